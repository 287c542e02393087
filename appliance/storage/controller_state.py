"""The NVME_CONTROLLER device-state blob: its layout, encoding, decoding with
the destination's checks, and applying it to a controller.

:func:`encode_controller` takes the state of a stopped controller;
:func:`decode_controller` checks a blob against the destination's
configuration with the limits the admin commands apply when queues are created
(qid, size, alignment, vector, CQ of an SQ) and returns a :class:`CtrlSnapshot`;
:func:`apply_controller` adopts it.  :mod:`appliance.storage.migration` puts
the blob in the stream as one DEVICE_STATE record.  The namespace inventory
(:mod:`appliance.storage.ns_inventory`) is part of it and is what the other
checks (changed namespaces, uncorrectable blocks, zones) are made against;
the migration adopts it before :func:`apply_controller`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from appliance.errors import LocalProtocolError
from appliance.storage import firmware as fw
from appliance.storage.controller import NvmeController
from appliance.storage.log_spec import CHANGED_NS_MAX, ErrorLogEntry
from appliance.storage.ns_inventory import Inventory, NamespaceEntry, check_entries, inventory_of
from appliance.storage.nsmgmt import namespace_count
from appliance.storage.queues import CompletionQueue, Shadow, SubmissionQueue
from appliance.storage.registers import CtrlState, Features
from appliance.storage.spec import AQA, NSID_ALL, PAGE_SIZE, Completion, FeatureId
from appliance.storage.uncorrectable import MAX_RANGES, LbaRanges
from appliance.storage.zones import ZoneRecord, ZoneSnapshot, ZoneState
from appliance.wire import U8, U16, U32, U64, Struct, WireError

#: 2: the uncorrectable block ranges (n_uncorrectable, where 1 had a reserved DWORD);
#: 3: the zones of zoned namespaces (n_zones; the head grew by 8 bytes);
#: 4: the firmware slots (FirmwareState and its download bitmap, after the zones)
#: 5: the namespace inventory (n_namespaces where 3 had reserved1, FLAG_COPIED)
STATE_VERSION = 5
NONE32 = 0xFFFFFFFF  # "no value" for optional u32 fields
STATES = (CtrlState.DISABLED, CtrlState.READY, CtrlState.SHUTDOWN, CtrlState.FAILED)
FLAG_SHADOW = 0x1
FLAG_TIMESTAMP = 0x2
FLAG_COPIED = 0x4  # the created namespaces were announced and their data is in the stream
MAX_BACKLOG = 1 << 16
ZONE_STATES = frozenset(ZoneState)


# ---------------------------------------------------------------- blob layout
class CtrlStateHead(Struct, size=104):
    """DEVICE_STATE (NVME_CONTROLLER) blob head; the arrays below follow in this order."""

    version: U16 = STATE_VERSION
    flags: U16 = 0  # FLAG_SHADOW | FLAG_TIMESTAMP
    ctrl_state: U8 = 0  # index into STATES
    ready: U8 = 0
    reserved0: U16 = 0
    cc: U32 = 0
    aqa: U32 = 0
    intms: U32 = 0
    error_count: U32 = 0
    asq: U64 = 0
    acq: U64 = 0
    shadow_doorbells: U64 = 0
    shadow_event_idx: U64 = 0
    timestamp_ms: U64 = 0
    n_sq: U16 = 0
    n_cq: U16 = 0
    n_backlog: U32 = 0  # completions waiting in CQ backlogs, in CQ order
    n_aer: U16 = 0
    n_events: U16 = 0
    n_masked: U16 = 0
    n_errors: U16 = 0
    n_changed: U32 = 0
    n_features: U16 = 0
    n_thresholds: U16 = 0
    n_tler: U16 = 0
    n_no_coalescing: U16 = 0
    n_uncorrectable: U32 = 0
    n_zones: U32 = 0  # zones that are not Empty, of every zoned namespace
    n_namespaces: U32 = 0  # allocated namespaces (NamespaceEntry each, after the changed list)


class SqState(Struct, size=32):
    qid: U16 = 0
    cqid: U16 = 0
    size: U32 = 0
    base: U64 = 0
    head: U32 = 0
    tail: U32 = 0
    shadow_published: U32 = NONE32
    shadow_rejected: U32 = NONE32


class CqState(Struct, size=40):
    qid: U16 = 0
    vector: U16 = 0
    size: U32 = 0
    base: U64 = 0
    head: U32 = 0
    tail: U32 = 0
    phase: U8 = 1
    ien: U8 = 0
    unsignalled: U8 = 0
    reserved: U8 = 0
    n_backlog: U32 = 0
    shadow_published: U32 = NONE32
    shadow_rejected: U32 = NONE32


class Cid(Struct, size=2):
    cid: U16 = 0


class EventState(Struct, size=4):
    type: U8 = 0
    info: U8 = 0
    log_page: U8 = 0
    reserved: U8 = 0


class LogPageId(Struct, size=2):
    log_page: U16 = 0


class Nsid(Struct, size=4):
    nsid: U32 = 0


class KeyValue(Struct, size=8):
    """A (key, value) pair: feature id / threshold select / nsid -> value."""

    key: U32 = 0
    value: U32 = 0


class Vector(Struct, size=4):
    vector: U32 = 0


class UncorrectableRange(Struct, size=24):
    """Blocks ``slba .. slba+nlb-1`` of namespace ``nsid`` are uncorrectable."""

    nsid: U32 = 0
    reserved: U32 = 0
    slba: U64 = 0
    nlb: U64 = 0


class ZoneEntry(Struct, size=24):
    """Zone ``zone`` of namespace ``nsid`` is in ``state`` (ZS), its write pointer ``wp``."""

    nsid: U32 = 0
    zone: U32 = 0
    state: U8 = 0
    reserved9: U8 = 0
    reserved10: U16 = 0
    reserved12: U32 = 0
    wp: U64 = 0


class FirmwareState(Struct, size=40):
    """The firmware slots: ``slot2`` (zeroes: empty), the running revision and its
    slot, the slot the next reset activates (0: none) and the download so far:
    its first bytes and ``n_bitmap`` bytes of DWORD bitmap that follow."""

    running: Annotated[bytes, "8s"] = b""
    slot2: Annotated[bytes, "8s"] = b""
    image_head: Annotated[bytes, "8s"] = b""
    active: U8 = 1
    next_active: U8 = 0
    reserved: U16 = 0
    n_bitmap: U32 = 0
    reserved2: U64 = 0


def state_error(message: str) -> LocalProtocolError:
    """The error a refused controller state raises (EINVAL to the stream's writer)."""
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
    uncorrectable: dict[int, LbaRanges]
    zones: dict[int, ZoneSnapshot]
    firmware: FirmwareState
    firmware_bitmap: int
    inventory: Inventory


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0


def _take(cursor: _Cursor, cls: type[Any], count: int) -> list[Any]:
    end = cursor.pos + count * cls.SIZE
    if end > len(cursor.data):
        raise state_error(f"blob ends inside the {cls.__name__} array")
    out = [cls.unpack(cursor.data, cursor.pos + i * cls.SIZE) for i in range(count)]
    cursor.pos = end
    return out


def encode_controller(ctrl: NvmeController, copied: bool = False) -> bytes:
    """The controller's state as a DEVICE_STATE blob (device stopped); ``copied``:
    the stream announced the created namespaces and carries their data."""
    regs, feats = ctrl.regs, ctrl.features
    flags = (FLAG_SHADOW if ctrl.shadow_buffers is not None else 0) | (
        FLAG_COPIED if copied else 0)
    inventory = inventory_of(ctrl)
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
        n_uncorrectable=sum(len(r.ranges) for r in ctrl.uncorrectable.values()),
        n_zones=sum(len(zones.state()) for zones in ctrl.zones.values()),
        n_namespaces=len(inventory.namespaces),
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
    parts += [a.entry().pack() for a in inventory.namespaces]
    parts += [KeyValue(key=k, value=v).pack() for k, v in sorted(feats.values.items())]
    parts += [KeyValue(key=k, value=v).pack() for k, v in sorted(feats.thresholds.items())]
    parts += [KeyValue(key=k, value=v).pack() for k, v in sorted(feats.tler.items())]
    parts += [Vector(vector=v).pack() for v in sorted(feats.no_coalescing)]
    parts += [UncorrectableRange(nsid=nsid, slba=a, nlb=b - a).pack()
              for nsid, ranges in sorted(ctrl.uncorrectable.items()) for a, b in ranges.ranges]
    parts += [ZoneEntry(nsid=nsid, zone=z.index, state=z.state, wp=z.wp).pack()
              for nsid, zones in sorted(ctrl.zones.items()) for z in zones.state()]
    slots, image = ctrl.firmware, ctrl.firmware.image
    bitmap = image.covered.to_bytes((image.dwords + 7) // 8, "little")
    parts.append(FirmwareState(running=slots.running, slot2=slots.slots[1] or bytes(8),
                               image_head=image.head, active=slots.active,
                               next_active=slots.next_active, n_bitmap=len(bitmap)).pack())
    parts.append(bitmap)
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
            raise state_error(f"controller state version {head.version}, this appliance reads "
                              f"version {STATE_VERSION} only: source and destination must run "
                              "the same appliance release")
        sqs: list[SqState] = _take(cursor, SqState, head.n_sq)
        cqs: list[CqState] = _take(cursor, CqState, head.n_cq)
        backlog: list[Completion] = _take(cursor, Completion, head.n_backlog)
        aers = [c.cid for c in _take(cursor, Cid, head.n_aer)]
        events = [(e.type, e.info, e.log_page) for e in _take(cursor, EventState, head.n_events)]
        masked = {m.log_page for m in _take(cursor, LogPageId, head.n_masked)}
        errors: list[ErrorLogEntry] = _take(cursor, ErrorLogEntry, head.n_errors)
        changed = [n.nsid for n in _take(cursor, Nsid, head.n_changed)]
        ns_entries: list[NamespaceEntry] = _take(cursor, NamespaceEntry, head.n_namespaces)
        features = {kv.key: kv.value for kv in _take(cursor, KeyValue, head.n_features)}
        thresholds = {kv.key: kv.value for kv in _take(cursor, KeyValue, head.n_thresholds)}
        tler = {kv.key: kv.value for kv in _take(cursor, KeyValue, head.n_tler)}
        no_coalescing = {v.vector for v in _take(cursor, Vector, head.n_no_coalescing)}
        bad: list[UncorrectableRange] = _take(cursor, UncorrectableRange, head.n_uncorrectable)
        zone_entries: list[ZoneEntry] = _take(cursor, ZoneEntry, head.n_zones)
        firmware: FirmwareState = _take(cursor, FirmwareState, 1)[0]
        if cursor.pos + firmware.n_bitmap > len(blob):
            raise state_error("blob ends inside the firmware download bitmap")
        bitmap = blob[cursor.pos:cursor.pos + firmware.n_bitmap]
        cursor.pos += firmware.n_bitmap
    except WireError as exc:
        raise state_error(str(exc)) from None
    if cursor.pos != len(blob):
        raise state_error(f"{len(blob) - cursor.pos} bytes after the last array")
    _check_head(ctrl, head)
    try:
        inventory = check_entries(ctrl, ns_entries)
    except ValueError as exc:
        raise state_error(f"namespace inventory: {exc}") from None
    _check_queues(ctrl, head, sqs, cqs)
    backlogs: dict[int, list[Completion]] = {}
    pos = 0
    for cq in cqs:
        backlogs[cq.qid] = backlog[pos:pos + cq.n_backlog]
        pos += cq.n_backlog
    if pos != len(backlog) or len(backlog) > MAX_BACKLOG:
        raise state_error(f"backlog counts {pos} vs {len(backlog)}")
    if len(aers) > ctrl.events.limit or len(set(aers)) != len(aers):
        raise state_error(f"{len(aers)} held AERs, limit {ctrl.events.limit}")
    if len(errors) > ctrl.error_log.size or len(changed) > CHANGED_NS_MAX:
        raise state_error("error log or changed namespace list too long")
    if any(n != NSID_ALL and not 1 <= n <= namespace_count(ctrl) for n in changed):
        raise state_error(f"changed namespace list {changed} names invalid NSIDs")
    _check_features(ctrl, features, thresholds, tler, no_coalescing)
    covered = _check_firmware(ctrl, firmware, bitmap)
    return CtrlSnapshot(head, sqs, cqs, backlogs, aers, events, masked, errors, changed,
                        features, thresholds, tler, no_coalescing,
                        _check_uncorrectable(inventory.blocks(), bad),
                        _check_zones(ctrl, inventory.kept(), zone_entries), firmware, covered,
                        inventory)


def _check_firmware(ctrl: NvmeController, state: FirmwareState, bitmap: bytes) -> int:
    """What Firmware Download and Commit can leave: printable revisions (running
    from the read-only slot 1: slot 1's own), an active and a next slot that
    hold an image, a download bitmap within the largest image.

    Returns:
        The download's DWORD bitmap.
    """
    slots = [ctrl.fr, None if state.slot2 == bytes(8) else state.slot2]
    covered = int.from_bytes(bitmap, "little")
    if (state.n_bitmap > fw.MAX_IMAGE // 32
            or (bitmap and not bitmap[-1]) or state.reserved or state.reserved2):
        raise state_error(f"firmware download bitmap of {state.n_bitmap} bytes")
    if fw.revision_of(state.running) != state.running or (
            slots[1] is not None and fw.revision_of(slots[1]) != slots[1]) or (
            state.active == fw.READ_ONLY_SLOT and state.running != ctrl.fr):
        raise state_error(f"firmware revisions {state.running!r} / {state.slot2!r}")
    if not 1 <= state.active <= fw.SLOTS or not 0 <= state.next_active <= fw.SLOTS or (
            slots[state.active - 1] is None) or (
            state.next_active and slots[state.next_active - 1] is None):
        raise state_error(f"firmware slots {state.active} / {state.next_active}")
    return covered


def _check_head(ctrl: NvmeController, head: CtrlStateHead) -> None:
    if head.ctrl_state >= len(STATES) or head.ready > 1 or head.flags & ~(
            FLAG_SHADOW | FLAG_TIMESTAMP | FLAG_COPIED) or head.reserved0:
        raise state_error(f"state {head.ctrl_state} / flags {head.flags:#x}")
    if head.flags & FLAG_SHADOW and (head.shadow_doorbells % PAGE_SIZE
                                     or head.shadow_event_idx % PAGE_SIZE):
        raise state_error("shadow doorbell buffers not page aligned")  # as Doorbell Buffer Config
    state = STATES[head.ctrl_state]
    if state is CtrlState.READY and not head.ready:
        raise state_error("READY without CSTS.RDY")


def _check_queues(ctrl: NvmeController, head: CtrlStateHead, sqs: list[SqState],
                  cqs: list[CqState]) -> None:
    """The limits admin.create_cq / create_sq and CC.EN apply, on restored queues."""
    state = STATES[head.ctrl_state]
    cq_ids = [cq.qid for cq in cqs]
    sq_ids = [sq.qid for sq in sqs]
    if len(set(cq_ids)) != len(cq_ids) or len(set(sq_ids)) != len(sq_ids):
        raise state_error("a queue id appears twice")
    if state is CtrlState.DISABLED and (sqs or cqs):
        raise state_error("queues on a disabled controller")
    if state is CtrlState.READY and (0 not in cq_ids or 0 not in sq_ids):
        raise state_error("a ready controller without admin queues")
    mqes = ctrl.regs.mqes
    # The admin queues are what CC.EN built from AQA, ASQ and ACQ.
    admin_sq = (AQA.get(head.aqa, "asqs") + 1, head.asq)
    admin_cq = (AQA.get(head.aqa, "acqs") + 1, head.acq)
    queues: list[SqState | CqState] = [*sqs, *cqs]
    for q in queues:
        if q.qid == 0:
            if (q.size, q.base) != (admin_sq if isinstance(q, SqState) else admin_cq):
                raise state_error(f"admin queue {q.size}@{q.base:#x} does not match AQA/ASQ/ACQ")
        elif not 0 < q.qid <= ctrl.io_queues:
            raise state_error(f"queue id {q.qid}")
        if not 2 <= q.size <= max(mqes + 1, 4096 if q.qid == 0 else 0) or q.base % PAGE_SIZE:
            raise state_error(f"queue {q.qid}: size {q.size} / base {q.base:#x}")
        if not (q.head < q.size and q.tail < q.size):
            raise state_error(f"queue {q.qid}: head {q.head} / tail {q.tail} outside {q.size}")
    for cq in cqs:
        if cq.phase > 1 or cq.ien > 1 or cq.unsignalled > 1 or cq.reserved:
            raise state_error(f"CQ {cq.qid}: phase/ien/flags")
        if cq.ien and cq.vector >= ctrl.vectors:
            raise state_error(f"CQ {cq.qid}: vector {cq.vector}")  # Invalid Interrupt Vector
    for sq in sqs:
        if (sq.qid == 0) != (sq.cqid == 0) or sq.cqid not in cq_ids:
            raise state_error(f"SQ {sq.qid}: CQ {sq.cqid}")  # Completion Queue Invalid


def _check_features(ctrl: NvmeController, features: dict[int, int], thresholds: dict[int, int],
                    tler: dict[int, int], no_coalescing: set[int]) -> None:
    for fid, value in features.items():
        if fid not in Features.SUPPORTED or value & Features.RESERVED.get(fid, 0):
            raise state_error(f"feature {fid:#x} = {value:#x}")
    if set(features) != set(FeatureId):
        raise state_error("feature list incomplete")
    # Both thresholds, over (THSEL 0) and under (1): Get Features and the SMART
    # log read each of them.
    if set(thresholds) != {0, 1} or any(v > 0xFFFF for v in thresholds.values()):
        raise state_error(f"temperature thresholds {thresholds}")
    if any(v > 0xFFFF for v in tler.values()):
        raise state_error("error recovery time limits")
    if any(v >= ctrl.vectors for v in no_coalescing):
        raise state_error(f"interrupt vector configuration {sorted(no_coalescing)}")


def _check_uncorrectable(blocks: dict[int, int],
                         entries: list[UncorrectableRange]) -> dict[int, LbaRanges]:
    """The uncorrectable ranges of each allocated namespace (``blocks``: its
    logical blocks, by NSID): in it, sorted, disjoint, not adjacent, MAX_RANGES
    at most (what Write Uncorrectable can leave)."""
    out = {nsid: LbaRanges() for nsid in blocks}
    for e in entries:
        if e.nsid not in blocks or e.reserved or e.nlb == 0 or e.slba + e.nlb > blocks[e.nsid]:
            raise state_error(f"uncorrectable LBA {e.slba}+{e.nlb} of namespace {e.nsid}")
        ranges = out[e.nsid].ranges
        if ranges and ranges[-1][1] >= e.slba or len(ranges) >= MAX_RANGES:
            raise state_error(f"namespace {e.nsid}: uncorrectable ranges out of order")
        ranges.append((e.slba, e.slba + e.nlb))
    return out


def _check_zones(ctrl: NvmeController, kept: set[int],
                 entries: list[ZoneEntry]) -> dict[int, ZoneSnapshot]:
    """Each zoned namespace's zones (of those ``kept``: not deleted), checked by
    its own table (geometry, write pointers where the states put them, the open
    and active limits)."""
    records: dict[int, list[ZoneRecord]] = {nsid: [] for nsid in ctrl.zones if nsid in kept}
    for e in entries:
        if e.nsid not in records or e.reserved9 or e.reserved10 or e.reserved12 or (
                e.state not in ZONE_STATES):
            raise state_error(f"zone {e.zone} of namespace {e.nsid}: state {e.state:#x}")
        records[e.nsid].append(ZoneRecord(e.zone, ZoneState(e.state), e.wp))
    try:
        return {nsid: ctrl.zones[nsid].checked(found) for nsid, found in records.items()}
    except ValueError as exc:
        raise state_error(str(exc)) from None


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
    ctrl.uncorrectable = {nsid: LbaRanges(r.ranges) for nsid, r in snap.uncorrectable.items()}
    for nsid, zones in snap.zones.items():
        ctrl.zones[nsid].adopt(zones)
    slots, state = ctrl.firmware, snap.firmware
    slots.slots[1] = None if state.slot2 == bytes(8) else state.slot2
    slots.running, slots.active, slots.next_active = state.running, state.active, state.next_active
    slots.image = fw.FirmwareImage(snap.firmware_bitmap, state.image_head)
    ctrl.identify_changed()
    now = clock or feats.clock
    feats.timestamp_base = ((head.timestamp_ms, now() if now else 0.0)
                            if head.flags & FLAG_TIMESTAMP else None)
