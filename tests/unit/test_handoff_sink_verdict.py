"""The destination of a live handoff on its failure paths: after its ``ok`` the
source's word decides, and silence is taken as ``go`` only when no word is
waiting to be read; before it, a refusal always ends with every fd closed; a
channel socket whose accept fails ends the pending handoff.

The destination (:class:`Incoming`) runs on a real event loop in the test's
thread, over a socketpair; the appliance around it is a stand-in recording
what it is told to do."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from appliance.runtime.handoff.frames import ABORT, GO
from appliance.runtime.handoff.sink import Incoming, Phase
from appliance.runtime.loop import EventLoop


class StandIn:
    """What :class:`Incoming` calls on the appliance, recorded."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.migratable = self
        self.calls: list[str] = []

    def migration_fingerprint(self) -> bytes:
        return bytes(32)

    def handoff_release(self) -> None:
        self.calls.append("release")

    def handoff_start(self) -> None:
        self.calls.append("start")


@pytest.fixture
def verdict() -> Iterator[tuple[Incoming, StandIn, socket.socket]]:
    """An Incoming that said ok and waits for the verdict; the source's end."""
    loop = EventLoop()
    app = StandIn(loop)
    ours, source = socket.socketpair()
    done: list[bool] = []
    incoming = Incoming(app, ours, False, lambda: done.append(True))  # type: ignore[arg-type]
    incoming.phase = Phase.VERDICT
    yield incoming, app, source
    source.close()
    incoming.end.close()
    loop.close()


def test_an_abort_waiting_when_the_timeout_fires_is_an_abort(
        verdict: tuple[Incoming, StandIn, socket.socket]) -> None:
    incoming, app, source = verdict
    source.sendall(ABORT)  # arrived after the loop looked, before its timer ran
    incoming._failed(TimeoutError(errno.ETIMEDOUT, "no progress"))
    assert app.calls == ["release"] and incoming.phase is Phase.DONE


@pytest.mark.parametrize("said", [GO, b""])
def test_go_or_silence_when_the_timeout_fires_is_go(
        verdict: tuple[Incoming, StandIn, socket.socket], said: bytes) -> None:
    incoming, app, source = verdict
    source.sendall(said)
    incoming._failed(TimeoutError(errno.ETIMEDOUT, "no progress"))
    assert app.calls == ["start"] and incoming.phase is Phase.DONE


def test_a_refusal_closes_the_fds_and_ends_even_if_forgetting_the_records_fails(
        verdict: tuple[Incoming, StandIn, socket.socket]) -> None:
    """Before the ok: whatever forgetting the loaded records raises, every fd
    received is closed, the source is told and the destination is idle again."""
    import os

    from appliance.runtime.handoff.frames import HandoffError

    incoming, app, source = verdict

    def abort_restore() -> None:
        raise RuntimeError("abort_restore")

    app.abort_restore = abort_restore  # type: ignore[attr-defined]
    incoming.phase = Phase.READING
    r, w = os.pipe()
    incoming.fds = [r, w]
    ended: list[bool] = []
    incoming.done = lambda: ended.append(True)
    with pytest.raises(RuntimeError):
        incoming._refuse(HandoffError("bad stream"))
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)
    assert incoming.fds == [] and ended == [True] and incoming.phase is Phase.DONE
    assert b"bad stream" in source.recv(4096)


def test_a_failing_accept_on_the_channel_socket_ends_the_pending_handoff(
        tmp_path: object) -> None:
    """The channel socket takes one connection; an accept that fails (out of
    fds, say) would fail again on every loop pass: the pending handoff ends,
    the socket is closed and the commands are served again."""
    import os
    from types import SimpleNamespace

    from appliance.control.commands import Target
    from appliance.runtime.handoff.sink import HandoffSink

    class Failing(socket.socket):
        def accept(self) -> tuple[socket.socket, object]:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    loop = EventLoop()
    app = SimpleNamespace(loop=loop, control=SimpleNamespace(target=Target(busy="arriving")))
    sink = HandoffSink(app)  # type: ignore[arg-type]
    listener = Failing(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{tmp_path}/chan.sock")
    listener.listen(1)
    sink.listener = listener
    loop.add_reader(listener.fileno(), sink._incoming)
    sink._incoming()
    assert sink.listener is None and listener.fileno() == -1
    assert sink.current is None and app.control.target.busy == ""
    loop.close()
