"""Hostile control-socket clients against a real ``appliance run``: idle
connections cannot lock ``appliance ctl`` out, and no nesting, number or
argument type gets anything but an error reply.  Each case ends with
:meth:`hostile.HostileTarget.assert_healthy`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hostile import HostileTarget, wait_until

IDLE_CLIENTS = 20  # more than the appliance's 16 connections


def no_traceback_anywhere(target: HostileTarget) -> None:
    """The whole log (assert_healthy reads its tail) holds no traceback."""
    text = target.proc.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-4000:]


def exchange(target: HostileTarget, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send ``lines`` pipelined on one connection; one reply per line, in order."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10.0)
        s.connect(target.control_sock)
        s.sendall(b"".join(line + b"\n" for line in lines))
        buf = b""
        while buf.count(b"\n") < len(lines) + 1:  # the QMP greeting, then the replies
            chunk = s.recv(1 << 16)
            assert chunk, f"closed after {len(buf.splitlines())} lines"
            buf += chunk

    def strict(name: str) -> None:
        raise AssertionError(f"reply carries {name}")

    greeting, *replies = [json.loads(line, parse_constant=strict) for line in buf.splitlines()]
    assert "QMP" in greeting
    return replies


def request(cmd: str, args: Any, request_id: Any = 7) -> bytes:
    return json.dumps({"id": request_id, "cmd": cmd, "args": args}).encode()


def test_idle_connections_cannot_lock_ctl_out(target: HostileTarget) -> None:
    held = []
    try:
        for _ in range(IDLE_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(s)
            s.connect(target.control_sock)
        target.check_control()  # served within 100 ms while they are held
        ctl = subprocess.run([sys.executable, "-m", "appliance", "ctl", "status",
                              "-c", str(target.proc.config_path)],
                             check=False, capture_output=True, timeout=30)
        assert ctl.returncode == 0, ctl.stderr
        assert "nvme" in json.loads(ctl.stdout)
    finally:
        for s in held:
            s.close()
    no_traceback_anywhere(target)
    target.assert_healthy()


def test_deep_nesting_gets_an_error_reply(target: HostileTarget) -> None:
    lines = [b"[" * 100_000 + b"]" * 100_000,  # past the line limit as well
             b"[" * 30_000 + b"]" * 30_000,  # within it: deep enough to exhaust recursion
             b'{"id": 1, "cmd": "status", "args": {"a": ' + b"{" * 20_000,
             request("fault.add", {"action": "status", "lba": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[
                 ]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}),
             request("status", {})]
    replies = exchange(target, lines)
    assert [r["ok"] for r in replies] == [False] * 4 + [True]
    assert [r["error"]["code"] for r in replies[:4]] == [
        "line_too_long", "bad_request", "bad_request", "bad_request"]
    no_traceback_anywhere(target)
    target.assert_healthy()


NUMBER_CASES = [
    (b'{"id": 1e999, "cmd": "status"}', "bad_request"),
    (b'{"id": 1, "cmd": "fault.add", "args": {"action": "delay", "delay": 1e999}}', "bad_request"),
    (b'{"id": NaN, "cmd": "status"}', "bad_request"),
    (b'{"id": 1, "cmd": "fault.add", "args": {"action": "status", "probability": NaN}}',
     "bad_request"),
    (b'{"id": 1, "cmd": "fault.add", "args": {"action": "status", "count": Infinity}}',
     "bad_request"),
    (b'{"id": 1, "cmd": "fault.add", "args": {"action": "status", "count": -Infinity}}',
     "bad_request"),
    (b'{"id": 1, "cmd": "fault.clear", "args": {"id": ' + b"9" * 5000 + b"}}", "bad_request"),
    (b'{"id": ' + b"1" * 5000 + b', "cmd": "status"}', "bad_request"),
    (request("fault.clear", {"id": "9" * 5000}), "bad_args"),
    (request("fault.clear", {"id": "²"}), "bad_args"),
    (request("fault.clear", {"id": True}), "bad_args"),
    (request("fault.add", {"action": "status", "count": "²"}), "bad_args"),
    (request("fault.add", {"action": "status", "qid": True}), "bad_args"),
    (request("fault.add", {"action": "status", "opcode": "0x" + "f" * 4000}), "bad_args"),
    (request("fault.add", {"action": "status", "status": [1, 2]}), "bad_args"),
    (request("fault.add", {"action": "status", "status": {"sct": 2}}), "bad_args"),
    (request("fault.add", {"action": "status", "lba": {"a": 1}}), "bad_args"),
    (request("fault.add", {"action": "status", "seed": 1e300}), "bad_args"),
    (request("fault.add", {"action": "delay", "delay": [1]}), "bad_args"),
    (request("fault.add", {"action": "drop", "port": {"p": 0}}), "bad_args"),
    (request("fault.add", {"action": "fatal", "now": [True]}), "bad_args"),
    (request("trace", {"on": {"x": 1}}), "bad_args"),
    (request("link", {"state": [1], "port": "net0"}), "bad_args"),
    (request("namespace.resize", {"nsid": "²", "size": "128M"}), "bad_args"),
    (request("namespace.resize", {"nsid": False, "size": "128M"}), "bad_args"),
    (request("handoff", {"to": ["/tmp/x"]}), "bad_args"),
    (request("status", {}, request_id=[1]), "bad_request"),
]


def test_hostile_numbers_and_types_get_error_replies(target: HostileTarget) -> None:
    lines = [line for line, _ in NUMBER_CASES] + [request("status", {})]
    replies = exchange(target, lines)
    got = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
    assert got == [code for _, code in NUMBER_CASES] + ["ok"]
    for (line, code), reply in zip(NUMBER_CASES, replies):
        if code == "bad_args":  # the message names the argument
            args = json.loads(line)["args"]
            assert reply["error"]["message"].split(":")[0] in args, (line[:80], reply)
    no_traceback_anywhere(target)
    target.assert_healthy()


RESIZE_CASES = [
    (10 ** 30, "bad_request"),  # past the protocol's integers
    ((1 << 64) - 1, "bad_args"),
    ((1 << 62), "failed"),  # in range, but no file system holds it
    ("9" * 4290 + "T", "bad_args"),
    ("1" * 30 + "T", "bad_args"),
    (-512, "bad_args"),
    (1000, "bad_args"),  # not a multiple of the block size
    ("1K", "bad_args"),  # smaller than now
    ("²", "bad_args"),
    (True, "bad_args"),
    ([128], "bad_args"),
    (None, "bad_args"),  # null is absent, and size is required
]


def test_huge_negative_or_odd_resize_is_refused_naming_size(target: HostileTarget) -> None:
    lines = [request("namespace.resize", {"size": size}) for size, _ in RESIZE_CASES]
    replies = exchange(target, lines)
    assert [r["error"]["code"] for r in replies] == [code for _, code in RESIZE_CASES]
    for (size, code), reply in zip(RESIZE_CASES, replies):
        if code != "bad_request":
            assert reply["error"]["message"].startswith("size: "), (size, reply)
    no_traceback_anywhere(target)
    target.assert_healthy()


def test_handoff_to_its_own_sockets_is_refused_at_once(target: HostileTarget) -> None:
    """Else the loop would wait on itself (a blocking request) for the handoff timeout."""
    own = [target.control_sock, target.port_sock("p0"), target.nvme_sock]
    t0 = time.monotonic()
    replies = exchange(target, [request("handoff", {"to": path}) for path in own])
    assert time.monotonic() - t0 < 2.0
    for reply in replies:
        assert reply["ok"] is False and reply["error"]["code"] == "failed", reply
        assert "socket of this process" in reply["error"]["message"]
    no_traceback_anywhere(target)
    target.assert_healthy()


def test_rule_flood_is_capped(target: HostileTarget) -> None:
    """A client arming rules without end is refused past the cap; clearing frees it."""
    never = {"action": "status", "qid": 9, "lba": [1 << 40, 1 << 40]}  # matches no health I/O
    replies = exchange(target, [request("fault.add", never)] * 300)
    assert sum(r["ok"] for r in replies) == 256
    assert {r["error"]["code"] for r in replies[256:]} == {"bad_args"}
    cleared, = exchange(target, [request("fault.clear", {})])
    assert cleared["result"] == {"cleared": 256}
    no_traceback_anywhere(target)
    target.assert_healthy()


def test_silent_connection_is_closed_after_control_idle_timeout(tmp_path: Path) -> None:
    with HostileTarget(tmp_path, control={"idle_timeout": 1}) as target:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10.0)
            s.connect(target.control_sock)
            t0 = time.monotonic()
            greeting = s.recv(1 << 16)  # said on connect, then nothing
            assert greeting.startswith(b'{"QMP":') and greeting.endswith(b"\r\n")
            assert s.recv(1) == b""  # closed by the appliance, not by us
            took = time.monotonic() - t0
        assert 0.9 <= took < 5.0, took
        no_traceback_anywhere(target)
        target.assert_healthy()


def test_pipelined_flood_does_not_starve_other_peers(target: HostileTarget) -> None:
    """Bursts of 64 KiB of status requests (replies read): control, vhost-user and
    vfio-user peers are still served within 100 ms meanwhile."""
    line = b'{"cmd": "status"}\n'
    burst = line * ((64 << 10) // len(line))
    rounds = 3
    answered = [0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as flood:
        flood.connect(target.control_sock)

        def drain() -> None:
            while chunk := flood.recv(1 << 20):
                answered[0] += chunk.count(b"\n")

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        for _ in range(rounds):
            flood.sendall(burst)
            target.assert_served()
        expected = rounds * (len(burst) // len(line))
        assert wait_until(lambda: answered[0] >= expected, 60.0), answered
        flood.shutdown(socket.SHUT_RDWR)
        reader.join(10.0)
    no_traceback_anywhere(target)
    target.assert_healthy()


QMP_CASES = [
    b'{"execute": "status"',  # never closed: the newline ends it
    b'{"execute": }',
    b"[" * 30_000 + b"]" * 30_000,
    b'{"execute": "status", "id": 1e999}',
    b'{"execute": "status", "id": NaN}',
    b'{"execute": ["status"], "id": 1}',
    b'{"execute": "status", "arguments": "all", "id": 1}',
    b'{"exec-oob": "status", "id": 1}',
    b'{"execute": "status", "cmd": "status", "id": 1}',
    b'{"execute": "qmp_capabilities", "id": 1}',  # again
    b'{"execute": "fault.add", "id": 1}',  # the dotted name is not a QMP name
    b'{"execute": "fault-add", "arguments": {"action": "status", "count": "\xc2\xb2"}, "id": 1}',
    b'{"execute": "namespace-resize", "arguments": {"size": [1]}, "id": 1}',
    b'"status"',
    b"\xff\xfe",
]


def test_hostile_qmp_input_gets_qmp_errors(target: HostileTarget) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10.0)
        s.connect(target.control_sock)
        wire = b'{"execute": "qmp_capabilities"}' + b"".join(c + b"\n" for c in QMP_CASES)
        s.sendall(wire + b'{"execute": "status", "id": "last"}')  # no newline after it
        buf = b""
        while buf.count(b"\r\n") < len(QMP_CASES) + 3:
            chunk = s.recv(1 << 16)
            assert chunk, buf[-400:]
            buf += chunk
    greeting, caps, *replies, last = [json.loads(line) for line in buf.split(b"\r\n")[:-1]]
    assert "QMP" in greeting and caps == {"return": {}}
    assert last["id"] == "last" and "nvme" in last["return"]
    for case, reply in zip(QMP_CASES, replies, strict=True):
        assert set(reply) <= {"error", "id"} and set(reply["error"]) >= {"class", "desc"}, case
        assert reply["error"]["class"] in ("GenericError", "CommandNotFound"), case
    no_traceback_anywhere(target)
    target.assert_healthy()
