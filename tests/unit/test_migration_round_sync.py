"""The destination makes each pre-copy round durable when the next round's
marker arrives, so the commit (in the downtime) syncs only the last round."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import make_controller

from appliance.memory import ClientMemory
from appliance.storage import NvmeController
from appliance.storage.migration import NvmeMigratable
from appliance.vfio_user import wire as w
from appliance.vfio_user.migration import VfioUserMigration
from appliance.vfio_user.migration_states import MigState
from appliance.vfio_user.migration_stream import ROUND_MARKER_SIZE

MiB = 1 << 20


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[VfioUserMigration, VfioUserMigration]]:
    ctrls: list[NvmeController] = []
    for side in ("src", "dst"):
        (tmp_path / side).mkdir()
        ctrls.append(make_controller(tmp_path / side, size=4 * MiB, io_queues=1,
                                     queue_entries=64))
    with open(tmp_path / "src" / "ns1.img", "r+b") as f:
        f.write(os.urandom(4 * MiB))
    migs = tuple(VfioUserMigration(NvmeMigratable(c), ClientMemory()) for c in ctrls)
    yield migs[0], migs[1]
    for c in ctrls:
        c.close()


def move(src: VfioUserMigration, dst: VfioUserMigration, size: int) -> int:
    """One MIG_DATA_READ of ``size`` from src written to dst; returns the bytes moved."""
    reply = src.handle(w.Command.MIG_DATA_READ,
                       w.MigDataHead(argsz=w.MigDataHead.SIZE + size, size=size).pack())
    data = reply[w.MigDataHead.SIZE:]
    dst.handle(w.Command.MIG_DATA_WRITE,
               w.MigDataHead(argsz=w.MigDataHead.SIZE + len(data), size=len(data)).pack() + data)
    return len(data)


def test_the_next_round_marker_syncs_the_staged_round(
        pair: tuple[VfioUserMigration, VfioUserMigration]) -> None:
    src, dst = pair
    dst.set_state(MigState.RESUMING)
    src.set_state(MigState.PRE_COPY)
    while move(src, dst, MiB // 2) == MiB // 2:  # round 0, to its short read
        pass
    device = dst.device
    assert isinstance(device, NvmeMigratable)
    [staging] = device._staging.values()
    assert 0 < staging.unsynced < 16 * MiB  # written, not all synced yet
    move(src, dst, ROUND_MARKER_SIZE)  # round 1's marker: round 0 becomes durable
    assert staging.unsynced == 0
    src.set_state(MigState.STOP_COPY)
    while move(src, dst, MiB) == MiB:
        pass
    dst.set_state(MigState.STOP)  # commits
    assert dst.state is MigState.STOP
