"""What stays out of the downtime on the destination: each pre-copy round is made
durable when the next round's marker arrives (the commit syncs only the last
round), and the replaced image's blocks are freed on the offload, after the commit."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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
        pair: tuple[VfioUserMigration, VfioUserMigration],
        monkeypatch: pytest.MonkeyPatch) -> None:
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
    synced: list[int] = []
    sync = os.fdatasync

    def counted(fd: int) -> None:
        synced.append(fd)
        sync(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    staged = staging.fd
    dst.set_state(MigState.STOP)  # commits
    assert dst.state is MigState.STOP
    assert staged not in synced  # nothing changed since the round's sync: no sync in the commit


class HeldOffload:
    """An offload that keeps the work until the test runs it."""

    def __init__(self) -> None:
        self.work: list[tuple[Callable[[], object], Callable[[BaseException | None], None]]] = []

    def submit(self, work: Callable[[], object],
               done: Callable[[BaseException | None], None]) -> None:
        self.work.append((work, done))

    def drain(self) -> None:
        while self.work:
            work, done = self.work.pop(0)
            work()
            done(None)


def test_the_replaced_image_is_released_on_the_offload(
        pair: tuple[VfioUserMigration, VfioUserMigration], tmp_path: Path) -> None:
    src, dst = pair
    device = dst.device
    assert isinstance(device, NvmeMigratable)
    offload = HeldOffload()
    device.ctrl.offload = offload
    image = tmp_path / "dst" / "ns1.img"
    old_inode = image.stat().st_ino

    def old_image_open() -> bool:
        fds = Path("/proc/self/fd")
        return any(os.stat(p).st_ino == old_inode and os.stat(p).st_nlink == 0
                   for p in fds.iterdir() if p.resolve().name.startswith("ns1.img"))

    dst.set_state(MigState.RESUMING)
    src.set_state(MigState.STOP_COPY)
    while move(src, dst, MiB) == MiB:
        pass
    dst.set_state(MigState.STOP)  # commits: the new image is in place
    assert image.stat().st_ino != old_inode
    assert len(offload.work) == 1 and old_image_open()  # not freed in the commit
    offload.drain()
    assert not old_image_open()
    with open(tmp_path / "src" / "ns1.img", "rb") as a, image.open("rb") as b:
        assert a.read() == b.read()
