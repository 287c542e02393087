from __future__ import annotations

import os
from pathlib import Path

from appliance.client import migrate as orch
from appliance.client.vfio_user import VfioUserClient
from appliance.testing.process import ApplianceProcess, make_config
from appliance.vfio_user.migration_states import MigState


def test_two_appliances(tmp_path: Path) -> None:
    procs = []
    for name, byte in (("src", 1), ("dst", 9)):
        tmp = tmp_path / name
        (tmp / "data").mkdir(parents=True)
        img = tmp / "data" / "disk0.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
            f.seek(5 << 20)
            f.write(bytes([byte]) * (1 << 20))
        if name == "src":
            with open(img, "r+b") as f:
                f.seek(40 << 20)
                f.write(os.urandom(3 << 20))
        procs.append(ApplianceProcess(make_config(tmp), tmp / "proc").start())
    try:
        src = VfioUserClient.connect(procs[0].config.storage.socket)
        dst = VfioUserClient.connect(procs[1].config.storage.socket)
        s = orch.migrate(src, dst, converge_bytes=0)
        print(s)
        assert orch.get_state(dst) is MigState.RUNNING and orch.get_state(src) is MigState.STOP
        a = (tmp_path / "src" / "data" / "disk0.img").read_bytes()
        b = (tmp_path / "dst" / "data" / "disk0.img").read_bytes()
        assert a == b
        # A client leaving while stopped: the next client finds a running device.
        src.close()
        src = VfioUserClient.connect(procs[0].config.storage.socket)
        assert orch.get_state(src) is MigState.RUNNING
        orch.set_state(src, MigState.STOP)
        src.reset()
        assert orch.get_state(src) is MigState.RUNNING
        src.close()
        dst.close()
    finally:
        for p in procs:
            p.stop()
            print(p.log_text()[-3000:])
