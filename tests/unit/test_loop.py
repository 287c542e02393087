"""EventLoop readers and writers: one selector key per fd, both directions on it."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator

import pytest

from appliance.runtime.loop import EventLoop


@pytest.fixture
def pair() -> Iterator[tuple[EventLoop, socket.socket, socket.socket]]:
    loop = EventLoop()
    a, b = socket.socketpair()
    a.setblocking(False)
    yield loop, a, b
    loop.close()
    a.close()
    b.close()


def test_reader_and_writer_on_one_fd_both_fire(pair: tuple[EventLoop, socket.socket, socket.socket]) -> None:
    loop, a, b = pair
    calls: list[str] = []
    loop.add_reader(a.fileno(), lambda: calls.append("r") or a.recv(100))
    loop.add_writer(a.fileno(), lambda: calls.append("w"))
    loop.run_once(0)
    assert calls == ["w"]  # writable, nothing to read
    b.send(b"x")
    calls.clear()
    loop.run_once(0)
    assert calls == ["r", "w"]


def test_removing_one_side_keeps_the_other(pair: tuple[EventLoop, socket.socket, socket.socket]) -> None:
    loop, a, b = pair
    calls: list[str] = []
    loop.add_reader(a.fileno(), lambda: calls.append("r") or a.recv(100))
    loop.add_writer(a.fileno(), lambda: calls.append("w"))
    loop.remove_writer(a.fileno())
    b.send(b"x")
    loop.run_once(0)
    assert calls == ["r"]
    loop.add_writer(a.fileno(), lambda: calls.append("w2"))
    loop.remove_reader(a.fileno())
    b.send(b"y")
    calls.clear()
    loop.run_once(0)
    assert calls == ["w2"]
    loop.remove_writer(a.fileno())
    calls.clear()
    loop.run_once(0)
    assert calls == []
    loop.remove_writer(a.fileno())  # not watched: no-op, as remove_reader always was
    loop.remove_reader(a.fileno())


def test_a_second_reader_or_writer_is_refused(pair: tuple[EventLoop, socket.socket, socket.socket]) -> None:
    loop, a, _ = pair
    loop.add_reader(a.fileno(), lambda: None)
    with pytest.raises(KeyError):
        loop.add_reader(a.fileno(), lambda: None)
    loop.add_writer(a.fileno(), lambda: None)
    with pytest.raises(KeyError):
        loop.add_writer(a.fileno(), lambda: None)


def test_reader_that_drops_the_writer_stops_it_in_the_same_pass(
        pair: tuple[EventLoop, socket.socket, socket.socket]) -> None:
    loop, a, b = pair
    calls: list[str] = []

    def reader() -> None:
        calls.append("r")
        a.recv(100)
        loop.remove_writer(a.fileno())

    loop.add_reader(a.fileno(), reader)
    loop.add_writer(a.fileno(), lambda: calls.append("w"))
    b.send(b"x")
    loop.run_once(0)
    assert calls == ["r"]


def test_a_failing_reader_does_not_stop_the_writer(
        pair: tuple[EventLoop, socket.socket, socket.socket]) -> None:
    loop, a, b = pair
    calls: list[str] = []

    def reader() -> None:
        a.recv(100)
        raise RuntimeError("bug")

    loop.add_reader(a.fileno(), reader)
    loop.add_writer(a.fileno(), lambda: calls.append("w"))
    b.send(b"x")
    loop.run_once(0)
    assert calls == ["w"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_closes_the_signal_wakeup_pipe_and_restores_the_old_fd() -> None:
    before = _open_fds()
    outer_r, outer_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = signal.set_wakeup_fd(outer_w)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        loop = EventLoop()
        loop.install_signal_handlers()
        loop.install_signal_handlers()  # a second call opens nothing more
        assert _open_fds() - before == 2 + 2 + 1  # ours, the loop's pipe, its epoll
        loop.close()
        assert signal.set_wakeup_fd(outer_w) == outer_w  # given back to the previous owner
        assert _open_fds() - before == 2  # only ours
    finally:
        signal.set_wakeup_fd(previous)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.close(outer_r)
        os.close(outer_w)
    assert _open_fds() == before
