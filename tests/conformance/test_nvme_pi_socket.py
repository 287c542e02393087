"""Metadata and end-to-end protection of the running appliance over a real
vfio-user socket: a 4 KiB + 8-byte type 1 namespace and a 512 + 16-byte one
without PI, checks, hostile fields, a guard fault rule and Format NVM."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.runtime.control import ControlClient
from appliance.storage.protection import (
    PRACT,
    PRCHK_APP,
    PRCHK_GUARD,
    PRCHK_REF,
    PRINFO_SHIFT,
    crc16_t10dif,
    pack_tuple,
)
from appliance.storage.spec import AdminOpcode, IoOpcode, Status
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.workload import pair_configs

ST = Status
ALL = (PRCHK_GUARD | PRCHK_APP | PRCHK_REF) << PRINFO_SHIFT
PRACT_ALL = ALL | PRACT << PRINFO_SHIFT
UNMAPPED = 0x7_0000_0000


@pytest.fixture(scope="module")
def pi_appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    tmp: Path = tmp_path_factory.mktemp("pi")
    cfg = make_config(tmp, storage={"namespaces": [
        {"image": str(tmp / "data" / "pi.img"), "size": "8M", "block_size": 4096,
         "metadata": 8, "pi": 1},
        {"image": str(tmp / "data" / "md.img"), "size": "4M", "metadata": 16}]})
    with ApplianceProcess(cfg, tmp / "proc") as proc:
        yield proc
        assert proc.alive, proc.log_text()
        assert "Traceback" not in proc.log_text()


@pytest.fixture(params=[True, False], ids=["shared", "dma-messages"])
def driver(pi_appliance: ApplianceProcess, request: pytest.FixtureRequest
           ) -> Iterator[NvmeDriver]:
    with VfioUserClient.connect(pi_appliance.config.storage.socket) as c:
        d = NvmeDriver(c, share_memory=request.param, interrupts=request.param)
        d.setup(io_queues=1, depth=32)
        d.identify_namespace(1)
        d.identify_namespace(2)
        yield d
        d.close()


def result(done: object) -> tuple[int, bool]:
    return done.status, done.dnr  # type: ignore[attr-defined]


def test_identify_and_protected_round_trip(driver: NvmeDriver) -> None:
    ident = driver.identify_namespace(1)
    assert (ident.flbas, ident.dps, ident.nlbaf) == (5, 9, 7)
    assert driver.identify_namespace(2).flbas == 2
    data = os.urandom(64 << 10)
    done, _ = driver.io(IoOpcode.WRITE, 100, 16, data=data, cdw12=PRACT_ALL, cdw14=100)
    assert result(done) == (ST.SUCCESS, False)
    done, back, md = driver.io_metadata(IoOpcode.READ, 100, 16, md_bytes=128, cdw12=ALL,
                                        cdw14=100)
    assert result(done) == (ST.SUCCESS, False) and back == data
    assert md[:8] == pack_tuple(crc16_t10dif(data[:4096]), 0, 100)


@pytest.mark.parametrize("name", ["guard", "apptag", "reftag", "ilbrt", "mptr unmapped",
                                  "metadata sgl", "prinfo without pi"])
def test_hostile_pi_fields(driver: NvmeDriver, name: str) -> None:
    data = os.urandom(4096)
    good = pack_tuple(crc16_t10dif(data), 0x10, 200)
    cases = {
        "guard": (1, bytes([good[0] ^ 1]) + good[1:], ALL, 200, ST.GUARD_CHECK_ERROR),
        "apptag": (1, good[:2] + b"\x00\x11" + good[4:], ALL, 200,
                   ST.APPLICATION_TAG_CHECK_ERROR),
        "reftag": (1, good[:4] + (201).to_bytes(4, "big"), ALL, 200,
                   ST.REFERENCE_TAG_CHECK_ERROR),
        "ilbrt": (1, good, ALL, 201, ST.INVALID_PROTECTION_INFORMATION),
    }
    if name in cases:
        nsid, md, cdw12, cdw14, expected = cases[name]
        done, _, _ = driver.io_metadata(IoOpcode.WRITE, 200, 1, nsid=nsid, data=data,
                                        metadata=md, cdw12=cdw12, cdw14=cdw14,
                                        cdw15=0xFFFF << 16 | 0x10)
        assert result(done) == (expected, True)
        return
    if name == "mptr unmapped":
        done, _ = driver.io(IoOpcode.WRITE, 200, 1, data=data, mptr=UNMAPPED)
        assert result(done) == (ST.DATA_TRANSFER_ERROR, False)
    elif name == "metadata sgl":
        done, _ = driver.io(IoOpcode.READ, 200, 1, flags=0x80)
        assert result(done) == (ST.INVALID_FIELD, True)
    else:
        done, _ = driver.io(IoOpcode.READ, 0, 1, nsid=2, cdw12=ALL)
        assert result(done) == (ST.INVALID_FIELD, True)


def test_a_guard_fault_fails_exactly_that_read(pi_appliance: ApplianceProcess,
                                               driver: NvmeDriver) -> None:
    data = os.urandom(4 * 4096)
    done, _ = driver.io(IoOpcode.WRITE, 300, 4, data=data, cdw12=PRACT_ALL, cdw14=300)
    assert result(done) == (ST.SUCCESS, False)
    with ControlClient(pi_appliance.config.control.socket) as ctl:
        ctl("fault.add", action="corrupt_guard", opcode=int(IoOpcode.READ), lba=302)
        try:
            done, _ = driver.io(IoOpcode.READ, 300, 2, cdw12=PRACT_ALL, cdw14=300)
            assert result(done) == (ST.SUCCESS, False)
            done, _ = driver.io(IoOpcode.READ, 302, 1, cdw12=PRACT_ALL, cdw14=302)
            assert result(done) == (ST.GUARD_CHECK_ERROR, True)
        finally:
            ctl("fault.clear")
    done, back = driver.io(IoOpcode.READ, 300, 4, cdw12=PRACT_ALL, cdw14=300)
    assert result(done) == (ST.SUCCESS, False) and back == data


def test_format_to_another_lba_format(driver: NvmeDriver) -> None:
    done = driver.admin_command(AdminOpcode.FORMAT_NVM, nsid=2, cdw10=7 | 3 << 5)  # 4096+64, PI 3
    assert result(done) == (ST.SUCCESS, False)
    ident = driver.identify_namespace(2)
    assert (ident.flbas, ident.dps, driver.block_size[2]) == (7, 0x3, 4096)  # PIL 0: last
    data = os.urandom(4096)
    done, _, _ = driver.io_metadata(IoOpcode.WRITE, 1, 1, nsid=2, data=data, md_bytes=64,
                                    cdw12=PRACT << PRINFO_SHIFT)
    assert result(done) == (ST.SUCCESS, False)
    done, back, _ = driver.io_metadata(IoOpcode.READ, 1, 1, nsid=2, md_bytes=64, cdw12=ALL)
    assert result(done) == (ST.SUCCESS, False) and back == data
    done = driver.admin_command(AdminOpcode.FORMAT_NVM, nsid=2, cdw10=2)  # back: 512+16
    assert result(done) == (ST.SUCCESS, False)
    assert driver.identify_namespace(2).flbas == 2 and driver.block_size[2] == 512


@pytest.mark.parametrize("shared", [True, False], ids=["same-files", "full-copy"])
def test_protected_blocks_move_with_a_handoff(tmp_path: Path, shared: bool) -> None:
    """Same files: both processes use the same image and side file.  Other
    files: the handoff copies both (NAMESPACE_BLOCKS and NAMESPACE_METADATA
    records), byte-identical after.  Either way the driver on the moved
    connection reads its protected blocks back checked."""
    src_cfg, dst_cfg = pair_configs(tmp_path, 16 << 20, shared=shared)
    for cfg in (src_cfg, dst_cfg):
        cfg["storage"]["namespaces"][0].update(  # type: ignore[index]
            {"block_size": 4096, "metadata": 8, "pi": 1})
    src = ApplianceProcess(src_cfg, tmp_path / "src" / "proc").start()
    dst = ApplianceProcess(dst_cfg, tmp_path / "dst" / "proc").start()
    try:
        d = NvmeDriver(VfioUserClient.connect(src.config.storage.socket), mem_size=8 << 20)
        d.setup(io_queues=1, depth=32)
        d.identify_namespace(1)
        data = os.urandom(8 * 4096)
        done, _ = d.io(IoOpcode.WRITE, 16, 8, data=data, cdw12=PRACT_ALL, cdw14=16)
        assert result(done) == (ST.SUCCESS, False)
        moved = subprocess.run([sys.executable, "-m", "appliance", "handoff", "--from",
                                src.config.control.socket, "--to", dst.config.control.socket],
                               check=False, capture_output=True, text=True, timeout=120)
        assert moved.returncode == 0, moved.stderr
        assert src.proc is not None and src.proc.wait(timeout=30) == 0
        done, back, md = d.io_metadata(IoOpcode.READ, 16, 8, md_bytes=64, cdw12=ALL, cdw14=16)
        assert result(done) == (ST.SUCCESS, False) and back == data
        assert md[:8] == pack_tuple(crc16_t10dif(data[:4096]), 0, 16)
        if not shared:
            for suffix in ("", ".md"):
                assert Path(dst.config.storage.namespaces[0].image + suffix).read_bytes() == \
                    Path(src.config.storage.namespaces[0].image + suffix).read_bytes()
        d.c.close()
    finally:
        for p in (src, dst):
            p.stop()
        assert "Traceback" not in dst.log_text(), dst.log_text()
