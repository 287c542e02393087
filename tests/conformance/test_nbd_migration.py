"""Shared-storage migration on an NBD export: two appliances on the same export
(qemu-storage-daemon and nbdkit), the Python driver's verified random writes
before, during and after; the stream carries device state only."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client import migrate as orch
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.testing.nbd import SERVERS, NbdServer
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.workload import (
    VerifiedWriter,
    file_hash,
    make_image,
    move_driver,
    prepare_destination,
)
from appliance.vfio_user.migration_states import MigState

SIZE = 64 << 20

Pair = tuple[NbdServer, ApplianceProcess, ApplianceProcess]


@pytest.fixture(params=SERVERS)
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    make_image(tmp_path / "export.img", SIZE, seed=5, random_mib=4)
    with NbdServer(request.param, tmp_path / "export.img", tmp_path / "nbd.sock") as srv:
        procs = [ApplianceProcess(make_config(tmp_path / name, storage={
            "namespaces": [{"image": srv.uri}]}), tmp_path / name / "proc").start()
            for name in ("src", "dst")]
        try:
            yield srv, procs[0], procs[1]
        finally:
            for p in procs:
                p.stop()
            assert "Traceback" not in procs[0].log_text() + procs[1].log_text()


def sock(p: ApplianceProcess) -> str:
    return p.config.storage.socket


def test_shared_storage_migration_under_verified_writes(pair: Pair) -> None:
    server, src_p, dst_p = pair
    src = VfioUserClient.connect(sock(src_p))
    dst = VfioUserClient.connect(sock(dst_p))
    driver = NvmeDriver(src, mem_size=16 << 20)
    try:
        driver.setup(io_queues=2, depth=32)
        writer = VerifiedWriter(driver, blocks=8, seed=9)
        writer.step(100)
        prepare_destination(driver, dst)
        steps = []

        def load() -> None:
            writer.step(2)
            steps.append(writer.ios)

        summary = orch.migrate(src, dst, shared_storage=True, between_reads=load)
        assert summary.bytes < 64 << 10  # device state only: no data copied
        assert orch.get_state(src) is MigState.STOP
        assert orch.get_state(dst) is MigState.RUNNING
        move_driver(driver, dst)
        assert writer.verify_all() == len(writer.written)  # every write, read on dst
        writer.step(100)  # the destination writes to the same export
        writer.verify_all()
        driver.flush(1)
        with open(server.image, "rb") as f:  # the export's file holds what was written
            for lba, data in writer.written.items():
                f.seek(lba * 512)
                assert f.read(len(data)) == data
    finally:
        driver.close()
        src.close()
        dst.close()


def test_a_full_copy_of_an_nbd_namespace_is_refused_and_the_source_serves(pair: Pair) -> None:
    server, src_p, dst_p = pair
    before = file_hash(server.image)
    src = VfioUserClient.connect(sock(src_p))
    dst = VfioUserClient.connect(sock(dst_p))
    try:
        with pytest.raises(orch.MigrationFailed):
            orch.migrate(src, dst)
        assert orch.get_state(src) is MigState.RUNNING
        assert orch.get_state(dst) in (MigState.RUNNING, MigState.STOP)
    finally:
        src.close()
        dst.close()
    assert "is on an NBD export" in src_p.log_text()
    assert file_hash(server.image) == before
    with VfioUserClient.connect(sock(src_p)) as c:
        driver = NvmeDriver(c)
        driver.setup(io_queues=1, depth=8)
        writer = VerifiedWriter(driver, seed=3)
        writer.step(20)  # the source still serves
        driver.close()


def test_the_migrate_command_with_shared_storage(pair: Pair) -> None:
    _, src_p, dst_p = pair
    res = subprocess.run([sys.executable, "-m", "appliance", "migrate", sock(src_p), sock(dst_p),
                          "--shared-storage"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert "shared storage" in res.stdout
    assert int(res.stdout.split("bytes: ")[1].split()[0]) < 64 << 10
    with VfioUserClient.connect(sock(dst_p)) as c:
        assert orch.get_state(c) is MigState.RUNNING
