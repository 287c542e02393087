"""Save and restore of the NVMe controller and its namespaces (device layer).

The parts live beside it: :mod:`appliance.storage.controller_state` (the
controller blob), :mod:`appliance.storage.dirty` (dirty pages, holes, zero
runs), :mod:`appliance.storage.staging` (the incoming image of a restore),
:mod:`appliance.storage.migration_restore` (the destination half: staging
and commit).

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
  1 MiB records.  A namespace with metadata follows each piece's records
  with NAMESPACE_METADATA records for the written metadata of its blocks
  (the side file's holes and zero pages are unwritten metadata, which the
  NAMESPACE_BLOCKS records imply at the destination); its metadata changes
  only with its blocks, so the same dirty pages cover it.  Read-only
  namespaces are not sent: their size and flag are part of the
  fingerprint, their image must be the same on both sides.
* **Controller state** (small, one DEVICE_STATE record of kind
  NVME_CONTROLLER, taken in STOP_COPY): the registers (CC, AQA, ASQ, ACQ,
  INTMS, the CC/CSTS machine state), every SQ and CQ (base, size, head,
  tail, phase, vector, IEN, unsignalled entries, completions in the
  backlog, shadow doorbell EventIdx state), the shadow doorbell buffers,
  held AERs and pending/masked events, the error log, the changed-namespace
  list, every feature value (the timestamp as its current value in ms), the
  blocks Write Uncorrectable marked, and the state and write pointer of every
  zone of a zoned namespace that is not Empty, and the namespace inventory
  (:mod:`appliance.storage.ns_inventory`).  A blob of another state
  version is refused with a message naming both versions.
* **Namespaces created at run time**: tracked like the others from the
  start of the session; a full stream announces them first (a DEVICE_STATE
  record of kind NVME_NAMESPACES) so the destination can make their images
  before their NAMESPACE_BLOCKS arrive.  One created or deleted during the
  session fails it (EBUSY).

Restore stages everything.  The first NAMESPACE_BLOCKS record of a
namespace creates its *staging image*: a new sparse file of the
namespace's size beside the image (a hidden ``.<image>.incoming-XXXXXXXX``
in the same directory, so the final rename is atomic; a namespace with
metadata gets a staging side file beside its side file too, renamed right
after the image), each record written
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
:meth:`commit_restore` swaps the images in, makes the namespaces the
source's inventory, then replaces the controller state and the PCI state.

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
from collections.abc import Callable

from appliance.errors import LocalProtocolError
from appliance.storage.controller import NvmeController
from appliance.storage.controller_state import (
    STATE_VERSION,
    CtrlSnapshot,
    CtrlStateHead,
    SqState,
    decode_controller,
    encode_controller,
)
from appliance.storage.dirty import DirtyPages, data_end, hole_end, zero_runs
from appliance.storage.metadata import stored
from appliance.storage.migration_restore import NvmeRestore
from appliance.storage.namespace import Namespace
from appliance.storage.ns_inventory import (
    IncomingNamespaces,
    inventory_of,
)
from appliance.storage.staging import Staging, pread_all
from appliance.vfio_user.migration_stream import (
    MAX_PAYLOAD,
    MAX_ZERO_RUN,
    BlocksFlag,
    BlocksHead,
    DeviceKind,
    Record,
    RecordHead,
    RecordType,
    device_state,
    namespace_blocks,
    namespace_metadata,
)

PAGE = 4096  # dirty-tracking unit: the NVMe page (a namespace's block if larger)
MAX_RECORD = 1 << 20  # data bytes per NAMESPACE_BLOCKS record: dirty runs coalesce up to it
ZERO_RUN_MIN = 64 * 1024  # all-zero stretches inside data this long go as ZEROES records
ZEROES_COST = RecordHead.SIZE + BlocksHead.SIZE  # stream bytes of a ZEROES record
MD_PAGE = 4096  # side-file bytes: zero stretches this long (unwritten metadata) are not sent
log = logging.getLogger("appliance.migrate")

__all__ = ["MAX_RECORD", "PAGE", "CtrlSnapshot", "CtrlStateHead", "DirtyPages", "NvmeMigratable",
           "SqState", "decode_controller", "encode_controller"]


class NvmeMigratable(NvmeRestore):
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
        #: the configured namespaces' fingerprint parts, as start-up made them
        self._configured = {n: part for n, part in _namespace_parts(ctrl).items()
                            if n not in ctrl.ns_mgmt.created}
        self.ctrl = ctrl
        self.page = page
        self.max_record = max_record
        self.clock = clock
        self.dirty: dict[int, DirtyPages] = {}
        self._formats: dict[int, tuple[int, ...]] = {}  # nsid -> its LBA format (_format)
        self._snapshot: CtrlSnapshot | None = None
        # nsid -> (start, end): [start, end) held data at the last SEEK_HOLE
        self._data_extent: dict[int, tuple[int, int]] = {}
        self._staging: dict[int, Staging] = {}
        self._incoming = IncomingNamespaces(ctrl.ns_mgmt.image_dir)
        #: the inventory the saving session started with (None: no session)
        self._allocated: tuple[object, ...] | None = None
        self._announcement: bytes | None = None  # created namespaces, before their data
        self._announced = False
        self._handed_over: set[int] = set()  # created images the destination took over
        self._hook_namespaces()

    def _hook_namespaces(self) -> None:
        """Dirty tracking on every writable namespace (created ones too)."""
        for nsid, ns in self.ctrl.namespaces.items():
            if not ns.read_only:
                ns.on_change = self._marker(nsid)

    @staticmethod
    def fingerprint_extra(ctrl: NvmeController,
                          configured: dict[int, str] | None = None) -> bytes:
        """The controller configuration a peer must share (ids, limits, namespaces).

        ``configured`` (NSID → its part) is what start-up gave the configured
        namespaces; a namespace created at run time is never part of it (the
        inventory in the controller state carries it), and one deleted at run
        time keeps its start-up part, also when a created namespace took its
        NSID since: a destination is started from the same configuration.
        """
        parts = [(f"nvme-v{STATE_VERSION} sn={ctrl.serial} mn={ctrl.mn!r} fr={ctrl.fr!r} "
                  f"ioq={ctrl.io_queues} mqes={ctrl.regs.mqes} mdts={ctrl.mdts_bytes} "
                  f"vectors={ctrl.vectors} cap={ctrl.regs.cap:#x}")]
        if ctrl.ns_mgmt.enabled:  # what Identify Controller says of Namespace Management
            parts.append(f"nsmgmt:{ctrl.ns_mgmt.capacity}:{ctrl.ns_mgmt.max_namespaces}")
        namespaces = _namespace_parts(ctrl)
        if configured is not None:  # (a deleted one's NSID may be a created one's now)
            namespaces = {**{n: part for n, part in namespaces.items() if n in configured},
                          **{n: part for n, part in configured.items()
                             if n in ctrl.ns_mgmt.deleted}}
        parts += [part for _, part in sorted(namespaces.items())]
        return "|".join(parts).encode()

    def migration_fingerprint(self) -> bytes:
        """The PCI fingerprint with :meth:`fingerprint_extra` as of now: a Format
        NVM of a configured namespace since start-up (another LBA format,
        extended or separate metadata, another protection) is part of it."""
        self.extra_fingerprint = self.fingerprint_extra(self.ctrl, self._configured)
        return super().migration_fingerprint()

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
        # Running again (a migration or handoff that did not go through): the
        # created images handed over in save_state are this process's again.
        self.ctrl.ns_mgmt.owned |= self._handed_over
        self._handed_over = set()
        self.ctrl.resume()  # doorbells and events that arrived while stopped

    def _inventory_key(self) -> tuple[object, ...]:
        return tuple(sorted(self.ctrl.namespaces)), tuple(sorted(self.ctrl.ns_mgmt.created.items()))

    def start_tracking(self) -> None:
        super().start_tracking()
        self._hook_namespaces()
        self._allocated = self._inventory_key()
        created = inventory_of(self.ctrl).created
        self._announcement = b"".join(a.entry().pack() for a in created) if created else None
        self._announced = False
        self.dirty = {}
        self._data_extent = {}
        for nsid, ns in self.ctrl.namespaces.items():
            if not ns.read_only:
                pages = self.dirty[nsid] = DirtyPages(ns.size, max(self.page, ns.block_size))
                pages.mark_all()
                self._formats[nsid] = _format(ns)

    def stop_tracking(self) -> None:
        super().stop_tracking()
        self.dirty = {}
        self._allocated = None

    def precopy_pending(self) -> int:
        """Dirty bytes: the created namespaces' announcement until it is sent, the
        data, and the metadata of the dirty blocks (at most that much travels)."""
        total = len(self._announcement) if self._announcement and not self._announced else 0
        for nsid, pages in self.dirty.items():
            ns, pending = self.ctrl.namespaces[nsid], pages.pending_bytes()
            total += pending + (pending >> ns.lba_shift) * ns.metadata
        return total

    def precopy_records(self, max_bytes: int) -> list[Record]:
        """Records for dirty pages: ``max_bytes`` of stream at most, or one record.

        Each dirty run becomes ZEROES records for its holes (found with
        SEEK_DATA/SEEK_HOLE, without reading them) and NAMESPACE_BLOCKS of
        up to ``max_record`` bytes for its data (all-zero stretches of
        ZERO_RUN_MIN bytes or more inside it as ZEROES again).  In a
        namespace with metadata, NAMESPACE_METADATA records follow with the
        written metadata of those blocks (:meth:`_metadata_records`), and a
        piece covers at most the blocks whose metadata fills ``max_record``.
        """
        self.check_copyable()
        out: list[Record] = []
        spent = 0
        if self._announcement is not None and not self._announced:
            out.append(device_state(DeviceKind.NVME_NAMESPACES, self._announcement))
            spent, self._announced = len(self._announcement), True
        for nsid in sorted(self.dirty):
            pages, ns = self.dirty[nsid], self.ctrl.namespaces[nsid]
            page = pages.page
            # A piece's metadata fits one record: at most max_record bytes of it.
            most = MAX_ZERO_RUN if ns.md is None else \
                self.max_record // ns.metadata << ns.lba_shift
            while (run := pages.next_run()) is not None:
                start, stop = run[0] * page, min(run[1] * page, ns.size)
                end = min(hole_end(ns.fd, start, stop, page), start + MAX_ZERO_RUN, start + most)
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
                if ns.md is not None:
                    records = self._metadata_records(nsid, ns, start, end)
                    out += records
                    spent += sum(r.size for r in records)
                pages.clear(run[0], -(-(end - start) // page))
                pages.cursor = -(-end // page)
        return out

    def check_copyable(self) -> None:
        """Raises:
            LocalProtocolError: a namespace whose data cannot be copied (NBD:
                EOPNOTSUPP) or that was created, deleted, resized or formatted
                since the session started (EBUSY).
        """
        self._check_sizes()
        for nsid in self.dirty:  # (a shared-storage session never asks for records)
            if self.ctrl.namespaces[nsid].remote:
                raise LocalProtocolError(f"namespace {nsid} is on an NBD export: its data is "
                                         "not copied (migrate with shared storage)",
                                         errno.EOPNOTSUPP)

    def channel_blocker(self) -> str:
        """Why the data channel cannot carry this device's data ("" when it can):
        it carries image blocks only, so neither a namespace with metadata (its
        NAMESPACE_METADATA records) nor a namespace created at run time (its
        announcement) can use it; the standard path carries both."""
        if any(ns.md is not None for ns in self.ctrl.namespaces.values()):
            return "a namespace has metadata (the data channel carries image blocks only)"
        if self.ctrl.ns_mgmt.created:
            return "a namespace was created at run time (the data channel cannot announce it)"
        return ""

    @staticmethod
    def _metadata_records(nsid: int, ns: Namespace, start: int, end: int) -> list[Record]:
        """NAMESPACE_METADATA records for the blocks of bytes ``start .. end-1``:
        their written metadata (unwritten metadata is a hole or zeroes in the side
        file, whole MD_PAGEs of it are skipped: the blocks' NAMESPACE_BLOCKS
        records left it unwritten at the destination already).

        Raises:
            OSError: the side file cannot be read (the session fails, as for
                the image).
        """
        assert ns.md is not None
        ms, out = ns.metadata, []
        pos, stop = (start >> ns.lba_shift) * ms, (end >> ns.lba_shift) * ms
        while pos < stop:
            pos = hole_end(ns.md.fd, pos, stop, ms)
            if pos >= stop:
                break
            piece = data_end(ns.md.fd, pos, stop, ms)
            raw = pread_all(ns.md.fd, piece - pos, pos)
            for a, b, zero in zero_runs(raw, MD_PAGE, MD_PAGE):
                if not zero:  # MD_PAGE is a multiple of every metadata size: whole blocks
                    out.append(namespace_metadata(nsid, (pos + a) // ms, (b - a) // ms,
                                                  stored(raw[a:b])))
            pos = piece
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
            LocalProtocolError: EBUSY when a namespace was created, deleted,
                resized or formatted to another LBA format since the session
                started (the stream announced the inventory it started with; its
                fingerprint has the old size and format: block and metadata
                sizes, protection, extended or separate metadata).
        """
        if self._allocated is not None and self._inventory_key() != self._allocated:
            raise LocalProtocolError("a namespace was created or deleted during the migration",
                                     errno.EBUSY)
        for nsid, pages in self.dirty.items():
            ns = self.ctrl.namespaces[nsid]
            if ns.size != pages.size:
                raise LocalProtocolError(f"namespace {nsid} was resized during the migration",
                                         errno.EBUSY)
            if self._formats.get(nsid, _format(ns)) != _format(ns):
                raise LocalProtocolError(f"namespace {nsid} was formatted to another LBA format "
                                         "during the migration", errno.EBUSY)

    def save_state(self) -> list[Record]:
        """The state records; without an announcement (shared storage) the
        destination takes over the created images themselves, so this process
        stops owning them until it runs again (:meth:`migration_run`): stopped
        after a migration, a delete here never removes what the destination
        serves."""
        self._check_sizes()
        blob = encode_controller(self.ctrl, copied=self._announced)
        if not self._announced:
            self._handed_over |= self.ctrl.ns_mgmt.owned
            self.ctrl.ns_mgmt.owned.clear()
        return [*super().save_state(), device_state(DeviceKind.NVME_CONTROLLER, blob)]


def _format(ns: Namespace) -> tuple[int, ...]:
    """What a Format NVM may change of ``ns``: block and metadata sizes, the
    protection (DPS: PI type, tuple first) and extended metadata."""
    return ns.block_size, ns.metadata, ns.protection.dps, int(ns.extended)


def _zeroes(nsid: int, offset: int, length: int) -> Record:
    head = BlocksHead(nsid=nsid, flags=BlocksFlag.ZEROES, offset=offset, length=length)
    return Record(RecordType.NAMESPACE_BLOCKS, head.pack())


def _namespace_parts(ctrl: NvmeController) -> dict[int, str]:
    """Each allocated namespace's part of the fingerprint: size, block size,
    read-only; the LBA format's metadata and protection; a zoned one's geometry."""
    out = {}
    for nsid, ns in ctrl.namespaces.items():
        part = f"ns{nsid}:{ns.size}:{ns.block_size}:{int(ns.read_only)}"
        if ns.md is not None:  # the LBA format and protection must match too
            part += f"|md{nsid}:{ns.metadata}:{ns.protection.dps}:{int(ns.extended)}"
        zones = ctrl.zones.get(nsid)
        if zones is not None:  # the zone geometry and limits must match too
            part += (f"|zoned{nsid}:{zones.zone_blocks}:{zones.capacity}:"
                     f"{zones.max_open}:{zones.max_active}")
        out[nsid] = part
    return out
