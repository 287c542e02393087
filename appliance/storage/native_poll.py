"""The doorbell-page poller in C: a QD1 I/O without Python (device layer).

With ``storage.doorbells: mmap`` and the native fast path, each loop pass's
:meth:`NvmeController.poll` first makes one C call,
``appliance._fastpath.nvme_poll``: it compares the doorbell page with what was
latched (``DoorbellPage.seen``); when only the SQ tails and CQ heads of the I/O
queues in its plan moved, and their values are ones Python would take, it
latches them, runs each SQ whose tail moved through ``nvme_run``'s per-entry
path (the Reads and Writes it runs whole; see native_io.py), posts the CQEs and
writes the CQ's MSI-X eventfd itself; then it returns at once.  Nothing moved:
it returns None without touching anything.

Everything else is Python's, exactly as without the poller: the admin queue's
doorbells, a doorbell C does not own or whose value Python refuses (the call
then consumes nothing of the page), the first entry C does not run whole (left
unconsumed), an SQ left with work (the budget, a full CQ) -- and then every
SQ after it in the pass's order too, so commands of different queues run in
the order a Python pass runs them --, a CQ with a backlog or an interrupt
owed, a vector Python must signal.  In each of those cases the
call says so and :meth:`NvmeController.poll` runs its own scan and pass.

**Shadow doorbells** (Doorbell Buffer Config, which Linux turns on): the
host writes its SQ tails and CQ heads into a buffer in its memory and rings
only when it crosses the EventIdx the controller publishes.  With them every
call reads each SQ's shadow tail (an unchanged page is then not enough to
return at once), takes it as ``SubmissionQueue.sync`` does (a value Python
refuses and has not reported yet is Python's), and once the SQ is empty
publishes its EventIdx (``Shadow.publish``: only a changed value is written)
and reads the shadow again, as ``_drain`` does; a ring in the page only wakes
the poller (its value is ignored, as Python ignores it).  A CQ head comes from
its shadow only when the CQ is full (``has_room``): C then hands the pass to
Python.

**Who owns the queue state.** Python does: the ``SubmissionQueue`` and
``CompletionQueue`` objects.  The C call reads ``sq.head``, ``sq.tail``,
``sq.size``, ``sq.base``, ``sq.qid``, ``sq.cqid``, ``cq.head``, ``cq.tail``,
``cq.phase``, ``cq.size``, ``cq.base``, ``cq.backlog``, ``cq.unsignalled``
(and a shadow's ``doorbell``, ``event_idx``, ``published``, ``rejected``) at
each call and writes back ``sq.tail`` / ``cq.head`` (a doorbell taken),
``shadow.published`` (an EventIdx written),
``sq.head``, ``cq.tail``, ``cq.phase`` (entries run) and ``cq.unsignalled``
(an interrupt owed to Python) before it returns; it keeps no queue state
between calls, so the two can never disagree, and a migration save or a
handoff (which pause the controller first: the call is not made while paused)
saves complete state.  ``DoorbellPage.seen`` is written for each doorbell
taken, as the Python scan writes it.

**When the plan holds.** :func:`build` makes a plan only when the controller
could run these queues natively and nothing else is pending: the fast path
handed over, a doorbell page, READY with Bus Master, MSI-X, no fault rule,
tracing off, a region mmap'd (C reaches only those; an entry touching another
is handed back), no dirty log of
the client's memory (its per-access marks stay Python's), no held or
DMA-waiting request.  The C call re-checks at every call what can change
without the controller seeing it (paused, held, waiting, the client memory,
its generation, dirty log and DMA-message writes in flight, fault rules, each queue still the one in
``sqs`` / ``cqs``) and returns False when one fails; the controller
drops the plan (:meth:`NvmeController.drop_native_plan`) whenever a register,
an irq setting, a queue, a namespace or the page itself changes.  The counters
(``commands``, ``bytes_read`` / ``bytes_written``, ``interrupts``, the MSI-X
``signalled`` count) are added from the call's totals, and each write's image
range goes to its namespace's change hook (migration's dirty map), as
``run_batch`` does; so only a call that ran something costs Python.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from appliance.storage.native_io import native_namespaces
from appliance.storage.registers import CtrlState
from appliance.vfio_user.wire import PciIrq

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController

_storage_log = logging.getLogger("appliance.storage")  # tracing: its DEBUG level

#: (python must follow, reads, writes, bytes read, bytes written, interrupts signalled,
#: image ranges written (nsid, offset, length))
PollOutcome = tuple[bool, int, int, int, int, int, list[tuple[int, int, int]]]
#: irqfd values besides an eventfd: Python signals / no interrupt (IEN clear)
PYTHON_SIGNALS, NO_INTERRUPT = -1, -2


class NativePoll(Protocol):
    """The C poller's one call (see the module docstring).

    Raises: ValueError or TypeError for a plan that does not describe queues;
    MemoryError.  Guest input never raises.
    """

    def nvme_poll(self, page: Any, seen: bytearray, plan: tuple[Any, ...], /,
                  ) -> PollOutcome | bool | None:
        """One pass: None nothing to do, False the plan no longer holds, else the totals."""
        ...


class NativePoller:
    """One controller's plan for the C poller and the call that uses it."""

    def __init__(self, native: NativePoll, ctrl: NvmeController, plan: tuple[Any, ...]) -> None:
        self.native, self.ctrl, self.plan = native, ctrl, plan

    def poll(self) -> bool | None:
        """One C pass.

        Returns:
            None: nothing moved (or nothing C may take) and nothing is owed;
            False: C did what it could and Python must now run its own scan and
            pass (or the plan no longer holds: then it is dropped); True: C did
            everything (doorbells, entries, interrupts).
        """
        ctrl = self.ctrl
        page = ctrl.doorbell_page
        if page is None or _storage_log.isEnabledFor(logging.DEBUG):
            ctrl.drop_native_plan()
            return False
        out = self.native.nvme_poll(page.mm, page.seen, self.plan)
        if out is None:
            return None
        if out is False or out is True:
            ctrl.drop_native_plan()
            return False
        python, reads, writes, bytes_read, bytes_written, irqs, image = out
        counters = ctrl.counters
        if reads or writes:
            commands = counters["commands"]
            if reads:
                commands["io.read"] = commands.get("io.read", 0) + reads
                counters["bytes_read"] += bytes_read
            if writes:
                commands["io.write"] = commands.get("io.write", 0) + writes
                counters["bytes_written"] += bytes_written
        if irqs:
            counters["interrupts"] += irqs
            ctrl.count_signalled(irqs)
        for nsid, offset, length in image:
            hook = ctrl.namespaces[nsid].on_change
            if hook is not None:
                hook(offset, length)
        return not python


def build(ctrl: NvmeController, budget: int) -> NativePoller | None:
    """The C poller's plan for ``ctrl`` now (``budget``: entries per SQ and call,
    as a Python pass), or None when it may not run (see the module docstring:
    then every pass is Python's until the next attempt)."""
    native = ctrl.native
    mem = ctrl.memory
    if (native is None or not hasattr(native, "nvme_poll") or ctrl.doorbell_page is None
            or mem is None or ctrl.paused or ctrl.regs.state is not CtrlState.READY
            or not ctrl.bus_master or ctrl.irq_mode != PciIrq.MSIX
            or ctrl.held or ctrl.waiting
            or (ctrl.faults is not None and ctrl.faults.rules)
            or _storage_log.isEnabledFor(logging.DEBUG)
            or mem.dirty_log is not None or mem.writes_in_flight):
        return None
    regions = mem.mapped_regions(partial=True)
    if not regions:
        return None
    shadowed = ctrl.shadow_buffers is not None
    queues = []
    for qid, sq in ctrl.sqs.items():
        cq = ctrl.cqs.get(sq.cqid)
        if qid == 0 or cq is None:
            continue
        if (sq.shadow is not None) != shadowed or (cq.shadow is not None) != shadowed:
            return None  # (Doorbell Buffer Config gives every I/O queue its slots)
        irqfd = NO_INTERRUPT
        if cq.ien:
            fd = ctrl.msix_eventfd(cq.vector)
            irqfd = PYTHON_SIGNALS if fd is None else fd
        queues.append((qid, sq, cq, irqfd))
    if not queues:
        return None
    guards = (ctrl, mem, mem.generation)
    plan = (shadowed, guards, tuple(queues), ctrl.sqs, ctrl.cqs, regions, native_namespaces(ctrl),
            ctrl.mdts_bytes, ctrl.offload is not None, ctrl.features.write_cache, budget)
    return NativePoller(native, ctrl, plan)  # type: ignore[arg-type]
