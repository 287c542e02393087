"""The controller's processing pass (device layer).

:class:`ProcessingPass` is the part of
:class:`~appliance.storage.controller.NvmeController` that a doorbell write
(or the runtime's poll) runs: it continues the requests waiting for DMA
messages, flushes every CQ's backlog, releases the fault hook's due
completions, drains each SQ (at most one ring's worth, :data:`SQ_BUDGET`
commands per pass; the native fast path runs the entries it can in batches,
:func:`~appliance.storage.native_io.run_batch`) into requests for the engine
(:class:`~appliance.storage.inflight.RequestEngine`), pairs pending events with
held AERs and then raises the CQs' interrupts (MSI-X: one per pass for each IEN
CQ that got entries; INTx: a level).  Posting a completion entry
(:meth:`ProcessingPass._post`) and recording a failed command's Error
Information entry (:meth:`ProcessingPass.record_error`) are here too.  The
controller supplies registers, queues, doorbells and the PCI function.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from appliance.memory import ClientMemory, DmaPending, GuestMemoryError, MappedRegions
from appliance.storage.native_io import native_memory, run_batch
from appliance.storage.queues import AsyncEvents, CompletionQueue, ErrorLog, SubmissionQueue
from appliance.storage.registers import CtrlState, RegisterFile
from appliance.storage.request import NvmeRequest, Result
from appliance.storage.spec import Command, Completion, EventInfo, IoOpcode, Status, status_field
from appliance.vfio_user.wire import PciIrq

if TYPE_CHECKING:
    from appliance.memory import DmaScope
    from appliance.storage.controller import NvmeController
    from appliance.storage.inflight import FaultHook
    from appliance.storage.native_io import NativeNvme

log = logging.getLogger("appliance.storage")

# I/O commands whose CDW10-11 hold an SLBA (the Error Information entry's LBA).
LBA_OPCODES = frozenset({IoOpcode.WRITE, IoOpcode.READ, IoOpcode.COMPARE, IoOpcode.WRITE_ZEROES,
                         IoOpcode.WRITE_UNCORRECTABLE, IoOpcode.VERIFY, IoOpcode.ZONE_APPEND,
                         IoOpcode.ZONE_MGMT_SEND, IoOpcode.ZONE_MGMT_RECV})
#: commands one SQ may run per processing pass; the rest waits for the next turn of
#: the loop (the runtime's idle poll), so one busy queue cannot starve the others
SQ_BUDGET = 64
#: I/O commands Python runs that change nothing the C poller's plan holds
PLAN_KEEPING_OPCODES = frozenset({IoOpcode.READ, IoOpcode.WRITE, IoOpcode.FLUSH,
                                  IoOpcode.COMPARE, IoOpcode.VERIFY})


class ProcessingPass:
    """SQs drained, CQs flushed, interrupts raised: the pass half of :class:`NvmeController`."""

    # Set by NvmeController.__init__ (and PciDevice's).
    memory: ClientMemory | None
    paused: bool
    regs: RegisterFile
    native: NativeNvme | None
    faults: FaultHook | None
    counters: dict[str, Any]
    events: AsyncEvents
    error_log: ErrorLog
    waiting: list[NvmeRequest]
    sqs: dict[int, SubmissionQueue]
    cqs: dict[int, CompletionQueue]
    _queue_dma: DmaScope
    _running: bool
    _owed: bool

    if TYPE_CHECKING:  # the rest of the controller's (no runtime stubs: they would shadow it)
        @property
        def _ctrl(self) -> NvmeController: ...
        @property
        def mem(self) -> ClientMemory: ...
        @property
        def irq_mode(self) -> PciIrq: ...
        @property
        def intx_asserted(self) -> bool: ...
        @property
        def bus_master(self) -> bool: ...
        def signal(self, vector: int) -> None: ...
        def deassert_intx(self) -> None: ...
        def submit(self, req: NvmeRequest) -> None: ...
        def _continue_waiting(self) -> bool: ...
        def fatal(self, why: str) -> None: ...
        def drop_native_plan(self) -> None: ...
        def _adopt_queues(self) -> None: ...
        def _doorbell_error(self, info: EventInfo, why: str) -> None: ...

    def _run(self) -> bool:
        if (self.paused or self.regs.state is not CtrlState.READY or self.memory is None
                or not self.bus_master or self._running):
            return False
        mem, did = self.memory, False
        mem.scope = self._queue_dma
        self._running = True
        try:
            if self.waiting:
                did |= self._continue_waiting()
            for cq in list(self.cqs.values()):
                did |= cq.flush(mem)
            if self.faults is not None:  # fault hook: deferred completions that are due
                did |= self.faults.release(self._ctrl)
            for sq in list(self.sqs.values()):
                if self.regs.state is not CtrlState.READY:
                    break
                if self.sqs.get(sq.qid) is sq:  # not deleted by an earlier command
                    did |= self._drain(sq, mem)
            if 0 in self.cqs:
                for cid, dw0 in self.events.take():
                    self._post(self.cqs[0], self.sqs[0], cid, (Status.SUCCESS, False, dw0))
                    did = True
        except GuestMemoryError as exc:  # a queue entry or shadow buffer is unreachable
            self.fatal(str(exc))
        except Exception as exc:  # a bug: the controller fails, the process lives on
            log.exception("nvme: processing failed")
            self.fatal(repr(exc))
        finally:
            self._running = False
        self._interrupts()
        self._owed = True  # (the next poll is Python's: it sees what is left)
        return did

    def _drain(self, sq: SubmissionQueue, mem: ClientMemory) -> bool:
        """Run up to one ring's worth of ``sq``'s commands (GuestMemoryError: fatal).

        With the native fast path the C code runs the entries it can in
        batches (:func:`~appliance.storage.native_io.run_batch`); each entry it
        hands back runs here, one at a time.
        """
        cq, done = self.cqs[sq.cqid], 0
        regions: MappedRegions | None = None
        looked = False  # regions looked up (only once there is work)
        python_next = False  # the entry at the head is Python's
        while True:
            self._sync(sq, mem)
            while not sq.empty and done < min(sq.size, SQ_BUDGET) and cq.has_room(mem):
                if not looked:
                    regions, looked = native_memory(self._ctrl, sq), True
                if regions and not python_next and self.native is not None:
                    ran, python_next = run_batch(self._ctrl, self.native, regions, sq, cq,
                                                 min(sq.size, SQ_BUDGET) - done)
                    done += ran
                    if ran:
                        continue
                python_next = False
                try:
                    cmd = sq.fetch(mem)
                except DmaPending:  # the entry is on its way: this SQ goes on then
                    return done > 0
                if sq.qid == 0 or cmd.opcode not in PLAN_KEEPING_OPCODES:
                    self.drop_native_plan()  # (queues, features, namespaces, marks may change)
                self.submit(NvmeRequest(sq, cmd))
                done += 1
                if self.regs.state is not CtrlState.READY or self.sqs.get(sq.qid) is not sq:
                    return True
            if sq.shadow is None or not sq.empty or done >= min(sq.size, SQ_BUDGET):
                return done > 0
            # EventIdx = the tail consumed, so the host's next update rings; then
            # re-read the shadow: the host may have moved before it saw the EventIdx.
            sq.shadow.publish(mem, sq.tail)
            self._sync(sq, mem)
            if sq.empty:
                return done > 0

    def _sync(self, queue: SubmissionQueue | CompletionQueue, mem: ClientMemory) -> None:
        try:
            taken = queue.sync(mem)
        except DmaPending:  # the shadow value is on its way: the next pass takes it
            return
        if not taken:
            self._doorbell_error(EventInfo.INVALID_DOORBELL_VALUE,
                                 f"queue {queue.qid} shadow doorbell value")

    def _post(self, cq: CompletionQueue, sq: SubmissionQueue, cid: int, result: Result) -> None:
        status, dnr, dw0 = result
        self._owed = True  # (a completion outside a pass: its interrupt is Python's)
        if cq.qid == 0:
            self._adopt_queues()  # a queue this command created, before the host may ring it
        cq.post(self.mem, Completion(dw0=dw0 & 0xFFFFFFFF, dw1=dw0 >> 32, sq_head=sq.head,
                                     sq_id=sq.qid, cid=cid, status=status_field(status, dnr, 0)))

    def record_error(self, qid: int, cmd: Command, status: int, dnr: bool,
                     lba: int | None = None) -> None:
        """Count a failed command and add its Error Information log entry.

        ``lba``: the first LBA that saw the error; by default the command's
        SLBA for an I/O command that has one.  Media errors (status code type
        2) also count in SMART's Media and Data Integrity Errors.
        """
        self.counters["errors"] += 1
        if status >> 8 == 2:
            self.counters["media_errors"] += 1
        if lba is None:
            lba = cmd.cdw10 | cmd.cdw11 << 32 if qid and cmd.opcode in LBA_OPCODES else 0
        self.error_log.add(qid, cmd.cid, status, dnr, cmd.nsid, lba)

    def _interrupts(self) -> None:
        if self.memory is not None and self.memory.writes_in_flight:
            return  # after the client acknowledged the entries (the last reply runs us again)
        if self.irq_mode == PciIrq.INTX:
            self._update_intx()
            return
        for cq in self.cqs.values():
            if cq.unsignalled:
                cq.unsignalled = False
                if cq.ien and not (self.faults is not None  # fault hook: a lost interrupt
                                   and self.faults.drop_interrupt(cq.qid)):
                    self.signal(cq.vector)
                    self.counters["interrupts"] += 1

    def _update_intx(self) -> None:
        """INTx is a level: asserted while an IEN CQ holds entries and INTMS bit 0 is clear."""
        level = False
        for cq in self.cqs.values():
            cq.unsignalled = False
            if cq.shadow is not None and self.memory is not None:
                self.memory.scope = self._queue_dma
                try:  # a stale head would keep the level up: read it, and ask for rings
                    cq.sync(self.memory)
                    cq.shadow.publish(self.memory, cq.head)
                except DmaPending:
                    pass  # the value is on its way; its arrival runs a pass
                except GuestMemoryError as exc:
                    self.fatal(str(exc))
            level |= cq.ien and cq.outstanding > 0
        level &= not self.regs.intms & 1
        if level and not self.intx_asserted:
            self.signal(0)
            self.counters["interrupts"] += 1
        elif not level and self.intx_asserted:
            self.deassert_intx()
