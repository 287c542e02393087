"""The destination of a live handoff after its ``ok``: the source's word decides,
and silence is taken as ``go`` only when no word is waiting to be read.

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
