"""What the NVMe I/O queues expect of the native fast path (device layer).

The C extension ``appliance._fastpath`` (native/fastpath/nvmeq.c) implements
:class:`NativeNvme`; :mod:`appliance.fastpath` decides whether it runs and the
runtime hands it to the controller (``NvmeController.native``), so nothing
here imports it.  The Python handlers stay the reference:
:func:`run_batch` lets the C code run the Read and Write commands of one I/O
SQ that would succeed on the loop, and it stops at the first entry Python
must run (see docs/architecture.md, "Fast path").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from appliance.memory import ClientMemory, MappedRegions

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController
    from appliance.storage.queues import CompletionQueue, SubmissionQueue

_storage_log = logging.getLogger("appliance.storage")  # tracing: its DEBUG level

#: per NSID from 1: (image fd, blocks, LBA shift, writable), None: Python only
NativeNamespaces = tuple[tuple[int, int, int, bool] | None, ...]
#: (done, hand back, SQ head, CQ tail, phase, reads, writes, bytes read,
#: bytes written, guest ranges written, image ranges written (nsid, offset, length))
NativeOutcome = tuple[int, bool, int, int, int, int, int, int, int,
                      list[tuple[int, int]], list[tuple[int, int, int]]]


class NativeNvme(Protocol):
    """The C path's one call.

    Raises: ValueError or TypeError for arguments that do not describe queues;
    MemoryError.  Guest input never raises: what C does not run, it hands back.
    """

    def nvme_run(self, regions: MappedRegions, sq: tuple[int, int, int, int],
                 cq: tuple[int, int, int, int, int], sqid: int, budget: int,
                 namespaces: NativeNamespaces, mdts: int, nowait: bool, write_cache: bool,
                 guest_marks: bool, /) -> NativeOutcome:
        """Run up to ``budget`` entries of the SQ ``(base, size, head, tail)``
        into the CQ ``(base, size, head, tail, phase)``."""
        ...


def native_memory(ctrl: NvmeController, sq: SubmissionQueue) -> MappedRegions | None:
    """Client memory for the C path when it may run ``sq`` now: an I/O SQ, the
    fast path handed to the controller, no fault rule armed, tracing off (debug
    logging: everything runs where it is logged): the mmap'd regions (an entry
    touching any other, an fd or DMA-message region such as QEMU's ROMs, is
    handed back: C never reaches past the regions it is given); else None."""
    if (ctrl.native is None or sq.qid == 0 or ctrl.memory is None
            or (ctrl.faults is not None and ctrl.faults.rules)
            or _storage_log.isEnabledFor(logging.DEBUG)):
        return None
    return ctrl.memory.mapped_regions(partial=True)


def native_namespaces(ctrl: NvmeController) -> NativeNamespaces:
    """The namespaces the C path may serve: active (attached; a zoned one never:
    its write pointers are Python's; nor one with metadata), a local image, no block marked
    uncorrectable (its reads fail, its writes unmark: Python keeps that)."""
    out: list[tuple[int, int, int, bool] | None] = []
    for nsid in range(1, max(ctrl.namespaces, default=0) + 1):
        ns = ctrl.namespaces.get(nsid)
        if (ns is None or ns.remote or ns.fd < 0 or nsid in ctrl.zones or ns.md is not None
                or not ctrl.is_active(nsid) or ctrl.uncorrectable.get(nsid)):
            out.append(None)
        else:
            out.append((ns.fd, ns.nlbas, ns.lba_shift, not ns.read_only))
    return tuple(out)


def run_batch(ctrl: NvmeController, native: NativeNvme, regions: MappedRegions,
              sq: SubmissionQueue, cq: CompletionQueue, budget: int) -> tuple[int, bool]:
    """Let the C path run up to ``budget`` commands of ``sq`` (an I/O SQ) and do
    what the Python path does besides for each: counters, the dirty log, the
    namespaces' change hooks, the CQ's interrupt flag.

    Returns:
        (commands run, whether the entry now at the head is Python's to run).
    """
    mem: ClientMemory = ctrl.mem
    (done, handback, sq.head, cq.tail, cq.phase, reads, writes, bytes_read, bytes_written,
     guest, image) = native.nvme_run(
        regions, (sq.base, sq.size, sq.head, sq.tail),
        (cq.base, cq.size, cq.head, cq.tail, cq.phase), sq.qid, budget,
        native_namespaces(ctrl), ctrl.mdts_bytes, ctrl.offload is not None,
        ctrl.features.write_cache, mem.dirty_log is not None)
    if done:
        counters = ctrl.counters
        commands = counters["commands"]
        if reads:
            commands["io.read"] = commands.get("io.read", 0) + reads
            counters["bytes_read"] += bytes_read
        if writes:
            commands["io.write"] = commands.get("io.write", 0) + writes
            counters["bytes_written"] += bytes_written
        cq.unsignalled = True
    # (marks come also from an entry handed back after a partial transfer)
    for address, length in guest:
        mem.mark_dirty(address, length)
    for nsid, offset, length in image:
        hook = ctrl.namespaces[nsid].on_change
        if hook is not None:
            hook(offset, length)
    return done, handback
