"""Metadata and end-to-end protection through the one driver: Identify, separate
(MPTR) and extended metadata, PRACT, PRCHK and the check statuses, hostile fields."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config
from appliance.client.nvme import NvmeDriver
from appliance.config import NamespaceConfig
from appliance.control.faults import FaultSet
from appliance.errors import ConfigError
from appliance.storage import NvmeController
from appliance.storage.migration import NvmeMigratable
from appliance.storage.protection import (
    PRACT,
    PRCHK_APP,
    PRCHK_GUARD,
    PRCHK_REF,
    PRINFO_SHIFT,
    crc16_t10dif,
    pack_tuple,
)
from appliance.storage.spec import AdminOpcode, IoOpcode, LogPage, Status
from appliance.testing.nvme import controller_driver
from tests.unit.test_nvme_driver import UNMAPPED, status

BLOCK = 4096
ALL = PRCHK_GUARD | PRCHK_APP | PRCHK_REF


def prinfo(bits: int) -> int:
    return bits << PRINFO_SHIFT


def tuples(data: bytes, first_ref: int, app: int = 0, block: int = BLOCK) -> bytes:
    return b"".join(pack_tuple(crc16_t10dif(data[i:i + block]), app, first_ref + i // block)
                    for i in range(0, len(data), block))


def make(tmp_path: Path, metadata: int, pi: int, block_size: int = BLOCK) -> NvmeController:
    cfg = NamespaceConfig(image=str(tmp_path / "pi.img"), size=1 << 20, block_size=block_size,
                          read_only=False, grow=False, metadata=metadata, pi=pi)
    return NvmeController([cfg], io_queues=1, queue_entries=64)


@pytest.fixture
def type1(tmp_path: Path) -> Iterator[NvmeDriver]:
    ctrl = make(tmp_path, 8, 1)
    d = controller_driver(ctrl).ready()
    d.identify_namespace(1)
    yield d
    ctrl.close()


def test_identify_reports_the_format_and_protection(type1: NvmeDriver) -> None:
    ident = type1.identify_namespace(1)
    assert ident.flbas == 5 and ident.nlbaf == 7  # 4096 + 8, separate buffer
    assert ident.dps == 0x9 and ident.dpc == 0x1F and ident.mc == 0x3
    assert type1.block_size[1] == BLOCK and type1.metadata_size[1] == 8


def test_write_read_with_host_tuples_checked(type1: NvmeDriver) -> None:
    data = os.urandom(2 * BLOCK)
    md = tuples(data, 10)
    done, _, _ = type1.io_metadata(IoOpcode.WRITE, 10, 2, data=data, metadata=md,
                                   cdw12=prinfo(ALL), cdw14=10)
    assert status(done) == (Status.SUCCESS, False)
    done, got, got_md = type1.io_metadata(IoOpcode.READ, 10, 2, md_bytes=16,
                                          cdw12=prinfo(ALL), cdw14=10)
    assert status(done) == (Status.SUCCESS, False)
    assert got == data and got_md == md


def test_pract_generates_on_write_and_strips_on_read(type1: NvmeDriver, tmp_path: Path) -> None:
    data = os.urandom(BLOCK * 3)
    done, _ = type1.io(IoOpcode.WRITE, 7, 3, data=data, cdw12=prinfo(PRACT | ALL),
                       cdw14=7, cdw15=0x1234)
    assert status(done) == (Status.SUCCESS, False)
    # the image is plain data; the side file holds the tuples (inverted)
    raw = (tmp_path / "pi.img").read_bytes()
    assert raw[7 * BLOCK:10 * BLOCK] == data
    side = bytes(b ^ 0xFF for b in (tmp_path / "pi.img.md").read_bytes()[7 * 8:10 * 8])
    assert side == tuples(data, 7, app=0x1234)
    done, got = type1.io(IoOpcode.READ, 7, 3, cdw12=prinfo(PRACT | ALL), cdw14=7,
                         cdw15=0xFFFF << 16 | 0x1234)
    assert status(done) == (Status.SUCCESS, False) and got == data


@pytest.mark.parametrize(("offset", "prchk", "expected"), [
    (0, PRCHK_GUARD, Status.GUARD_CHECK_ERROR),
    (2, PRCHK_APP, Status.APPLICATION_TAG_CHECK_ERROR),
    (4, PRCHK_REF, Status.REFERENCE_TAG_CHECK_ERROR),
])
def test_write_check_errors_store_nothing(type1: NvmeDriver, offset: int, prchk: int,
                                          expected: Status) -> None:
    data = os.urandom(BLOCK * 2)
    md = bytearray(tuples(data, 20))
    md[8 + offset] ^= 0x40  # the second block's field
    done, _, _ = type1.io_metadata(IoOpcode.WRITE, 20, 2, data=data, metadata=bytes(md),
                                   cdw12=prinfo(prchk), cdw14=20, cdw15=0xFFFF << 16)
    assert status(done) == (expected, True)
    _, entry = type1.log_page(LogPage.ERROR, 64)
    assert int.from_bytes(entry[16:24], "little") == 21  # the failing LBA
    # without the check the same write goes through
    done, _, _ = type1.io_metadata(IoOpcode.WRITE, 20, 2, data=data, metadata=bytes(md),
                                   cdw12=prinfo(ALL & ~prchk), cdw14=20, cdw15=0xFFFF << 16)
    assert status(done) == (Status.SUCCESS, False)
    done, _, _ = type1.io_metadata(IoOpcode.READ, 20, 2, md_bytes=16, cdw12=prinfo(prchk),
                                   cdw14=20, cdw15=0xFFFF << 16)
    assert status(done) == (expected, True)


def test_unwritten_blocks_read_with_every_check(type1: NvmeDriver) -> None:
    done, got, md = type1.io_metadata(IoOpcode.READ, 100, 2, md_bytes=16, cdw12=prinfo(ALL),
                                      cdw14=100)
    assert status(done) == (Status.SUCCESS, False)
    assert got == bytes(2 * BLOCK) and md == b"\xff" * 16


def test_type1_ilbrt_must_be_slba(type1: NvmeDriver) -> None:
    done, _ = type1.io(IoOpcode.READ, 5, 1, cdw12=prinfo(PRACT | PRCHK_REF), cdw14=6)
    assert status(done) == (Status.INVALID_PROTECTION_INFORMATION, True)


def test_metadata_buffer_outside_memory_is_a_transfer_error(type1: NvmeDriver) -> None:
    for opcode in (IoOpcode.WRITE, IoOpcode.READ):
        done, _ = type1.io(opcode, 0, 1, data=bytes(BLOCK), mptr=UNMAPPED)
        assert status(done) == (Status.DATA_TRANSFER_ERROR, False)
    done, _ = type1.io(IoOpcode.READ, 0, 1, mptr=UNMAPPED, cdw12=prinfo(PRACT))
    assert status(done) == (Status.SUCCESS, False)  # PRACT strips: no metadata moves


def test_metadata_sgl_is_refused(type1: NvmeDriver) -> None:
    done, _ = type1.io(IoOpcode.READ, 0, 1, flags=0x80)  # PSDT 10b: metadata SGL
    assert status(done) == (Status.INVALID_FIELD, True)


def test_no_pi_namespace_refuses_prinfo_and_moves_metadata(tmp_path: Path) -> None:
    ctrl = make(tmp_path, 16, 0, block_size=512)
    try:
        d = controller_driver(ctrl).ready()
        assert d.identify_namespace(1).flbas == 2 and d.block_size[1] == 512
        done, _ = d.io(IoOpcode.READ, 0, 1, cdw12=prinfo(PRCHK_GUARD))
        assert status(done) == (Status.INVALID_FIELD, True)
        md = os.urandom(32)
        data = os.urandom(1024)
        done, _, _ = d.io_metadata(IoOpcode.WRITE, 3, 2, data=data, metadata=md)
        assert status(done) == (Status.SUCCESS, False)
        done, got, got_md = d.io_metadata(IoOpcode.READ, 3, 2, md_bytes=32)
        assert got == data and got_md == md
    finally:
        ctrl.close()


def test_pi_in_longer_metadata_is_inserted(tmp_path: Path) -> None:
    ctrl = make(tmp_path, 16, 3, block_size=512)
    try:
        d = controller_driver(ctrl).ready()
        d.identify_namespace(1)
        data, user = os.urandom(512), os.urandom(16)
        done, _, _ = d.io_metadata(IoOpcode.WRITE, 1, 1, data=data, metadata=user,
                                   cdw12=prinfo(PRACT), cdw14=0x55, cdw15=0xABCD)
        assert status(done) == (Status.SUCCESS, False)
        done, _, got_md = d.io_metadata(IoOpcode.READ, 1, 1, md_bytes=16, cdw12=prinfo(ALL),
                                        cdw15=0xFFFF << 16 | 0xABCD)
        assert status(done) == (Status.SUCCESS, False)
        # DPS bit 3 set: the tuple is the first 8 bytes; type 3 keeps ILBRT as is
        assert got_md == pack_tuple(crc16_t10dif(data), 0xABCD, 0x55) + user[8:]
    finally:
        ctrl.close()


def _format(d: NvmeDriver, lbaf: int, pi: int = 0, mset: bool = False, pil: bool = True,
            nsid: int = 1) -> tuple[int, bool]:
    cdw10 = lbaf | int(mset) << 4 | pi << 5 | int(pil) << 8
    return status(d.admin_command(AdminOpcode.FORMAT_NVM, nsid=nsid, cdw10=cdw10))


def test_format_to_every_lba_format_and_back(tmp_path: Path) -> None:
    ctrl = make(tmp_path, 0, 0, block_size=512)
    try:
        d = controller_driver(ctrl).ready()
        for lbaf, (block, ms) in enumerate([(512, 0), (512, 8), (512, 16), (512, 64),
                                            (4096, 0), (4096, 8), (4096, 16), (4096, 64)]):
            pi = 1 if ms else 0
            assert _format(d, lbaf, pi) == (Status.SUCCESS, False)
            ident = d.identify_namespace(1)
            assert ident.flbas == lbaf and ident.nsze == (1 << 20) // block
            assert ident.dps == (0x9 if pi else 0)
            assert d.block_size[1] == block and d.metadata_size[1] == ms
            data = os.urandom(block)
            user = os.urandom(ms)  # PRACT puts the tuple in its first 8 bytes
            done, _, _ = d.io_metadata(IoOpcode.WRITE, 3, 1, data=data, metadata=user,
                                       md_bytes=ms, cdw12=prinfo(PRACT) if pi else 0, cdw14=3)
            assert status(done) == (Status.SUCCESS, False)
            done, got, got_md = d.io_metadata(IoOpcode.READ, 3, 1, md_bytes=ms, cdw14=3,
                                              cdw12=prinfo(PRACT | ALL) if pi else 0)
            assert status(done) == (Status.SUCCESS, False) and got == data
            assert got_md[8:] == user[8:] and (ms <= 8 or got_md[:8] != user[:8])
        assert _format(d, 0) == (Status.SUCCESS, False)
        assert d.identify_namespace(1).flbas == 0
        assert not os.path.getsize(tmp_path / "pi.img.md")  # the old metadata is gone
    finally:
        ctrl.close()


@pytest.mark.parametrize(("lbaf", "pi"), [(8, 0), (15, 0), (0, 1), (4, 2), (1, 4)])
def test_format_refuses_what_cannot_hold(type1: NvmeDriver, lbaf: int, pi: int) -> None:
    assert _format(type1, lbaf, pi) == (Status.INVALID_FORMAT, True)
    assert type1.identify_namespace(1).flbas == 5  # unchanged


def test_format_extended_lbas_interleave_metadata(type1: NvmeDriver, tmp_path: Path) -> None:
    assert _format(type1, 1, pi=2, mset=True, pil=False) == (Status.SUCCESS, False)
    ident = type1.identify_namespace(1)
    assert ident.flbas == 0x11 and ident.dps == 0x2
    data = os.urandom(1024)
    md = tuples(data, 0x99, block=512)
    ext = data[:512] + md[:8] + data[512:] + md[8:]
    done, _ = type1.io(IoOpcode.WRITE, 4, 2, data=ext, nbytes=len(ext), cdw12=prinfo(ALL),
                       cdw14=0x99)
    assert status(done) == (Status.SUCCESS, False)
    assert (tmp_path / "pi.img").read_bytes()[2048:3072] == data
    done, got = type1.io(IoOpcode.READ, 4, 2, nbytes=len(ext), cdw12=prinfo(ALL), cdw14=0x99)
    assert status(done) == (Status.SUCCESS, False) and got == ext
    done, got = type1.io(IoOpcode.READ, 4, 2, cdw12=prinfo(PRACT | ALL), cdw14=0x99)
    assert status(done) == (Status.SUCCESS, False) and got == data  # PRACT: no tuples


@pytest.mark.parametrize(("action", "expected"), [
    ("corrupt_guard", Status.GUARD_CHECK_ERROR),
    ("corrupt_reftag", Status.REFERENCE_TAG_CHECK_ERROR),
])
def test_injected_pi_fault_fails_exactly_that_read(tmp_path: Path, action: str,
                                                   expected: Status) -> None:
    ctrl = make(tmp_path, 8, 1)
    ctrl.faults = faults = FaultSet(clock=lambda: 0.0, seed=1)
    type1 = controller_driver(ctrl).ready()
    type1.identify_namespace(1)
    data = os.urandom(BLOCK * 4)
    done, _ = type1.io(IoOpcode.WRITE, 40, 4, data=data, cdw12=prinfo(PRACT), cdw14=40)
    assert status(done) == (Status.SUCCESS, False)
    faults.add({"action": action, "opcode": int(IoOpcode.READ), "lba": "42"})
    done, _ = type1.io(IoOpcode.READ, 40, 2, cdw12=prinfo(PRACT | ALL), cdw14=40)
    assert status(done) == (Status.SUCCESS, False)  # blocks 40-41: not the rule's
    done, _ = type1.io(IoOpcode.READ, 40, 4, cdw12=prinfo(PRACT | ALL), cdw14=40)
    assert status(done) == (expected, True)
    _, entry = type1.log_page(LogPage.ERROR, 64)
    assert int.from_bytes(entry[16:24], "little") == 42
    done, got, md = type1.io_metadata(IoOpcode.READ, 42, 1, md_bytes=8, cdw14=42)
    assert status(done) == (Status.SUCCESS, False) and got == data[2 * BLOCK:3 * BLOCK]
    assert md != tuples(data[2 * BLOCK:3 * BLOCK], 42)  # unchecked: the host sees the damage
    faults.clear()
    done, _ = type1.io(IoOpcode.READ, 40, 4, cdw12=prinfo(PRACT | ALL), cdw14=40)
    assert status(done) == (Status.SUCCESS, False)  # the stored tuples were never touched
    ctrl.close()


def test_migration_fingerprint_covers_the_format(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with_pi, plain = make(tmp_path / "a", 8, 1), make(tmp_path / "b", 0, 0)
    try:
        assert b"md1:8:9:0" in NvmeMigratable.fingerprint_extra(with_pi)
        assert b"md1" not in NvmeMigratable.fingerprint_extra(plain)
    finally:
        with_pi.close()
        plain.close()


@pytest.mark.parametrize(("ns", "message"), [
    ("{image: a, metadata: 4}", "storage.namespaces[0].metadata: must be one of 0, 8, 16, 64"),
    ("{image: a, metadata: 8, pi: 4}", "storage.namespaces[0].pi:"),
    ("{image: a, metadata: 0, pi: 1}", "storage.namespaces[0].pi: protection information needs"),
    ("{image: 'nbd+unix:///x?socket=/s', metadata: 8}", "storage.namespaces[0].metadata: only"),
    ("{image: a, metadata: 8, zoned: {zone_size: 1M}}", "storage.namespaces[0].metadata: only"),
])
def test_config_errors_name_the_key(tmp_path: Path, ns: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(f"storage: {{namespaces: [{ns}]}}")
    with pytest.raises(ConfigError) as info:
        config.load(str(f))
    assert message in str(info.value)


def test_config_metadata_and_pi(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("storage: {namespaces: [{image: a, block_size: 4096, metadata: 8, pi: 1}]}")
    ns = config.load(str(f)).storage.namespaces[0]
    assert (ns.block_size, ns.metadata, ns.pi) == (4096, 8, 1)
