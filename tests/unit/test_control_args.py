"""Control command arguments: every hostile value gets a bad_args reply naming it,
never an exception past the refusal paths (the service would log a traceback)."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nvme_driver import make_controller

from appliance.control import args as a
from appliance.control.commands import COMMANDS, Target, dispatch
from appliance.control.faults import FaultSet
from appliance.control.protocol import (
    BAD_ARGS,
    BAD_REQUEST,
    FAILED,
    UNAVAILABLE,
    ControlConnection,
    ControlError,
    Request,
    reply_error,
    reply_ok,
)

CODES = {BAD_ARGS, BAD_REQUEST, FAILED, UNAVAILABLE}


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    ctrl = make_controller(tmp_path, io_queues=2, queue_entries=64)
    faults = FaultSet(clock=lambda: 0.0)
    ctrl.faults = faults
    level = logging.getLogger("appliance").level
    yield Target(controller=ctrl, faults=faults)
    logging.getLogger("appliance").setLevel(level)  # trace may have been switched
    ctrl.close()


def refused(t: Target, cmd: str, **args: Any) -> ControlError:
    with pytest.raises(ControlError) as info:
        dispatch(t, Request(1, cmd, args))
    return info.value


HUGE = [10 ** 30, -(10 ** 30), 1 << 64]
NOT_INTEGERS = [True, False, 1.5, 1e300, float("inf"), float("nan"), "²", "٣x", "1" * 5000,
                "0x" + "f" * 4000, [], [1], {"a": 1}, ""]


@pytest.mark.parametrize("size", [*HUGE, -512, 0, 1000, (1 << 63) + 512, "1" * 25 + "T",
                                  "9" * 4290 + "T", "-5M", *NOT_INTEGERS])
def test_resize_with_a_bad_size_names_the_argument(target: Target, size: Any) -> None:
    err = refused(target, "namespace.resize", size=size)
    assert err.code == BAD_ARGS and err.message.startswith("size: "), err.message


@pytest.mark.parametrize("nsid", [*HUGE, 0, -1, 5, *NOT_INTEGERS])
def test_resize_with_a_bad_nsid_names_the_argument(target: Target, nsid: Any) -> None:
    err = refused(target, "namespace.resize", size="2M", nsid=nsid)
    assert err.code == BAD_ARGS and err.message.startswith("nsid: "), err.message


def test_resize_that_the_file_system_refuses_fails_naming_the_size(target: Target) -> None:
    err = refused(target, "namespace.resize", size=(1 << 62))  # far past ext4/xfs file sizes
    assert err.code in (FAILED,) and err.message.startswith("size: "), err.message


@pytest.mark.parametrize("field", ["count", "qid", "opcode", "nsid", "status", "seed", "lba",
                                   "probability", "delay", "dnr"])
@pytest.mark.parametrize("value", [*HUGE, *NOT_INTEGERS[:-1]])  # "" is a name-less status
def test_fault_fields_with_bad_values_name_the_field(target: Target, field: str,
                                                     value: Any) -> None:
    args = {"action": "delay", "delay": 1, field: value}
    if field in ("probability", "delay") and value in (True, False, 1.5):
        return  # numbers (bools are not: checked below with a real bool)
    if field == "dnr" and value in (True, False):
        return
    err = refused(target, "fault.add", **args)
    assert err.code == BAD_ARGS and err.message.startswith(f"{field}: "), err.message


@pytest.mark.parametrize("cmd, args, name", [
    ("fault.add", {"action": "status", "probability": True}, "probability"),
    ("fault.add", {"action": "drop", "port": [1]}, "port"),
    ("fault.add", {"action": "drop", "direction": {}}, "direction"),
    ("fault.add", {"action": "fatal", "now": [1]}, "now"),
    ("fault.add", {"action": [1]}, "action"),
    ("fault.add", {"action": "status", "target": {"a": 1}}, "target"),
    ("fault.clear", {"id": "²"}, "id"),
    ("fault.clear", {"id": True}, "id"),
    ("fault.clear", {"id": 1.0}, "id"),
    ("trace", {"on": [1]}, "on"),
    ("trace", {"on": 2}, "on"),
    ("link", {"state": {}}, "state"),
    ("link", {"state": "up", "port": 7}, "port"),
    ("handoff", {"to": 5}, "to"),
    ("handoff", {}, "to"),
    ("handoff.accept", {"version": "²"}, "version"),
    ("namespace.resize", {}, "size"),
])
def test_wrong_types_name_the_argument(target: Target, cmd: str, args: dict[str, Any],
                                       name: str) -> None:
    err = refused(target, cmd, **args)
    assert err.code == BAD_ARGS and err.message.startswith(f"{name}: "), err.message


def test_checkers_accept_what_the_command_line_sends() -> None:
    assert a.integer(0, 255)("opcode", "0x02") == 2
    assert a.integer(-5, 5)("n", " -3 ") == -3
    assert a.number(0, 1)("p", "0.25") == 0.25 and a.number(0, 10)("d", 3) == 3.0
    assert a.flag("on", "Up") is True and a.flag("on", 0) is False
    assert a.size(1, 1 << 40)("size", "128M") == 128 << 20
    assert a.shown(1 << 200) == "an integer of 201 bits" and len(a.shown("x" * 1000)) == 60


# ---------------------------------------------------------------- property style
def _scalar(rng: random.Random) -> Any:
    return rng.choice([
        0, 1, -1, 7, 512, 4096, 2 << 20, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1, 1 << 64,
        10 ** 30, rng.randrange(-(1 << 70), 1 << 70), rng.randrange(1 << 16),
        0.5, -0.0, 1e308, 5e-324, float("inf"), float("-inf"), float("nan"), rng.uniform(-1e6, 1e6),
        True, False, None,
        "", "²", "١٢٣", "0x1f", "0x", "-5", "1e999", "NaN", "on", "off", "up", "down", "8-15",
        "9-3", "128M", "2M", "1" * 25 + "T", "9" * 5000, "0x" + "f" * 4000, "status", "drop",
        "delay", "fatal", "remove", "hang", "net", "nvme", "rx", "both", "net0", "p0",
        "unrecovered_read_error", "/nonexistent/ctl.sock", "\x00", "\ud800",
        "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(8))),
    ])


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.random()
    if depth < 3 and kind < 0.12:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 3 and kind < 0.2:
        return {str(_scalar(rng)): _value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return _scalar(rng)


def _answer(target: Target, line: bytes) -> dict[str, Any]:
    """What the control service answers to one line (its _answer without the socket)."""
    conn = ControlConnection()
    conn.receive_data(line + b"\n")
    event = conn.next_event()
    assert event is not None
    if isinstance(event, bytes):
        reply = event
    else:
        try:
            reply = reply_ok(event.id, dispatch(target, event))
        except ControlError as exc:
            reply = reply_error(event.id, exc.code, exc.message)

    def no_constant(name: str) -> None:
        raise AssertionError(f"reply carries {name}: {reply!r}")

    out: dict[str, Any] = json.loads(reply, parse_constant=no_constant)
    return out


def test_random_values_in_every_argument_of_every_command_get_a_reply(
        target: Target, caplog: pytest.LogCaptureFixture) -> None:
    """Any JSON value in any argument: a well-formed ok or error reply, nothing raised."""
    rng = random.Random(20261204)
    names = {cmd: sorted(command.args) or ["bogus"] for cmd, command in COMMANDS.items()}
    replies = 0
    with caplog.at_level(logging.WARNING):
        for _ in range(150):
            for cmd in COMMANDS:
                if cmd == "handoff.accept":  # would open a transfer socket when it matches
                    continue
                count = rng.randrange(1, min(4, len(names[cmd])) + 1)
                args = {name: _value(rng) for name in rng.sample(names[cmd], count)}
                if rng.random() < 0.1:
                    args["bogus"] = 1
                if cmd == "fault.add" and rng.random() < 0.5:
                    args["action"] = rng.choice(["status", "delay", "drop", "hang"])
                line = json.dumps({"id": _scalar(rng), "cmd": cmd, "args": args},
                                  ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
                reply = _answer(target, line)
                assert reply["ok"] is True or reply["error"]["code"] in CODES, reply
                if not reply["ok"]:
                    assert isinstance(reply["error"]["message"], str)
                replies += 1
    assert replies == 150 * (len(COMMANDS) - 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
