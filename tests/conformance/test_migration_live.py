"""Acceptance: a 256 MiB namespace migrated under a verifying write load, and the
driver carries on against the destination (real processes, real sockets)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from migration_pair import image, running_pair, sock

from appliance.client import migrate as orch
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.testing.process import ApplianceProcess
from appliance.testing.workload import (
    VerifiedWriter,
    file_hash,
    move_driver,
    prepare_destination,
)
from appliance.vfio_user.migration_states import MigState

SIZE = 256 << 20


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ApplianceProcess, ApplianceProcess]]:
    yield from running_pair(tmp_path, SIZE)


def test_live_migration_under_verified_writes(pair: tuple[ApplianceProcess, ApplianceProcess],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    src_p, dst_p = pair
    src = VfioUserClient.connect(sock(src_p))
    driver = NvmeDriver(src, mem_size=16 << 20)
    driver.setup(io_queues=2, depth=32)
    writer = VerifiedWriter(driver, blocks=8, seed=7)
    writer.step(50)  # before the migration starts
    dst = VfioUserClient.connect(sock(dst_p))
    prepare_destination(driver, dst)  # same memfd, same eventfds, before RESUMING
    steps = []

    def load() -> None:  # between MIG_DATA_READs, while the source runs
        writer.step(2)
        steps.append(writer.ios)

    summary = orch.migrate(src, dst, converge_bytes=256 << 10, max_rounds=10,
                           between_reads=load)
    assert len(steps) >= 10  # the load really ran during pre-copy
    assert summary.rounds >= 1
    # At switchover the source is stopped: both images are byte-identical.
    assert orch.get_state(src) is MigState.STOP
    assert orch.get_state(dst) is MigState.RUNNING
    assert file_hash(image(src_p)) == file_hash(image(dst_p))
    before = writer.ios
    move_driver(driver, dst)
    assert writer.verify_all() == len(writer.written)  # every earlier write, read on dst
    writer.step(50)  # new verified writes on the destination, through the restored queues
    writer.verify_all()
    assert writer.ios > before
    assert driver.eventfds and all(q.eventfd is not None for q in driver.queues.values())
    with capsys.disabled():
        print(f"\nmigration 256 MiB under load: {summary.rounds} rounds, "
              f"{summary.bytes / 2**20:.1f} MiB, {summary.seconds:.2f} s, "
              f"downtime {summary.downtime * 1000:.1f} ms, {len(steps)} load steps")
    driver.close()
    src.close()
    dst.close()
