"""The life of an NVMe request inside the controller (device layer).

:class:`RequestEngine` is the part of
:class:`~appliance.storage.controller.NvmeController` that runs requests
(:mod:`appliance.storage.request` holds their state table): submit through the
fault hook, execute the admin or I/O handler, hold, complete (the one way a
CQE is posted), and the two waits a request can be in — for DMA messages (its
:class:`~appliance.memory.DmaScope`; it runs again from the start once the
replies are in, after re-checking its queue) and for blocking file I/O running
on the runtime's :class:`Offload` (it completes when the work comes back).
The controller supplies queues, registers, memory and interrupts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from appliance.memory import ClientMemory, DmaPending, DmaScope, GuestMemoryError
from appliance.storage import admin, zns
from appliance.storage.queues import CompletionQueue, SubmissionQueue
from appliance.storage.request import NvmeRequest, Offloaded, RequestState, Result
from appliance.storage.spec import AdminOpcode, Command, CommandError, IoOpcode, Status

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController

log = logging.getLogger("appliance.storage")

_OPCODE_NAMES = {
    True: {op.value: f"admin.{op.name.lower()}" for op in AdminOpcode},
    False: {op.value: f"io.{op.name.lower()}" for op in IoOpcode},
}


class FaultHook(Protocol):
    """What the controller asks of an installed fault set (appliance.control.faults.FaultSet)."""

    def submit(self, ctrl: NvmeController, req: NvmeRequest) -> Result | None:
        """Run ``req`` (normally :meth:`NvmeController.execute`); None: held or dropped."""

    def release(self, ctrl: NvmeController) -> bool:
        """Complete held requests whose time has come; True if any was."""

    def drop_interrupt(self, cqid: int) -> bool:
        """Whether the interrupt due for ``cqid`` is to be swallowed."""

    @property
    def rules(self) -> Sequence[object]:
        """The armed rules (while there is one, every command runs in Python)."""


class Offload(Protocol):
    """Where blocking file I/O runs (the runtime's worker threads)."""

    def submit(self, work: Callable[[], object],
               done: Callable[[BaseException | None], None]) -> None:
        """Run ``work`` off the loop, then ``done(exception or None)`` on the loop."""

    def drain(self) -> None:
        """Block until every submitted work finished and its ``done`` ran."""


class RequestEngine:
    """Requests in flight: the request half of :class:`NvmeController`."""

    # Set by NvmeController.__init__ (and PciDevice's).
    memory: ClientMemory | None
    faults: FaultHook | None
    offload: Offload | None
    counters: dict[str, Any]
    held: dict[tuple[int, int], NvmeRequest]
    waiting: list[NvmeRequest]
    sqs: dict[int, SubmissionQueue]
    cqs: dict[int, CompletionQueue]
    _queue_dma: DmaScope

    def _may_dma(self) -> bool:
        raise NotImplementedError  # NvmeController's: enabled, Bus Master, a client

    def _run(self) -> bool:
        raise NotImplementedError  # NvmeController's processing pass

    def _interrupts(self) -> None:
        raise NotImplementedError  # NvmeController's

    def _post(self, cq: CompletionQueue, sq: SubmissionQueue, cid: int, result: Result) -> None:
        raise NotImplementedError  # NvmeController's

    def record_error(self, qid: int, cmd: Command, status: int, dnr: bool,
                     lba: int | None = None) -> None:
        raise NotImplementedError  # NvmeController's

    def fatal(self, why: str) -> None:
        raise NotImplementedError  # NvmeController's

    @property
    def _ctrl(self) -> NvmeController:
        """This engine as the controller it is part of (what handlers take)."""
        return cast("NvmeController", self)

    # ------------------------------------------------------------ the life of a request
    def submit(self, req: NvmeRequest) -> None:
        """Run a fetched request through the fault hook (if any) and complete it
        unless it was held."""
        result = self.execute(req) if self.faults is None else self.faults.submit(self._ctrl, req)
        if result is not None:
            self.complete(req, result)

    def execute(self, req: NvmeRequest) -> Result | None:
        """Run ``req``'s handler (admin or I/O command set).

        Returns:
            The result to complete with, or None if the handler holds the
            request (an AER) — then it is ``HELD``.  A refused command's
            Error Information entry is already recorded.
        """
        first = req.state is RequestState.FETCHED
        req.to(RequestState.EXECUTING)
        qid, cmd = req.qid, req.cmd
        key = _OPCODE_NAMES[qid == 0].get(cmd.opcode) or \
            f"{'admin' if qid == 0 else 'io'}.{cmd.opcode:#04x}"
        if first:  # not again when it continues after a DMA wait
            counts = self.counters["commands"]
            counts[key] = counts.get(key, 0) + 1
        mem = self.memory
        if mem is not None:
            if req.dma is None:
                req.dma = DmaScope(on_ready=self._dma_arrived)
            mem.scope = req.dma
        try:
            dw0 = (admin.execute if qid == 0 else zns.execute)(self._ctrl, cmd)
        except DmaPending:  # it runs again from the start once the client answered
            self._wait(req)
            return None
        except Exception as exc:  # noqa: BLE001 - classified: a status, or a bug's
            return self._failed(req, exc, key)
        else:
            if dw0 is None:
                req.to(RequestState.HELD)
                return None
            if isinstance(dw0, Offloaded):
                return self._offload(req, dw0, key)
            if req.dma is not None and req.dma.busy:  # its writes are not acknowledged yet
                req.result = (Status.SUCCESS, False, dw0)
                self._wait(req)
                return None
            return Status.SUCCESS, False, dw0
        finally:
            if mem is not None:
                mem.scope = self._queue_dma

    def _failed(self, req: NvmeRequest, exc: Exception, key: str) -> Result:
        """The status a handler's exception completes ``req`` with (its Error
        Information entry recorded): its own NVMe status, Data Transfer Error for
        unreachable memory, Internal Error (and the traceback logged) for a bug."""
        qid, cmd, lba = req.qid, req.cmd, None
        if isinstance(exc, CommandError):
            status, dnr, why, lba = exc.status, exc.dnr, str(exc), exc.lba
        elif isinstance(exc, GuestMemoryError):
            status, dnr, why = Status.DATA_TRANSFER_ERROR, False, str(exc)
        else:  # a bug must fail the command, never the process
            log.error("nvme: qid %d cid %d %s crashed", qid, cmd.cid, key, exc_info=exc)
            status, dnr, why = Status.INTERNAL_ERROR, True, repr(exc)
        self.record_error(qid, cmd, status, dnr, lba)
        log.debug("nvme: qid %d cid %d %s: %s (%s)", qid, cmd.cid, key, status.name, why)
        return status, dnr, 0

    # ------------------------------------------------------------ blocking I/O off the loop
    def _offload(self, req: NvmeRequest, off: Offloaded, key: str) -> Result | None:
        """Run ``off.work`` on the offload; ``req`` waits meanwhile (Abort finds it)."""
        if self.offload is None:  # no worker: here and now
            try:
                off.work()
                return Status.SUCCESS, False, off.then()
            except Exception as exc:  # noqa: BLE001 - classified like the handler's
                return self._failed(req, exc, key)
            finally:
                off.release()
        req.io_busy = True
        self._wait(req)
        self.offload.submit(off.work, lambda exc: self._offloaded(req, off, exc, key))
        return None

    def _offloaded(self, req: NvmeRequest, off: Offloaded, exc: BaseException | None,
                   key: str) -> None:
        """Back on the loop: complete ``req`` unless an Abort or a reset ended it."""
        req.io_busy = False
        try:
            if req.state is not RequestState.WAITING:
                return  # aborted, or dropped by a reset (which waited for the work)
            result: Result
            try:
                if exc is not None:
                    raise exc
                result = (Status.SUCCESS, False, off.then())
            except Exception as error:  # noqa: BLE001 - classified like the handler's
                result = self._failed(req, error, key)
            if self.memory is not None:  # the worker wrote the guest pages after the
                for address, length in off.written:  # views marked them: mark them again
                    self.memory.mark_dirty(address, length)
            if not self._may_dma():
                req.result = result  # posted by the next pass that may DMA
                return
            self.complete(req, result)
            self._interrupts()
        finally:
            off.release()

    def _drain_offload(self) -> None:
        """Wait until no blocking I/O of ours runs (before a reset, a pause, a close)."""
        if self.offload is not None:
            self.offload.drain()

    def dma_unmapping(self) -> None:
        """DMA_UNMAP: reads running off the loop write into guest memory: let them end."""
        self._drain_offload()

    def drain_queue_io(self) -> None:
        """Delete I/O SQ: commands of the queue running off the loop finish first."""
        self._drain_offload()

    def hold(self, req: NvmeRequest, result: Result | None = None) -> None:
        """Keep ``req`` without a completion; ``result``: what it completes with
        when released (a delay), None if it has not run (a hang).  Abort finds it."""
        req.to(RequestState.HELD)
        req.result = result
        self.held[req.key] = req

    def held_request(self, sqid: int, cid: int) -> NvmeRequest | None:
        """The held (or DMA-waiting) request Abort names, if it is still
        outstanding on a live queue."""
        req = self.held.get((sqid, cid)) or next(
            (r for r in self.waiting if r.key == (sqid, cid) and not r.io_busy), None)
        # (a command whose I/O runs off the loop is still writing guest memory:
        # "not aborted", it completes when the I/O does)
        if req is not None and not self._queue_alive(req):
            self._drop(req)
            return None
        return req

    def complete(self, req: NvmeRequest, result: Result) -> bool:
        """Post ``req``'s completion entry: the one way a result reaches a CQ.

        Returns:
            False if its queue is gone (reset, deleted): the request is dropped,
            nothing is posted.
        """
        if self.held.get(req.key) is req:
            del self.held[req.key]
        self._unwait(req)
        if not self._queue_alive(req):
            req.to(RequestState.DROPPED)
            return False
        req.to(RequestState.COMPLETED)
        self._post(self.cqs[req.sq.cqid], req.sq, req.cid, result)
        return True

    def _queue_alive(self, req: NvmeRequest) -> bool:
        return self.sqs.get(req.qid) is req.sq and req.sq.cqid in self.cqs

    def _drop(self, req: NvmeRequest) -> None:
        if self.held.get(req.key) is req:
            del self.held[req.key]
        self._unwait(req)
        if not req.done:
            req.to(RequestState.DROPPED)

    # ------------------------------------------------------------ DMA messages
    def _wait(self, req: NvmeRequest) -> None:
        req.to(RequestState.WAITING)
        self.waiting.append(req)

    def _unwait(self, req: NvmeRequest) -> None:
        if req.state is RequestState.WAITING:
            self.waiting.remove(req)
            if req.dma is not None:
                req.dma.drop()

    def _dma_arrived(self) -> None:
        """A scope's DMA messages all got their replies: continue what waited."""
        self._run()

    def _continue_waiting(self) -> bool:
        """Continue the requests whose DMA messages were answered, in order.

        Each re-checks what may have changed meanwhile: a queue deleted or a
        controller reset drops it (no completion, 7.3.1); the caller already
        checked CC.EN, Bus Master and the client.
        """
        did = False
        for req in [r for r in self.waiting
                    if not r.io_busy and (r.dma is None or not r.dma.busy)]:
            if req.state is not RequestState.WAITING:
                continue  # finished by an earlier one (an Abort)
            if not self._queue_alive(req):
                self._drop(req)
                continue
            did = True
            if req.result is not None:  # only its writes were outstanding
                result = req.result
                if req.dma is not None and req.dma.error is not None:
                    self.record_error(req.qid, req.cmd, Status.DATA_TRANSFER_ERROR, False)
                    result = (Status.DATA_TRANSFER_ERROR, False, 0)
                self.complete(req, result)
                continue
            self.waiting.remove(req)
            after = self.execute(req)
            if after is not None:
                self.complete(req, after)
        return did
