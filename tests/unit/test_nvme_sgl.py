"""SGL data pointers (PSDT 01b) through the one driver and an in-process controller."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import UNMAPPED, make_controller, status

from appliance.client.nvme import NvmeDriver
from appliance.client.nvme_sgl import FLAGS_SGL, descriptor
from appliance.storage.sgl import MAX_DESCRIPTORS
from appliance.storage.spec import Command, IoOpcode, SglDescriptor, SglType, Status
from appliance.testing.nvme import controller_driver

ST = Status
DB, BB, SEG, LAST = SglType.DATA_BLOCK, SglType.BIT_BUCKET, SglType.SEGMENT, SglType.LAST_SEGMENT


@pytest.fixture
def drv(tmp_path: Path) -> Iterator[NvmeDriver]:
    ctrl = make_controller(tmp_path, size=4 << 20)
    yield controller_driver(ctrl).ready()
    ctrl.close()


def sgl_command(opcode: int, sgl1: SglDescriptor, slba: int = 0, nlb: int = 8) -> Command:
    raw = sgl1.pack()
    return Command(opcode=opcode, nsid=1, flags=FLAGS_SGL, cdw10=slba, cdw12=nlb - 1,
                   prp1=int.from_bytes(raw[:8], "little"), prp2=int.from_bytes(raw[8:], "little"))


def segment(drv: NvmeDriver, *descs: SglDescriptor) -> int:
    """A segment page holding ``descs``; returns its address."""
    page = drv.alloc(4096)
    drv.put(page, b"".join(d.pack() for d in descs))
    return page


@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("nlb", [1, 8, 64, 1024])
def test_sgl_write_read_round_trip(drv: NvmeDriver, tmp_path: Path, nlb: int,
                                   scatter: bool) -> None:
    payload = os.urandom(nlb * 512)
    done, _ = drv.io(IoOpcode.WRITE, slba=16, nlb=nlb, data=payload, scatter=scatter, sgl=True)
    assert status(done) == (ST.SUCCESS, False)
    with open(tmp_path / "ns1.img", "rb") as f:
        f.seek(16 * 512)
        assert f.read(len(payload)) == payload
    done, back = drv.io(IoOpcode.READ, slba=16, nlb=nlb, scatter=scatter, sgl=True)
    assert status(done) == (ST.SUCCESS, False) and back == payload
    done, _ = drv.io(IoOpcode.COMPARE, slba=16, nlb=nlb, data=payload, sgl=True)
    assert status(done) == (ST.SUCCESS, False)
    assert drv.bus.ctrl.counters["sgl_commands"] == 3


def test_segment_chain_across_pages(drv: NvmeDriver) -> None:
    """More than 256 scattered pages: Segment descriptors chain segment pages (as
    Linux does), the last through a Last Segment descriptor."""
    d = drv
    # 512 KiB (MDTS) in 128 scattered pages, each page's data in two 2 KiB runs: 256
    # data descriptors, one more than a segment page holds beside its pointer
    data = os.urandom(512 * 1024)
    buf = [d.alloc(8192) for _ in range(128)]
    descs = []
    for i, page in enumerate(buf):
        d.put(page, data[i * 4096:i * 4096 + 2048])
        d.put(page + 6144, data[i * 4096 + 2048:(i + 1) * 4096])
        descs += [descriptor(DB, page, 2048), descriptor(DB, page + 6144, 2048)]
    pages = [d.alloc(4096), d.alloc(4096)]
    d.put(pages[0], b"".join(x.pack() for x in [*descs[:255],
                                                 descriptor(LAST, pages[1], 16 * 1)]))
    d.put(pages[1], descs[255].pack())
    cmd = sgl_command(IoOpcode.WRITE, descriptor(SEG, pages[0], 4096), nlb=1024)
    assert status(d.command(1, cmd)) == (ST.SUCCESS, False)
    assert d.bus.ctrl.namespaces[1].read_bytes(0, len(data)) == data


def test_bit_bucket_discards_read_data_and_is_ignored_on_writes(drv: NvmeDriver) -> None:
    payload = os.urandom(4096)
    assert status(drv.io(IoOpcode.WRITE, slba=0, nlb=8, data=payload)[0]) == (ST.SUCCESS, False)
    buf = drv.alloc(4096)
    seg = segment(drv, descriptor(DB, buf, 1024), descriptor(BB, 0, 2048),
                  descriptor(DB, buf + 1024, 1024))
    done = drv.command(1, sgl_command(IoOpcode.READ, descriptor(LAST, seg, 48)))
    assert status(done) == (ST.SUCCESS, False)
    assert drv.get(buf, 2048) == payload[:1024] + payload[3072:]
    assert drv.get(buf + 2048, 2048) == bytes(2048)  # nothing past the two blocks
    # On a write the bit bucket moves nothing and counts for nothing.
    drv.put(buf, payload)
    seg = segment(drv, descriptor(DB, buf, 2048), descriptor(BB, 0, 512),
                  descriptor(DB, buf + 2048, 2048))
    done = drv.command(1, sgl_command(IoOpcode.WRITE, descriptor(LAST, seg, 48), slba=100))
    assert status(done) == (ST.SUCCESS, False)
    assert drv.bus.ctrl.namespaces[1].read_bytes(100, 4096) == payload


def _hostile(drv: NvmeDriver) -> dict[str, tuple[SglDescriptor, Status]]:
    buf = drv.alloc(8192)
    loop = drv.alloc(4096)
    drv.put(loop, descriptor(SEG, loop, 16).pack())  # a segment that points at itself
    return {
        "short data block": (descriptor(DB, buf, 4095), ST.DATA_SGL_LENGTH_INVALID),
        "long data block": (descriptor(DB, buf, 4097), ST.DATA_SGL_LENGTH_INVALID),
        "keyed data block": (descriptor(SglType.KEYED_DATA_BLOCK, buf, 4096),
                             ST.SGL_DESCRIPTOR_TYPE_INVALID),
        "transport data block": (descriptor(SglType.TRANSPORT_DATA_BLOCK, buf, 4096),
                                 ST.SGL_DESCRIPTOR_TYPE_INVALID),
        "reserved type": (SglDescriptor(address=buf, length=4096, sgl_id=0xE0),
                          ST.SGL_DESCRIPTOR_TYPE_INVALID),
        "offset subtype": (SglDescriptor(address=0, length=4096, sgl_id=0x01),
                           ST.SGL_DESCRIPTOR_TYPE_INVALID),
        "bit bucket as sgl1": (descriptor(BB, 0, 4096), ST.SGL_DESCRIPTOR_TYPE_INVALID),
        "segment length 0": (descriptor(LAST, segment(drv, descriptor(DB, buf, 4096)), 0),
                             ST.INVALID_SGL_SEGMENT_DESCRIPTOR),
        "segment length not x16": (descriptor(LAST, segment(drv, descriptor(DB, buf, 4096)), 20),
                                   ST.INVALID_SGL_SEGMENT_DESCRIPTOR),
        "segment inside last segment": (
            descriptor(LAST, segment(drv, descriptor(DB, buf, 2048),
                                     descriptor(SEG, buf, 16)), 32),
            ST.INVALID_SGL_SEGMENT_DESCRIPTOR),
        "segment descriptor not last": (
            descriptor(SEG, segment(drv, descriptor(LAST, buf, 16),
                                    descriptor(DB, buf, 4096)), 32),
            ST.INVALID_SGL_DESCRIPTOR_COUNT),
        "segment loop": (descriptor(SEG, loop, 16), ST.INVALID_SGL_DESCRIPTOR_COUNT),
        "segment past the budget": (descriptor(LAST, buf, 0xFFFFFFF0),
                                    ST.INVALID_SGL_DESCRIPTOR_COUNT),
        "data block wraps": (descriptor(DB, (1 << 64) - 2048, 4096), ST.DATA_SGL_LENGTH_INVALID),
        "segment wraps": (descriptor(SEG, (1 << 64) - 16, 32), ST.DATA_SGL_LENGTH_INVALID),
        "descriptors past the data": (
            descriptor(LAST, segment(drv, descriptor(DB, buf, 4096),
                                     descriptor(DB, buf + 4096, 512)), 32),
            ST.DATA_SGL_LENGTH_INVALID),
        "segment after the data": (
            descriptor(SEG, segment(drv, descriptor(DB, buf, 4096),
                                    descriptor(LAST, buf, 16)), 32),
            ST.DATA_SGL_LENGTH_INVALID),
        "segment outside memory": (descriptor(LAST, UNMAPPED, 16), ST.DATA_TRANSFER_ERROR),
        "data outside memory": (descriptor(DB, UNMAPPED, 4096), ST.DATA_TRANSFER_ERROR),
    }


HOSTILE = [
    "short data block", "long data block", "keyed data block", "transport data block",
    "reserved type", "offset subtype", "bit bucket as sgl1", "segment length 0",
    "segment length not x16", "segment inside last segment", "segment descriptor not last",
    "segment loop", "segment past the budget", "data block wraps", "segment wraps", "descriptors past the data",
    "segment after the data", "segment outside memory", "data outside memory"]


def test_hostile_catalogue_is_complete(drv: NvmeDriver) -> None:
    assert sorted(_hostile(drv)) == sorted(HOSTILE)


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("opcode", [IoOpcode.READ, IoOpcode.WRITE])
def test_hostile_sgl_gets_the_spec_status(drv: NvmeDriver, name: str, opcode: int) -> None:
    sgl1, expected = _hostile(drv)[name]
    done = drv.command(1, sgl_command(opcode, sgl1))
    dnr = expected != ST.DATA_TRANSFER_ERROR
    assert status(done) == (expected, dnr), name
    # the controller lives on: the next command works
    assert status(drv.io(IoOpcode.READ, slba=0, nlb=1, sgl=True)[0]) == (ST.SUCCESS, False)


def test_descriptor_budget_bounds_a_chain_of_empty_descriptors(drv: NvmeDriver) -> None:
    """Zero-length data blocks describe nothing; a chain of them ends at the budget."""
    pages = [drv.alloc(4096) for _ in range(MAX_DESCRIPTORS // 255 + 2)]
    for here, nxt in itertools.pairwise(pages):
        drv.put(here, b"".join([descriptor(DB, here, 0).pack()] * 255)
                + descriptor(SEG, nxt, 4096).pack())
    done = drv.command(1, sgl_command(IoOpcode.READ, descriptor(SEG, pages[0], 4096)))
    assert status(done) == (ST.INVALID_SGL_DESCRIPTOR_COUNT, True)


def test_a_segment_is_read_only_as_far_as_the_descriptor_budget(
        drv: NvmeDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """The segment's length is the host's: more descriptors than the budget are
    refused before they are read, so a long segment costs no memory here."""
    mem = drv.bus.ctrl.mem
    read, sizes = mem.read, []

    def spy(address: int, length: int) -> bytes:
        sizes.append(length)
        return read(address, length)

    monkeypatch.setattr(mem, "read", spy)
    size = (MAX_DESCRIPTORS + 1) * SglDescriptor.SIZE
    seg = drv.alloc(size)
    done = drv.command(1, sgl_command(IoOpcode.READ, descriptor(LAST, seg, size)))
    assert status(done) == (ST.INVALID_SGL_DESCRIPTOR_COUNT, True)
    assert max(sizes, default=0) < size


def test_sgl_past_mdts_is_invalid_field(drv: NvmeDriver) -> None:
    done = drv.command(1, sgl_command(IoOpcode.READ, descriptor(DB, drv.alloc(4096), 4096),
                                      nlb=1025))
    assert status(done) == (ST.INVALID_FIELD, True)


def test_admin_commands_refuse_sgls(drv: NvmeDriver) -> None:
    done = drv.admin_command(0x06, cdw10=1, flags=FLAGS_SGL)
    assert status(done) == (ST.INVALID_FIELD, True)
