"""Save and restore of the NVMe controller and its namespaces (device layer).

The parts live beside it: :mod:`appliance.storage.controller_state` (the
controller blob), :mod:`appliance.storage.dirty` (dirty pages, holes, zero
runs), :mod:`appliance.storage.staging` (the incoming image of a restore).

Theory of operation
-------------------
:class:`NvmeMigratable` is the :class:`~appliance.vfio_user.migratable.Migratable`
of an :class:`~appliance.storage.controller.NvmeController`.  It extends the
PCI part (:class:`~appliance.pci.migration.PciMigratable`: config space,
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
  list, every feature value (the timestamp as its current value in ms), the
  blocks Write Uncorrectable marked, and the state and write pointer of every
  zone of a zoned namespace that is not Empty.  A blob of another state
  version is refused with a message naming both versions.

Restore stages everything.  The first NAMESPACE_BLOCKS record of a
namespace creates its *staging image*: a new sparse file of the
namespace's size beside the image (a hidden ``.<image>.incoming-XXXXXXXX``
in the same directory, so the final rename is atomic), each record written
at its offset (ZEROES punch a hole), synced every 16 MiB and at every
pre-copy round marker (so the commit, in the downtime, syncs only the last
round).  A full stream carries every byte of every writable namespace (a
saving session starts with everything dirty), so at commit the staging
image *is* the new image: blocks the stream did not carry are filled from
the old image (none for a complete stream), the file is synced and renamed
over the image, and the :class:`~appliance.storage.namespace.Namespace`
swaps its fd to it
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

import errno
import logging
import os
from collections.abc import Callable, Sequence

from appliance.errors import LocalProtocolError
from appliance.pci.migration import PciMigratable
from appliance.storage.controller import NvmeController
from appliance.storage.controller_state import (
    STATE_VERSION,
    CtrlSnapshot,
    CtrlStateHead,
    SqState,
    apply_controller,
    decode_controller,
    encode_controller,
    state_error,
)
from appliance.storage.dirty import DirtyPages, data_end, hole_end, zero_runs
from appliance.storage.staging import Staging
from appliance.vfio_user.migration_stream import (
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

PAGE = 4096  # dirty-tracking unit: the NVMe page (a namespace's block if larger)
MAX_RECORD = 1 << 20  # data bytes per NAMESPACE_BLOCKS record: dirty runs coalesce up to it
ZERO_RUN_MIN = 64 * 1024  # all-zero stretches inside data this long go as ZEROES records
ZEROES_COST = RecordHead.SIZE + BlocksHead.SIZE  # stream bytes of a ZEROES record
log = logging.getLogger("appliance.migrate")

__all__ = ["MAX_RECORD", "PAGE", "CtrlSnapshot", "CtrlStateHead", "DirtyPages", "NvmeMigratable",
           "SqState", "decode_controller", "encode_controller"]


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
        # nsid -> (start, end): [start, end) held data at the last SEEK_HOLE
        self._data_extent: dict[int, tuple[int, int]] = {}
        self._staging: dict[int, Staging] = {}
        for nsid, ns in ctrl.namespaces.items():
            if not ns.read_only:
                ns.on_change = self._marker(nsid)

    @staticmethod
    def fingerprint_extra(ctrl: NvmeController) -> bytes:
        """The controller configuration a peer must share (ids, limits, namespaces)."""
        parts = [(f"nvme-v{STATE_VERSION} sn={ctrl.serial} mn={ctrl.mn!r} fr={ctrl.fr!r} "
                  f"ioq={ctrl.io_queues} mqes={ctrl.regs.mqes} mdts={ctrl.mdts_bytes} "
                  f"vectors={ctrl.vectors} cap={ctrl.regs.cap:#x}")]
        if ctrl.ns_mgmt.enabled:  # what Identify Controller says of Namespace Management
            parts.append(f"nsmgmt:{ctrl.ns_mgmt.capacity}:{ctrl.ns_mgmt.max_namespaces}")
        for nsid, ns in sorted(ctrl.namespaces.items()):
            parts.append(f"ns{nsid}:{ns.size}:{ns.block_size}:{int(ns.read_only)}")
            if ns.md is not None:  # the LBA format and protection must match too
                parts.append(f"md{nsid}:{ns.metadata}:{ns.protection.dps}:{int(ns.extended)}")
            zones = ctrl.zones.get(nsid)
            if zones is not None:  # the zone geometry and limits must match too
                parts.append(f"zoned{nsid}:{zones.zone_blocks}:{zones.capacity}:"
                             f"{zones.max_open}:{zones.max_active}")
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

    def _refuse_changed_namespaces(self) -> None:
        why = self.ctrl.ns_mgmt.departure_blocker()
        if why:
            raise LocalProtocolError(f"cannot migrate: {why}", errno.EBUSY)

    def start_tracking(self) -> None:
        self._refuse_changed_namespaces()
        super().start_tracking()
        self.dirty = {}
        self._data_extent = {}
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
        for nsid in self.dirty:  # (a shared-storage session never asks for records)
            if self.ctrl.namespaces[nsid].remote:
                raise LocalProtocolError(f"namespace {nsid} is on an NBD export: its data is "
                                         "not copied (migrate with shared storage)",
                                         errno.EOPNOTSUPP)
            if self.ctrl.namespaces[nsid].md is not None:
                raise LocalProtocolError(f"namespace {nsid} has metadata: its side file is "
                                         "not copied (migrate with shared storage)",
                                         errno.EOPNOTSUPP)
        out: list[Record] = []
        spent = 0
        for nsid in sorted(self.dirty):
            pages, ns = self.dirty[nsid], self.ctrl.namespaces[nsid]
            page = pages.page
            while (run := pages.next_run()) is not None:
                start, stop = run[0] * page, min(run[1] * page, ns.size)
                end = min(hole_end(ns.fd, start, stop, page), start + MAX_ZERO_RUN)
                if end > start:
                    if out and spent + ZEROES_COST > max_bytes:
                        return out
                    out.append(_zeroes(nsid, start, end - start))
                    spent += ZEROES_COST
                else:
                    end = min(self._data_end(nsid, start, stop, page), start + self.max_record)
                    if out and spent + (end - start) > max_bytes:
                        return out  # whole records: a read takes parts of one anyway
                    data = ns.read_bytes(start >> ns.lba_shift, end - start)
                    for a, b, zero in zero_runs(data, page, ZERO_RUN_MIN):
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

    def _data_end(self, nsid: int, start: int, stop: int, page: int) -> int:
        """:func:`data_end` of namespace ``nsid``, from the extent the last call
        found when ``start`` lies inside it: one SEEK_HOLE per data extent, not
        one per record (tmpfs answers SEEK_HOLE by walking every page up to the
        hole: ~2 ms per call on a full 256 MiB file).  An extent that changed
        since is still read right: what is read is the image's contents (a hole
        punched since reads as zeroes and goes as ZEROES), what is left dirty
        is found again by the next call."""
        first, end = self._data_extent.get(nsid, (0, 0))
        if not first <= start < end:
            ns = self.ctrl.namespaces[nsid]
            first, end = start, data_end(ns.fd, start, ns.size, page)
            self._data_extent[nsid] = (first, end)
        return min(end, stop)

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
        self._refuse_changed_namespaces()
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
                raise state_error(f"DEVICE_STATE kind {kind} version {version}")
            if self._snapshot is not None:
                raise state_error("second controller state record")
            self._snapshot = decode_controller(self.ctrl, blob)
        else:
            super().stage(record)

    def _stage_blocks(self, record: Record) -> None:
        try:
            head, data = parse_blocks_head(record)
        except StreamError as exc:
            raise state_error(str(exc)) from None
        ns = self.ctrl.namespaces.get(head.nsid)
        if ns is None or ns.read_only:
            raise state_error(f"blocks for namespace {head.nsid} (absent or read-only here)")
        if ns.remote:
            raise state_error(f"blocks for namespace {head.nsid}, which is on an NBD export "
                              "here (migrate it with shared storage)")
        if ns.md is not None:
            raise state_error(f"blocks for namespace {head.nsid}, which has metadata here "
                              "(migrate it with shared storage)")
        if (head.offset % ns.block_size or head.length % ns.block_size
                or head.offset + head.length > ns.size):
            raise state_error(f"nsid {head.nsid}: blocks {head.offset:#x}+{head.length:#x} "
                       f"outside {ns.size:#x} or not {ns.block_size}-aligned")
        staging = self._staging.get(head.nsid)
        if staging is None:
            staging = self._staging[head.nsid] = Staging(ns)
        if head.flags & BlocksFlag.ZEROES:
            staging.zero(head.offset, head.length)
        else:
            staging.write(head.offset, data)

    def round_received(self) -> None:
        """Sync every staging image (the commit, in the downtime, syncs the rest)."""
        for staging in self._staging.values():
            staging.sync()

    def check_staged(self) -> None:
        super().check_staged()
        if self._snapshot is None:
            raise state_error("the stream carried no controller state")

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
        replaced: list[int] = []
        try:
            for stage in staging.values():
                replaced.append(stage.commit())
        except (OSError, ValueError) as exc:
            # Some images may be swapped: no valid state to fall back to.
            raise OSError(errno.EIO, f"restoring namespace data: {exc}") from exc
        finally:
            for stage in staging.values():
                stage.discard()
            self._release_images(replaced)
        apply_controller(self.ctrl, snapshot, self.clock)
        super().apply_staged()

    def _release_images(self, fds: list[int]) -> None:
        """Close the replaced images' fds on the offload when there is one: freeing
        a large file's blocks would otherwise lengthen the downtime."""
        def close_all() -> None:
            for fd in fds:
                os.close(fd)

        def closed(exc: BaseException | None) -> None:
            if exc is not None:
                log.warning("closing a replaced image failed: %s", exc)

        if not fds:
            return
        if self.ctrl.offload is None:
            close_all()
        else:
            self.ctrl.offload.submit(close_all, closed)

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
