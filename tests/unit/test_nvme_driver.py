"""A tiny in-test NVMe driver, and end-to-end flows through NvmeController.

The driver plays the Linux ``nvme`` driver's part against the controller
in-process: guest memory is a memfd mapped into a ClientMemory, interrupts go
to a recording sink, BAR0 and config space are reached through the PciDevice
region entry points exactly as the vfio-user server calls them.  Other
``test_nvme_*`` modules import :class:`Driver` from here.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import NamespaceConfig
from appliance.memory import ClientMemory
from appliance.pci.config import COMMAND, PciCommand
from appliance.storage import NvmeController
from appliance.storage.spec import (
    CC,
    PAGE_SIZE,
    AdminOpcode,
    Command,
    Completion,
    FeatureId,
    IoOpcode,
    Reg,
    Status,
)
from appliance.vfio_user.wire import PciIrq, PciRegion

BASE = 0x10_0000  # guest "RAM" starts at 1 MiB
SIZE = 8 << 20
UNMAPPED = 0x4000_0000
CC_ENABLE = CC.encode(en=1, iosqes=6, iocqes=4)


class Sink:
    """Records interrupts; every eventfd 'exists'."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, index: int, sub: int) -> bool:
        self.calls.append((index, sub))
        return True

    def take(self) -> list[tuple[int, int]]:
        calls, self.calls = self.calls, []
        return calls


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Linux ``nvme_dbbuf_need_event``: ring the MMIO doorbell?"""
    return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF


class Driver:
    """Just enough of an NVMe host driver to exercise the controller."""

    def __init__(self, ctrl: NvmeController, msix: bool = True) -> None:
        self.ctrl = ctrl
        fd = os.memfd_create("guest", os.MFD_ALLOW_SEALING)  # sealable, as QEMU's: mmap'd
        os.ftruncate(fd, SIZE)
        self.ram = mmap.mmap(fd, SIZE)
        self.mem = ClientMemory()
        self.mem.map(BASE, SIZE, fd=fd)
        self.sink = Sink()
        ctrl.attach(self.mem, self.sink)
        cmd = PciCommand.MEMORY | PciCommand.BUS_MASTER
        ctrl.region_write(PciRegion.CONFIG, COMMAND, int(cmd).to_bytes(2, "little"))
        if msix:
            ctrl.set_irq_count(PciIrq.MSIX, ctrl.vectors)
            ctrl.irqs_configured(PciIrq.MSIX)
        else:
            ctrl.set_irq_count(PciIrq.INTX, 1)
            ctrl.irqs_configured(PciIrq.INTX)
        self.free = BASE
        self.sqs: dict[int, list[int]] = {}  # qid -> [base, size, tail]
        self.cqs: dict[int, list[int]] = {}  # qid -> [base, size, head, phase]
        self.cid = 0
        self.dbbuf: tuple[int, int] | None = None
        self.doorbell_writes = 0

    # ------------------------------------------------------------ memory
    def alloc(self, size: int) -> int:
        address = self.free
        self.free += -(-size // PAGE_SIZE) * PAGE_SIZE
        assert self.free <= BASE + SIZE
        self.ram[address - BASE:address - BASE + size] = bytes(size)
        return address

    def peek(self, address: int, n: int) -> bytes:
        return bytes(self.ram[address - BASE:address - BASE + n])

    def poke(self, address: int, data: bytes) -> None:
        self.ram[address - BASE:address - BASE + len(data)] = data

    def prps(self, pages: list[int], offset: int = 0) -> tuple[int, int]:
        """PRP1/PRP2 for data in ``pages`` (PRP lists built, chained past 512 entries)."""
        prp1 = pages[0] + offset
        rest = pages[1:]
        if not rest:
            return prp1, 0
        if len(rest) == 1:
            return prp1, rest[0]
        first = self.alloc(PAGE_SIZE)
        page = first
        while rest:
            if len(rest) <= 512:
                self.poke(page, struct.pack(f"<{len(rest)}Q", *rest))
                break
            nxt = self.alloc(PAGE_SIZE)
            self.poke(page, struct.pack("<511Q", *rest[:511]) + struct.pack("<Q", nxt))
            rest, page = rest[511:], nxt
        return prp1, first

    def buffer(self, nbytes: int, scatter: bool = False) -> tuple[int, int, list[int]]:
        """A data buffer of whole pages: (prp1, prp2, page addresses)."""
        npages = -(-nbytes // PAGE_SIZE)
        if scatter:  # every other page, so nothing merges
            pages = [self.alloc(2 * PAGE_SIZE) for _ in range(npages)]
        else:
            base = self.alloc(npages * PAGE_SIZE)
            pages = [base + i * PAGE_SIZE for i in range(npages)]
        return (*self.prps(pages), pages)

    def gather(self, pages: list[int], nbytes: int) -> bytes:
        return b"".join(self.peek(p, PAGE_SIZE) for p in pages)[:nbytes]

    def scatter(self, pages: list[int], data: bytes) -> None:
        for i, page in enumerate(pages):
            self.poke(page, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])

    # ------------------------------------------------------------ registers
    def read_reg(self, offset: int, size: int = 4) -> int:
        return int.from_bytes(self.ctrl.region_read(PciRegion.BAR0, offset, size), "little")

    def write_reg(self, offset: int, value: int, size: int = 4) -> None:
        self.doorbell_writes += offset >= 0x1000
        self.ctrl.region_write(PciRegion.BAR0, offset, value.to_bytes(size, "little"))

    def enable(self, entries: int = 32, cc: int = CC_ENABLE) -> None:
        asq, acq = self.alloc(entries * 64), self.alloc(entries * 16)
        self.sqs[0], self.cqs[0] = [asq, entries, 0], [acq, entries, 0, 1]
        self.write_reg(Reg.AQA, (entries - 1) << 16 | (entries - 1))
        for reg, value in ((Reg.ASQ, asq), (Reg.ACQ, acq)):  # lo_hi_writeq
            self.write_reg(reg, value & 0xFFFFFFFF)
            self.write_reg(reg + 4, value >> 32)
        self.write_reg(Reg.CC, cc & ~1)
        self.write_reg(Reg.CC, cc)

    @property
    def csts(self) -> int:
        return self.read_reg(Reg.CSTS)

    # ------------------------------------------------------------ queues
    def submit(self, qid: int, cmd: Command, ring: bool = True) -> int:
        base, size, tail = self.sqs[qid]
        self.cid = (self.cid + 1) & 0xFFFF
        cmd.cid = self.cid
        self.poke(base + tail * 64, cmd.pack())
        new = (tail + 1) % size
        self.sqs[qid][2] = new
        if ring:
            self.ring_sq(qid, tail)
        return int(cmd.cid)

    def ring_sq(self, qid: int, old: int) -> None:
        new = self.sqs[qid][2]
        if self.dbbuf and qid:
            dbs, eis = self.dbbuf
            self.poke(dbs + 8 * qid, struct.pack("<I", new))
            event_idx = struct.unpack("<I", self.peek(eis + 8 * qid, 4))[0]
            if not need_event(event_idx, new, old):
                return
        self.write_reg(0x1000 + 8 * qid, new)

    def reap(self, qid: int) -> list[Completion]:
        base, size, head, phase = self.cqs[qid]
        out = []
        while True:
            entry = Completion.unpack(self.peek(base + head * 16, 16))
            if entry.status & 1 != phase:
                break
            out.append(entry)
            head += 1
            if head == size:
                head, phase = 0, phase ^ 1
        if out:
            old = self.cqs[qid][2]
            self.cqs[qid][2:] = [head, phase]
            if self.dbbuf and qid:
                dbs, eis = self.dbbuf
                self.poke(dbs + 8 * qid + 4, struct.pack("<I", head))
                event_idx = struct.unpack("<I", self.peek(eis + 8 * qid + 4, 4))[0]
                if not need_event(event_idx, head, old):
                    return out
            self.write_reg(0x1000 + 8 * qid + 4, head)
        return out

    def run(self, qid: int, cmd: Command) -> Completion:
        cid = self.submit(qid, cmd)
        done = self.reap(qid)
        assert [c.cid for c in done] == [cid], done
        return done[0]

    def admin(self, opcode: int, **fields: int) -> Completion:
        return self.run(0, Command(opcode=opcode, **fields))

    def identify(self, cns: int, nsid: int = 0, **fields: int) -> tuple[Completion, bytes]:
        prp1, prp2, pages = self.buffer(4096)
        done = self.admin(AdminOpcode.IDENTIFY, nsid=nsid, cdw10=cns, prp1=prp1, prp2=prp2,
                          **fields)
        return done, self.gather(pages, 4096)

    def create_io_queue(self, qid: int, entries: int = 64, vector: int | None = None) -> None:
        cq, sq = self.alloc(entries * 16), self.alloc(entries * 64)
        vector = qid if vector is None else vector
        done = self.admin(AdminOpcode.CREATE_CQ, prp1=cq, cdw10=(entries - 1) << 16 | qid,
                          cdw11=vector << 16 | 0x3)
        assert status(done) == (Status.SUCCESS, False)
        done = self.admin(AdminOpcode.CREATE_SQ, prp1=sq, cdw10=(entries - 1) << 16 | qid,
                          cdw11=qid << 16 | 0x1)
        assert status(done) == (Status.SUCCESS, False)
        self.cqs[qid], self.sqs[qid] = [cq, entries, 0, 1], [sq, entries, 0]

    def io(self, opcode: int, slba: int, nlb: int, nsid: int = 1, qid: int = 1,
           data: bytes | None = None, scatter: bool = False, **fields: int
           ) -> tuple[Completion, bytes]:
        """One read/write/compare of ``nlb`` blocks; returns (completion, data read)."""
        bs = self.ctrl.namespaces[nsid].block_size if nsid in self.ctrl.namespaces else 512
        nbytes = nlb * bs
        prp1, prp2, pages = self.buffer(nbytes, scatter)
        if data is not None:
            self.scatter(pages, data)
        cdw12 = fields.pop("cdw12", 0) | (nlb - 1)
        done = self.run(qid, Command(opcode=opcode, nsid=nsid, prp1=prp1, prp2=prp2,
                                     cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=cdw12,
                                     **fields))
        return done, self.gather(pages, nbytes)

    def ready(self, io_queues: int = 1) -> Driver:
        """Enable, set the queue count and create I/O queue pairs 1..io_queues."""
        self.enable()
        assert self.csts & 1
        if io_queues:
            done = self.admin(AdminOpcode.SET_FEATURES, cdw10=FeatureId.NUMBER_OF_QUEUES,
                              cdw11=(io_queues - 1) << 16 | (io_queues - 1))
            assert status(done) == (Status.SUCCESS, False)
        for qid in range(1, io_queues + 1):
            self.create_io_queue(qid)
        self.sink.take()
        return self


def status(entry: Completion) -> tuple[int, bool]:
    """(SCT << 8 | SC, DNR) of a completion."""
    return (entry.status >> 1) & 0x7FF, bool(entry.status & 0x8000)


def make_controller(tmp_path: Path, *, read_only: bool = False, block_size: int = 512,
                    size: int = 1 << 20, namespaces: int = 1, **kw: object) -> NvmeController:
    cfgs = [NamespaceConfig(image=str(tmp_path / f"ns{i}.img"), size=size, block_size=block_size,
                            read_only=read_only, grow=False) for i in range(1, namespaces + 1)]
    return NvmeController(cfgs, **kw)  # type: ignore[arg-type]


@pytest.fixture
def ctrl(tmp_path: Path) -> Iterator[NvmeController]:
    c = make_controller(tmp_path, io_queues=4, queue_entries=256)
    yield c
    c.close()


# ---------------------------------------------------------------- end-to-end flows
def test_bring_up_like_linux(ctrl: NvmeController) -> None:
    d = Driver(ctrl)
    cap = d.read_reg(Reg.CAP, 8)
    assert cap & 0xFFFF == 255 and cap >> 16 & 1 == 1  # MQES, CQR
    assert (cap >> 24) & 0xFF == 20 and (cap >> 37) & 0xFF == 1  # TO, CSS NVM
    assert d.read_reg(Reg.CAP + 4) == cap >> 32  # lo_hi_readq
    assert d.read_reg(Reg.VS) == 0x00010400
    d.enable()
    assert d.csts == 1
    done, data = d.identify(1)
    assert status(done) == (Status.SUCCESS, False)
    assert data[0:2] == b"\xa9\xa9" and data[4:24].rstrip() == b"APPLIANCE0001"
    assert data[512:514] == b"\x66\x44" and data[77] == 7  # SQES/CQES, MDTS
    assert struct.unpack_from("<H", data, 256)[0] & 0x100  # OACS: doorbell buffer config
    done, data = d.identify(2)
    assert struct.unpack_from("<2I", data) == (1, 0)
    done, data = d.identify(0, nsid=1)
    assert struct.unpack_from("<Q", data)[0] == 2048 and data[130] == 9  # NSZE, LBADS
    done, data = d.identify(3, nsid=1)
    assert data[0:2] == b"\x03\x10" and data[20:22] == b"\0\0"
    done, data = d.identify(6, cdw11=0)
    assert status(done) == (Status.SUCCESS, False) and data == bytes(4096)
    done = d.admin(AdminOpcode.SET_FEATURES, cdw10=FeatureId.NUMBER_OF_QUEUES, cdw11=0x00070007)
    assert done.dw0 == 0x00030003  # 4 I/O queues allocated, whatever was asked
    for qid in range(1, 5):
        d.create_io_queue(qid)
    assert len(ctrl.sqs) == 5


def test_constructor_checks(tmp_path: Path) -> None:
    for kw in ({"io_queues": 0}, {"io_queues": 256}, {"queue_entries": 1},
               {"serial": ""}, {"serial": "x" * 21}, {"model": "caf\u00e9"}):
        with pytest.raises(ValueError):
            make_controller(tmp_path, **kw)
    with pytest.raises(ValueError):
        make_controller(tmp_path, block_size=1024)
    ok = make_controller(tmp_path, namespaces=2)
    assert ok.vectors == 5 and ok.region(0).size == 0x4000
    ok.close()


def test_bugs_fail_the_command_not_the_process(
        ctrl: NvmeController, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Driver(ctrl).ready()

    def boom(*_: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(ctrl.namespaces[1], "flush", boom)
    done = d.run(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert status(done) == (Status.INTERNAL_ERROR, True) and d.csts == 1
    monkeypatch.setattr(ctrl.sqs[1], "fetch", boom)
    d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert d.csts & 0b10  # a bug outside a command: CFS, still no exception


def test_poll_and_detach(ctrl: NvmeController) -> None:
    assert ctrl.poll() is False  # no client
    d = Driver(ctrl).ready()
    assert ctrl.poll() is False
    old = d.sqs[1][2]
    d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1), ring=False)
    assert ctrl.poll() is False  # no doorbell, no shadow: the entry is not the host's yet
    d.ring_sq(1, old)
    assert len(d.reap(1)) == 1
    ctrl.detach()
    assert d.csts == 0 and ctrl.sqs == {} and ctrl.counters["commands"]["io.flush"] == 1
