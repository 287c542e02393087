"""``handoff`` that fails while it starts leaves nothing behind: no handoff under
way, the control commands served again.

The appliance around :class:`HandoffSource` is a stand-in whose migration
fingerprint fails (whatever the error, nothing was sent yet)."""

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
