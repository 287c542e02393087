"""Control socket replies never block the loop: clients that do not read their replies.

The loop runs in the test's own thread (``run_once``), so every step is
deterministic: no threads, no timing thresholds.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nvme_driver import make_controller

from appliance.control.faults import FaultSet
from appliance.runtime import control
from appliance.runtime.control import ControlClient, ControlService
from appliance.runtime.loop import EventLoop

Service = tuple[ControlService, str, EventLoop]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    ctrl = make_controller(tmp_path, io_queues=2, queue_entries=64)
    ctrl.faults = FaultSet(clock=lambda: 0.0)
    loop = EventLoop()
    path = str(tmp_path / "control.sock")
    svc = ControlService(loop, path, controller=ctrl)
    yield svc, path, loop
    svc.close()
    loop.close()
    ctrl.close()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    return s


def requests(first: int, n: int, cmd: str = "status") -> bytes:
    return b"".join(json.dumps({"id": i, "cmd": cmd}).encode() + b"\n"
                    for i in range(first, first + n))


def spin(loop: EventLoop, done: Callable[[], bool], passes: int = 200) -> None:
    """Run loop passes until ``done()`` (each pass handles what is ready, nothing waits)."""
    for _ in range(passes):
        if done():
            return
        loop.run_once(0)
    assert done(), f"not reached in {passes} loop passes"


class Lines:
    """The reply lines a non-blocking client socket has received so far."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf, self.got = sock, bytearray(), []

    def poll(self) -> list[dict[str, Any]]:
        try:
            while chunk := self.sock.recv(65536):
                self.buf += chunk
        except BlockingIOError:
            pass
        *lines, rest = bytes(self.buf).split(b"\n")
        self.buf[:] = rest
        self.got += [r for r in map(json.loads, lines) if "QMP" not in r]  # not the greeting
        return self.got


def test_client_that_does_not_read_cannot_stall_the_others(service: Service) -> None:
    svc, path, loop = service
    lazy = connect(path)
    spin(loop, lambda: len(svc.clients) == 1)
    slow = svc.clients[0]
    # Pipeline status requests and read nothing until replies pile up in the appliance
    # (the socket's own buffer is full). Batches, so the backlog stays under the cap.
    sent = 0
    while not slow.out:
        assert sent < 20000, "replies never backed up"
        lazy.sendall(requests(sent + 1, 20))
        sent += 20
        loop.run_once(0)
    assert slow in svc.clients and slow.writing
    lazy.sendall(requests(sent + 1, 1, "fault.list"))  # not read: its replies are pending

    other = connect(path)
    other.sendall(b'{"id": "b", "cmd": "fault.list"}\n')
    answered = Lines(other)
    spin(loop, lambda: bool(answered.poll()))
    assert [(r["id"], r["ok"]) for r in answered.got] == [("b", True)]
    assert slow in svc.clients and slow.out, "the first client's replies are still unread"

    # The lazy client reads at last: every reply, in order, then the late request's.
    replies = Lines(lazy)
    spin(loop, lambda: len(replies.poll()) == sent + 1, passes=100000)
    assert [r["id"] for r in replies.got] == list(range(1, sent + 2))
    assert all(r["ok"] for r in replies.got)
    assert not slow.out and not slow.writing  # reading again
    lazy.sendall(requests(1000000, 1, "fault.list"))
    spin(loop, lambda: replies.poll()[-1]["id"] == 1000000)
    lazy.close()
    other.close()


def test_client_over_the_output_cap_is_disconnected_and_service_goes_on(
        service: Service, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    svc, path, loop = service
    # Requests are answered a batch per loop pass and only while the socket takes the
    # replies, so what piles up is at most one batch: a cap below that is passed.
    monkeypatch.setattr(control, "MAX_OUTPUT", 1024)
    flood = connect(path)
    spin(loop, lambda: len(svc.clients) == 1)
    # A small kernel share, so the outcome does not depend on net.core.wmem_default.
    svc.clients[0].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    # One burst: far more replies than socket buffer + cap.
    flood.sendall(requests(1, 1500))
    with caplog.at_level(logging.WARNING, logger="appliance.control"):
        spin(loop, lambda: not svc.clients)
    assert "replies unread" in caplog.text and "disconnected" in caplog.text
    buf = bytearray()
    flood.setblocking(True)
    flood.settimeout(10)
    while chunk := flood.recv(65536):  # what the socket held, then end of file
        buf += chunk
    replies = [json.loads(line) for line in bytes(buf).split(b"\n")[1:-1]]  # after the greeting
    assert 0 < len(replies) < 1500 and [r["id"] for r in replies] == list(range(1, len(replies) + 1))
    flood.close()

    other = connect(path)
    other.sendall(b'{"id": 7, "cmd": "status"}\n')
    answered = Lines(other)
    spin(loop, lambda: bool(answered.poll()))
    assert answered.got[0]["id"] == 7 and answered.got[0]["ok"]
    other.close()


def test_blocking_client_round_trips_unchanged(service: Service) -> None:
    """The ``appliance ctl`` client: one request, one reply, many times."""
    _, path, loop = service
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            loop.run_once(0.05)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with ControlClient(path) as client:
            for _ in range(50):
                assert client("status")["nvme"]["state"]
    finally:
        stop.set()
        t.join()


def test_a_pipelined_burst_takes_turns_with_other_clients(service: Service) -> None:
    """A read of thousands of requests is answered a batch per loop pass: another
    client's request, sent after the burst, is answered long before the burst is."""
    svc, path, loop = service
    burst, other = connect(path), connect(path)
    spin(loop, lambda: len(svc.clients) == 2)
    burst.sendall(requests(1, 1500))
    replies = Lines(burst)
    spin(loop, lambda: bool(replies.poll()))  # the burst is being answered
    other.sendall(b'{"id": "o", "cmd": "fault.list"}\n')
    answered = Lines(other)
    passes = 0
    while not answered.poll():
        loop.run_once(0)
        replies.poll()
        passes += 1
    assert passes <= 3 and len(replies.got) < 1500 - control.BATCH
    spin(loop, lambda: len(replies.poll()) == 1500, passes=1000)
    assert [r["id"] for r in replies.got] == list(range(1, 1501))
    burst.close()
    other.close()
