"""NVMe namespace data in a migration: 4 KiB dirty pages, coalesced records, and the
destination's staging image (a new file beside the image, renamed over it at commit).

The source side is driven with real Write commands (the namespace's change hook
feeds the dirty map); the destination side with the records the source made.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import make_controller, status

from appliance.client.nvme import NvmeDriver
from appliance.errors import LocalProtocolError
from appliance.storage import NvmeController
from appliance.storage.migration import MAX_RECORD, DirtyPages, NvmeMigratable
from appliance.storage.spec import IoOpcode
from appliance.testing.nvme import controller_driver
from appliance.vfio_user import migration_stream as s
from appliance.vfio_user.migration_stream import Record, RecordType

pytestmark = pytest.mark.usefixtures("nvme_fastpath")  # both I/O queue paths

MiB = 1 << 20


def blocks(records: list[Record]) -> list[tuple[int, int, int, bool]]:
    """(nsid, offset, length, zeroes) of the NAMESPACE_BLOCKS records."""
    out = []
    for r in records:
        if r.type == RecordType.NAMESPACE_BLOCKS:
            head, _ = s.parse_blocks_head(r)
            out.append((head.nsid, head.offset, head.length,
                        bool(head.flags & s.BlocksFlag.ZEROES)))
    return out


def drain(mig: NvmeMigratable, max_bytes: int = MiB) -> list[Record]:
    out: list[Record] = []
    while records := mig.precopy_records(max_bytes):
        out += records
    assert mig.precopy_pending() == 0
    return out


def incoming(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".incoming-" in p.name)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[NvmeDriver, NvmeMigratable]]:
    (tmp_path / "src").mkdir()
    ctrl = make_controller(tmp_path / "src", size=4 * MiB, io_queues=1, queue_entries=64)
    drv = controller_driver(ctrl).ready(io_queues=1)
    mig = NvmeMigratable(ctrl)
    yield drv, mig
    ctrl.close()


def write(drv: NvmeDriver, offset: int, data: bytes) -> None:
    done, _ = drv.io(IoOpcode.WRITE, slba=offset // 512, nlb=len(data) // 512, data=data)
    assert status(done)[0] == 0


# ------------------------------------------------------------ source: dirty pages
def test_a_4k_write_is_one_4k_resend(source: tuple[NvmeDriver, NvmeMigratable]) -> None:
    drv, mig = source
    mig.start_tracking()
    assert mig.precopy_pending() == 4 * MiB
    drain(mig)
    data = os.urandom(4096)
    write(drv, 0x123000, data)
    assert mig.precopy_pending() == 4096
    records = mig.precopy_records(MiB)
    assert blocks(records) == [(1, 0x123000, 4096, False)]
    assert s.parse_namespace_blocks(records[0])[2] == data
    assert mig.precopy_pending() == 0 and mig.precopy_records(MiB) == []


def test_a_512_byte_write_dirties_its_page(source: tuple[NvmeDriver, NvmeMigratable]) -> None:
    drv, mig = source
    mig.start_tracking()
    drain(mig)
    write(drv, 0x200200, os.urandom(512))  # the second block of a page
    assert mig.precopy_pending() == 4096
    assert blocks(mig.precopy_records(MiB)) == [(1, 0x200000, 4096, False)]


def test_contiguous_dirty_pages_coalesce(source: tuple[NvmeDriver, NvmeMigratable]) -> None:
    drv, mig = source
    mig.start_tracking()
    drain(mig)
    write(drv, 0x10000, os.urandom(4096))
    write(drv, 0x11000, os.urandom(8192))  # touches the page after: one run of 3 pages
    write(drv, 0x300000, os.urandom(4096))
    assert mig.precopy_pending() == 4 * 4096
    assert blocks(drain(mig)) == [(1, 0x10000, 3 * 4096, False), (1, 0x300000, 4096, False)]


def test_round_one_moves_1mib_records_and_skips_holes(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path, size=8 * MiB)
    image = tmp_path / "ns1.img"
    data = os.urandom(3 * MiB + 8192)
    with image.open("r+b") as f:
        f.seek(2 * MiB)
        f.write(data)
    mig = NvmeMigratable(ctrl)
    mig.start_tracking()
    got = blocks(drain(mig))
    payload = [b for b in got if not b[3]]
    assert [length for _, _, length, _ in payload] == [MiB, MiB, MiB, 8192]
    assert payload[0][1] == 2 * MiB
    assert sum(length for _, _, length, _ in got) == 8 * MiB  # holes as ZEROES, not read
    ctrl.close()


def test_zero_data_inside_a_run_goes_as_zeroes(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path, size=2 * MiB)
    with (tmp_path / "ns1.img").open("r+b") as f:  # allocated, not holes
        f.write(os.urandom(4096) + bytes(256 * 1024) + os.urandom(4096) + bytes(8192)
                + os.urandom(4096))
        f.write(bytes(2 * MiB - f.tell()))
    mig = NvmeMigratable(ctrl)
    mig.start_tracking()
    got = blocks(drain(mig))
    assert got[:3] == [(1, 0, 4096, False), (1, 4096, 256 * 1024, True),
                       (1, 4096 + 256 * 1024, 4 * 4096, False)]  # a short zero stretch stays
    assert all(zero for *_, zero in got[3:])
    assert sum(length for _, _, length, _ in got) == 2 * MiB
    ctrl.close()


def test_records_respect_the_budget(source: tuple[NvmeDriver, NvmeMigratable]) -> None:
    drv, mig = source
    mig.start_tracking()
    drain(mig)
    write(drv, 0x100000, os.urandom(8192))
    write(drv, 0x200000, os.urandom(4096))
    for page in range(0, 64 * 4096, 4096):
        write(drv, 0x300000 + page, os.urandom(4096))
    assert blocks(mig.precopy_records(12288)) == [(1, 0x100000, 8192, False),
                                                  (1, 0x200000, 4096, False)]
    # Records are not cut to the budget: at least one whole record comes.
    assert blocks(mig.precopy_records(1)) == [(1, 0x300000, 64 * 4096, False)]


def test_the_sweep_resumes_where_it_stopped(source: tuple[NvmeDriver, NvmeMigratable]) -> None:
    drv, mig = source
    mig.start_tracking()
    drain(mig)
    write(drv, 0x200000, os.urandom(4096))
    write(drv, 0x300000, os.urandom(4096))
    assert blocks(mig.precopy_records(1)) == [(1, 0x200000, 4096, False)]
    write(drv, 0x1000, os.urandom(4096))  # behind the cursor: after the pages ahead of it
    assert [b[1] for b in blocks(drain(mig))] == [0x300000, 0x1000]


def test_last_partial_page(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path, size=MiB + 1536)  # 1 MiB and three 512-byte blocks
    with (tmp_path / "ns1.img").open("r+b") as f:
        f.write(os.urandom(MiB + 1536))
    mig = NvmeMigratable(ctrl)
    mig.start_tracking()
    assert mig.precopy_pending() == MiB + 1536
    assert blocks(drain(mig)) == [(1, 0, MiB, False), (1, MiB, 1536, False)]
    ctrl.close()


def test_dirty_map_of_a_gib() -> None:
    pages = DirtyPages(1 << 30, 4096)
    assert len(pages.map) == 262144  # one byte per page
    pages.mark_all()
    assert pages.pending_bytes() == 1 << 30
    pages.clear(0, 262144)
    pages.mark(4095, 2)  # straddles two pages
    pages.mark(4096, 4096)
    assert pages.count == 2 and pages.next_run() == (0, 2)
    pages.mark(-1, 0)
    pages.mark(1 << 30, 4096)  # past the end: ignored
    assert pages.count == 2


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path)
    for kw in ({"page": 1000}, {"max_record": 6000}, {"max_record": 32 * MiB}):
        with pytest.raises(ValueError):
            NvmeMigratable(ctrl, **kw)  # type: ignore[arg-type]
    assert MAX_RECORD == MiB
    ctrl.close()


# ------------------------------------------------------------ destination: staging image
def pair(tmp_path: Path, size: int = 4 * MiB) -> tuple[NvmeController, NvmeController, Path]:
    for side in ("src", "dst"):
        (tmp_path / side).mkdir()
    src = make_controller(tmp_path / "src", size=size)
    dst = make_controller(tmp_path / "dst", size=size)
    with (tmp_path / "src" / "ns1.img").open("r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(2 * MiB))
    with (tmp_path / "dst" / "ns1.img").open("r+b") as f:
        f.write(b"\x09" * size)  # the destination's old data
    return src, dst, tmp_path / "dst"


def full_stream(src: NvmeController) -> list[Record]:
    mig = NvmeMigratable(src)
    mig.start_tracking()
    return drain(mig) + mig.save_state()


def test_commit_swaps_in_the_staged_image(tmp_path: Path) -> None:
    src, dst, where = pair(tmp_path)
    image = where / "ns1.img"
    old = image.read_bytes()
    old_inode, ns = image.stat().st_ino, dst.namespaces[1]
    fd = ns.fd
    mig = NvmeMigratable(dst)
    mig.load_records(full_stream(src))
    assert image.read_bytes() == old and len(incoming(where)) == 1  # staged beside it
    assert ns.read_bytes(0, 4096) == b"\x09" * 4096
    mig.commit_restore()
    assert incoming(where) == []
    assert image.stat().st_ino != old_inode  # renamed over, not copied into
    assert image.read_bytes() == (tmp_path / "src" / "ns1.img").read_bytes()
    assert ns.fd == fd  # the same descriptor, now on the new file
    assert ns.read_bytes(MiB >> 9, MiB) == src.namespaces[1].read_bytes(MiB >> 9, MiB)
    assert ns.read_bytes(0, 4096) == bytes(4096)
    ns.write_zeroes(0, 8, deallocate=False)  # and writes land in the new image
    ns.flush()
    os.pwrite(ns.fd, b"new", 0)
    assert image.read_bytes()[:3] == b"new"
    src.close()
    dst.close()


def test_abort_removes_the_staged_image(tmp_path: Path) -> None:
    src, dst, where = pair(tmp_path)
    image = where / "ns1.img"
    old = image.read_bytes()
    mig = NvmeMigratable(dst)
    mig.load_records(full_stream(src)[:3])
    assert len(incoming(where)) == 1
    mig.abort_restore()
    assert incoming(where) == [] and image.read_bytes() == old
    assert dst.namespaces[1].read_bytes(0, 4096) == b"\x09" * 4096
    src.close()
    dst.close()


def test_incomplete_state_refuses_and_keeps_the_image(tmp_path: Path) -> None:
    src, dst, where = pair(tmp_path)
    image = where / "ns1.img"
    old = image.read_bytes()
    mig = NvmeMigratable(dst)
    stream = full_stream(src)
    mig.load_records([r for r in stream if r.type != RecordType.DEVICE_STATE])
    with pytest.raises(LocalProtocolError, match="no controller state"):
        mig.commit_restore()
    mig.abort_restore()
    assert incoming(where) == [] and image.read_bytes() == old
    src.close()
    dst.close()


def test_blocks_not_carried_keep_the_old_data(tmp_path: Path) -> None:
    src, dst, where = pair(tmp_path)
    image = where / "ns1.img"
    old = image.read_bytes()
    new = os.urandom(8192)
    mig = NvmeMigratable(dst)
    mig.load_records([s.namespace_blocks(1, 2 * MiB, new),
                      *NvmeMigratable(src).save_state()])
    mig.commit_restore()
    assert image.read_bytes() == old[:2 * MiB] + new + old[2 * MiB + 8192:]
    src.close()
    dst.close()


def test_a_range_resent_as_zeroes_reads_zero(tmp_path: Path) -> None:
    src, dst, where = pair(tmp_path)
    mig = NvmeMigratable(dst)
    stream = full_stream(src)
    zero = Record(RecordType.NAMESPACE_BLOCKS,
                  s.BlocksHead(nsid=1, flags=s.BlocksFlag.ZEROES, offset=MiB, length=65536).pack())
    mig.load_records([*stream[:-3], zero, *stream[-3:]])
    mig.commit_restore()
    data = (where / "ns1.img").read_bytes()
    want = (tmp_path / "src" / "ns1.img").read_bytes()
    assert data[MiB:MiB + 65536] == bytes(65536)
    assert data[:MiB] + data[MiB + 65536:] == want[:MiB] + want[MiB + 65536:]
    src.close()
    dst.close()


def test_a_stale_staging_file_is_removed(tmp_path: Path) -> None:
    src, dst, where = pair(tmp_path)
    (where / ".ns1.img.incoming-abcd1234").write_bytes(b"left by a killed process")
    (where / ".other.img.incoming-abcd1234").write_bytes(b"not ours")
    mig = NvmeMigratable(dst)
    mig.load_records(full_stream(src)[:1])
    assert len(incoming(where)) == 2 and (where / ".other.img.incoming-abcd1234").exists()
    mig.abort_restore()
    src.close()
    dst.close()


def test_only_stale_staging_files_are_removed(tmp_path: Path) -> None:
    # A directory, or a symlink to a file elsewhere, with a staging file's name
    # was not left by a restore: it stays, and the restore goes on.
    src, dst, where = pair(tmp_path)
    (where / ".ns1.img.incoming-dir12345").mkdir()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"someone's")
    (where / ".ns1.img.incoming-lnk12345").symlink_to(target)
    mig = NvmeMigratable(dst)
    mig.load_records(full_stream(src)[:1])
    assert (where / ".ns1.img.incoming-dir12345").is_dir()
    assert (where / ".ns1.img.incoming-lnk12345").is_symlink() and target.exists()
    mig.abort_restore()
    src.close()
    dst.close()


def test_device_state_only_stages_nothing(tmp_path: Path) -> None:
    src, dst, where = pair(tmp_path)
    image = where / "ns1.img"
    inode, old = image.stat().st_ino, image.read_bytes()
    mig = NvmeMigratable(dst)
    mig.load_records(NvmeMigratable(src).save_state())  # what a shared-storage stream carries
    assert incoming(where) == []
    mig.commit_restore()
    assert image.stat().st_ino == inode and image.read_bytes() == old
    src.close()
    dst.close()


def test_the_staged_image_keeps_the_mode(tmp_path: Path) -> None:
    src, dst, where = pair(tmp_path)
    image = where / "ns1.img"
    image.chmod(0o640)
    mig = NvmeMigratable(dst)
    mig.load_records(full_stream(src))
    mig.commit_restore()
    assert image.stat().st_mode & 0o777 == 0o640
    src.close()
    dst.close()


def test_a_resize_during_the_session_fails_it(source: tuple[NvmeDriver, NvmeMigratable]) -> None:
    drv, mig = source
    mig.start_tracking()
    ns = drv.bus.ctrl.namespaces[1]
    ns.size, ns.nlbas = ns.size + MiB, ns.nlbas + 2048  # as the namespace.resize command does
    with pytest.raises(LocalProtocolError, match="resized") as err:
        mig.precopy_records(MiB)
    assert err.value.errno == errno.EBUSY
    with pytest.raises(LocalProtocolError, match="resized"):
        mig.save_state()
