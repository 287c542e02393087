"""Restore of the NVMe controller and its namespaces: the destination half of
:class:`~appliance.storage.migration.NvmeMigratable` (device layer).

:class:`NvmeRestore` stages what a stream carries and commits it (the theory
is :mod:`appliance.storage.migration`'s): NAMESPACE_BLOCKS and
NAMESPACE_METADATA records go into each namespace's staging image
(:mod:`appliance.storage.staging`), a full stream's announcement of created
namespaces makes their images first (:mod:`appliance.storage.ns_inventory`),
the controller state is decoded and checked against this configuration
(:mod:`appliance.storage.controller_state`).  :meth:`NvmeRestore.commit_restore`
prepares the staged images (the old ones untouched), then swaps them in and
applies the controller and PCI state; :meth:`NvmeRestore.abort_restore` drops
everything staged.  Every refusal of a record is the stream's
(:func:`~appliance.storage.controller_state.state_error`, EINVAL).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from appliance.errors import LocalProtocolError
from appliance.pci.migration import PciMigratable
from appliance.storage.controller_state import (
    FLAG_COPIED,
    CtrlSnapshot,
    apply_controller,
    decode_controller,
    state_error,
)
from appliance.storage.namespace import Namespace
from appliance.storage.ns_inventory import IncomingNamespaces, NamespaceEntry, check_entries
from appliance.storage.nsmgmt import namespace_count
from appliance.storage.staging import Staging
from appliance.vfio_user.migration_stream import (
    BlocksFlag,
    DeviceKind,
    Record,
    RecordType,
    StreamError,
    parse_blocks_head,
    parse_device_state,
    parse_metadata_head,
)

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController

log = logging.getLogger("appliance.migrate")


class NvmeRestore(PciMigratable):
    """Staging and commit of a restore: the destination half of ``NvmeMigratable``."""

    # Set by NvmeMigratable.__init__.
    ctrl: NvmeController
    clock: Callable[[], float] | None
    _snapshot: CtrlSnapshot | None
    _staging: dict[int, Staging]
    _incoming: IncomingNamespaces

    if TYPE_CHECKING:  # NvmeMigratable's own
        def _hook_namespaces(self) -> None: ...

    def stage(self, record: Record) -> None:
        if record.type == RecordType.NAMESPACE_BLOCKS:
            self._stage_blocks(record)
        elif record.type == RecordType.NAMESPACE_METADATA:
            self._stage_metadata(record)
        elif record.type == RecordType.DEVICE_STATE:
            kind, version, blob = parse_device_state(record)
            if kind == DeviceKind.NVME_NAMESPACES and version == 1:
                self._stage_created(blob)
                return
            if kind != DeviceKind.NVME_CONTROLLER or version != 1:
                raise state_error(f"DEVICE_STATE kind {kind} version {version}")
            if self._snapshot is not None:
                raise state_error("second controller state record")
            snapshot = decode_controller(self.ctrl, blob)
            self._open_created(snapshot)
            self._snapshot = snapshot
        else:
            super().stage(record)

    def _stage_created(self, blob: bytes) -> None:
        """A full stream's announcement: make each created namespace's image
        (exclusively, in image_dir) so its blocks can be staged."""
        incoming = self._incoming
        if incoming.announced is not None or self._snapshot is not None:
            raise state_error("a namespace announcement after the first or after the state")
        if not blob or len(blob) % NamespaceEntry.SIZE:
            raise state_error(f"namespace announcement of {len(blob)} bytes")
        count, nn = len(blob) // NamespaceEntry.SIZE, namespace_count(self.ctrl)
        if count > nn:  # (never fits: refused before decoding any)
            raise state_error(f"namespace announcement of {count} entries, NN is {nn}")
        entries = [NamespaceEntry.unpack(blob, at)
                   for at in range(0, len(blob), NamespaceEntry.SIZE)]
        try:
            announced = check_entries(self.ctrl, entries, announced=True)
            for a in announced.created:
                incoming.make(a)
        except (OSError, ValueError) as exc:
            incoming.discard()
            raise state_error(f"created namespaces: {exc}") from None
        incoming.announced = announced

    def _open_created(self, snapshot: CtrlSnapshot) -> None:
        """The created namespaces of the state: announced and made (a full
        stream, FLAG_COPIED), or the source's images opened (shared storage)."""
        incoming, created = self._incoming, snapshot.inventory.created
        announced = incoming.announced
        if bool(snapshot.head.flags & FLAG_COPIED) != (announced is not None):
            raise state_error("the controller state and the namespace announcement disagree")
        if announced is not None:
            if len(created) != len(announced.created) or not all(
                    a.same_image(b) for a, b in zip(created, announced.created, strict=True)):
                raise state_error("the created namespaces differ from those announced")
            return
        try:
            for a in created:
                incoming.open(a)
            incoming.check_distinct(self.ctrl)
        except (OSError, ValueError) as exc:
            incoming.discard()
            raise state_error(f"created namespace image: {exc}") from None

    def _namespace(self, nsid: int) -> Namespace | None:
        """The namespace a record names: an incoming created one first."""
        return self._incoming.namespaces.get(nsid) or self.ctrl.namespaces.get(nsid)

    def _stage_blocks(self, record: Record) -> None:
        try:
            head, data = parse_blocks_head(record)
        except StreamError as exc:
            raise state_error(str(exc)) from None
        staging = self.staging_for(head.nsid, head.offset, head.length)
        if head.flags & BlocksFlag.ZEROES:
            staging.zero(head.offset, head.length)
        else:
            staging.write(head.offset, data)

    def _stage_metadata(self, record: Record) -> None:
        """Stage a NAMESPACE_METADATA record: the metadata of blocks this stream carried.

        Raises:
            LocalProtocolError: EINVAL (the stream's refusal) for a malformed
                record, a namespace without metadata here (or absent,
                read-only), blocks outside it or not carried yet, or a length
                other than blocks x this namespace's metadata size.
        """
        try:
            head, data = parse_metadata_head(record)
        except StreamError as exc:
            raise state_error(str(exc)) from None
        ns = self._namespace(head.nsid)
        if ns is None or ns.read_only or ns.md is None:
            raise state_error(f"metadata for namespace {head.nsid} (absent, read-only or "
                              "without metadata here)")
        where = f"nsid {head.nsid}: metadata of blocks {head.slba}+{head.nlb}"
        if len(data) != head.nlb * ns.metadata:
            raise state_error(f"{where}: {len(data)} bytes, not {ns.metadata} per block")
        staging = self._staging.get(head.nsid)
        if head.slba + head.nlb > ns.nlbas:
            raise state_error(f"{where}: past {ns.nlbas} blocks")
        if staging is None or not staging.carried(head.slba, head.nlb):
            raise state_error(f"{where}: blocks the stream has not carried")
        staging.write_metadata(head.slba, data)

    def staging_for(self, nsid: int, offset: int, length: int) -> Staging:
        """The staging image that takes ``length`` bytes at ``offset`` of namespace ``nsid``.

        Raises:
            LocalProtocolError: no such writable, file-backed namespace here, or a
                range outside it or not block-aligned (EINVAL).
        """
        ns = self._namespace(nsid)
        if ns is None or ns.read_only:
            raise state_error(f"blocks for namespace {nsid} (absent or read-only here)")
        if ns.remote:
            raise state_error(f"blocks for namespace {nsid}, which is on an NBD export "
                              "here (migrate it with shared storage)")
        if offset % ns.block_size or length % ns.block_size or offset + length > ns.size:
            raise state_error(f"nsid {nsid}: blocks {offset:#x}+{length:#x} "
                              f"outside {ns.size:#x} or not {ns.block_size}-aligned")
        staging = self._staging.get(nsid)
        if staging is None:
            staging = self._staging[nsid] = Staging(ns)
        return staging

    def round_received(self) -> None:
        """Sync every staging image (the commit, in the downtime, syncs the rest)."""
        for staging in self._staging.values():
            staging.sync()

    def check_staged(self) -> None:
        super().check_staged()
        if self._snapshot is None:
            raise state_error("the stream carried no controller state")
        deleted = self._snapshot.inventory.deleted
        if any(self._staging[n].ns is self.ctrl.namespaces.get(n) for n in deleted
               if n in self._staging):
            raise state_error("blocks for a namespace the state deletes")

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
                replaced += stage.commit()
        except (OSError, ValueError) as exc:
            # Some images may be swapped: no valid state to fall back to.
            self._incoming.discard()
            raise OSError(errno.EIO, f"restoring namespace data: {exc}") from exc
        finally:
            for stage in staging.values():
                stage.discard()
            self._release_images(replaced)
        self._incoming.adopt(self.ctrl, snapshot.inventory)
        self._hook_namespaces()
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
        self._incoming.discard()

    def load_records(self, records: Sequence[Record]) -> None:
        for record in records:
            self.stage(record)
