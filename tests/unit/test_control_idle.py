"""Control connections cannot lock the socket out: idle ones are closed by a loop
timer, and at the connection limit a new one replaces the one idle the longest.

The loop runs in the test's own thread (``run_once``): waiting is for an
observable condition (a reply, an EOF) with a deadline, never a sleep.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.runtime.control import MAX_CLIENTS, ControlClient, ControlService
from appliance.runtime.loop import EventLoop

IDLE = 0.2  # seconds


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[ControlService, str, EventLoop]]:
    loop = EventLoop()
    path = str(tmp_path / "control.sock")
    svc = ControlService(loop, path, idle_timeout=IDLE)
    yield svc, path, loop
    svc.close()
    loop.close()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    return s


def closed_by_peer(s: socket.socket) -> bool:
    try:
        while s.recv(65536):  # (the QMP greeting, replies)
            pass
        return True
    except BlockingIOError:
        return False


def run_until(loop: EventLoop, cond: Callable[[], bool], timeout: float = 5.0) -> float:
    """Run the loop until ``cond()``; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        loop.run_once(0.01)
    return time.monotonic() - t0


def later(seconds: float) -> Callable[[], bool]:
    """A condition that holds once ``seconds`` have passed (the loop runs meanwhile)."""
    until = time.monotonic() + seconds
    return lambda: time.monotonic() >= until


def ask_status(loop: EventLoop, s: socket.socket) -> dict[str, object]:
    s.sendall(b'{"id": 1, "cmd": "status"}\n')
    buf = bytearray()

    def answered() -> bool:
        try:
            buf.extend(s.recv(65536))
        except BlockingIOError:
            pass
        return any(b'"id"' in line for line in buf.split(b"\n")[:-1])  # (not the greeting)

    run_until(loop, answered)
    reply: dict[str, object] = next(json.loads(line) for line in buf.split(b"\n")
                                    if b'"id"' in line)
    return reply


def test_silent_connection_is_closed_after_the_idle_timeout(
        service: tuple[ControlService, str, EventLoop], caplog: pytest.LogCaptureFixture) -> None:
    svc, path, loop = service
    with caplog.at_level(logging.INFO, "appliance.control"), connect(path) as s:
        took = run_until(loop, lambda: closed_by_peer(s))
    assert IDLE * 0.9 <= took < IDLE + 1.0
    assert svc.clients == []
    assert sum("control.idle_timeout" in r.getMessage() for r in caplog.records) == 1


def test_requests_and_replies_keep_a_connection_open(
        service: tuple[ControlService, str, EventLoop]) -> None:
    svc, path, loop = service
    with connect(path) as busy, connect(path) as silent:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * IDLE:  # a request every half idle period
            assert ask_status(loop, busy)["ok"] is True
            run_until(loop, later(IDLE / 2))
        assert closed_by_peer(silent)
        assert not closed_by_peer(busy) and len(svc.clients) == 1


def test_at_the_limit_a_new_connection_replaces_the_one_idle_longest(
        service: tuple[ControlService, str, EventLoop], caplog: pytest.LogCaptureFixture) -> None:
    svc, path, loop = service
    svc.idle_timeout = 3600.0
    held = []
    for _ in range(MAX_CLIENTS):
        held.append(connect(path))
        run_until(loop, lambda: len(svc.clients) == len(held))
    for s in held[1:]:  # all but the first have said something since
        assert ask_status(loop, s)["ok"] is True
    with caplog.at_level(logging.WARNING, "appliance.control"):
        newcomer = connect(path)
        assert ask_status(loop, newcomer)["ok"] is True
    assert closed_by_peer(held[0])
    assert not any(closed_by_peer(s) for s in held[1:])
    assert len(svc.clients) == MAX_CLIENTS
    assert len([r for r in caplog.records if "for a new one" in r.getMessage()]) == 1
    for s in [*held, newcomer]:
        s.close()


def _full_backlog(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose backlog is full: a non-blocking connect gets EAGAIN."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return listener, queued
        queued.append(s)


def test_control_client_retries_a_connect_while_the_backlog_is_full(tmp_path: Path) -> None:
    path = str(tmp_path / "full.sock")
    listener, queued = _full_backlog(path)
    with listener:
        t0 = time.monotonic()
        with pytest.raises(BlockingIOError):
            ControlClient(path, timeout=0.2)
        assert time.monotonic() - t0 >= 0.2  # it kept trying for its whole timeout
        drained = threading.Event()

        def drain() -> None:  # the appliance's loop accepting what waits
            while not drained.is_set():
                listener.settimeout(0.05)
                try:
                    listener.accept()[0].close()
                except TimeoutError:
                    pass

        worker = threading.Thread(target=drain)
        worker.start()
        try:
            ControlClient(path, timeout=5.0).close()  # connects once there is room
        finally:
            drained.set()
            worker.join()
    for s in queued:
        s.close()


def test_a_connection_waiting_for_a_deferred_answer_is_kept_without_a_busy_timer(
        service: tuple[ControlService, str, EventLoop],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A handoff may take longer than the idle timeout: its connection stays open,
    the idle sweep does not run again and again meanwhile, and once the answer
    is sent the connection is timed again."""
    from typing import Any

    from appliance.control import commands
    from appliance.control.protocol import Deferred

    svc, path, loop = service
    made: list[Deferred] = []

    def handler(_t: commands.Target, _args: dict[str, Any]) -> Deferred:
        made.append(Deferred())
        return made[-1]

    monkeypatch.setitem(commands.COMMANDS, "test.later", commands.Command(handler, {}))
    sweeps = []
    sweep = svc._sweep

    def counted(due: float) -> None:
        sweeps.append(due)
        sweep(due)

    monkeypatch.setattr(svc, "_sweep", counted)
    with connect(path) as s:
        s.sendall(b'{"id": 1, "cmd": "test.later"}\n')
        run_until(loop, lambda: len(made) == 1)
        run_until(loop, later(3 * IDLE))
        assert not closed_by_peer(s)
        assert len(sweeps) <= 3
        made[0].resolve(True)
        run_until(loop, lambda: closed_by_peer(s))
    assert svc.clients == []


def test_at_the_limit_a_connection_waiting_for_its_answer_is_not_the_one_closed(
        service: tuple[ControlService, str, EventLoop],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from typing import Any

    from appliance.control import commands
    from appliance.control.protocol import Deferred

    svc, path, loop = service
    svc.idle_timeout = 3600.0
    made: list[Deferred] = []

    def handler(_t: commands.Target, _args: dict[str, Any]) -> Deferred:
        made.append(Deferred())
        return made[-1]

    monkeypatch.setitem(commands.COMMANDS, "test.later", commands.Command(handler, {}))
    held = [connect(path)]
    held[0].sendall(b'{"id": 1, "cmd": "test.later"}\n')  # the oldest: it waits for a handoff
    run_until(loop, lambda: len(made) == 1)
    for _ in range(MAX_CLIENTS - 1):
        held.append(connect(path))
        run_until(loop, lambda: len(svc.clients) == len(held))
    newcomer = connect(path)
    assert ask_status(loop, newcomer)["ok"] is True
    assert closed_by_peer(held[1])  # silent the longest of those not waiting
    assert not closed_by_peer(held[0])
    made[0].resolve(True)
    buf = bytearray()
    run_until(loop, lambda: bool(buf.extend(held[0].recv(65536)) or buf.endswith(b"\n")))
    assert json.loads(buf)["result"] is True
    for s in [*held, newcomer]:
        s.close()
