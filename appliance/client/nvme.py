"""A small NVMe host driver over the vfio-user client library (runtime layer).

It does what the Linux driver does, minus the block layer: maps "guest" memory
(a memfd, shared with the server unless told otherwise), resets and enables the
controller, creates I/O queue pairs each with its own MSI-X vector (eventfds),
and submits Read/Write/Flush with PRP1/PRP2 and PRP lists.  Doorbells are
posted region writes, as QEMU sends them, or (``doorbells="mmap"``) stores
into the doorbell page mapped from the fd the server hands out with BAR0's
region info (its sparse mmap area), as QEMU does when it maps that page.  It
is the fixture for driver work without a VM and the load generator for
benchmarks.

Waiting for a completion never sleeps: with interrupts it selects on the CQ's
eventfd; without, a synchronous register read acts as a barrier (the server
handles messages in order, so every posted doorbell before it is processed).
"""

from __future__ import annotations

import mmap
import os
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from appliance.client.vfio_user import VfioUserClient, eventfd_count, new_eventfd
from appliance.storage import spec
from appliance.vfio_user.wire import PciIrq, PciRegion

BAR0 = PciRegion.BAR0
PAGE = spec.PAGE_SIZE


class NvmeError(Exception):
    """A command completed with a non-zero status."""

    def __init__(self, status: int, dnr: bool, what: str) -> None:
        name = spec.Status(status).name if status in spec.Status._value2member_map_ else hex(status)
        super().__init__(f"{what}: status {name}{' (DNR)' if dnr else ''}")
        self.status = status
        self.dnr = dnr


class PageAllocator:
    """Bump allocator of 4 KiB pages with a free list, in client memory."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.size = base, size
        self.next = base
        self.free: list[int] = []

    def alloc(self, pages: int = 1) -> int:
        """Allocate ``pages`` contiguous pages (the caller zeroes them)."""
        if pages == 1 and self.free:
            return self.free.pop()
        addr = self.next
        if addr + pages * PAGE > self.base + self.size:
            raise MemoryError("driver memory exhausted")
        self.next += pages * PAGE
        return addr

    def release(self, addr: int) -> None:
        self.free.append(addr)


@dataclass
class QueuePair:
    qid: int
    depth: int
    sq_addr: int
    cq_addr: int
    vector: int
    eventfd: int | None
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1
    next_cid: int = 0
    outstanding: dict[int, Any] = field(default_factory=dict)


@dataclass
class Completion:
    cid: int
    status: int
    dnr: bool
    dw0: int
    context: Any = None


class NvmeDriver:
    """Drive the appliance's NVMe controller through a connected client."""

    def __init__(self, client: VfioUserClient, *, mem_base: int = 0x4000_0000,
                 mem_size: int = 64 << 20, share_memory: bool = True, interrupts: bool = True,
                 timeout: float = 10.0, doorbells: str = "message") -> None:
        """``doorbells``: ``"message"`` (posted REGION_WRITEs) or ``"mmap"`` (stores into
        the server's doorbell page; ValueError if BAR0 offers no mmap area covering it)."""
        self.c = client
        self.doorbell_words: memoryview | None = None
        if doorbells == "mmap":
            self.doorbell_words = self._map_doorbells()
        elif doorbells != "message":
            raise ValueError(f"doorbells {doorbells!r}")
        self.timeout = timeout
        self.area = client.map_memfd(mem_base, mem_size, share_fd=share_memory)
        self.mem = self.area.view()
        self.pages = PageAllocator(mem_base, mem_size)
        self.interrupts = interrupts
        self.queues: dict[int, QueuePair] = {}
        self.eventfds: list[int] = []
        self.cap = 0
        self.identify: spec.IdentifyController | None = None
        self.block_size: dict[int, int] = {}
        self.ns_blocks: dict[int, int] = {}

    def _map_doorbells(self) -> memoryview:
        """Map BAR0's doorbell page from the region fd; a dword view of it from 1000h."""
        reply = self.c.region_info(BAR0)
        base = reply.info.offset
        for offset, size in reply.sparse_areas:
            if reply.fd is not None and offset <= spec.DOORBELL_BASE < offset + size:
                try:
                    mm = mmap.mmap(reply.fd, size, flags=mmap.MAP_SHARED, offset=base + offset)
                finally:
                    os.close(reply.fd)
                self._doorbell_mm = mm
                return memoryview(mm)[spec.DOORBELL_BASE - offset:].cast("I")
        if reply.fd is not None:
            os.close(reply.fd)
        raise ValueError(f"BAR0 has no mmap area over the doorbells: {reply.sparse_areas}")

    def _doorbell(self, index: int, value: int) -> None:
        """Write doorbell dword ``index`` (2*qid: SQ tail, 2*qid+1: CQ head)."""
        if self.doorbell_words is not None:
            self.doorbell_words[index] = value  # one 4-byte store, as a CPU's MMIO write
        else:
            self.c.write32(BAR0, spec.DOORBELL_BASE + index * 4, value, posted=True)

    # ------------------------------------------------------------ memory helpers
    def _off(self, addr: int) -> int:
        return addr - self.area.address

    def put(self, addr: int, data: bytes) -> None:
        o = self._off(addr)
        self.mem[o:o + len(data)] = data

    def get(self, addr: int, n: int) -> bytes:
        o = self._off(addr)
        return bytes(self.mem[o:o + n])

    # ------------------------------------------------------------ bring-up
    def enable(self, admin_depth: int = 32) -> None:
        """Reset, set up the admin queue, enable, wait for CSTS.RDY."""
        # Memory space + bus mastering, as pci_enable_device/pci_set_master do:
        # without Bus Master Enable the controller may not touch client memory.
        self.c.region_write(PciRegion.CONFIG, 0x04, (0x0006).to_bytes(2, "little"))
        self.cap = self.c.read64(BAR0, spec.Reg.CAP)
        self.c.write32(BAR0, spec.Reg.CC, 0)
        self._wait_ready(0)
        nvec = self.c.irq_info(PciIrq.MSIX).count if self.interrupts else 0
        if nvec:
            self.eventfds = [new_eventfd() for _ in range(nvec)]
            self.c.set_irq_eventfds(PciIrq.MSIX, [os.dup(fd) for fd in self.eventfds])
        sq, cq = self.pages.alloc(), self.pages.alloc()
        self.put(cq, bytes(PAGE))
        self.queues[0] = QueuePair(0, admin_depth, sq, cq, 0, self.eventfds[0] if nvec else None)
        self.c.write32(BAR0, spec.Reg.AQA, spec.AQA.encode(asqs=admin_depth - 1, acqs=admin_depth - 1))
        self.c.write64(BAR0, spec.Reg.ASQ, sq)
        self.c.write64(BAR0, spec.Reg.ACQ, cq)
        self.c.write32(BAR0, spec.Reg.CC, spec.CC.encode(en=1, iosqes=spec.SQES, iocqes=spec.CQES))
        self._wait_ready(1)

    def _wait_ready(self, want: int) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            csts = self.c.read32(BAR0, spec.Reg.CSTS)
            if spec.CSTS.get(csts, "cfs"):
                raise NvmeError(0, True, f"controller fatal status (CSTS={csts:#x})")
            if spec.CSTS.get(csts, "rdy") == want:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"CSTS.RDY did not become {want}")

    def shutdown(self) -> None:
        """Normal shutdown (CC.SHN=01b) and wait for SHST complete."""
        cc = self.c.read32(BAR0, spec.Reg.CC)
        self.c.write32(BAR0, spec.Reg.CC, spec.CC.set(cc, "shn", spec.SHN_NORMAL))
        deadline = time.monotonic() + self.timeout
        while spec.CSTS.get(self.c.read32(BAR0, spec.Reg.CSTS), "shst") != spec.SHST_COMPLETE:
            if time.monotonic() > deadline:
                raise TimeoutError("shutdown did not complete")

    def setup(self, io_queues: int = 2, depth: int = 64) -> spec.IdentifyController:
        """Enable, identify, and create ``io_queues`` I/O queue pairs."""
        self.enable()
        ident = self.identify_controller()
        nq = self.admin(spec.Command(opcode=spec.AdminOpcode.SET_FEATURES,
                                     cdw10=spec.FeatureId.NUMBER_OF_QUEUES,
                                     cdw11=((io_queues - 1) << 16) | (io_queues - 1))).dw0
        granted = min(io_queues, (nq & 0xFFFF) + 1, ((nq >> 16) & 0xFFFF) + 1)
        for qid in range(1, granted + 1):
            self.create_queue_pair(qid, depth)
        for nsid in self.active_namespaces():
            self.identify_namespace(nsid)
        return ident

    # ------------------------------------------------------------ admin commands
    def admin(self, cmd: spec.Command, data_len: int = 0) -> Completion:
        return self.run(0, cmd)

    def identify_controller(self) -> spec.IdentifyController:
        buf = self.pages.alloc()
        self.admin(spec.Command(opcode=spec.AdminOpcode.IDENTIFY, prp1=buf, cdw10=spec.Cns.CONTROLLER))
        self.identify = spec.IdentifyController.unpack(self.get(buf, spec.IDENTIFY_SIZE))
        self.pages.release(buf)
        return self.identify

    def active_namespaces(self) -> list[int]:
        buf = self.pages.alloc()
        self.admin(spec.Command(opcode=spec.AdminOpcode.IDENTIFY, prp1=buf,
                                cdw10=spec.Cns.ACTIVE_NS_LIST))
        raw = self.get(buf, spec.IDENTIFY_SIZE)
        self.pages.release(buf)
        ids = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 4096, 4)]
        return [n for n in ids if n][: 1024]

    def identify_namespace(self, nsid: int) -> spec.IdentifyNamespace:
        buf = self.pages.alloc()
        self.admin(spec.Command(opcode=spec.AdminOpcode.IDENTIFY, nsid=nsid, prp1=buf,
                                cdw10=spec.Cns.NAMESPACE))
        ns = spec.IdentifyNamespace.unpack(self.get(buf, spec.IDENTIFY_SIZE))
        self.pages.release(buf)
        lbaf = ns.lbaf0  # this controller offers one LBA format
        self.block_size[nsid] = 1 << spec.LBAF.get(lbaf, "lbads")
        self.ns_blocks[nsid] = ns.nsze
        return ns

    def create_queue_pair(self, qid: int, depth: int) -> QueuePair:
        cq_pages = (depth * spec.CQE_SIZE + PAGE - 1) // PAGE
        cq = self.pages.alloc(cq_pages)
        sq = self.pages.alloc((depth * spec.SQE_SIZE + PAGE - 1) // PAGE)
        self.put(cq, bytes(cq_pages * PAGE))  # stale phase tags would read as completions
        vector = qid if len(self.eventfds) > qid else 0
        ien = 1 if self.eventfds else 0
        self.admin(spec.Command(opcode=spec.AdminOpcode.CREATE_CQ, prp1=cq,
                                cdw10=((depth - 1) << 16) | qid, cdw11=(vector << 16) | (ien << 1) | 1))
        self.admin(spec.Command(opcode=spec.AdminOpcode.CREATE_SQ, prp1=sq,
                                cdw10=((depth - 1) << 16) | qid, cdw11=(qid << 16) | 1))
        q = QueuePair(qid, depth, sq, cq, vector, self.eventfds[vector] if self.eventfds else None)
        self.queues[qid] = q
        return q

    # ------------------------------------------------------------ submission / completion
    def submit(self, qid: int, cmd: spec.Command, context: Any = None, ring: bool = True) -> int:
        """Place ``cmd`` on SQ ``qid`` (ring the doorbell unless ``ring`` is False)."""
        q = self.queues[qid]
        if len(q.outstanding) >= q.depth - 1:
            raise RuntimeError(f"queue {qid} full")
        while q.next_cid in q.outstanding:
            q.next_cid = (q.next_cid + 1) & 0xFFFF
        cid = q.next_cid
        q.next_cid = (cid + 1) & 0xFFFF
        cmd.cid = cid
        self.put(q.sq_addr + q.sq_tail * spec.SQE_SIZE, cmd.pack())
        q.sq_tail = (q.sq_tail + 1) % q.depth
        q.outstanding[cid] = context
        if ring:
            self.ring(qid)
        return cid

    def ring(self, qid: int) -> None:
        self._doorbell(2 * qid, self.queues[qid].sq_tail)

    def reap(self, qid: int) -> list[Completion]:
        """Completions now in CQ ``qid``; updates the CQ head doorbell."""
        q = self.queues[qid]
        done = []
        while True:
            raw = self.get(q.cq_addr + q.cq_head * spec.CQE_SIZE, spec.CQE_SIZE)
            cqe = spec.Completion.unpack(raw)
            if cqe.status & 1 != q.phase:
                break
            status = (cqe.status >> 1) & 0x7FF
            ctx = q.outstanding.pop(cqe.cid, None)
            done.append(Completion(cqe.cid, status, bool(cqe.status & spec.STATUS_DNR), cqe.dw0, ctx))
            q.cq_head += 1
            if q.cq_head == q.depth:
                q.cq_head, q.phase = 0, q.phase ^ 1
        if done:
            self._doorbell(2 * qid + 1, q.cq_head)
        return done

    def wait(self, qid: int, count: int = 1) -> list[Completion]:
        """Block until at least ``count`` completions arrived on ``qid``."""
        q = self.queues[qid]
        got: list[Completion] = []
        deadline = time.monotonic() + self.timeout
        while len(got) < count:
            got += self.reap(qid)
            if len(got) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {qid}: {len(got)}/{count} completions")
            if q.eventfd is not None:
                if select.select([q.eventfd], [], [], left)[0]:
                    eventfd_count(q.eventfd)
            else:  # barrier: posted doorbells are processed (mmap'd ones: by the server's poll)
                self.c.read32(BAR0, spec.Reg.CSTS)
        return got

    def run(self, qid: int, cmd: spec.Command) -> Completion:
        """Submit one command and wait for it; raise :class:`NvmeError` on failure."""
        cid = self.submit(qid, cmd)
        while True:
            for comp in self.wait(qid):
                if comp.cid == cid:
                    if comp.status:
                        raise NvmeError(comp.status, comp.dnr, f"opcode {cmd.opcode:#x}")
                    return comp

    # ------------------------------------------------------------ data commands
    def buffer(self, nbytes: int) -> tuple[int, int, int, list[int]]:
        """Allocate a data buffer; returns (address, prp1, prp2, pages to release)."""
        npages = (nbytes + PAGE - 1) // PAGE
        data = self.pages.alloc(npages)
        owned = [data + i * PAGE for i in range(npages)]
        if npages <= 1:
            return data, data, 0, owned
        if npages == 2:
            return data, data, data + PAGE, owned
        per_list = PAGE // 8 - 1
        entries = [data + i * PAGE for i in range(1, npages)]
        first_list = prev = self.pages.alloc()
        owned.append(first_list)
        while entries:
            chunk, entries = entries[:per_list], entries[per_list:]
            if entries and len(entries) == 1:  # the last entry fits where the chain pointer would
                chunk, entries = chunk + entries, []
            nxt = self.pages.alloc() if entries else 0
            if nxt:
                owned.append(nxt)
            words = chunk + ([nxt] if nxt else [])
            self.put(prev, b"".join(x.to_bytes(8, "little") for x in words))
            prev = nxt
        return data, data, first_list, owned

    def rw_command(self, opcode: int, nsid: int, lba: int, nblocks: int, prp1: int, prp2: int,
                   fua: bool = False) -> spec.Command:
        return spec.Command(opcode=opcode, nsid=nsid, prp1=prp1, prp2=prp2,
                            cdw10=lba & 0xFFFFFFFF, cdw11=lba >> 32,
                            cdw12=(nblocks - 1) | ((1 << 30) if fua else 0))

    def write(self, nsid: int, lba: int, data: bytes, qid: int = 1, fua: bool = False) -> None:
        bs = self.block_size[nsid]
        addr, prp1, prp2, owned = self.buffer(len(data))
        self.put(addr, data)
        try:
            self.run(qid, self.rw_command(spec.IoOpcode.WRITE, nsid, lba, len(data) // bs, prp1, prp2, fua))
        finally:
            for p in owned:
                self.pages.release(p)

    def read(self, nsid: int, lba: int, nblocks: int, qid: int = 1) -> bytes:
        bs = self.block_size[nsid]
        addr, prp1, prp2, owned = self.buffer(nblocks * bs)
        try:
            self.run(qid, self.rw_command(spec.IoOpcode.READ, nsid, lba, nblocks, prp1, prp2))
            return self.get(addr, nblocks * bs)
        finally:
            for p in owned:
                self.pages.release(p)

    def flush(self, nsid: int, qid: int = 1) -> None:
        self.run(qid, spec.Command(opcode=spec.IoOpcode.FLUSH, nsid=nsid))

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds.clear()
        if self.doorbell_words is not None:
            self.doorbell_words.release()
            self.doorbell_words = None
            self._doorbell_mm.close()

    def chunks(self, total: int, size: int) -> Iterator[tuple[int, int]]:
        for off in range(0, total, size):
            yield off, min(size, total - off)
