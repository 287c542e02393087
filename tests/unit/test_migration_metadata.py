"""A namespace with metadata in a full-copy migration: NAMESPACE_METADATA records
after the blocks they describe, a staged side file beside the staged image,
both renamed at commit, hostile records refused with the destination untouched.

The source is driven with real Write / Write Zeroes commands (PRACT makes the
PI tuples); the destination takes the records the source made.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.config import NamespaceConfig
from appliance.errors import LocalProtocolError
from appliance.storage import NvmeController
from appliance.storage.migration import NvmeMigratable
from appliance.storage.protection import PRACT, PRCHK_APP, PRCHK_GUARD, PRCHK_REF, PRINFO_SHIFT
from appliance.storage.spec import AdminOpcode, IoOpcode, Status
from appliance.testing.nvme import controller_driver
from appliance.vfio_user import migration_stream as s
from appliance.vfio_user.migration_stream import Record, RecordType

MiB = 1 << 20
BLOCK = 4096
CHECK = (PRCHK_GUARD | PRCHK_APP | PRCHK_REF) << PRINFO_SHIFT
GENERATE = PRACT << PRINFO_SHIFT
PIL = 1 << 8  # Format NVM: the tuple first in the metadata, as configured namespaces have it


def make(where: Path, size: int = 4 * MiB, metadata: int = 8, pi: int = 1,
         block_size: int = BLOCK) -> NvmeController:
    where.mkdir(exist_ok=True)
    cfg = NamespaceConfig(image=str(where / "ns1.img"), size=size, block_size=block_size,
                          read_only=False, grow=False, metadata=metadata, pi=pi)
    return NvmeController([cfg], io_queues=1, queue_entries=64)


def driver(ctrl: NvmeController) -> NvmeDriver:
    d = controller_driver(ctrl).ready()
    d.identify_namespace(1)
    return d


def protected_write(d: NvmeDriver, slba: int, data: bytes) -> None:
    done, _ = d.io(IoOpcode.WRITE, slba, len(data) // BLOCK, data=data, cdw12=GENERATE,
                   cdw14=slba)
    assert (done.status, done.dnr) == (Status.SUCCESS, False)


def checked_read(d: NvmeDriver, slba: int, nlb: int) -> bytes:
    """Blocks read with every PI check (PRACT strips the tuples): SUCCESS or fail."""
    done, data = d.io(IoOpcode.READ, slba, nlb, cdw12=CHECK | GENERATE, cdw14=slba)
    assert (done.status, done.dnr) == (Status.SUCCESS, False)
    return data


def drain(mig: NvmeMigratable) -> list[Record]:
    out: list[Record] = []
    while records := mig.precopy_records(MiB):
        out += records
    assert mig.precopy_pending() == 0
    return out


def metadata_heads(records: list[Record]) -> list[tuple[int, int, int]]:
    """(nsid, slba, nlb) of the NAMESPACE_METADATA records."""
    heads = [s.parse_metadata_head(r)[0] for r in records
             if r.type == RecordType.NAMESPACE_METADATA]
    return [(h.nsid, h.slba, h.nlb) for h in heads]


def files(where: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(where.iterdir())}


# ------------------------------------------------------------ source
def test_written_metadata_follows_its_blocks(tmp_path: Path) -> None:
    src = make(tmp_path / "src")
    d, mig = driver(src), NvmeMigratable(src)
    protected_write(d, 16, os.urandom(4 * BLOCK))
    mig.start_tracking()
    assert mig.precopy_pending() == 4 * MiB + 1024 * 8  # data + the metadata of every block
    records = drain(mig)
    # The written blocks' metadata travels after their data; the holes' does not.
    assert metadata_heads(records) == [(1, 16, 4)]
    at = [r.type for r in records].index(RecordType.NAMESPACE_METADATA)
    assert s.parse_blocks_head(records[at - 1])[0].offset == 16 * BLOCK
    _, md = s.parse_metadata_head(records[at])
    assert bytes(md) == src.namespaces[1].md.read(16, 4)  # type: ignore[union-attr]
    # A rewrite sends its block and that block's metadata again, nothing more.
    protected_write(d, 700, os.urandom(BLOCK))
    records = mig.precopy_records(MiB)
    assert [r.type for r in records] == [RecordType.NAMESPACE_BLOCKS,
                                         RecordType.NAMESPACE_METADATA]
    assert metadata_heads(records) == [(1, 700, 1)]
    # Write Zeroes punches the metadata: the blocks go again, no metadata with them.
    d.io(IoOpcode.WRITE_ZEROES, 16, 4)
    records = mig.precopy_records(MiB)
    assert records and metadata_heads(records) == []
    # Format NVM (same format) erases every block's metadata: everything goes again,
    # without metadata.
    protected_write(d, 900, os.urandom(BLOCK))
    done = d.admin_command(AdminOpcode.FORMAT_NVM, nsid=1,
                           cdw10=5 | 1 << 5 | PIL)  # 4096+8, PI 1, the tuple first
    assert (done.status, done.dnr) == (Status.SUCCESS, False)
    assert mig.precopy_pending() == 4 * MiB + 1024 * 8
    assert metadata_heads(drain(mig)) == []
    src.close()


def test_a_format_to_another_lba_format_fails_the_session(tmp_path: Path) -> None:
    src = make(tmp_path / "src")
    d, mig = driver(src), NvmeMigratable(src)
    before = mig.migration_fingerprint()
    mig.start_tracking()
    done = d.admin_command(AdminOpcode.FORMAT_NVM, nsid=1, cdw10=6 | 1 << 5)  # 4096+16, PI 1
    assert (done.status, done.dnr) == (Status.SUCCESS, False)
    assert mig.migration_fingerprint() != before  # what a new session would announce
    with pytest.raises(LocalProtocolError, match="another LBA format") as err:
        mig.precopy_records(MiB)
    assert err.value.errno == errno.EBUSY
    src.close()


@pytest.mark.parametrize("cdw10", [5 | 2 << 5 | PIL, 5 | 1 << 5, 5 | 1 << 5 | PIL | 1 << 4],
                         ids=["another-pi-type", "pi-last", "extended"])
def test_a_format_to_other_protection_fails_the_session(tmp_path: Path, cdw10: int) -> None:
    """The same block and metadata sizes (4096+8), but another PI type, the tuple
    last instead of first, or extended metadata: the stream's fingerprint has
    the old protection, so the session fails as for another LBA format."""
    src = make(tmp_path / "src")
    d, mig = driver(src), NvmeMigratable(src)
    before = mig.migration_fingerprint()
    mig.start_tracking()
    done = d.admin_command(AdminOpcode.FORMAT_NVM, nsid=1, cdw10=cdw10)
    assert (done.status, done.dnr) == (Status.SUCCESS, False)
    assert mig.migration_fingerprint() != before
    with pytest.raises(LocalProtocolError, match="another LBA format") as err:
        mig.precopy_records(MiB)
    assert err.value.errno == errno.EBUSY
    src.close()


# ------------------------------------------------------------ destination
def pair(tmp_path: Path) -> tuple[NvmeController, NvmeController, NvmeDriver]:
    src, dst = make(tmp_path / "src"), make(tmp_path / "dst")
    old = driver(dst)  # the destination's own old blocks and metadata
    for slba in (0, 64, 900):
        protected_write(old, slba, b"\x09" * 8 * BLOCK)
    return src, dst, driver(src)


def full_stream(src: NvmeController, mig: NvmeMigratable | None = None) -> list[Record]:
    mig = mig or NvmeMigratable(src)
    if not mig.tracking:
        mig.start_tracking()
    return drain(mig) + mig.save_state()


def same_files(tmp_path: Path) -> None:
    for name in ("ns1.img", "ns1.img.md"):
        assert (tmp_path / "src" / name).read_bytes() == (tmp_path / "dst" / name).read_bytes()


def test_pre_copy_rounds_move_data_and_metadata(tmp_path: Path) -> None:
    src, dst, d = pair(tmp_path)
    protected_write(d, 10, os.urandom(16 * BLOCK))
    protected_write(d, 64, os.urandom(4 * BLOCK))
    mig, restore = NvmeMigratable(src), NvmeMigratable(dst)
    mig.start_tracking()
    restore.load_records(drain(mig))  # round 0
    protected_write(d, 12, os.urandom(2 * BLOCK))  # rewritten between rounds
    d.io(IoOpcode.WRITE_ZEROES, 64, 2)  # metadata punched: unwritten again
    protected_write(d, 1000, os.urandom(BLOCK))
    restore.load_records(full_stream(src, mig))
    assert (tmp_path / "dst" / "ns1.img.md").read_bytes() != \
        (tmp_path / "src" / "ns1.img.md").read_bytes()  # staged only, untouched until commit
    restore.commit_restore()
    same_files(tmp_path)
    assert [p.name for p in (tmp_path / "dst").iterdir() if "incoming" in p.name] == []
    back = driver(dst)
    for slba, nlb in ((10, 16), (64, 4), (1000, 1), (0, 8)):  # the tags moved; holes read FFh
        assert checked_read(back, slba, nlb) == src.namespaces[1].read_bytes(slba, nlb * BLOCK)
    src.close()
    dst.close()


def test_extended_lbas_migrate(tmp_path: Path) -> None:
    kw = {"metadata": 16, "pi": 1, "block_size": 512}
    src, dst = make(tmp_path / "src", **kw), make(tmp_path / "dst", **kw)
    d = driver(src)
    for side in (d, driver(dst)):  # both formatted to extended LBAs (the fingerprint says so)
        done = side.admin_command(AdminOpcode.FORMAT_NVM, nsid=1, cdw10=2 | 1 << 4 | 1 << 5)
        assert (done.status, done.dnr) == (Status.SUCCESS, False)
    data, user = os.urandom(4 * 512), os.urandom(4 * 16)
    extended = b"".join(data[i * 512:(i + 1) * 512] + user[i * 16:(i + 1) * 16] for i in range(4))
    done, _ = d.io(IoOpcode.WRITE, 8, 4, data=extended, nbytes=len(extended), cdw12=GENERATE,
                   cdw14=8)  # the PI tuples inserted into the host's 16 bytes
    assert (done.status, done.dnr) == (Status.SUCCESS, False)
    done, want = d.io(IoOpcode.READ, 8, 4, nbytes=len(extended), cdw12=CHECK, cdw14=8)
    assert done.status == Status.SUCCESS and want != extended
    restore = NvmeMigratable(dst)
    assert restore.migration_fingerprint() == NvmeMigratable(src).migration_fingerprint()
    restore.load_records(full_stream(src))
    restore.commit_restore()
    same_files(tmp_path)
    done, back = driver(dst).io(IoOpcode.READ, 8, 4, nbytes=len(extended), cdw12=CHECK, cdw14=8)
    assert (done.status, done.dnr) == (Status.SUCCESS, False) and back == want
    src.close()
    dst.close()


def test_a_stream_without_metadata_leaves_it_unwritten(tmp_path: Path) -> None:
    src, dst, d = pair(tmp_path)
    protected_write(d, 64, os.urandom(8 * BLOCK))
    stream = [r for r in full_stream(src) if r.type != RecordType.NAMESPACE_METADATA]
    restore = NvmeMigratable(dst)
    restore.load_records(stream)
    restore.commit_restore()
    # Blocks carried without metadata: unwritten (zeroes in the side file, FFh to a
    # host, every check off), not the destination's old tuples.
    side = (tmp_path / "dst" / "ns1.img.md").read_bytes()
    assert side == bytes(len(side))
    assert (tmp_path / "dst" / "ns1.img").read_bytes() == \
        (tmp_path / "src" / "ns1.img").read_bytes()
    assert dst.namespaces[1].md.read(64, 8) == b"\xff" * 64  # type: ignore[union-attr]
    src.close()
    dst.close()


def test_blocks_not_carried_keep_their_old_metadata(tmp_path: Path) -> None:
    src, dst, d = pair(tmp_path)
    old = (tmp_path / "dst" / "ns1.img.md").read_bytes()
    new = os.urandom(BLOCK)
    protected_write(d, 300, new)
    md = src.namespaces[1].md.read(300, 1)  # type: ignore[union-attr]
    restore = NvmeMigratable(dst)
    restore.load_records([s.namespace_blocks(1, 300 * BLOCK, new),
                          s.namespace_metadata(1, 300, 1, md),
                          *NvmeMigratable(src).save_state()])
    restore.commit_restore()
    side = (tmp_path / "dst" / "ns1.img.md").read_bytes()
    assert side[:300 * 8] == old[:300 * 8] and side[301 * 8:] == old[301 * 8:]
    assert checked_read(driver(dst), 300, 1) == new
    assert checked_read(driver(dst), 64, 8) == b"\x09" * 8 * BLOCK  # its old tuples still check
    src.close()
    dst.close()


def test_abort_removes_both_staged_files(tmp_path: Path) -> None:
    src, dst, d = pair(tmp_path)
    protected_write(d, 64, os.urandom(8 * BLOCK))
    where = tmp_path / "dst"
    (where / ".ns1.img.md.incoming-abcd1234").write_bytes(b"left by a killed process")
    before = files(where)
    restore = NvmeMigratable(dst)
    restore.load_records(drain_all := full_stream(src))
    assert len([n for n in os.listdir(where) if "incoming" in n]) == 2  # the stale one went
    restore.abort_restore()
    before.pop(".ns1.img.md.incoming-abcd1234")
    assert files(where) == before and drain_all
    src.close()
    dst.close()


def metadata_record(nsid: int, slba: int, nlb: int, data: bytes, reserved: int = 0) -> Record:
    head = s.MetadataHead(nsid=nsid, reserved=reserved, slba=slba, nlb=nlb)
    return Record(RecordType.NAMESPACE_METADATA, head.pack() + data)


@pytest.mark.parametrize(("name", "message"), [
    ("no such namespace", "absent"),
    ("too short", "not 8 per block"),
    ("another metadata size", "not 8 per block"),
    ("past the end", "past 1024 blocks"),
    ("not carried", "not carried"),
    ("reserved", "reserved"),
    ("no blocks", "of 0 blocks"),
    ("ragged", "of 3 blocks"),
])
def test_hostile_metadata_records(tmp_path: Path, name: str, message: str) -> None:
    src, dst, d = pair(tmp_path)
    protected_write(d, 64, os.urandom(8 * BLOCK))
    where = tmp_path / "dst"
    before = files(where)
    stream = full_stream(src)
    bad = {
        "no such namespace": metadata_record(2, 64, 1, bytes(8)),
        "too short": metadata_record(1, 64, 2, bytes(8)),
        "another metadata size": metadata_record(1, 64, 1, bytes(16)),
        "past the end": metadata_record(1, 1020, 8, bytes(64)),
        "not carried": metadata_record(1, 64, 1, bytes(8)),  # before any blocks
        "reserved": metadata_record(1, 64, 1, bytes(8), reserved=1),
        "no blocks": metadata_record(1, 64, 0, bytes(8)),
        "ragged": metadata_record(1, 64, 3, bytes(8)),
    }[name]
    records = [bad, *stream] if name == "not carried" else [*stream[:-3], bad, *stream[-3:]]
    restore = NvmeMigratable(dst)
    with pytest.raises(LocalProtocolError, match=message) as err:
        restore.load_records(records)
    assert err.value.errno == errno.EINVAL
    restore.abort_restore()
    assert files(where) == before
    src.close()
    dst.close()


def test_metadata_for_a_namespace_without_any_is_refused(tmp_path: Path) -> None:
    dst = make(tmp_path / "dst", metadata=0, pi=0)
    restore = NvmeMigratable(dst)
    with pytest.raises(LocalProtocolError, match="without metadata here") as err:
        restore.load_records([s.namespace_blocks(1, 0, bytes(BLOCK)),
                              s.namespace_metadata(1, 0, 1, bytes(8))])
    assert err.value.errno == errno.EINVAL
    restore.abort_restore()
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["ns1.img"]
    dst.close()
