"""Save and restore of the NVMe controller and its namespaces (migrate layer).

Theory of operation
-------------------
:class:`NvmeMigratable` is the :class:`~appliance.migrate.device.Migratable`
of an :class:`~appliance.storage.controller.NvmeController`.  It extends the
PCI part (:class:`~appliance.migrate.device.PciMigratable`: config space,
MSI-X, interrupt configuration) with two things:

* **Namespace data** (bulk, pre-copied).  Dirty tracking is per 4 KiB
  page (the NVMe page; a namespace with larger logical blocks tracks per
  block): a :class:`DirtyPages` byte map per writable namespace, fed by a
  change hook on each namespace (``on_change(offset, length)``, called for
  Write, Write Zeroes, Dataset Management deallocate and Format).  Starting
  a saving session marks every page dirty; each ``precopy_records`` call
  sweeps the map from where the last one stopped and turns each run of
  contiguous dirty pages into records: holes of the image (SEEK_DATA /
  SEEK_HOLE, not read) and all-zero stretches as ZEROES records (length
  only), data as NAMESPACE_BLOCKS of up to ``max_record`` (1 MiB) bytes.
  So a random 4 KiB write costs one 4 KiB resend, and round 0 still moves
  1 MiB records.  Read-only namespaces are not sent: their size and flag
  are part of the fingerprint, their image must be the same on both sides.
* **Controller state** (small, one DEVICE_STATE record of kind
  NVME_CONTROLLER, taken in STOP_COPY): the registers (CC, AQA, ASQ, ACQ,
  INTMS, the CC/CSTS machine state), every SQ and CQ (base, size, head,
  tail, phase, vector, IEN, unsignalled entries, completions in the
  backlog, shadow doorbell EventIdx state), the shadow doorbell buffers,
  held AERs and pending/masked events, the error log, the changed-namespace
  list and every feature value (the timestamp as its current value in ms).

Restore stages everything.  The first NAMESPACE_BLOCKS record of a
namespace creates its *staging image*: a new sparse file of the
namespace's size beside the image (a hidden ``.<image>.incoming-XXXXXXXX``
in the same directory, so the final rename is atomic), each record written
at its offset (ZEROES punch a hole), synced every 16 MiB.  A full stream carries every byte of every
writable namespace (a saving session starts with everything dirty), so at
commit the staging image *is* the new image: blocks the stream did not
carry are filled from the old image (none for a complete stream), the
file is synced and renamed over the image, and the
:class:`~appliance.storage.namespace.Namespace` swaps its fd to it
(:meth:`~appliance.storage.namespace.Namespace.replace_image`).  The
downtime no longer includes copying the data into the image.  Until then
the old image is untouched; an abort removes the staging file (one left by
a killed process is removed when that image is staged next).  A
shared-storage stream has no NAMESPACE_BLOCKS: nothing is staged.  The
controller blob is decoded and checked against the destination's
configuration with the same limits the admin commands apply when queues
are created (qid, size, alignment, vector, CQ of an SQ).
:meth:`commit_restore` swaps the images in, then replaces the controller
state and the PCI state.

Quiescing: while stopped, the controller is paused
(:meth:`NvmeController.pause`): neither doorbells nor the runtime's ``poll``
(shadow doorbells, the doorbell page) run a command, doorbell values still
latch; resuming (:meth:`NvmeController.resume`) runs one pass to catch up.
The dirty pages come from each namespace's ``on_change(offset, length)``
hook, which :class:`~appliance.storage.namespace.Namespace` calls after every
change of its data.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.errors import LocalProtocolError
from appliance.migrate.device import PciMigratable
from appliance.migrate.stream import (
    MAX_PAYLOAD,
    MAX_ZERO_RUN,
    BlocksFlag,
    BlocksHead,
    DeviceKind,
    Record,
    RecordHead,
    RecordType,
    StreamError,
    device_state,
    namespace_blocks,
    parse_blocks_head,
    parse_device_state,
)
from appliance.storage.controller import NvmeController
from appliance.storage.namespace import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Namespace,
    fallocate,
)
from appliance.storage.queues import CompletionQueue, Shadow, SubmissionQueue
from appliance.storage.registers import CtrlState, Features
from appliance.storage.spec import (
    AQA,
    CHANGED_NS_MAX,
    NSID_ALL,
    PAGE_SIZE,
    Completion,
    ErrorLogEntry,
    FeatureId,
)
from appliance.wire import Struct, WireError

PAGE = 4096  # dirty-tracking unit: the NVMe page (a namespace's block if larger)
MAX_RECORD = 1 << 20  # data bytes per NAMESPACE_BLOCKS record: dirty runs coalesce up to it
ZERO_RUN_MIN = 64 * 1024  # all-zero stretches inside data this long go as ZEROES records
ZEROES_COST = RecordHead.SIZE + BlocksHead.SIZE  # stream bytes of a ZEROES record
SYNC_EVERY = 16 << 20  # staged bytes between fdatasyncs of a staging image (commit syncs the rest)
STATE_VERSION = 1
NONE32 = 0xFFFFFFFF  # "no value" for optional u32 fields
STATES = (CtrlState.DISABLED, CtrlState.READY, CtrlState.SHUTDOWN, CtrlState.FAILED)
log = logging.getLogger("appliance.migrate")
FLAG_SHADOW = 0x1
FLAG_TIMESTAMP = 0x2
MAX_BACKLOG = 1 << 16


# ---------------------------------------------------------------- blob layout
class CtrlStateHead(Struct, size=96):
    """DEVICE_STATE (NVME_CONTROLLER) blob head; the arrays below follow in this order."""

    FIELDS = (
        ("version", "H", STATE_VERSION),
        ("flags", "H", 0),  # FLAG_SHADOW | FLAG_TIMESTAMP
        ("ctrl_state", "B", 0),  # index into STATES
        ("ready", "B", 0),
        ("reserved0", "H", 0),
        ("cc", "I", 0),
        ("aqa", "I", 0),
        ("intms", "I", 0),
        ("error_count", "I", 0),
        ("asq", "Q", 0),
        ("acq", "Q", 0),
        ("shadow_doorbells", "Q", 0),
        ("shadow_event_idx", "Q", 0),
        ("timestamp_ms", "Q", 0),
        ("n_sq", "H", 0),
        ("n_cq", "H", 0),
        ("n_backlog", "I", 0),  # completions waiting in CQ backlogs, in CQ order
        ("n_aer", "H", 0),
        ("n_events", "H", 0),
        ("n_masked", "H", 0),
        ("n_errors", "H", 0),
        ("n_changed", "I", 0),
        ("n_features", "H", 0),
        ("n_thresholds", "H", 0),
        ("n_tler", "H", 0),
        ("n_no_coalescing", "H", 0),
        ("reserved1", "I", 0),
    )


class SqState(Struct, size=32):
    FIELDS = (
        ("qid", "H", 0), ("cqid", "H", 0), ("size", "I", 0), ("base", "Q", 0),
        ("head", "I", 0), ("tail", "I", 0),
        ("shadow_published", "I", NONE32), ("shadow_rejected", "I", NONE32),
    )


class CqState(Struct, size=40):
    FIELDS = (
        ("qid", "H", 0), ("vector", "H", 0), ("size", "I", 0), ("base", "Q", 0),
        ("head", "I", 0), ("tail", "I", 0),
        ("phase", "B", 1), ("ien", "B", 0), ("unsignalled", "B", 0), ("reserved", "B", 0),
        ("n_backlog", "I", 0),
        ("shadow_published", "I", NONE32), ("shadow_rejected", "I", NONE32),
    )


class Cid(Struct, size=2):
    FIELDS = (("cid", "H", 0),)


class EventState(Struct, size=4):
    FIELDS = (("type", "B", 0), ("info", "B", 0), ("log_page", "B", 0), ("reserved", "B", 0))


class LogPageId(Struct, size=2):
    FIELDS = (("log_page", "H", 0),)


class Nsid(Struct, size=4):
    FIELDS = (("nsid", "I", 0),)


class KeyValue(Struct, size=8):
    """A (key, value) pair: feature id / threshold select / nsid -> value."""

    FIELDS = (("key", "I", 0), ("value", "I", 0))


class Vector(Struct, size=4):
    FIELDS = (("vector", "I", 0),)


def _bad(message: str) -> LocalProtocolError:
    return LocalProtocolError(f"NVMe state: {message}", errno.EINVAL)


def _opt(value: int | None) -> int:
    return NONE32 if value is None else value


def _unopt(value: int) -> int | None:
    return None if value == NONE32 else value


# ---------------------------------------------------------------- decoded state
@dataclass
class CtrlSnapshot:
    """The controller state a blob carries, decoded and checked."""

    head: CtrlStateHead
    sqs: list[SqState]
    cqs: list[CqState]
    backlogs: dict[int, list[Completion]]
    aers: list[int]
    events: list[tuple[int, int, int]]
    masked: set[int]
    errors: list[ErrorLogEntry]
    changed: list[int]
    features: dict[int, int]
    thresholds: dict[int, int]
    tler: dict[int, int]
    no_coalescing: set[int]


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0


def _take(cursor: _Cursor, cls: type[Any], count: int) -> list[Any]:
    end = cursor.pos + count * cls.SIZE
    if end > len(cursor.data):
        raise _bad(f"blob ends inside the {cls.__name__} array")
    out = [cls.unpack(cursor.data, cursor.pos + i * cls.SIZE) for i in range(count)]
    cursor.pos = end
    return out


def encode_controller(ctrl: NvmeController) -> bytes:
    """The controller's state as a DEVICE_STATE blob (device stopped)."""
    regs, feats = ctrl.regs, ctrl.features
    flags = FLAG_SHADOW if ctrl.shadow_buffers is not None else 0
    timestamp_ms = 0
    if feats.timestamp_base is not None:
        flags |= FLAG_TIMESTAMP
        timestamp_ms = int.from_bytes(feats.timestamp()[:6], "little")
    shadow = ctrl.shadow_buffers or (0, 0)
    sqs = [ctrl.sqs[q] for q in sorted(ctrl.sqs)]
    cqs = [ctrl.cqs[q] for q in sorted(ctrl.cqs)]
    backlog = [entry for cq in cqs for entry in cq.backlog]
    events = ctrl.events
    head = CtrlStateHead(
        flags=flags, ctrl_state=STATES.index(regs.state), ready=int(regs.ready),
        cc=regs.cc, aqa=regs.aqa, intms=regs.intms, error_count=ctrl.error_log.count,
        asq=regs.asq, acq=regs.acq, shadow_doorbells=shadow[0], shadow_event_idx=shadow[1],
        timestamp_ms=timestamp_ms, n_sq=len(sqs), n_cq=len(cqs), n_backlog=len(backlog),
        n_aer=len(events.outstanding), n_events=len(events.pending),
        n_masked=len(events.masked), n_errors=len(ctrl.error_log.entries),
        n_changed=len(ctrl.changed_ns), n_features=len(feats.values),
        n_thresholds=len(feats.thresholds), n_tler=len(feats.tler),
        n_no_coalescing=len(feats.no_coalescing),
    )
    parts = [head.pack()]
    for sq in sqs:
        parts.append(SqState(
            qid=sq.qid, cqid=sq.cqid, size=sq.size, base=sq.base, head=sq.head, tail=sq.tail,
            shadow_published=_opt(sq.shadow.published if sq.shadow else None),
            shadow_rejected=_opt(sq.shadow.rejected if sq.shadow else None)).pack())
    for cq in cqs:
        parts.append(CqState(
            qid=cq.qid, vector=cq.vector, size=cq.size, base=cq.base, head=cq.head,
            tail=cq.tail, phase=cq.phase, ien=int(cq.ien), unsignalled=int(cq.unsignalled),
            n_backlog=len(cq.backlog),
            shadow_published=_opt(cq.shadow.published if cq.shadow else None),
            shadow_rejected=_opt(cq.shadow.rejected if cq.shadow else None)).pack())
    parts += [entry.pack() for entry in backlog]
    parts += [Cid(cid=cid).pack() for cid in events.outstanding]
    parts += [EventState(type=t, info=i, log_page=p).pack() for t, i, p in events.pending]
    parts += [LogPageId(log_page=p).pack() for p in sorted(events.masked)]
    parts += [entry.pack() for entry in ctrl.error_log.entries]
    parts += [Nsid(nsid=n).pack() for n in ctrl.changed_ns]
    parts += [KeyValue(key=k, value=v).pack() for k, v in sorted(feats.values.items())]
    parts += [KeyValue(key=k, value=v).pack() for k, v in sorted(feats.thresholds.items())]
    parts += [KeyValue(key=k, value=v).pack() for k, v in sorted(feats.tler.items())]
    parts += [Vector(vector=v).pack() for v in sorted(feats.no_coalescing)]
    return b"".join(parts)


def decode_controller(ctrl: NvmeController, blob: bytes) -> CtrlSnapshot:
    """Decode a blob and check it against ``ctrl``'s configuration.

    Raises:
        LocalProtocolError: EINVAL for a malformed blob or state this
            controller could not have reached.
    """
    cursor = _Cursor(blob)
    try:
        head: CtrlStateHead = _take(cursor, CtrlStateHead, 1)[0]
        if head.version != STATE_VERSION:
            raise _bad(f"version {head.version}")
        sqs: list[SqState] = _take(cursor, SqState, head.n_sq)
        cqs: list[CqState] = _take(cursor, CqState, head.n_cq)
        backlog: list[Completion] = _take(cursor, Completion, head.n_backlog)
        aers = [c.cid for c in _take(cursor, Cid, head.n_aer)]
        events = [(e.type, e.info, e.log_page) for e in _take(cursor, EventState, head.n_events)]
        masked = {m.log_page for m in _take(cursor, LogPageId, head.n_masked)}
        errors: list[ErrorLogEntry] = _take(cursor, ErrorLogEntry, head.n_errors)
        changed = [n.nsid for n in _take(cursor, Nsid, head.n_changed)]
        features = {kv.key: kv.value for kv in _take(cursor, KeyValue, head.n_features)}
        thresholds = {kv.key: kv.value for kv in _take(cursor, KeyValue, head.n_thresholds)}
        tler = {kv.key: kv.value for kv in _take(cursor, KeyValue, head.n_tler)}
        no_coalescing = {v.vector for v in _take(cursor, Vector, head.n_no_coalescing)}
    except WireError as exc:
        raise _bad(str(exc)) from None
    if cursor.pos != len(blob):
        raise _bad(f"{len(blob) - cursor.pos} bytes after the last array")
    _check_head(ctrl, head)
    _check_queues(ctrl, head, sqs, cqs)
    backlogs: dict[int, list[Completion]] = {}
    pos = 0
    for cq in cqs:
        backlogs[cq.qid] = backlog[pos:pos + cq.n_backlog]
        pos += cq.n_backlog
    if pos != len(backlog) or len(backlog) > MAX_BACKLOG:
        raise _bad(f"backlog counts {pos} vs {len(backlog)}")
    if len(aers) > ctrl.events.limit or len(set(aers)) != len(aers):
        raise _bad(f"{len(aers)} held AERs, limit {ctrl.events.limit}")
    if len(errors) > ctrl.error_log.size or len(changed) > CHANGED_NS_MAX:
        raise _bad("error log or changed namespace list too long")
    if any(n != NSID_ALL and n not in ctrl.namespaces for n in changed):
        raise _bad(f"changed namespace list {changed} names unknown namespaces")
    _check_features(ctrl, features, thresholds, tler, no_coalescing)
    return CtrlSnapshot(head, sqs, cqs, backlogs, aers, events, masked, errors, changed,
                        features, thresholds, tler, no_coalescing)


def _check_head(ctrl: NvmeController, head: CtrlStateHead) -> None:
    if head.ctrl_state >= len(STATES) or head.ready > 1 or head.flags & ~(
            FLAG_SHADOW | FLAG_TIMESTAMP) or head.reserved0 or head.reserved1:
        raise _bad(f"state {head.ctrl_state} / flags {head.flags:#x}")
    if head.flags & FLAG_SHADOW and (head.shadow_doorbells % PAGE_SIZE
                                     or head.shadow_event_idx % PAGE_SIZE):
        raise _bad("shadow doorbell buffers not page aligned")  # as Doorbell Buffer Config
    state = STATES[head.ctrl_state]
    if state is CtrlState.READY and not head.ready:
        raise _bad("READY without CSTS.RDY")


def _check_queues(ctrl: NvmeController, head: CtrlStateHead, sqs: list[SqState],
                  cqs: list[CqState]) -> None:
    """The limits admin.create_cq / create_sq and CC.EN apply, on restored queues."""
    state = STATES[head.ctrl_state]
    cq_ids = [cq.qid for cq in cqs]
    sq_ids = [sq.qid for sq in sqs]
    if len(set(cq_ids)) != len(cq_ids) or len(set(sq_ids)) != len(sq_ids):
        raise _bad("a queue id appears twice")
    if state is CtrlState.DISABLED and (sqs or cqs):
        raise _bad("queues on a disabled controller")
    if state is CtrlState.READY and (0 not in cq_ids or 0 not in sq_ids):
        raise _bad("a ready controller without admin queues")
    mqes = ctrl.regs.mqes
    # The admin queues are what CC.EN built from AQA, ASQ and ACQ.
    admin_sq = (AQA.get(head.aqa, "asqs") + 1, head.asq)
    admin_cq = (AQA.get(head.aqa, "acqs") + 1, head.acq)
    for q in (*sqs, *cqs):
        if q.qid == 0:
            if (q.size, q.base) != (admin_sq if isinstance(q, SqState) else admin_cq):
                raise _bad(f"admin queue {q.size}@{q.base:#x} does not match AQA/ASQ/ACQ")
        elif not 0 < q.qid <= ctrl.io_queues:
            raise _bad(f"queue id {q.qid}")
        if not 2 <= q.size <= max(mqes + 1, 4096 if q.qid == 0 else 0) or q.base % PAGE_SIZE:
            raise _bad(f"queue {q.qid}: size {q.size} / base {q.base:#x}")
        if not (q.head < q.size and q.tail < q.size):
            raise _bad(f"queue {q.qid}: head {q.head} / tail {q.tail} outside {q.size}")
    for cq in cqs:
        if cq.phase > 1 or cq.ien > 1 or cq.unsignalled > 1 or cq.reserved:
            raise _bad(f"CQ {cq.qid}: phase/ien/flags")
        if cq.ien and cq.vector >= ctrl.vectors:
            raise _bad(f"CQ {cq.qid}: vector {cq.vector}")  # Invalid Interrupt Vector
    for sq in sqs:
        if (sq.qid == 0) != (sq.cqid == 0) or sq.cqid not in cq_ids:
            raise _bad(f"SQ {sq.qid}: CQ {sq.cqid}")  # Completion Queue Invalid


def _check_features(ctrl: NvmeController, features: dict[int, int], thresholds: dict[int, int],
                    tler: dict[int, int], no_coalescing: set[int]) -> None:
    for fid, value in features.items():
        if fid not in Features.SUPPORTED or value & Features.RESERVED.get(fid, 0):
            raise _bad(f"feature {fid:#x} = {value:#x}")
    if set(features) != set(FeatureId):
        raise _bad("feature list incomplete")
    # Both thresholds, over (THSEL 0) and under (1): Get Features and the SMART
    # log read each of them.
    if set(thresholds) != {0, 1} or any(v > 0xFFFF for v in thresholds.values()):
        raise _bad(f"temperature thresholds {thresholds}")
    if any(v > 0xFFFF for v in tler.values()):
        raise _bad("error recovery time limits")
    if any(v >= ctrl.vectors for v in no_coalescing):
        raise _bad(f"interrupt vector configuration {sorted(no_coalescing)}")


def apply_controller(ctrl: NvmeController, snap: CtrlSnapshot,
                     clock: Callable[[], float] | None = None) -> None:
    """Replace ``ctrl``'s registers, queues, events and features with ``snap``."""
    head, regs, feats = snap.head, ctrl.regs, ctrl.features
    regs.cc, regs.aqa, regs.intms = head.cc, head.aqa, head.intms
    regs.asq, regs.acq = head.asq, head.acq
    regs.state, regs.ready = STATES[head.ctrl_state], bool(head.ready)
    regs.invalid_reason = ""
    ctrl.sqs.clear()
    ctrl.cqs.clear()
    ctrl.shadow_buffers = ((head.shadow_doorbells, head.shadow_event_idx)
                           if head.flags & FLAG_SHADOW else None)

    def shadow(qid: int, is_cq: bool, published: int, rejected: int) -> Shadow | None:
        slot = ctrl.shadow_for(qid, is_cq)
        if slot is not None:
            slot.published, slot.rejected = _unopt(published), _unopt(rejected)
        return slot

    for c in snap.cqs:
        cq = CompletionQueue(c.qid, c.base, c.size, c.vector, bool(c.ien), head=c.head,
                             tail=c.tail, phase=c.phase, unsignalled=bool(c.unsignalled))
        cq.shadow = shadow(c.qid, True, c.shadow_published, c.shadow_rejected)
        cq.backlog.extend(entry.replace() for entry in snap.backlogs[c.qid])
        ctrl.cqs[c.qid] = cq
    for s in snap.sqs:
        sq = SubmissionQueue(s.qid, s.base, s.size, s.cqid, head=s.head, tail=s.tail)
        sq.shadow = shadow(s.qid, False, s.shadow_published, s.shadow_rejected)
        ctrl.sqs[s.qid] = sq
        ctrl.cqs[s.cqid].sqids.add(s.qid)
    events = ctrl.events
    events.outstanding = list(snap.aers)
    events.pending = list(snap.events)
    events.masked = set(snap.masked)
    ctrl.error_log.count = head.error_count
    ctrl.error_log.entries.clear()
    ctrl.error_log.entries.extend(snap.errors)
    ctrl.changed_ns[:] = snap.changed
    feats.values = dict(snap.features)
    feats.thresholds = {0: snap.thresholds[0], 1: snap.thresholds[1]}  # over, under
    feats.tler = dict(snap.tler)
    feats.no_coalescing = set(snap.no_coalescing)
    now = clock or feats.clock
    feats.timestamp_base = ((head.timestamp_ms, now() if now else 0.0)
                            if head.flags & FLAG_TIMESTAMP else None)


# ---------------------------------------------------------------- namespace data
class DirtyPages:
    """The dirty pages of one namespace: one byte per page (1 = dirty) in a bytearray.

    Marking and scanning stay in C (slice assignment, ``count``, ``find``):
    256 KiB for a 1 GiB namespace at 4 KiB pages, a few microseconds per
    write.  Scans sweep from a cursor and wrap, so a round walks the whole
    namespace once even while a hot spot keeps being written.
    """

    def __init__(self, size: int, page: int) -> None:
        self.size, self.page = size, page
        self.pages = -(-size // page)
        self.map = bytearray(self.pages)
        self.count = 0  # pages set in map
        self.cursor = 0  # where the next scan starts

    def mark(self, offset: int, length: int) -> None:
        """Bytes ``offset .. offset+length-1`` changed (clipped to the namespace)."""
        if length <= 0 or offset >= self.size:
            return
        first = max(offset, 0) // self.page
        last = min(offset + length - 1, self.size - 1) // self.page
        n = last + 1 - first
        self.count += n - self.map.count(1, first, last + 1)
        self.map[first:last + 1] = b"\x01" * n

    def mark_all(self) -> None:
        self.map[:] = b"\x01" * self.pages
        self.count = self.pages

    def clear(self, first: int, n: int) -> None:
        """Pages ``first .. first+n-1`` were sent."""
        self.count -= self.map.count(1, first, first + n)
        self.map[first:first + n] = bytes(n)

    def pending_bytes(self) -> int:
        """Dirty bytes (the last page counts only up to the namespace's end)."""
        short = self.pages * self.page - self.size
        return self.count * self.page - (short if self.map and self.map[-1] else 0)

    def next_run(self) -> tuple[int, int] | None:
        """The next dirty run from the cursor on (wrapping): (first page, page after)."""
        if not self.count:
            return None
        first = self.map.find(1, self.cursor)
        if first < 0:
            first = self.map.find(1)
        end = self.map.find(0, first)
        return first, self.pages if end < 0 else end


def _hole_end(fd: int, pos: int, stop: int, page: int) -> int:
    """Where the hole at ``pos`` ends (page-aligned, at most ``stop``); ``pos`` if data."""
    try:
        data = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            return pos  # no SEEK_DATA here: everything counts as data
        data = stop  # no data from pos to the end of the file
    return stop if data >= stop else data - data % page


def _data_end(fd: int, pos: int, stop: int, page: int) -> int:
    """Where the data at ``pos`` ends (page-aligned, past ``pos``, at most ``stop``)."""
    try:
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
    except OSError:
        return stop
    return min(stop, max(pos + page, -(-hole // page) * page))


def _zero_runs(data: bytes, page: int, min_run: int) -> list[tuple[int, int, bool]]:
    """Cut ``data`` into (start, end, all zero) pieces at page boundaries; zero
    pieces shorter than ``min_run`` bytes stay inside data pieces."""
    if not data[0] and not data[-1] and data == bytes(len(data)):
        return [(0, len(data), True)]
    zero_page = bytes(page)
    pieces: list[tuple[int, int, bool]] = []
    start = 0  # of the current data piece
    zero_from = -1  # start of the current run of zero pages
    for at in range(0, len(data), page):
        if not data[at] and data[at:at + page] == zero_page[:len(data) - at]:
            if zero_from < 0:
                zero_from = at
            continue
        if zero_from >= 0 and at - zero_from >= min_run:
            if zero_from > start:
                pieces.append((start, zero_from, False))
            pieces.append((zero_from, at, True))
            start = at
        zero_from = -1
    if zero_from >= 0 and len(data) - zero_from >= min_run:
        if zero_from > start:
            pieces.append((start, zero_from, False))
        pieces.append((zero_from, len(data), True))
    elif start < len(data):
        pieces.append((start, len(data), False))
    return pieces


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts).ljust(length, b"\0")


class _Staging:
    """A namespace's incoming image: a complete new sparse file beside the old one.

    A hidden file in the image's directory (``.<image>.incoming-XXXXXXXX``,
    so the final rename is atomic), records written at their offsets;
    ``covered`` remembers which blocks the stream carried.  :meth:`prepare`
    fills what it did not carry from the old image and syncs;
    :meth:`commit` renames the file over the image; :meth:`discard` (abort)
    removes it.  A process killed mid-stream leaves its file behind: the
    next staging of the same image removes it.
    """

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.covered = bytearray(ns.nlbas)  # 1 = block carried by the stream
        self.unsynced = 0
        directory, base = os.path.split(ns.image_path())
        prefix = f".{base}.incoming-"
        for stale in os.listdir(directory):
            if stale.startswith(prefix) and len(stale) == len(prefix) + 8:
                log.info("nsid %d: removing %s, left by an interrupted restore", ns.nsid, stale)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, stale))
        fd, path = tempfile.mkstemp(dir=directory, prefix=prefix, suffix="")
        self.fd = fd
        self.path: str | None = path
        try:
            os.fchmod(fd, stat.S_IMODE(os.fstat(ns.fd).st_mode))
            os.ftruncate(fd, ns.size)
        except BaseException:
            self.discard()
            raise

    def write(self, offset: int, data: bytes | memoryview) -> None:
        _pwrite_all(self.fd, data, offset)
        self._cover(offset, len(data))
        self.unsynced += len(data)
        if self.unsynced >= SYNC_EVERY:  # keeps the sync at commit (in the downtime) short
            os.fdatasync(self.fd)
            self.unsynced = 0

    def zero(self, offset: int, length: int) -> None:
        first, n = offset >> self.ns.lba_shift, length >> self.ns.lba_shift
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        # A fresh file reads zeroes already: only a range sent before needs punching.
        if (self.covered.find(1, first, first + n) >= 0
                and not fallocate(self.fd, mode, offset, length)):
            zeros = bytes(min(length, MAX_RECORD))
            for at in range(offset, offset + length, len(zeros)):
                _pwrite_all(self.fd, zeros[:offset + length - at], at)
        self._cover(offset, length)

    def _cover(self, offset: int, length: int) -> None:
        first, n = offset >> self.ns.lba_shift, length >> self.ns.lba_shift
        self.covered[first:first + n] = b"\x01" * n

    def prepare(self) -> None:
        """Fill the blocks the stream did not carry from the old image, and sync.

        Raises:
            OSError: the image is unchanged then.
        """
        ns, shift = self.ns, self.ns.lba_shift
        pos = self.covered.find(0)
        while pos >= 0:  # none for a complete stream
            end = self.covered.find(1, pos)
            end = ns.nlbas if end < 0 else end
            for at in range(pos << shift, end << shift, MAX_RECORD):
                data = _pread_all(ns.fd, min(MAX_RECORD, (end << shift) - at), at)
                if data != bytes(len(data)):  # the staging file reads zeroes already
                    _pwrite_all(self.fd, data, at)
            pos = self.covered.find(0, end)
        os.fdatasync(self.fd)
        self.unsynced = 0

    def commit(self) -> None:
        """Rename the prepared file over the image; the namespace serves from it."""
        assert self.path is not None
        self.ns.replace_image(self.path)
        self.path = None
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Drop the staged image (the old one was never touched)."""
        self.close()
        if self.path is not None:
            path, self.path = self.path, None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class NvmeMigratable(PciMigratable):
    """:class:`Migratable` of an NvmeController: PCI, controller state, namespace data."""

    def __init__(self, ctrl: NvmeController, *, page: int = PAGE, max_record: int = MAX_RECORD,
                 clock: Callable[[], float] | None = None) -> None:
        """Args:
            ctrl: the controller; its namespaces get a change hook now.
            page: bytes per dirty-tracking unit, a multiple of 4096 (a
                namespace with larger logical blocks tracks per block).
            max_record: data bytes per NAMESPACE_BLOCKS record at most
                (contiguous dirty pages coalesce up to it); a multiple of
                ``page``, at most 16 MiB.
            clock: what the restored Timestamp feature counts from (default:
                the controller's features clock).

        Raises:
            ValueError: a bad page or record size.
        """
        if page <= 0 or page % 4096:
            raise ValueError(f"page {page} is not a positive multiple of 4096")
        if max_record <= 0 or max_record % page or max_record > MAX_PAYLOAD - BlocksHead.SIZE:
            raise ValueError(f"max_record {max_record} is not a multiple of {page} up to 16 MiB")
        super().__init__(ctrl, extra_fingerprint=self.fingerprint_extra(ctrl))
        self.ctrl = ctrl
        self.page = page
        self.max_record = max_record
        self.clock = clock
        self.dirty: dict[int, DirtyPages] = {}
        self._snapshot: CtrlSnapshot | None = None
        self._staging: dict[int, _Staging] = {}
        for nsid, ns in ctrl.namespaces.items():
            if not ns.read_only:
                ns.on_change = self._marker(nsid)

    @staticmethod
    def fingerprint_extra(ctrl: NvmeController) -> bytes:
        """The controller configuration a peer must share (ids, limits, namespaces)."""
        parts = [(f"nvme-v{STATE_VERSION} sn={ctrl.serial} mn={ctrl.mn!r} fr={ctrl.fr!r} "
                  f"ioq={ctrl.io_queues} mqes={ctrl.regs.mqes} mdts={ctrl.mdts_bytes} "
                  f"vectors={ctrl.vectors} cap={ctrl.regs.cap:#x}")]
        for nsid, ns in sorted(ctrl.namespaces.items()):
            parts.append(f"ns{nsid}:{ns.size}:{ns.block_size}:{int(ns.read_only)}")
        return "|".join(parts).encode()

    def _marker(self, nsid: int) -> Callable[[int, int], None]:
        def mark(offset: int, length: int) -> None:
            pages = self.dirty.get(nsid) if self.tracking else None
            if pages is not None:
                pages.mark(offset, length)
        return mark

    # ------------------------------------------------------------ Migratable: source
    def migration_stop(self) -> None:
        self.ctrl.pause()
        super().migration_stop()

    def migration_run(self) -> None:
        super().migration_run()
        self.ctrl.resume()  # doorbells and events that arrived while stopped

    def start_tracking(self) -> None:
        super().start_tracking()
        self.dirty = {}
        for nsid, ns in self.ctrl.namespaces.items():
            if not ns.read_only:
                pages = self.dirty[nsid] = DirtyPages(ns.size, max(self.page, ns.block_size))
                pages.mark_all()

    def stop_tracking(self) -> None:
        super().stop_tracking()
        self.dirty = {}

    def precopy_pending(self) -> int:
        return sum(pages.pending_bytes() for pages in self.dirty.values())

    def precopy_records(self, max_bytes: int) -> list[Record]:
        """Records for dirty pages: ``max_bytes`` of stream at most, or one record.

        Each dirty run becomes ZEROES records for its holes (found with
        SEEK_DATA/SEEK_HOLE, without reading them) and NAMESPACE_BLOCKS of
        up to ``max_record`` bytes for its data (all-zero stretches of
        ZERO_RUN_MIN bytes or more inside it as ZEROES again).
        """
        self._check_sizes()
        out: list[Record] = []
        spent = 0
        for nsid in sorted(self.dirty):
            pages, ns = self.dirty[nsid], self.ctrl.namespaces[nsid]
            page = pages.page
            while (run := pages.next_run()) is not None:
                start, stop = run[0] * page, min(run[1] * page, ns.size)
                end = min(_hole_end(ns.fd, start, stop, page), start + MAX_ZERO_RUN)
                if end > start:
                    if out and spent + ZEROES_COST > max_bytes:
                        return out
                    out.append(_zeroes(nsid, start, end - start))
                    spent += ZEROES_COST
                else:
                    end = min(_data_end(ns.fd, start, stop, page), start + self.max_record)
                    if out and spent + (end - start) > max_bytes:
                        return out  # whole records: a read takes parts of one anyway
                    data = ns.read_bytes(start >> ns.lba_shift, end - start)
                    for a, b, zero in _zero_runs(data, page, ZERO_RUN_MIN):
                        if zero:
                            out.append(_zeroes(nsid, start + a, b - a))
                            spent += ZEROES_COST
                        else:
                            out.append(namespace_blocks(nsid, start + a, data[a:b]
                                                        if b - a < len(data) else data))
                            spent += b - a
                pages.clear(run[0], -(-(end - start) // page))
                pages.cursor = -(-end // page)
        return out

    def _check_sizes(self) -> None:
        """Raises:
            LocalProtocolError: EBUSY when a namespace was resized since the
                session started (the stream's fingerprint has the old size).
        """
        for nsid, pages in self.dirty.items():
            if self.ctrl.namespaces[nsid].size != pages.size:
                raise LocalProtocolError(f"namespace {nsid} was resized during the migration",
                                         errno.EBUSY)

    def save_state(self) -> list[Record]:
        self._check_sizes()
        blob = encode_controller(self.ctrl)
        return [*super().save_state(), device_state(DeviceKind.NVME_CONTROLLER, blob)]

    # ------------------------------------------------------------ Migratable: destination
    def stage(self, record: Record) -> None:
        if record.type == RecordType.NAMESPACE_BLOCKS:
            self._stage_blocks(record)
        elif record.type == RecordType.DEVICE_STATE:
            kind, version, blob = parse_device_state(record)
            if kind != DeviceKind.NVME_CONTROLLER or version != 1:
                raise _bad(f"DEVICE_STATE kind {kind} version {version}")
            if self._snapshot is not None:
                raise _bad("second controller state record")
            self._snapshot = decode_controller(self.ctrl, blob)
        else:
            super().stage(record)

    def _stage_blocks(self, record: Record) -> None:
        try:
            head, data = parse_blocks_head(record)
        except StreamError as exc:
            raise _bad(str(exc)) from None
        ns = self.ctrl.namespaces.get(head.nsid)
        if ns is None or ns.read_only:
            raise _bad(f"blocks for namespace {head.nsid} (absent or read-only here)")
        if (head.offset % ns.block_size or head.length % ns.block_size
                or head.offset + head.length > ns.size):
            raise _bad(f"nsid {head.nsid}: blocks {head.offset:#x}+{head.length:#x} "
                       f"outside {ns.size:#x} or not {ns.block_size}-aligned")
        staging = self._staging.get(head.nsid)
        if staging is None:
            staging = self._staging[head.nsid] = _Staging(ns)
        if head.flags & BlocksFlag.ZEROES:
            staging.zero(head.offset, head.length)
        else:
            staging.write(head.offset, data)

    def check_staged(self) -> None:
        super().check_staged()
        if self._snapshot is None:
            raise _bad("the stream carried no controller state")

    def commit_restore(self) -> None:
        """Check, prepare the staged images (the old ones untouched), then swap and apply.

        Raises:
            LocalProtocolError: incomplete state (EINVAL) or a staged image
                that cannot be completed or synced (its errno); nothing
                changed then.
            OSError: EIO when an image could not be swapped in after the
                point of no return.
        """
        self.check_staged()
        try:
            for staging in self._staging.values():
                staging.prepare()
        except OSError as exc:
            raise LocalProtocolError(f"preparing the restored image: {exc}",
                                     exc.errno or errno.EIO) from None
        self.apply_staged()

    def apply_staged(self) -> None:
        snapshot, self._snapshot = self._snapshot, None
        assert snapshot is not None
        staging, self._staging = self._staging, {}
        try:
            for stage in staging.values():
                stage.commit()
        except (OSError, ValueError) as exc:
            # Some images may be swapped: no valid state to fall back to.
            raise OSError(errno.EIO, f"restoring namespace data: {exc}") from exc
        finally:
            for stage in staging.values():
                stage.discard()
        apply_controller(self.ctrl, snapshot, self.clock)
        super().apply_staged()

    def abort_restore(self) -> None:
        super().abort_restore()
        self._snapshot = None
        for stage in self._staging.values():
            stage.discard()
        self._staging = {}

    def load_records(self, records: Sequence[Record]) -> None:
        for record in records:
            self.stage(record)


def _zeroes(nsid: int, offset: int, length: int) -> Record:
    head = BlocksHead(nsid=nsid, flags=BlocksFlag.ZEROES, offset=offset, length=length)
    return Record(RecordType.NAMESPACE_BLOCKS, head.pack())
