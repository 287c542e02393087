"""SGLs, Copy, Verify, Write Uncorrectable and the effects log against the running
appliance, over a real vfio-user socket: valid and hostile fields."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.client.nvme_sgl import FLAGS_SGL, descriptor
from appliance.client.vfio_user import VfioUserClient
from appliance.storage.spec import Command, IoOpcode, LogPage, SglDescriptor, SglType, Status

ST = Status
DB, BB, LAST, SEG = SglType.DATA_BLOCK, SglType.BIT_BUCKET, SglType.LAST_SEGMENT, SglType.SEGMENT
UNMAPPED = 0x7_0000_0000


@pytest.fixture(params=[True, False], ids=["shared", "dma-messages"])
def driver(sock_path: str, request: pytest.FixtureRequest) -> Iterator[NvmeDriver]:
    with VfioUserClient.connect(sock_path) as c:
        d = NvmeDriver(c, share_memory=request.param, interrupts=request.param)
        d.setup(io_queues=1, depth=32)
        yield d
        d.close()


def sgl_command(opcode: int, sgl1: SglDescriptor, slba: int, nlb: int) -> Command:
    raw = sgl1.pack()
    return Command(opcode=opcode, nsid=1, flags=FLAGS_SGL, cdw10=slba, cdw12=nlb - 1,
                   prp1=int.from_bytes(raw[:8], "little"), prp2=int.from_bytes(raw[8:], "little"))


def result(done: object) -> tuple[int, bool]:
    return done.status, done.dnr  # type: ignore[attr-defined]


@pytest.mark.parametrize("scatter", [False, True], ids=["contiguous", "scattered"])
def test_sgl_io_round_trip(driver: NvmeDriver, scatter: bool) -> None:
    data = os.urandom(128 << 10)
    done, _ = driver.io(IoOpcode.WRITE, 4000, 256, data=data, scatter=scatter, sgl=True)
    assert result(done) == (ST.SUCCESS, False)
    done, back = driver.io(IoOpcode.READ, 4000, 256, scatter=scatter, sgl=True)
    assert result(done) == (ST.SUCCESS, False) and back == data
    assert driver.read(1, 4000, 256) == data  # and through PRPs the same


def test_sgl_bit_bucket_read(driver: NvmeDriver) -> None:
    data = os.urandom(4096)
    driver.write(1, 5000, data)
    buf, seg = driver.alloc(4096), driver.alloc(4096)
    driver.put(seg, b"".join(d.pack() for d in (descriptor(BB, 0, 512),
                                                 descriptor(DB, buf, 3584))))
    done = driver.command(1, sgl_command(IoOpcode.READ, descriptor(LAST, seg, 32), 5000, 8))
    assert result(done) == (ST.SUCCESS, False) and driver.get(buf, 3584) == data[512:]


@pytest.mark.parametrize("name", ["segment loop", "keyed", "short", "segment unmapped",
                                  "data unmapped", "segment in last"])
def test_hostile_sgls(driver: NvmeDriver, name: str) -> None:
    buf, seg = driver.alloc(4096), driver.alloc(4096)
    cases = {
        "segment loop": (descriptor(SEG, seg, 16), [descriptor(SEG, seg, 16)],
                         ST.INVALID_SGL_DESCRIPTOR_COUNT),
        "keyed": (descriptor(SglType.KEYED_DATA_BLOCK, buf, 4096), [],
                  ST.SGL_DESCRIPTOR_TYPE_INVALID),
        "short": (descriptor(DB, buf, 4000), [], ST.DATA_SGL_LENGTH_INVALID),
        "segment unmapped": (descriptor(LAST, UNMAPPED, 16), [], ST.DATA_TRANSFER_ERROR),
        "data unmapped": (descriptor(DB, UNMAPPED, 4096), [], ST.DATA_TRANSFER_ERROR),
        "segment in last": (descriptor(LAST, seg, 32),
                            [descriptor(DB, buf, 2048), descriptor(LAST, seg, 16)],
                            ST.INVALID_SGL_SEGMENT_DESCRIPTOR),
    }
    sgl1, segment, expected = cases[name]
    if segment:
        driver.put(seg, b"".join(d.pack() for d in segment))
    for opcode in (IoOpcode.READ, IoOpcode.WRITE):
        done = driver.command(1, sgl_command(opcode, sgl1, 0, 8))
        assert result(done) == (expected, expected != ST.DATA_TRANSFER_ERROR), (name, opcode)
    assert driver.read(1, 0, 1) is not None  # the controller keeps working


def test_copy_verify_write_uncorrectable(driver: NvmeDriver) -> None:
    data = os.urandom(8 * 512)
    driver.write(1, 6000, data)
    assert result(driver.copy(1, 7000, [(6004, 4), (6000, 4)], sgl=True)) == (ST.SUCCESS, False)
    assert driver.read(1, 7000, 8) == data[2048:] + data[:2048]
    assert result(driver.blocks_command(IoOpcode.VERIFY, 1, 7000, 8)) == (ST.SUCCESS, False)
    # 32 MiB: read by the runtime's worker threads, the loop serves on meanwhile
    assert result(driver.blocks_command(IoOpcode.VERIFY, 1, 0, 65536)) == (ST.SUCCESS, False)
    assert result(driver.blocks_command(IoOpcode.WRITE_UNCORRECTABLE, 1, 7003, 1)) == (
        ST.SUCCESS, False)
    done, _ = driver.io(IoOpcode.READ, 7000, 8)
    assert result(done) == (ST.UNRECOVERED_READ_ERROR, True)
    assert result(driver.blocks_command(IoOpcode.VERIFY, 1, 7000, 8)) == (
        ST.UNRECOVERED_READ_ERROR, True)
    driver.write(1, 7003, data[:512])
    assert driver.read(1, 7000, 8)[1536:2048] == data[:512]
    # hostile fields
    assert result(driver.copy(1, 7000, [(6000, 1)], cdw12=2 << 8)) == (ST.INVALID_FIELD, True)
    assert result(driver.copy(1, 7000, [(6000, 257)])) == (ST.COMMAND_SIZE_LIMIT_EXCEEDED, True)
    assert result(driver.copy(1, 1 << 40, [(6000, 1)])) == (ST.LBA_OUT_OF_RANGE, True)
    assert result(driver.blocks_command(IoOpcode.WRITE_UNCORRECTABLE, 1, 0, 1,
                                        cdw12=1 << 31)) == (ST.INVALID_FIELD, True)
    done = driver.command(1, Command(opcode=IoOpcode.COPY, nsid=1, prp1=UNMAPPED))
    assert result(done) == (ST.DATA_TRANSFER_ERROR, False)  # the range list is unreachable


def test_effects_log(driver: NvmeDriver) -> None:
    done, page = driver.log_page(LogPage.COMMANDS_EFFECTS, 4096)
    assert result(done) == (ST.SUCCESS, False)
    io = struct.unpack_from("<256I", page, 1024)
    zoned = {IoOpcode.ZONE_MGMT_SEND, IoOpcode.ZONE_MGMT_RECV, IoOpcode.ZONE_APPEND}
    assert [op for op in range(256) if io[op]] == sorted(int(op) for op in IoOpcode
                                                         if op not in zoned)
    _, page = driver.log_page(LogPage.COMMANDS_EFFECTS, 4096, cdw14=2 << 24)  # zoned
    io = struct.unpack_from("<256I", page, 1024)
    assert [op for op in range(256) if io[op]] == sorted(int(op) for op in IoOpcode)
