"""The source of a live handoff always ends what it started: an error while it
asks, while it undoes a failed handoff or while it lets go after the ok still
ends the handoff (the operator answered, Target.busy cleared, the destination
told go after its ok).

The appliance around :class:`HandoffSource` / :class:`Outgoing` is a stand-in
whose one method in use fails."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from appliance.control.commands import Target
from appliance.runtime.handoff.source import HandoffSource


class Broken(Exception):
    pass


def test_an_unexpected_error_while_asking_leaves_no_handoff_under_way(tmp_path: Path) -> None:
    def fingerprint() -> bytes:
        raise Broken("no fingerprint")

    cfg = SimpleNamespace(control=SimpleNamespace(socket=str(tmp_path / "c.sock")),
                          storage=SimpleNamespace(socket=str(tmp_path / "s.sock")),
                          net=SimpleNamespace(ports=()))
    app = SimpleNamespace(cfg=cfg, control=SimpleNamespace(target=Target()),
                          handoff_blocker=lambda: "",
                          migratable=SimpleNamespace(migration_fingerprint=fingerprint))
    source = HandoffSource(app)  # type: ignore[arg-type]
    finished: list[object] = []
    with pytest.raises(Broken):
        source.start(str(tmp_path / "other.sock"), lambda *a: finished.append(a))
    assert not source.active and app.control.target.busy == "" and finished == []


def test_a_failing_resume_still_answers_the_handoff() -> None:
    """Whatever undoing the handoff raises, ``finished`` is called once: the
    operator's Deferred settles and Target.busy is cleared."""
    from appliance.runtime.handoff.frames import HandoffError
    from appliance.runtime.handoff.source import Outgoing, Phase

    def resume() -> None:
        raise Broken("resume")

    app = SimpleNamespace(handoff_resume=resume)
    finished: list[tuple[object, object]] = []
    out = Outgoing(app, "/nowhere", 1.0, lambda r, e: finished.append((r, e)))  # type: ignore[arg-type]
    out.phase, out.paused = Phase.FINAL, True
    error = HandoffError("the destination went away")
    with pytest.raises(Broken):
        out._fail(error)
    assert finished == [(None, error)] and out.phase is Phase.DONE


def test_a_failing_release_after_the_ok_still_says_go_and_answers() -> None:
    """After the destination's ok the devices live there: whatever letting go of
    our copies raises, the destination is told go and the operator answered."""
    import socket

    from appliance.runtime.handoff.channel import ChannelEnd
    from appliance.runtime.handoff.frames import GO
    from appliance.runtime.handoff.source import Outgoing, Phase
    from appliance.runtime.loop import EventLoop

    def release() -> None:
        raise Broken("release")

    loop = EventLoop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)  # GO is sent before _succeed returns, or not at all
    app = SimpleNamespace(handoff_release=release, loop=loop)
    finished: list[tuple[object, object]] = []
    out = Outgoing(app, "/nowhere", 1.0, lambda r, e: finished.append((r, e)))  # type: ignore[arg-type]
    out.chan = ChannelEnd(loop, ours, lambda: None, lambda exc: None)
    out.phase = Phase.VERDICT
    with pytest.raises(Broken):
        out._succeed({"ok": True, "adopt_ms": 1.0})
    assert theirs.recv(16) == GO and out.chan.closed
    assert len(finished) == 1 and finished[0][1] is None and out.phase is Phase.DONE
    theirs.close()
    loop.close()
