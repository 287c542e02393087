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
