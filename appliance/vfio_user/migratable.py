"""What a device offers to be migrated (protocol layer: the handler's view of a device).

Theory of operation
-------------------
Migration reaches a device only through save/restore, so the migration code
never depends on a device's internals (and storage/ and net/ stay independent):
:class:`Migratable` lists the calls, and the vfio-user migration handler
(:mod:`appliance.vfio_user.migration`) makes them, one per arc of the state
machine (:mod:`appliance.vfio_user.migration_states`):

============================  ==================================================
arc                           device calls
============================  ==================================================
RUNNING -> STOP               ``migration_stop()``
STOP -> RUNNING               ``migration_run()``
RUNNING -> PRE_COPY           ``start_tracking()``; then, on reads, ``precopy_pending()``,
                              ``precopy_records(n)``
STOP -> STOP_COPY             ``start_tracking()``
PRE_COPY -> STOP_COPY         ``migration_stop()``; on reads ``precopy_records(n)``
                              until [], then ``save_state()`` once
PRE_COPY -> RUNNING,          ``stop_tracking()`` (the saving session ends; nothing
STOP_COPY -> STOP             of the device changed)
STOP -> RESUMING              ``abort_restore()`` (drop stale staging); then, on
                              writes, ``load_records(records)`` (and
                              ``round_received()`` at each pre-copy round marker)
RESUMING -> STOP              ``commit_restore()`` once END verified, else
                              ``abort_restore()``
============================  ==================================================

Records reach :meth:`Migratable.load_records` only after their checksum
verified, and are *staged*: nothing of the device changes before
:meth:`Migratable.commit_restore`, which runs only after the END record's
digest over the whole stream verified.  So a destination fed a bad or
truncated stream keeps its old state.

The PCI state every device shares is saved and restored by
:mod:`appliance.pci.migration`; the NVMe controller's by
:mod:`appliance.storage.migration`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from appliance.vfio_user.migration_stream import Record


class Migratable(Protocol):
    """The device side of migration (all calls come from the event loop thread)."""

    def migration_fingerprint(self) -> bytes:
        """Bytes identifying the device *configuration* (not its state).

        Two appliances can exchange state only when their fingerprints are
        equal: same device type, ids, BAR layout, MSI-X vectors, namespaces
        and their sizes, queue limits.  At most 1024 bytes (a digest).
        """

    def migration_stop(self) -> None:
        """Quiesce: process no more doorbells/commands, no DMA, no interrupts.

        Raises:
            LocalProtocolError: the device could not stop and is still running.
        """

    def migration_run(self) -> None:
        """Resume normal operation after :meth:`migration_stop`."""

    def start_tracking(self) -> None:
        """A saving session starts: every bulk byte is pending; writes re-dirty."""

    def stop_tracking(self) -> None:
        """The saving session ended (done or cancelled); forget the dirty state."""

    def precopy_pending(self) -> int:
        """Bulk bytes still to send (dirty), so the client can decide to stop."""

    def precopy_records(self, max_bytes: int) -> list[Record]:
        """Take pending bulk data (e.g. NAMESPACE_BLOCKS), clearing what is returned.

        Returns:
            Records whose payloads total at most ``max_bytes`` (but at least
            one record while anything is pending); [] when nothing is.
        """

    def save_state(self) -> list[Record]:
        """The small device state (registers, queues, PCI), device stopped.

        Returns:
            PCI_CONFIG / MSIX / DEVICE_STATE records.
        """

    def load_records(self, records: Sequence[Record]) -> None:
        """Validate and stage verified records (PCI_CONFIG, MSIX, DEVICE_STATE,
        NAMESPACE_BLOCKS); nothing is applied yet.

        Raises:
            LocalProtocolError: EINVAL for a record this device cannot take.
        """

    def round_received(self) -> None:
        """A pre-copy round of the incoming stream ended (its successor's
        DIRTY_ROUND marker arrived; not the final one): a good moment to make
        what was staged durable, so the commit, in the downtime, has only the
        last round left to sync.

        Raises:
            OSError: the staged data could not be synced (the session is lost).
        """

    def commit_restore(self) -> None:
        """Apply everything staged (the stream's END verified).

        Checks completeness first; when it raises LocalProtocolError the
        device is unchanged.

        Raises:
            LocalProtocolError: EINVAL when the staged state is incomplete or
                inconsistent.
        """

    def abort_restore(self) -> None:
        """Drop everything staged; the device keeps its old state."""


# ---------------------------------------------------------------- PCI state records
