"""The NVMe host driver: the one driver every tool and test uses (client layer).

It does what the Linux driver does, minus the block layer: maps "guest" memory
(a memfd, shared with the controller unless told otherwise), resets and enables
the controller, creates I/O queue pairs each with its own MSI-X vector, and
submits commands with PRP1/PRP2 and PRP lists.  Doorbells are posted region
writes, as QEMU sends them, or (``doorbells="mmap"``) stores into the doorbell
page mapped from the fd the controller offers with BAR0 (its sparse mmap area),
as QEMU does when it maps that page.  With a doorbell buffer configured
(:attr:`NvmeDriver.shadow_doorbells`) the I/O queues' doorbells go to the shadow
buffer and ring only when the controller's EventIdx asks for it, as Linux does.

It reaches the controller only through a :class:`~appliance.client.nvme_bus.HostBus`:
a vfio-user socket (:class:`~appliance.client.nvme_bus.VfioUserBus`; pass the
:class:`VfioUserClient` itself), the fixture for driver work without a VM and the
load generator for benchmarks; or an in-process controller
(:func:`appliance.testing.nvme.controller_driver`), what the unit tests drive.

Waiting for a completion never sleeps: with interrupts it selects on the CQ's
eventfd; without, a synchronous register read acts as a barrier (the server
handles messages in order, so every posted doorbell before it is processed).
Two levels of commands: :meth:`NvmeDriver.command` returns the completion
whatever its status; :meth:`NvmeDriver.run` (and :meth:`NvmeDriver.admin`, the
bring-up, read/write/flush) raise :class:`NvmeError` when it failed.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from typing import Any

from appliance.client.nvme_bus import HostBus, VfioUserBus
from appliance.client.nvme_firmware import FirmwareCommands
from appliance.client.nvme_io import IoCommands
from appliance.client.nvme_nsmgmt import NamespaceCommands
from appliance.client.nvme_queues import (
    PAGE,
    Completion,
    NvmeError,
    PageAllocator,
    QueuePair,
    need_event,
)
from appliance.client.nvme_sgl import build_sgl, data_runs
from appliance.client.nvme_zoned import ZonedCommands
from appliance.client.vfio_user import MemoryArea, VfioUserClient, eventfd_count
from appliance.runtime.unix import wait_readable
from appliance.storage import identify_spec, spec
from appliance.vfio_user.wire import PciRegion

__all__ = ["BAR0", "CC_ENABLE", "PAGE", "Completion", "NvmeDriver", "NvmeError", "PageAllocator",
           "QueuePair", "need_event"]

BAR0 = PciRegion.BAR0
CC_ENABLE = spec.CC.encode(en=1, iosqes=spec.SQES, iocqes=spec.CQES)
PCI_COMMAND_MEMORY_MASTER = 0x0006  # config COMMAND: memory space + bus master enable
PRP_ENTRIES = PAGE // 8  # entries of one PRP list page (the last may chain to the next)


class NvmeDriver(IoCommands, ZonedCommands, NamespaceCommands, FirmwareCommands):
    """Drive an NVMe controller through a :class:`HostBus`."""

    def __init__(self, bus: HostBus | VfioUserClient, *, mem_base: int = 0x4000_0000,
                 mem_size: int = 64 << 20, share_memory: bool = True, interrupts: bool = True,
                 timeout: float = 10.0, doorbells: str = "message") -> None:
        """``bus``: a :class:`HostBus`, or a connected :class:`VfioUserClient` (its
        :class:`VfioUserBus`).  ``doorbells``: ``"message"`` (posted region writes) or
        ``"mmap"`` (stores into the controller's doorbell page; ValueError if BAR0
        offers no mmap area covering it)."""
        self.bus: HostBus = VfioUserBus(bus) if isinstance(bus, VfioUserClient) else bus
        self.doorbell_words: memoryview | None = None
        if doorbells == "mmap":
            self.doorbell_words = self.bus.map_doorbells()
        elif doorbells != "message":
            raise ValueError(f"doorbells {doorbells!r}")
        self.timeout = timeout
        self.area: MemoryArea = self.bus.map_memory(mem_base, mem_size, share=share_memory)
        self.mem = self.area.view()
        self.pages = PageAllocator(mem_base, mem_size)
        self.interrupts = interrupts
        self.vectors = 0  # interrupt vectors set up (0: none yet, or interrupts off)
        self.eventfds: list[int] = []  # per vector, when interrupts are waited for on eventfds
        self._irqs_set = False
        self.queues: dict[int, QueuePair] = {}
        self.shadow_doorbells: tuple[int, int] | None = None  # (shadow buffer, EventIdx buffer)
        self.doorbell_writes = 0  # MMIO doorbell writes (messages or page stores)
        self.cap = 0
        self.identity: identify_spec.IdentifyController | None = None
        self.block_size: dict[int, int] = {}
        self.metadata_size: dict[int, int] = {}  # metadata bytes per block, by NSID
        self.ns_blocks: dict[int, int] = {}

    @property
    def c(self) -> VfioUserClient:
        """The vfio-user client under a :class:`VfioUserBus`.

        Raises:
            TypeError: the driver runs on another bus.
        """
        if not isinstance(self.bus, VfioUserBus):
            raise TypeError(f"not on a vfio-user socket: {self.bus!r}")
        return self.bus.client

    @c.setter
    def c(self, client: VfioUserClient) -> None:
        if not isinstance(self.bus, VfioUserBus):
            raise TypeError(f"not on a vfio-user socket: {self.bus!r}")
        self.bus.client = client

    # ------------------------------------------------------------ registers
    def read_reg(self, offset: int, size: int = 4) -> int:
        """A BAR0 register (``size`` 4 or 8 bytes)."""
        return int.from_bytes(self.bus.region_read(BAR0, offset, size), "little")

    def write_reg(self, offset: int, value: int, size: int = 4, *, posted: bool = False) -> None:
        """Write a BAR0 register (a doorbell from 1000h: counted in :attr:`doorbell_writes`)."""
        self.doorbell_writes += offset >= spec.DOORBELL_BASE
        self.bus.region_write(BAR0, offset, value.to_bytes(size, "little"), posted=posted)

    @property
    def csts(self) -> int:
        return self.read_reg(spec.Reg.CSTS)

    def _doorbell(self, index: int, value: int) -> None:
        """Write doorbell dword ``index`` (2*qid: SQ tail, 2*qid+1: CQ head)."""
        if self.doorbell_words is not None:
            self.doorbell_writes += 1
            self.doorbell_words[index] = value  # one 4-byte store, as a CPU's MMIO write
            self.bus.doorbell_stored()
        else:
            self.write_reg(spec.DOORBELL_BASE + index * 4, value, posted=True)

    # ------------------------------------------------------------ memory helpers
    def _off(self, addr: int) -> int:
        return addr - self.area.address

    def put(self, addr: int, data: bytes) -> None:
        o = self._off(addr)
        self.mem[o:o + len(data)] = data

    def get(self, addr: int, n: int) -> bytes:
        o = self._off(addr)
        return bytes(self.mem[o:o + n])

    def alloc(self, nbytes: int) -> int:
        """Zeroed whole pages for ``nbytes``; returns the address of the first.

        Raises:
            MemoryError: the driver's memory is used up.
        """
        npages = max(1, (nbytes + PAGE - 1) // PAGE)
        addr = self.pages.alloc(npages)
        self.put(addr, bytes(npages * PAGE))
        return addr

    def prps(self, pages: list[int], offset: int = 0) -> tuple[int, int, list[int]]:
        """PRP1/PRP2 for data in ``pages`` (PRP lists built, chained past 512 entries);
        returns (prp1, prp2, the list pages allocated)."""
        prp1 = pages[0] + offset
        rest = pages[1:]
        if not rest:
            return prp1, 0, []
        if len(rest) == 1:
            return prp1, rest[0], []
        lists = [self.alloc(PAGE)]
        while rest:
            if len(rest) <= PRP_ENTRIES:  # the last entry fits where the chain pointer would
                self.put(lists[-1], struct.pack(f"<{len(rest)}Q", *rest))
                break
            nxt = self.alloc(PAGE)
            chunk, rest = rest[:PRP_ENTRIES - 1], rest[PRP_ENTRIES - 1:]
            self.put(lists[-1], struct.pack(f"<{len(chunk)}Q", *chunk, nxt))
            lists.append(nxt)
        return prp1, lists[0], lists

    def _buffer(self, nbytes: int, scatter: bool = False, sgl: bool = False
                ) -> tuple[int, int, list[int], list[int]]:
        """(DWORDs 6-7, DWORDs 8-9, data pages, PRP list or SGL segment pages) of a
        zeroed buffer of whole pages: PRP1/PRP2, or with ``sgl`` SGL1 (set PSDT 01b,
        :data:`~appliance.client.nvme_sgl.FLAGS_SGL`, in the command)."""
        npages = max(1, (nbytes + PAGE - 1) // PAGE)
        if scatter:  # every other page, so nothing merges
            pages = [self.alloc(2 * PAGE) for _ in range(npages)]
        else:
            base = self.alloc(npages * PAGE)
            pages = [base + i * PAGE for i in range(npages)]
        if sgl:
            sgl1, lists = build_sgl(data_runs(pages, nbytes), lambda: self.alloc(PAGE), self.put)
            raw = sgl1.pack()
            return (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little"),
                    pages, lists)
        prp1, prp2, lists = self.prps(pages)
        return prp1, prp2, pages, lists

    def buffer(self, nbytes: int, scatter: bool = False) -> tuple[int, int, list[int]]:
        """A zeroed data buffer of whole pages, kept as long as the driver:
        (prp1, prp2, page addresses).  ``scatter``: no two pages adjacent."""
        prp1, prp2, pages, _ = self._buffer(nbytes, scatter)
        return prp1, prp2, pages

    def _release(self, *page_lists: list[int]) -> None:
        for pages in page_lists:
            for page in pages:
                self.pages.release(page)

    def gather(self, pages: list[int], nbytes: int) -> bytes:
        """The first ``nbytes`` of the data in ``pages``."""
        return b"".join(self.get(p, PAGE) for p in pages)[:nbytes]

    def scatter(self, pages: list[int], data: bytes) -> None:
        """Copy ``data`` into ``pages``, a page each."""
        for i, page in enumerate(pages):
            self.put(page, data[i * PAGE:(i + 1) * PAGE])

    # ------------------------------------------------------------ bring-up
    def enable(self, admin_depth: int = 32, cc: int | None = None) -> None:
        """Reset, set up the admin queue, enable with ``cc``, wait for CSTS.RDY.

        By default ``cc`` is :data:`CC_ENABLE` with CC.CSS 110b (every I/O
        command set) when CAP.CSS announces I/O command sets, as Linux enables.

        Raises:
            NvmeError: the controller set CSTS.CFS (an invalid ``cc``, say).
            TimeoutError: CSTS.RDY did not follow within the timeout.
        """
        # Memory space + bus mastering, as pci_enable_device/pci_set_master do:
        # without Bus Master Enable the controller may not touch client memory.
        self.bus.region_write(PciRegion.CONFIG, 0x04,
                              PCI_COMMAND_MEMORY_MASTER.to_bytes(2, "little"))
        self.cap = self.read_reg(spec.Reg.CAP, 8)
        if cc is None:
            iocs = spec.CAP.get(self.cap, "css") & spec.CAP_CSS_IOCS
            cc = spec.CC.set(CC_ENABLE, "css", spec.CC_CSS_IOCS if iocs else spec.CC_CSS_NVM)
        self.write_reg(spec.Reg.CC, cc & ~1)
        self._wait_ready(0)
        if not self._irqs_set:
            self.vectors, self.eventfds = self.bus.setup_interrupts(self.interrupts)
            self._irqs_set = True
        sq, cq = self.alloc(admin_depth * spec.SQE_SIZE), self.alloc(admin_depth * spec.CQE_SIZE)
        self.queues[0] = QueuePair(0, admin_depth, sq, cq, 0,
                                   self.eventfds[0] if self.eventfds else None)
        self.write_reg(spec.Reg.AQA, spec.AQA.encode(asqs=admin_depth - 1, acqs=admin_depth - 1))
        for reg, value in ((spec.Reg.ASQ, sq), (spec.Reg.ACQ, cq)):  # lo_hi_writeq, as Linux
            self.write_reg(reg, value & 0xFFFFFFFF)
            self.write_reg(reg + 4, value >> 32)
        self.write_reg(spec.Reg.CC, cc)
        self._wait_ready(1)

    def _wait_ready(self, want: int) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            csts = self.csts
            if spec.CSTS.get(csts, "cfs"):
                raise NvmeError(0, True, f"controller fatal status (CSTS={csts:#x})")
            if spec.CSTS.get(csts, "rdy") == want:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"CSTS.RDY did not become {want}")

    def shutdown(self) -> None:
        """Normal shutdown (CC.SHN=01b) and wait for SHST complete."""
        cc = self.read_reg(spec.Reg.CC)
        self.write_reg(spec.Reg.CC, spec.CC.set(cc, "shn", spec.SHN_NORMAL))
        deadline = time.monotonic() + self.timeout
        while spec.CSTS.get(self.csts, "shst") != spec.SHST_COMPLETE:
            if time.monotonic() > deadline:
                raise TimeoutError("shutdown did not complete")

    def ready(self, io_queues: int = 1) -> NvmeDriver:
        """The short bring-up: enable, ask for ``io_queues`` queues, create queue
        pairs 1..io_queues (no identify), forget the interrupts it raised.

        Raises:
            NvmeError: a command of the bring-up failed.
        """
        self.enable()
        if io_queues:
            self._set_queue_count(io_queues)
        for qid in range(1, io_queues + 1):
            self.create_queue_pair(qid)
        self.bus.forget_interrupts()
        return self

    def setup(self, io_queues: int = 2, depth: int = 64) -> identify_spec.IdentifyController:
        """Linux's probe: enable, identify, create up to ``io_queues`` I/O queue
        pairs (as many as granted), identify every active namespace.

        Raises:
            NvmeError: a command of the bring-up failed.
        """
        self.enable()
        ident = self.identify_controller()
        nq = self._set_queue_count(io_queues)
        granted = min(io_queues, (nq & 0xFFFF) + 1, ((nq >> 16) & 0xFFFF) + 1)
        for qid in range(1, granted + 1):
            self.create_queue_pair(qid, depth)
        for nsid in self.active_namespaces():
            self.identify_namespace(nsid)
        return ident

    def _set_queue_count(self, io_queues: int) -> int:
        """Set Features Number of Queues; returns its dw0 (what was allocated)."""
        return self.admin(spec.Command(opcode=spec.AdminOpcode.SET_FEATURES,
                                       cdw10=spec.FeatureId.NUMBER_OF_QUEUES,
                                       cdw11=((io_queues - 1) << 16) | (io_queues - 1))).dw0

    # ------------------------------------------------------------ admin commands
    def admin(self, cmd: spec.Command) -> Completion:
        """Run an admin command; raises :class:`NvmeError` when it failed."""
        return self.run(0, cmd)

    def admin_command(self, opcode: int, **fields: int) -> Completion:
        """Run an admin command built from ``fields``; returns its completion, failed or not."""
        return self.command(0, spec.Command(opcode=opcode, **fields))

    def identify(self, cns: int, nsid: int = 0, **fields: int) -> tuple[Completion, bytes]:
        """One Identify of ``cns``: (its completion, failed or not; the 4 KiB it returned)."""
        prp1, prp2, pages, lists = self._buffer(spec.IDENTIFY_SIZE)
        try:
            done = self.admin_command(spec.AdminOpcode.IDENTIFY, nsid=nsid,
                                      cdw10=fields.pop("cdw10", cns),
                                      prp1=prp1, prp2=prp2, **fields)
            return done, self.gather(pages, spec.IDENTIFY_SIZE)
        finally:
            self._release(pages, lists)

    def _identify_ok(self, cns: int, nsid: int = 0) -> bytes:
        done, data = self.identify(cns, nsid)
        self._check(done, spec.AdminOpcode.IDENTIFY)
        return data

    def identify_controller(self) -> identify_spec.IdentifyController:
        self.identity = identify_spec.IdentifyController.unpack(self._identify_ok(spec.Cns.CONTROLLER))
        return self.identity

    def active_namespaces(self) -> list[int]:
        raw = self._identify_ok(spec.Cns.ACTIVE_NS_LIST)
        ids = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 4096, 4)]
        return [n for n in ids if n][: 1024]

    def identify_namespace(self, nsid: int) -> identify_spec.IdentifyNamespace:
        """Identify namespace ``nsid`` and learn its block size and size."""
        ns = identify_spec.IdentifyNamespace.unpack(self._identify_ok(spec.Cns.NAMESPACE, nsid))
        index = ns.flbas & 0xF  # the namespace's current LBA format
        lbaf = ns.lbaf0 if index == 0 else int.from_bytes(
            ns.lbaf1_15[(index - 1) * 4:index * 4], "little")
        self.block_size[nsid] = 1 << identify_spec.LBAF.get(lbaf, "lbads")
        self.metadata_size[nsid] = identify_spec.LBAF.get(lbaf, "ms")
        self.ns_blocks[nsid] = ns.nsze
        return ns

    def create_queue_pair(self, qid: int, depth: int = 64, vector: int | None = None) -> QueuePair:
        """Create I/O CQ then SQ ``qid`` of ``depth`` entries, the CQ on ``vector``
        (default: its own, ``qid``, when the controller has that many; else 0).

        Raises:
            NvmeError: either Create command failed.
        """
        cq = self.alloc(depth * spec.CQE_SIZE)  # zeroed: stale phase tags would read as completions
        sq = self.alloc(depth * spec.SQE_SIZE)
        if vector is None:
            vector = qid if qid < self.vectors else 0
        ien = 1 if self.vectors else 0
        self.admin(spec.Command(opcode=spec.AdminOpcode.CREATE_CQ, prp1=cq,
                                cdw10=((depth - 1) << 16) | qid, cdw11=(vector << 16) | (ien << 1) | 1))
        self.admin(spec.Command(opcode=spec.AdminOpcode.CREATE_SQ, prp1=sq,
                                cdw10=((depth - 1) << 16) | qid, cdw11=(qid << 16) | 1))
        eventfd = self.eventfds[vector] if vector < len(self.eventfds) else None
        q = QueuePair(qid, depth, sq, cq, vector, eventfd)
        self.queues[qid] = q
        return q

    # ------------------------------------------------------------ submission / completion
    def submit(self, qid: int, cmd: spec.Command, context: Any = None, ring: bool = True,
               cid: int | None = None, force: bool = False) -> int:
        """Place ``cmd`` on SQ ``qid`` (ring the doorbell unless ``ring`` is False);
        returns its CID: the next free one, or ``cid`` (a test's pick, used even if
        outstanding).  ``force``: place it even with ``depth - 1`` commands
        outstanding (a test of the controller's own limits: the SQ slots the
        controller already fetched are free, the driver just cannot know it yet).

        Raises:
            RuntimeError: the SQ is full (without ``force``).
        """
        q = self.queues[qid]
        if not force and len(q.outstanding) >= q.depth - 1:
            raise RuntimeError(f"queue {qid} full")
        if cid is None:
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
        """Tell the controller SQ ``qid``'s tail (through the shadow buffer when
        configured, ringing only if the EventIdx asks for it)."""
        q = self.queues[qid]
        new, old = q.sq_tail, q.sq_rung
        q.sq_rung = new
        if self._shadow_says_quiet(2 * qid, new, old):
            return
        self._doorbell(2 * qid, new)

    def _shadow_says_quiet(self, index: int, new: int, old: int) -> bool:
        """Write doorbell ``index``'s shadow (I/O queues only); True when the
        controller's EventIdx says the MMIO doorbell need not ring."""
        if self.shadow_doorbells is None or index < 2:
            return False
        shadow, event_idx = self.shadow_doorbells
        self.put(shadow + 4 * index, struct.pack("<I", new))
        (event,) = struct.unpack("<I", self.get(event_idx + 4 * index, 4))
        return not need_event(event, new, old)

    def _collect(self, qid: int) -> list[Completion]:
        """New entries in CQ ``qid``; updates the CQ head doorbell."""
        q = self.queues[qid]
        done = []
        old = q.cq_head
        while True:
            raw = self.get(q.cq_addr + q.cq_head * spec.CQE_SIZE, spec.CQE_SIZE)
            cqe = spec.Completion.unpack(raw)
            if cqe.status & 1 != q.phase:
                break
            status = (cqe.status >> 1) & 0x7FF
            ctx = q.outstanding.pop(cqe.cid, None)
            done.append(Completion(cqe.cid, status, bool(cqe.status & spec.STATUS_DNR), cqe.dw0, ctx,
                                   cqe.dw1))
            q.cq_head += 1
            if q.cq_head == q.depth:
                q.cq_head, q.phase = 0, q.phase ^ 1
        if done and not self._shadow_says_quiet(2 * qid + 1, q.cq_head, old):
            self._doorbell(2 * qid + 1, q.cq_head)
        return done

    def reap(self, qid: int) -> list[Completion]:
        """Completions now in CQ ``qid`` (first those a :meth:`command` put aside)."""
        q = self.queues[qid]
        done, q.unclaimed = q.unclaimed, []
        return done + self._collect(qid)

    def _idle(self, q: QueuePair, left: float) -> None:
        """Wait up to ``left`` seconds for the controller to post to ``q``'s CQ."""
        if q.eventfd is not None:
            if wait_readable(q.eventfd, left):
                eventfd_count(q.eventfd)
        else:  # barrier: posted doorbells are processed (mmap'd ones: by the server's poll)
            self.read_reg(spec.Reg.CSTS)

    def wait(self, qid: int, count: int = 1) -> list[Completion]:
        """Block until at least ``count`` completions arrived on ``qid``.

        Raises:
            TimeoutError: fewer arrived within the timeout.
        """
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
            self._idle(q, left)
        return got

    def command(self, qid: int, cmd: spec.Command) -> Completion:
        """Submit one command and wait for its completion; returns it, failed or not.
        Other completions seen meanwhile wait for the next :meth:`reap`.

        Raises:
            TimeoutError: it did not complete within the timeout.
        """
        cid = self.submit(qid, cmd)
        q = self.queues[qid]
        deadline = time.monotonic() + self.timeout
        while True:
            mine = None
            for comp in self._collect(qid):
                if comp.cid == cid and mine is None:
                    mine = comp
                else:
                    q.unclaimed.append(comp)
            if mine is not None:
                return mine
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {qid}: no completion for CID {cid}")
            self._idle(q, left)

    def run(self, qid: int, cmd: spec.Command) -> Completion:
        """:meth:`command`, raising :class:`NvmeError` when it failed."""
        return self._check(self.command(qid, cmd), cmd.opcode)

    @staticmethod
    def _check(comp: Completion, opcode: int) -> Completion:
        if comp.status:
            raise NvmeError(comp.status, comp.dnr, f"opcode {opcode:#x}")
        return comp

    # ------------------------------------------------------------ log pages, teardown
    def log_page(self, lid: int, nbytes: int, nsid: int = spec.NSID_ALL, offset: int = 0,
                 **fields: int) -> tuple[Completion, bytes]:
        """Get Log Page ``lid``: (its completion, failed or not; the ``nbytes`` read)."""
        prp1, prp2, pages, lists = self._buffer(nbytes)
        numd = nbytes // 4 - 1
        try:
            done = self.admin_command(spec.AdminOpcode.GET_LOG_PAGE, nsid=nsid, prp1=prp1,
                                      prp2=prp2, cdw10=lid | (numd & 0xFFFF) << 16,
                                      cdw11=numd >> 16, cdw12=offset & 0xFFFFFFFF,
                                      cdw13=offset >> 32, **fields)
            return done, self.gather(pages, nbytes)
        finally:
            self._release(pages, lists)

    def close(self) -> None:
        """Release the doorbell page view, the bus's fds and mappings."""
        if self.doorbell_words is not None:
            self.doorbell_words.release()
            self.doorbell_words = None
        self.bus.close()
        self.eventfds = []

    def chunks(self, total: int, size: int) -> Iterator[tuple[int, int]]:
        for off in range(0, total, size):
            yield off, min(size, total - off)
