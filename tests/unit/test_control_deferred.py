"""A command that answers later (a live handoff) holds up only its own connection.

The loop runs in the test's own thread, so every step is deterministic.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from test_control_backpressure import Service, connect, requests, service, spin

from appliance.control import commands
from appliance.control.protocol import FAILED, UNAVAILABLE, Deferred

__all__ = ["service"]  # the fixture


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Deferred]]:
    """A command ``test.later`` whose answer is a Deferred the test settles."""
    made: list[Deferred] = []

    def handler(_t: commands.Target, _args: dict[str, Any]) -> Deferred:
        made.append(Deferred())
        return made[-1]

    monkeypatch.setitem(commands.COMMANDS, "test.later", commands.Command(handler, {}))
    yield made


def replies(sock: socket.socket, buf: bytearray) -> list[dict[str, Any]]:
    try:
        buf += sock.recv(65536)
    except BlockingIOError:
        pass
    *lines, rest = bytes(buf).split(b"\n")
    buf[:] = rest
    return [r for r in map(json.loads, lines) if "QMP" not in r]  # not the greeting


def test_the_deferred_answer_comes_first_and_others_are_served_meanwhile(
        service: Service, later: list[Deferred]) -> None:
    _svc, path, loop = service
    asker, other = connect(path), connect(path)
    asker.sendall(requests(1, 1, "test.later") + requests(2, 3))
    spin(loop, lambda: len(later) == 1)
    got_asker: list[dict[str, Any]] = []
    got_other: list[dict[str, Any]] = []
    abuf, obuf = bytearray(), bytearray()
    other.sendall(requests(10, 2))
    spin(loop, lambda: bool(got_other.extend(replies(other, obuf))) or len(got_other) >= 2)
    assert [r["id"] for r in got_other] == [10, 11]  # another connection is served meanwhile
    for _ in range(20):
        loop.run_once(0)
    got_asker += replies(asker, abuf)
    assert got_asker == []  # nothing answered behind the deferred request
    later[0].resolve({"moved": True})
    spin(loop, lambda: bool(got_asker.extend(replies(asker, abuf))) or len(got_asker) >= 4)
    assert [r["id"] for r in got_asker] == [1, 2, 3, 4]
    assert got_asker[0] == {"id": 1, "ok": True, "result": {"moved": True}}
    asker.close()
    other.close()


def test_a_failed_deferred_is_an_error_reply(service: Service, later: list[Deferred]) -> None:
    _svc, path, loop = service
    sock = connect(path)
    sock.sendall(requests(1, 1, "test.later"))
    spin(loop, lambda: len(later) == 1)
    later[0].fail(FAILED, "the destination refused")
    got: list[dict[str, Any]] = []
    buf = bytearray()
    spin(loop, lambda: bool(got.extend(replies(sock, buf))) or len(got) >= 1)
    assert got == [{"id": 1, "ok": False, "error": {"code": FAILED,
                                                    "message": "the destination refused"}}]
    with pytest.raises(RuntimeError):
        later[0].resolve(None)  # once only
    sock.close()


def test_while_busy_only_status_and_fault_list_are_answered(service: Service) -> None:
    svc, path, loop = service
    svc.target.busy = "a live handoff is under way"
    sock = connect(path)
    sock.sendall(b"".join(json.dumps({"id": i, "cmd": cmd, "args": args}).encode() + b"\n"
                          for i, (cmd, args) in enumerate([
                              ("status", {}), ("fault.list", {}), ("fault.clear", {"id": 1}),
                              ("trace", {"on": True}), ("handoff", {"to": "/nowhere"})])))
    got: list[dict[str, Any]] = []
    buf = bytearray()
    spin(loop, lambda: bool(got.extend(replies(sock, buf))) or len(got) >= 5)
    assert [r["ok"] for r in got] == [True, True, False, False, False]
    for r in got[2:]:
        assert r["error"]["code"] == UNAVAILABLE
        assert r["error"]["message"].endswith("a live handoff is under way")
    sock.close()
