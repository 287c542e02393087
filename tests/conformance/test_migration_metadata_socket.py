"""Namespaces with metadata migrated with a full copy, real processes and sockets:
a PI type 1 namespace (4096 + 8, separate metadata) and an extended-LBA one
(512 + 16, PI type 1) moved under the driver's protected, verified writes
(pre-copy rounds with writes between them); images and side files byte-identical
after, every block read back at the destination with all PI checks.  Hostile
NAMESPACE_METADATA records are refused and leave the destination's files as
they were.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client import migrate as orch
from appliance.client.datachannel import ChannelPlan
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.storage.metadata import interleave, split
from appliance.storage.protection import PRACT, PRCHK_APP, PRCHK_GUARD, PRCHK_REF, PRINFO_SHIFT
from appliance.storage.spec import AdminOpcode, IoOpcode, Status
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.workload import file_hash, move_driver, prepare_destination
from appliance.vfio_user.migration_states import MigState
from appliance.vfio_user.migration_stream import (
    MetadataHead,
    RecordHead,
    RecordType,
    record_checksum,
)
from tests.conformance.test_migration_faults import RecordForwarder, Transform

CHECK = (PRCHK_GUARD | PRCHK_APP | PRCHK_REF) << PRINFO_SHIFT
GENERATE = PRACT << PRINFO_SHIFT
EXTENDED_512_16_PI1 = 2 | 1 << 4 | 1 << 5  # Format NVM: LBAF 2 (512 + 16), MSET 1, PI type 1
FILES = ("pi.img", "pi.img.md", "ext.img", "ext.img.md")


class ProtectedWriter:
    """Random writes with PI (PRACT makes the tuples), each read back at once
    with every check; :meth:`verify_all` reads every slot again, checked."""

    def __init__(self, driver: NvmeDriver, nsid: int, *, seed: int) -> None:
        self.driver, self.nsid = driver, nsid
        self.rng = random.Random(seed)
        self.block = driver.block_size[nsid]
        self.ms = driver.metadata_size[nsid]
        self.extended = self.ms == 16  # the extended namespace: metadata in the data buffer
        # One page per buffer (the driver reuses single pages): 1 x 4096 or 7 x 528 bytes.
        self.blocks = 4096 // (self.block + (self.ms if self.extended else 0))
        self.slots = driver.ns_blocks[nsid] // self.blocks
        self.written: dict[int, bytes] = {}  # first LBA -> what a checked read returns

    def step(self, count: int = 1) -> None:
        for _ in range(count):
            lba = self.rng.randrange(self.slots) * self.blocks
            data = self.rng.randbytes(self.blocks * self.block)
            if self.extended:  # the host's own 8 bytes beside the tuple PRACT inserts
                data = interleave(data, self.rng.randbytes(self.blocks * self.ms), self.block,
                                  self.ms)
            done, _ = self.driver.io(IoOpcode.WRITE, lba, self.blocks, nsid=self.nsid, data=data,
                                     nbytes=len(data), cdw12=GENERATE, cdw14=lba)
            assert (done.status, done.dnr) == (Status.SUCCESS, False)
            back = self.read(lba)
            if self.extended:
                assert split(back, self.block, self.ms)[0] == split(data, self.block, self.ms)[0]
            else:
                assert back == data
            self.written[lba] = back

    def read(self, lba: int) -> bytes:
        """The slot at ``lba``, every PI check on (PRACT strips 8-byte metadata)."""
        nbytes = self.blocks * (self.block + (self.ms if self.extended else 0))
        done, back = self.driver.io(IoOpcode.READ, lba, self.blocks, nsid=self.nsid,
                                    nbytes=nbytes, cdw14=lba,
                                    cdw12=CHECK | (0 if self.extended else GENERATE))
        assert (done.status, done.dnr) == (Status.SUCCESS, False), f"nsid {self.nsid} LBA {lba}"
        return back

    def verify_all(self) -> int:
        for lba, want in self.written.items():
            assert self.read(lba) == want, f"nsid {self.nsid} LBA {lba}"
        return len(self.written)


def config(tmp: Path) -> dict[str, object]:
    data = tmp / "data"
    return make_config(tmp, storage={"namespaces": [
        {"image": str(data / "pi.img"), "size": "16M", "block_size": 4096, "metadata": 8,
         "pi": 1},
        {"image": str(data / "ext.img"), "size": "8M", "block_size": 512, "metadata": 16,
         "pi": 1}]})


def format_extended(driver: NvmeDriver) -> None:
    done = driver.admin_command(AdminOpcode.FORMAT_NVM, nsid=2, cdw10=EXTENDED_512_16_PI1)
    assert (done.status, done.dnr) == (Status.SUCCESS, False)
    driver.identify_namespace(2)


def attach(p: ApplianceProcess) -> tuple[VfioUserClient, NvmeDriver]:
    c = VfioUserClient.connect(p.config.storage.socket)
    d = NvmeDriver(c, mem_size=8 << 20)
    d.setup(io_queues=1, depth=32)
    d.identify_namespace(1)
    d.identify_namespace(2)
    return c, d


def hashes(p: ApplianceProcess) -> list[str]:
    return [file_hash(Path(p.config.data_dir) / name) for name in FILES]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ApplianceProcess, ApplianceProcess]]:
    src = ApplianceProcess(config(tmp_path / "src"), tmp_path / "src" / "proc").start()
    dst = ApplianceProcess(config(tmp_path / "dst"), tmp_path / "dst" / "proc").start()
    try:
        # The destination: extended LBAs like the source (the fingerprint says so)
        # and old protected blocks of its own, which the migration replaces.
        c, d = attach(dst)
        format_extended(d)
        old = ProtectedWriter(d, 1, seed=99)
        old.step(20)
        ProtectedWriter(d, 2, seed=98).step(20)
        d.close()
        c.close()
        yield src, dst
    finally:
        for p in (src, dst):
            p.stop()
        assert "Traceback" not in src.log_text() + dst.log_text()


@pytest.mark.parametrize("channel", [False, True], ids=["standard", "channel-asked"])
def test_metadata_namespaces_migrate_under_protected_writes(
        pair: tuple[ApplianceProcess, ApplianceProcess], channel: bool) -> None:
    """A data channel asked for is refused by both (it carries image blocks
    only): the migration runs on the standard path and says why."""
    src_p, dst_p = pair
    src, driver = attach(src_p)
    format_extended(driver)
    writers = [ProtectedWriter(driver, 1, seed=1), ProtectedWriter(driver, 2, seed=2)]
    for w in writers:
        w.step(100)
    dst = VfioUserClient.connect(dst_p.config.storage.socket)
    prepare_destination(driver, dst)
    steps = [0]

    def load() -> None:  # between MIG_DATA_READs, while the source runs
        for w in writers:
            w.step(1)
        steps[0] += 1

    # 64 KiB reads: round 0 takes several, with writes between them.
    summary = orch.migrate(src, dst, converge_bytes=0, max_rounds=3, chunk=64 << 10,
                           between_reads=load, data_channel=ChannelPlan() if channel else None)
    assert summary.data_channel == ""
    assert ("cannot use a data channel" in summary.channel_fallback) == channel
    assert ("has metadata" in src_p.log_text()) == channel
    # Writes landed between pre-copy reads: blocks already sent went again (the
    # sweep wraps inside a round), their new tuples with them.
    assert steps[0] >= 4 and summary.rounds >= 1
    assert orch.get_state(dst) is MigState.RUNNING
    assert hashes(src_p) == hashes(dst_p)  # images and side files byte-identical
    move_driver(driver, dst)
    for w in writers:  # every protected block, read checked on the destination
        assert w.verify_all() == len(w.written)
        w.step(10)
        w.verify_all()
    driver.close()
    src.close()
    dst.close()


def forge(raw: bytes, payload: bytes) -> bytes:
    """The record ``raw`` with another payload (same type and sequence number, checksum
    recomputed): what a hostile source sends."""
    head = RecordHead.unpack(raw).replace(length=len(payload), checksum=0)
    head.checksum = record_checksum(head.pack(), payload)
    return head.pack() + payload


def replace_first_metadata(payload: bytes) -> Transform:
    """A transform that forges the first NAMESPACE_METADATA record's payload."""
    done = [False]

    def transform(index: int, kind: RecordType, raw: bytes) -> list[bytes]:
        if kind is RecordType.NAMESPACE_METADATA and not done[0]:
            done[0] = True
            return [forge(raw, payload)]
        return [raw]

    return transform


HOSTILE = {
    "absent namespace": (MetadataHead(nsid=3, slba=0, nlb=1), 8, "absent"),
    "another metadata size": (MetadataHead(nsid=1, slba=0, nlb=1), 16, "not 8 per block"),
    "past the end": (MetadataHead(nsid=1, slba=4095, nlb=2), 16, "past 4096 blocks"),
}


def test_hostile_metadata_records_leave_the_destination_untouched(
        pair: tuple[ApplianceProcess, ApplianceProcess]) -> None:
    src_p, dst_p = pair
    src, driver = attach(src_p)
    format_extended(driver)
    writer = ProtectedWriter(driver, 1, seed=3)
    writer.step(20)
    before = hashes(dst_p)
    dst = VfioUserClient.connect(dst_p.config.storage.socket)
    for name, (head, nbytes, message) in HOSTILE.items():
        fwd = RecordForwarder(replace_first_metadata(head.pack() + b"\x5a" * nbytes))
        with pytest.raises(orch.MigrationFailed) as err:
            orch.migrate(src, dst, converge_bytes=0, max_rounds=2, forward=fwd)
        assert fwd.index > 0, name
        assert "Invalid argument" in str(err.value), name
        assert message in dst_p.log_text(), name
        assert not err.value.rollback_errors
        assert orch.get_state(dst) is MigState.RUNNING
        assert orch.get_state(src) is MigState.RUNNING
        assert hashes(dst_p) == before, name  # images and side files as they were
        assert not [n for n in Path(dst_p.config.data_dir).iterdir() if "incoming" in n.name]
    assert writer.verify_all() == len(writer.written)  # the source serves on
    driver.close()
    src.close()
    dst.close()
