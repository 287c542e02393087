"""Regressions found by fuzzing the control protocol (tests/fuzz/fuzz_control.py).

Every request line ends in a result or the protocol's own error reply
(ControlError); nothing else may escape ``parse_line`` or ``dispatch``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nvme_driver import make_controller

from appliance.control.commands import Target, dispatch
from appliance.control.faults import FaultSet
from appliance.control.protocol import ControlConnection, ControlError, Request, parse_line


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    ctrl = make_controller(tmp_path)
    yield Target(controller=ctrl, faults=FaultSet(clock=lambda: 0.0))
    ctrl.close()


def refused(target: Target, cmd: str, args: dict[str, Any]) -> str:
    with pytest.raises(ControlError) as info:
        dispatch(target, Request(1, cmd, args))
    return info.value.code


# ------------------------------------------------------------ fixed here (the fault rules)
@pytest.mark.parametrize("args", [
    {"action": "status", "count": float("inf")},  # JSON 1e999
    {"action": "status", "status": [1]},  # a list where a status is expected
    {"action": "status", "lba": [0, float("inf")]},
    {"action": "status", "probability": 10 ** 400},
    {"action": "delay", "delay": 10 ** 400},
], ids=["count-1e999", "status-list", "lba-1e999", "probability-big", "delay-big"])
def test_bad_fault_arguments_are_bad_args(target: Target, args: dict[str, Any]) -> None:
    assert refused(target, "fault.add", args) == "bad_args"
    assert target.faults is not None and target.faults.rules == []


def test_json_1e999_line_is_answered() -> None:
    """Refused by the line parser already (a number past a float), with an error reply."""
    conn = ControlConnection()
    conn.receive_data(b'{"id": 1, "cmd": "fault.add", "args": {"action": "status", "count": 1e999}}\n')
    reply = conn.next_event()
    assert isinstance(reply, bytes)
    assert json.loads(reply)["error"]["code"] == "bad_request"


# ------------------------------------------------------------ fixed in the control protocol
def test_deeply_nested_line_is_a_bad_request() -> None:
    with pytest.raises(ControlError) as info:
        parse_line(b'{"cmd": "status", "args": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert info.value.code == "bad_request"


def test_superscript_digit_rule_id_is_bad_args(target: Target) -> None:
    assert refused(target, "fault.clear", {"id": "\u00b2"}) == "bad_args"


def test_superscript_digit_nsid_is_bad_args(target: Target) -> None:
    assert refused(target, "namespace.resize", {"nsid": "\u00b2", "size": "2M"}) == "bad_args"


def test_replies_stay_json(target: Target) -> None:
    result = dispatch(target, Request(1, "fault.list", {}))
    assert json.loads(json.dumps(result)) == result
