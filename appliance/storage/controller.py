"""The NVMe controller as a vfio-user PCI device (device layer).

Theory of operation
-------------------
BAR0 (64-bit, 16 KiB) holds the controller registers at 0h-FFFh
(:mod:`~appliance.storage.registers`), the doorbells from 1000h (stride 4,
CAP.DSTRD = 0), the MSI-X table at 2000h and the PBA at 3000h (served by
:class:`~appliance.pci.PciDevice`); one MSI-X vector per I/O queue plus the
admin queue.

A doorbell write (QEMU posts them as REGION_WRITE with NO_REPLY) runs the
processing pass (:mod:`~appliance.storage.processing_pass`), which fetches
the submitted commands of every SQ (at most one ring's worth per SQ per
call), turns each into an
:class:`~appliance.storage.request.NvmeRequest` and submits it: the fault
hook, if one is installed, or :meth:`NvmeController.execute`.  A request is
finished through :meth:`NvmeController.complete` (the one way a completion
reaches a CQ) or held (:meth:`NvmeController.hold`: an injected hang or
delay) and completed later; Abort finds any held request by (SQID, CID).  The
pass then raises the CQs' interrupts.  A CQ without room stops its SQs; completions that
cannot be posted (AERs, aborts) wait in the CQ's backlog until the host frees
entries.  :meth:`NvmeController.poll` runs the same pass for the runtime's
idle loop: it picks up shadow doorbell values the host wrote without ringing
(Doorbell Buffer Config, see :mod:`~appliance.storage.queues`).

Doorbells as memory (``doorbells="mmap"``): BAR0's doorbell page is a memfd
the client maps (a sparse mmap area of region 0), so the host's doorbell
writes arrive without a message.  :meth:`NvmeController.poll` scans the page
for changed dwords (:mod:`~appliance.storage.doorbells`) and latches them as
if they had come as REGION_WRITEs; the runtime calls it from a timer every
:meth:`NvmeController.poll_interval` seconds (fast while I/O is flowing, slow
when idle).  Note that QEMU turns off posted writes for the whole device as
soon as any region is mmap'able: every other register write waits for its
reply.

Quiesce (migration): :meth:`NvmeController.pause` stops every processing
pass (doorbells still latch); :meth:`NvmeController.resume` runs what is
pending.

Nothing is DMA'd unless a client is attached and Bus Master is enabled.  An
unreachable queue entry or shadow buffer is fatal (CSTS.CFS until a reset); a
bad data buffer fails its command (Data Transfer Error).  MSI-X: one
interrupt per pass for each IEN CQ that got entries (coalescing settings are
stored, each pass is one coalesced interrupt).  INTx: a level, asserted
while an IEN CQ holds unconsumed entries and INTMS bit 0 is clear.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from appliance.errors import LocalProtocolError
from appliance.memory import ClientMemory, DmaScope, GuestMemoryError
from appliance.pci import Bar, MsixLayout, PciDevice
from appliance.storage import admin, native_poll
from appliance.storage.doorbells import DoorbellMode, DoorbellPage
from appliance.storage.error_injection import GuestFaultHook
from appliance.storage.firmware import FirmwareSlots
from appliance.storage.identify_spec import OAES_NS_ATTRIBUTE
from appliance.storage.identity import (
    AERL,
    BAR0_SIZE,
    CLASS_CODE,
    DEVICE_ID,
    DOORBELLS_END,
    ELPE,
    MDTS,
    REGISTERS_END,
    VENDOR_ID,
    WCTEMP,
)
from appliance.storage.inflight import FaultHook, Offload, RequestEngine
from appliance.storage.log_spec import CHANGED_NS_MAX
from appliance.storage.namespace import BlockExport, Namespace, NamespaceSettings
from appliance.storage.native_io import NativeNvme
from appliance.storage.nsmgmt import NamespaceManagement
from appliance.storage.processing_pass import SQ_BUDGET, ProcessingPass
from appliance.storage.protection import PiFault
from appliance.storage.queues import (
    DOORBELL_STRIDE,
    AsyncEvents,
    CompletionQueue,
    ErrorLog,
    Shadow,
    SubmissionQueue,
    doorbell_target,
)
from appliance.storage.registers import (
    CtrlEvent,
    CtrlState,
    Features,
    RegisterFile,
    StateError,
    dwords,
)
from appliance.storage.request import NvmeRequest
from appliance.storage.spec import (
    CC,
    CC_CSS_IOCS,
    NSID_ALL,
    PAGE_SIZE,
    CommandError,
    EventInfo,
    EventType,
    LogPage,
    Status,
    ascii_field,
)
from appliance.storage.uncorrectable import LbaRanges
from appliance.storage.zones import ZoneTable
from appliance.vfio_user.backend import IrqEventfd, IrqSink
from appliance.vfio_user.wire import PciIrq

log = logging.getLogger("appliance.storage")

# Doorbell page polling (mmap mode): the runtime's timer period, fast while the
# device is busy or was within the last FAST_TICKS ticks, slow once it is quiet.
POLL_FAST, POLL_SLOW, FAST_TICKS = 0.0005, 0.02, 1000


class NvmeController(ProcessingPass, RequestEngine, PciDevice):
    """An NVMe 2.0 I/O controller with file-backed namespaces."""

    #: the native fast path for the I/O queues (set by the runtime from
    #: appliance.fastpath.nvme); None: every command runs in Python
    native: NativeNvme | None = None

    def __init__(self, namespaces: Sequence[NamespaceSettings], io_queues: int = 4,
                 queue_entries: int = 1024, serial: str = "APPLIANCE0001",
                 model: str = "Appliance NVMe", firmware: str = "0.1",
                 clock: Callable[[], float] | None = None,
                 doorbells: DoorbellMode = DoorbellMode.MESSAGE,
                 exports: Mapping[int, BlockExport] | None = None,
                 management: NamespaceManagement | None = None) -> None:
        """Open the namespace images and build the PCI function.

        ``namespaces``: each with ``image``, ``size``, ``block_size`` (512 or
        4096) and ``read_only``; NSIDs are 1.. in order.  ``clock`` (seconds,
        monotonic) drives the Timestamp feature; without it the timestamp
        holds the value the host set.  ``doorbells``: ``"message"`` (region
        writes only) or ``"mmap"`` (BAR0's doorbell page is a memfd the client
        may map; see :class:`DoorbellPage`; the runtime must then call
        :meth:`poll` every :meth:`poll_interval` seconds).  ``exports``: the
        remote images (NBD) by NSID, connected by the runtime; the controller
        owns them from now on (closed with it).  ``management``: the Namespace
        Management settings (:mod:`appliance.storage.nsmgmt`; None: not offered).

        Raises:
            ValueError: a bad queue count, queue size, string, namespace or
                doorbell mode.
            OSError: an image cannot be opened or created.
        """
        if not 1 <= io_queues <= 255 or not 2 <= queue_entries <= 65536:
            raise ValueError(f"io_queues {io_queues} / queue_entries {queue_entries} out of range")
        if doorbells not in tuple(DoorbellMode):  # the config's strings are welcome too
            raise ValueError(f"doorbells {doorbells!r} not one of {', '.join(DoorbellMode)}")
        doorbells = DoorbellMode(doorbells)
        #: where blocking file I/O runs (the runtime's threads); None: inline (tests)
        self.offload: Offload | None = None
        self.doorbell_page: DoorbellPage | None = None
        self.paused = False
        self._quiet_ticks = 0
        self.sn = ascii_field(serial, 20, "serial")
        self.mn, self.fr = ascii_field(model, 40, "model"), ascii_field(firmware, 8, "firmware")
        self.serial, self.io_queues = serial, io_queues
        self.regs = RegisterFile(mqes=queue_entries - 1)
        self.namespaces: dict[int, Namespace] = {}  # the allocated ones
        self.ns_mgmt = management or NamespaceManagement()
        try:
            for nsid, ns in enumerate(namespaces, 1):
                self.namespaces[nsid] = Namespace(
                    nsid, ns.image, ns.size, ns.block_size, ns.read_only,
                    (exports or {}).get(nsid), ns.metadata, ns.pi)
            #: the zones of each zoned namespace (device state: migrated)
            self.zones: dict[int, ZoneTable] = {}
            for nsid, settings in enumerate(namespaces, 1):
                if settings.zoned is not None:
                    opened = self.namespaces[nsid]
                    opened.fixed_format = True
                    self.zones[nsid] = ZoneTable(nsid, opened.nlbas, opened.lba_shift,
                                                 settings.zoned)
            mmap_areas: tuple[tuple[int, int], ...] = ()
            if doorbells is DoorbellMode.MMAP:
                self.doorbell_page = DoorbellPage()
                mmap_areas = ((REGISTERS_END, DOORBELLS_END - REGISTERS_END),)
            super().__init__(
                vendor_id=VENDOR_ID, device_id=DEVICE_ID, subsystem_vendor_id=VENDOR_ID,
                subsystem_id=DEVICE_ID, revision=0, class_code=CLASS_CODE,
                bars=[Bar(0, BAR0_SIZE, read=self._bar0_read, write=self._bar0_write,
                          is_64bit=True, mmap_areas=mmap_areas,
                          mmap_fd=self.doorbell_page.fd if self.doorbell_page else None)],
                msix=MsixLayout(vectors=io_queues + 1))
        except BaseException:
            self.close()
            raise
        self.mdts_bytes = PAGE_SIZE << MDTS
        self.features = Features(io_queues, self.vectors, WCTEMP, clock)
        self.events = AsyncEvents(AERL + 1)
        self.error_log = ErrorLog(ELPE + 1)
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.shadow_buffers: tuple[int, int] | None = None
        self.changed_ns: list[int] = []
        self.counters: dict[str, Any] = {
            "commands": {}, "errors": 0, "bytes_read": 0, "bytes_written": 0,
            "interrupts": 0, "invalid_doorbells": 0, "fatal": 0, "media_errors": 0,
            "aborted": 0, "sgl_commands": 0,
        }
        #: blocks a Write Uncorrectable marked, per namespace (device state: migrated)
        self.uncorrectable = {nsid: LbaRanges() for nsid in self.namespaces}
        self.faults: FaultHook | None = None  # installed by the runtime (appliance.control.faults)
        #: OCP Error Injection (Set/Get Features C0h): installed when storage.guest_faults is on
        self.guest_faults: GuestFaultHook | None = None
        #: set by the fault hook around one command: the PI tuples its read corrupts
        self.pi_fault: PiFault | None = None
        #: held requests by (SQID, CID): hung or delayed by a fault (AERs wait in ``events``)
        self.held: dict[tuple[int, int], NvmeRequest] = {}
        #: requests waiting for DMA messages (memory mapped without an fd), in order
        self.waiting: list[NvmeRequest] = []
        #: the DMA messages of queue work (SQ entries, CQ entries, shadow doorbells)
        self._queue_dma = DmaScope(consume=True, on_ready=self._dma_arrived)
        self._running = False
        #: the C doorbell-page poller's plan (native_poll.py); None: Python polls
        self._poller: native_poll.NativePoller | None = None
        self._poller_retry = True  # build a plan at the next Python poll
        self._owed = True  # Python has work pending: its poll runs, not C's
        #: firmware slots, running revision, download (device state: migrated)
        self.firmware = FirmwareSlots(self.fr)
        self.identify_data = admin.identify_controller(self)

    # ------------------------------------------------------------ public
    def poll(self) -> bool:
        """Do pending work (doorbell page, shadow doorbells, backlogs, events).

        Returns:
            True if a doorbell changed, a command ran or a completion was posted.
        """
        poller = self._poller
        if poller is not None and not self._owed:
            ran = poller.poll()  # the C poller: None idle, True it did everything
            if ran is None:
                return False
            if ran:
                self._quiet_ticks = 0
                return True
        rang = self._scan_doorbell_page()
        did = self._run_unless_quiet() or rang
        if did:
            self._quiet_ticks = 0
        self._owed = not self._quiet(shadows_polled=True)
        if self._poller is None and self._poller_retry and self.doorbell_page is not None:
            self._poller_retry = False
            self._poller = native_poll.build(self, SQ_BUDGET)
        return did

    def drop_native_plan(self) -> None:
        """Forget the C poller's plan (something it relies on changed); the next
        Python poll builds a new one (see :mod:`~appliance.storage.native_poll`)."""
        self._poller = None
        self._poller_retry = True

    def _run_unless_quiet(self) -> bool:
        """A processing pass, unless it could find nothing to do (:meth:`_quiet`):
        the loop polls every turn and most doorbell writes are CQ heads."""
        return False if self._quiet() else self._run()

    def _quiet(self, shadows_polled: bool = False) -> bool:
        """Whether a processing pass would find no work: no shadow doorbells (the
        host moves those without ringing; ``shadows_polled``: the C poller reads
        them at every call), no request held or waiting, every SQ
        drained (an SQ tail doorbell makes its SQ not drained), no CQ backlog
        or interrupt owed, no event to pair with a held AER, and MSI-X or MSI
        (an INTx level is re-evaluated every pass)."""
        if ((self.shadow_buffers is not None and not shadows_polled) or self.waiting or self.held
                or (self.events.pending and self.events.outstanding)
                or self.irq_mode == PciIrq.INTX):
            return False
        for sq in self.sqs.values():
            if not sq.empty:
                return False
        for cq in self.cqs.values():
            if cq.backlog or cq.unsignalled:
                return False
        return True

    def poll_interval(self) -> float:
        """Seconds until the runtime's next :meth:`poll` (doorbell page mode).

        Fast while an I/O queue has work (an SQ not drained, completions in a
        backlog) or a doorbell changed within the last ``FAST_TICKS`` calls of
        this method (the runtime calls it once per timer tick), slow when the
        device has been quiet that long.  The grace period matters: a
        synchronous reader (``dd iflag=direct``) rings again only after it
        reaps a completion, a gap in which every queue is idle.
        """
        self._quiet_ticks += 1
        self._poller_retry = True  # (a plan refused earlier may be possible now)
        busy = any(not sq.empty for qid, sq in self.sqs.items() if qid) or any(
            cq.backlog for cq in self.cqs.values())
        return POLL_FAST if busy or self._quiet_ticks <= FAST_TICKS else POLL_SLOW

    def pause(self) -> None:
        """Quiesce (migration stop): nothing runs until :meth:`resume`.

        No command is fetched or executed, no completion is posted, no
        interrupt raised and client memory is not touched.  Register writes
        still act (CC, AQA, INTMS...) and doorbell writes still latch their
        values (SQ tails, CQ heads), so nothing the host rings is lost.
        Blocking I/O already running off the loop finishes (and completes) first.
        """
        self._drain_offload()
        self.paused = True
        self.drop_native_plan()

    def resume(self) -> bool:
        """End :meth:`pause` and run what became pending meanwhile.

        Returns:
            True if a command ran or a completion was posted.
        """
        self.paused = False
        self.drop_native_plan()
        return self.poll()

    def notify_namespace_changed(self, nsid: int) -> None:
        """Add ``nsid`` to the Changed Namespace List and report a Namespace
        Attribute Changed notice if the host enabled it (Async Event Configuration)."""
        if nsid not in self.changed_ns:
            if len(self.changed_ns) >= CHANGED_NS_MAX or NSID_ALL in self.changed_ns:
                self.changed_ns[:] = [NSID_ALL]  # figure 199: too many to list
            else:
                self.changed_ns.append(nsid)
        if self.features.async_config & OAES_NS_ATTRIBUTE:
            self.events.add(EventType.NOTICE, EventInfo.NS_ATTRIBUTE_CHANGED, LogPage.CHANGED_NS)
        self._run()

    def close(self) -> None:
        """Close every namespace image and the doorbell page (after any I/O running
        off the loop finished)."""
        self._drain_offload()
        self._poller = None
        for ns in self.namespaces.values():
            ns.close()
        if self.doorbell_page is not None:
            self.doorbell_page.close()

    def reset_device(self) -> None:
        """FLR / DEVICE_RESET: registers to power-on values, queues and state gone."""
        self.regs.power_on()
        self._reset_controller()

    # ------------------------------------------------------------ for the command handlers
    @property
    def mem(self) -> ClientMemory:
        if self.memory is None:
            raise GuestMemoryError(0, 0, 0, why="no client attached")
        return self.memory

    def namespace(self, nsid: int) -> Namespace:
        """The active namespace ``nsid``, else INVALID_NAMESPACE (DNR)."""
        ns = self.namespaces.get(nsid)
        if ns is None or not self.is_active(nsid):
            raise CommandError(Status.INVALID_NAMESPACE, f"NSID {nsid:#x}")
        return ns

    def is_active(self, nsid: int) -> bool:
        """Whether namespace ``nsid`` is allocated and attached now; a zoned one only while
        CC.CSS enables the I/O command sets (110b); with the NVM command set
        alone (000b) it is inactive, as a namespace of a disabled command set is."""
        return nsid in self.namespaces and nsid not in self.ns_mgmt.detached and (
            nsid not in self.zones or CC.get(self.regs.cc, "css") == CC_CSS_IOCS)

    def active_namespaces(self) -> list[Namespace]:
        """The active namespaces in NSID order (NSID FFFFFFFFh: all of them)."""
        return [ns for nsid, ns in sorted(self.namespaces.items()) if self.is_active(nsid)]

    def identify_changed(self) -> None:
        """Rebuild Identify Controller (capacities change with the namespaces)."""
        self.drop_native_plan()
        self.identify_data = admin.identify_controller(self)

    def shadow_for(self, qid: int, is_cq: bool) -> Shadow | None:
        """The shadow doorbell slots for an I/O queue, if shadow doorbells are configured."""
        if self.shadow_buffers is None or qid == 0:
            return None
        return Shadow.for_queue(self.shadow_buffers, qid, is_cq)

    def configure_shadow_doorbells(self, doorbells: int, event_idx: int) -> None:
        """Doorbell Buffer Config: every I/O queue now takes its values from the shadow."""
        self.shadow_buffers = (doorbells, event_idx)
        self.drop_native_plan()
        for qid, sq in self.sqs.items():
            sq.shadow = self.shadow_for(qid, is_cq=False)
        for qid, cq in self.cqs.items():
            cq.shadow = self.shadow_for(qid, is_cq=True)

    def complete_aer(self, cid: int, status: Status) -> None:
        """Complete a held Asynchronous Event Request (an abort, 5.1)."""
        self._post(self.cqs[0], self.sqs[0], cid, (status, False, 0))

    def fatal(self, why: str) -> None:
        """Controller Fatal Status (CSTS.CFS) until the host resets the controller."""
        log.error("nvme: controller fatal status (CSTS.CFS): %s", why)
        self.drop_native_plan()
        self.counters["fatal"] += 1
        try:
            self.regs.fire(CtrlEvent.FATAL)
        except StateError:
            pass

    def _may_dma(self) -> bool:
        """Whether a processing pass may touch client memory now."""
        return (not self.paused and self.regs.state is CtrlState.READY
                and self.memory is not None and self.bus_master)

    # ------------------------------------------------------------ what the C poller relies on
    # Every change of a register, an irq setting or the client's memory drops its plan.
    def attach(self, memory: ClientMemory, irq: IrqSink, eventfd: IrqEventfd | None = None) -> None:
        self.drop_native_plan()
        super().attach(memory, irq, eventfd)

    def detach(self) -> None:
        self.drop_native_plan()
        super().detach()

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.drop_native_plan()
        super().region_write(index, offset, data)

    def irq_mask(self, index: int, start: int, count: int, masked: bool) -> None:
        self.drop_native_plan()
        super().irq_mask(index, start, count, masked)

    def set_irq_count(self, index: int, count: int) -> None:
        self.drop_native_plan()
        super().set_irq_count(index, count)

    def irqs_configured(self, index: int) -> None:
        self.drop_native_plan()
        super().irqs_configured(index)

    def dma_unmapping(self) -> None:
        self.drop_native_plan()
        super().dma_unmapping()

    # ------------------------------------------------------------ BAR0
    def _bar0_read(self, offset: int, count: int) -> bytes:
        if offset + count <= REGISTERS_END:
            return self.regs.read(offset, count)
        return bytes(count)  # doorbells are write-only; the rest is reserved

    def _bar0_write(self, offset: int, data: bytes) -> None:
        if offset + len(data) <= REGISTERS_END:
            try:
                events = self.regs.write(offset, data)
            except StateError as exc:  # the table covers every reachable pair; be safe
                log.error("nvme: %s", exc)
                events = []
            for event in events:
                self._on_event(event)
            if self.irq_mode == PciIrq.INTX and not self.paused:
                self._update_intx()  # INTMS / INTMC
        elif REGISTERS_END <= offset and offset + len(data) <= DOORBELLS_END:
            page = self.doorbell_page
            for off, value in dwords(offset, data):
                if page is not None:  # a message write to the mmap'd page: keep it the truth
                    page.store(off - REGISTERS_END, value)
                self._latch_doorbell(off, value)
            self._run_unless_quiet()

    def _on_event(self, event: CtrlEvent) -> None:
        regs = self.regs
        if event is CtrlEvent.ENABLE:
            self.sqs[0] = SubmissionQueue(0, regs.asq, regs.admin_sq_size, cqid=0)
            self.cqs[0] = CompletionQueue(0, regs.acq, regs.admin_cq_size, vector=0, ien=True,
                                          sqids={0})
            self._adopt_queues()
        elif event is CtrlEvent.ENABLE_INVALID:
            log.warning("nvme: CC.EN refused, CSTS.CFS set: %s", regs.invalid_reason)
        elif event is CtrlEvent.DISABLE:
            self._reset_controller()
        elif event is CtrlEvent.SHUTDOWN:
            for ns in self.namespaces.values():
                try:
                    ns.flush()
                except CommandError as exc:
                    log.warning("nvme: shutdown flush of nsid %d failed: %s", ns.nsid, exc)

    def _scan_doorbell_page(self) -> bool:
        """Latch every doorbell the host wrote into the mmap'd page since the last scan."""
        page = self.doorbell_page
        if page is None:
            return False
        self._adopt_queues()
        changed = page.changed(2 * (self.io_queues + 1))
        for slot, value in changed:
            self._latch_doorbell(REGISTERS_END + slot * DOORBELL_STRIDE, value)
        return bool(changed)

    def _adopt_queues(self) -> None:
        """Doorbell page: give each new queue's slots its tail/head before the host sees it.

        A queue created by an admin command (adopted before its completion is
        posted), by CC.EN or by a restore starts from the value in its state,
        not from whatever an earlier queue with the same id left in the page.
        """
        page = self.doorbell_page
        if page is not None:  # (every scan: a queue already adopted costs one lookup)
            known = page.known
            for qid, sq in self.sqs.items():
                if known.get(2 * qid) is not sq:
                    page.adopt(2 * qid, sq, sq.tail)
            for qid, cq in self.cqs.items():
                if known.get(2 * qid + 1) is not cq:
                    page.adopt(2 * qid + 1, cq, cq.head)

    def take_over_doorbell_page(self, fd: int, seen: bytes) -> None:
        """Live handoff, after the controller state is restored: serve the doorbell
        page memfd the client already maps (from the previous process), keeping the
        values the host wrote there; every current queue owns its slots as they are.

        Raises:
            OSError, ValueError: as :meth:`DoorbellPage.take_over` (nothing changed).
            LocalProtocolError: this controller has no doorbell page.
        """
        page = self.doorbell_page
        if page is None:
            raise LocalProtocolError("doorbells are not mmap'd here (storage.doorbells differs)")
        page.take_over(fd, seen)
        self.drop_native_plan()
        page.forget()
        for qid, sq in self.sqs.items():
            page.claim(2 * qid, sq)
        for qid, cq in self.cqs.items():
            page.claim(2 * qid + 1, cq)

    def _latch_doorbell(self, offset: int, value: int) -> None:
        if self.regs.state is not CtrlState.READY:
            return  # doorbells of a disabled controller are ignored
        qid, is_cq = doorbell_target(offset)
        if is_cq:
            cq = self.cqs.get(qid)
            ok = cq is not None and (cq.shadow is not None or cq.set_head(value))
        else:
            sq = self.sqs.get(qid)
            ok = sq is not None and (sq.shadow is not None or sq.set_tail(value))
        if not ok:
            exists = qid in (self.cqs if is_cq else self.sqs)
            self._doorbell_error(EventInfo.INVALID_DOORBELL_VALUE if exists
                                 else EventInfo.INVALID_DOORBELL_REGISTER,
                                 f"{'CQ' if is_cq else 'SQ'} {qid} doorbell value {value:#x}")

    def _doorbell_error(self, info: EventInfo, why: str) -> None:
        log.debug("nvme: invalid doorbell write: %s", why)
        self.counters["invalid_doorbells"] += 1
        self.events.add(EventType.ERROR, info, LogPage.ERROR)

    def _reset_controller(self) -> None:
        """Controller reset (section 7.3.2): queues, held commands, features, shadows go."""
        for req in [*self.held.values(), *self.waiting]:
            self._drop(req)
        self._drain_offload()  # no DMA into guest memory after the reset: wait for it
        self._queue_dma.drop()  # replies still on their way belong to the old queues
        self._queue_dma = DmaScope(consume=True, on_ready=self._dma_arrived)
        self.sqs.clear()
        self.cqs.clear()
        self.drop_native_plan()
        if self.doorbell_page is not None:
            self.doorbell_page.forget()
        self.shadow_buffers = None
        self.events.reset()
        self.features.reset()
        self.changed_ns.clear()
        if self.firmware.reset():  # a committed image is activated now
            self.identify_changed()
        if self.intx_asserted:
            self.deassert_intx()
