"""The PCI part of migration every device shares (device layer).

Config space, the MSI-X table and PBA, and the interrupt configuration (mode,
enabled counts, client masks) of a :class:`~appliance.pci.device.PciDevice`,
as records of the migration stream.  :class:`PciMigratable` wraps a plain
PciDevice (no bulk data) and is the base the NVMe adapter
(:mod:`appliance.storage.migration`) extends; the calls it offers are
:class:`~appliance.vfio_user.migratable.Migratable`'s.
"""


from __future__ import annotations

import errno
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from appliance.errors import LocalProtocolError
from appliance.pci.config import CONFIG_SPACE_SIZE, STATUS, PciStatus
from appliance.vfio_user.migration_stream import Record, RecordType
from appliance.vfio_user.wire import PCI_NUM_IRQS, PciIrq
from appliance.wire import U16, U32, Struct, WireError

if TYPE_CHECKING:
    from appliance.pci.device import PciDevice



class PciStateHead(Struct, size=24):
    """PCI_CONFIG payload head; config bytes then ``n_masked`` IrqMask entries follow."""

    version: U16 = 1
    irq_mode: U16 = 0  # PciIrq the device signals through (informational)
    config_size: U32 = CONFIG_SPACE_SIZE
    count_intx: U16 = 0  # sub-indexes enabled per irq index (set_irq_count)
    count_msi: U16 = 0
    count_msix: U16 = 0
    count_err: U16 = 0
    count_req: U16 = 0
    reserved: U16 = 0
    n_masked: U32 = 0


class IrqMask(Struct, size=4):
    """One sub-index the client masked with SET_IRQS ACTION_MASK."""

    index: U16 = 0
    sub: U16 = 0


class MsixStateHead(Struct, size=16):
    """MSIX payload head; the table bytes, then the PBA bytes follow."""

    vectors: U16 = 0
    flags: U16 = 0  # MSIX_TABLE_IN_USE | MSIX_FUNCTION_MASKED
    table_size: U32 = 0
    pba_size: U32 = 0
    reserved: U32 = 0


MSIX_TABLE_IN_USE = 0x1
MSIX_FUNCTION_MASKED = 0x2
MSIX_FLAGS_RESERVED = 0xFFFF & ~(MSIX_TABLE_IN_USE | MSIX_FUNCTION_MASKED)
_COUNT_FIELDS = ("count_intx", "count_msi", "count_msix", "count_err", "count_req")
# Read-only config bits the device itself changes (PciDevice.signal/deassert_intx).
_DEVICE_OWNED = {STATUS: int(PciStatus.INTERRUPT) & 0xFF}


def _bad(message: str) -> LocalProtocolError:
    return LocalProtocolError(message, errno.EINVAL)


def pci_fingerprint(dev: PciDevice, extra: bytes = b"") -> bytes:
    """SHA-256 over what fixes a PCI device's configuration.

    Covers the read-only image of config space (ids, class, capability
    layout, BAR types; the device-owned Interrupt Status bit cleared), the
    write masks (BAR sizes), the MSI-X layout and ``extra`` (the device
    type's own configuration, e.g. namespaces).
    """
    config = dev.config
    h = hashlib.sha256(b"appliance-pci-v1\0")
    image = bytearray(config.data)
    for i in range(CONFIG_SPACE_SIZE):
        image[i] &= ~(config.wmask[i] | config.w1cmask[i]) & 0xFF
    for offset, bits in _DEVICE_OWNED.items():
        image[offset] &= ~bits & 0xFF
    h.update(image)
    h.update(config.wmask)
    h.update(config.w1cmask)
    if dev.msix is not None:
        lay = dev.msix.layout
        h.update(f"msix {lay.vectors} {lay.table_bar}:{lay.table_offset:#x} "
                 f"{lay.pba_bar}:{lay.pba_offset:#x}".encode())
    for index in sorted(dev.bars):
        bar = dev.bars[index]
        h.update(f"bar{index} {bar.size:#x} {bar.is_64bit} {bar.prefetchable}".encode())
    h.update(extra)
    return h.digest()


def _irq_snapshot(dev: PciDevice) -> tuple[list[int], list[tuple[int, int]]]:
    """The client-enabled counts and client masks the device holds.

    PciDevice exposes setters (set_irq_count, irq_mask) but no getters, so
    this reads its two private lists; keep in step with appliance.pci.interrupts.
    """
    counts: list[int] = list(dev._irq_counts)
    masked_sets: list[set[int]] = dev._client_masked
    masks = [(index, sub) for index in range(PCI_NUM_IRQS) for sub in sorted(masked_sets[index])]
    return counts, masks


def pci_state_records(dev: PciDevice) -> list[Record]:
    """Save a PciDevice: PCI_CONFIG (config space, irq configuration) and MSIX.

    Returns:
        One PCI_CONFIG record and, when the device has MSI-X, one MSIX record.
    """
    counts, masks = _irq_snapshot(dev)
    head = PciStateHead(irq_mode=int(dev.irq_mode), n_masked=len(masks),
                        **{name: counts[i] for i, name in enumerate(_COUNT_FIELDS)})
    payload = head.pack() + bytes(dev.config.data)
    payload += b"".join(IrqMask(index=i, sub=s).pack() for i, s in masks)
    records = [Record(RecordType.PCI_CONFIG, payload)]
    if dev.msix is not None:
        msix = dev.msix
        flags = (MSIX_TABLE_IN_USE if msix.table_in_use else 0) | (
            MSIX_FUNCTION_MASKED if msix.function_mask else 0)
        table = msix.read_table(0, msix.layout.table_size)
        pba = msix.read_pba(0, msix.layout.pba_size)
        mhead = MsixStateHead(vectors=msix.vectors, flags=flags, table_size=len(table),
                              pba_size=len(pba))
        records.append(Record(RecordType.MSIX, mhead.pack() + table + pba))
    return records


def _parse_config(dev: PciDevice, payload: bytes) -> tuple[PciStateHead, bytes, list[IrqMask]]:
    try:
        head = PciStateHead.unpack(payload)
    except WireError as exc:
        raise _bad(f"PCI_CONFIG: {exc}") from None
    if head.version != 1 or head.reserved or head.config_size != CONFIG_SPACE_SIZE:
        raise _bad(f"PCI_CONFIG version {head.version} / config size {head.config_size}")
    end = PciStateHead.SIZE + head.config_size
    if len(payload) != end + head.n_masked * IrqMask.SIZE:
        raise _bad(f"PCI_CONFIG payload of {len(payload)} bytes does not match its head")
    image = payload[PciStateHead.SIZE:end]
    config = dev.config
    for i in range(CONFIG_SPACE_SIZE):
        fixed = ~(config.wmask[i] | config.w1cmask[i] | _DEVICE_OWNED.get(i, 0)) & 0xFF
        if (image[i] ^ config.data[i]) & fixed:
            raise _bad(f"PCI_CONFIG: read-only config byte {i:#x} differs "
                       f"({image[i]:#04x} vs {config.data[i]:#04x}): another device model")
    try:
        irq_mode = PciIrq(head.irq_mode)
    except ValueError:
        raise _bad(f"PCI_CONFIG: irq mode {head.irq_mode}") from None
    if irq_mode not in (PciIrq.INTX, PciIrq.MSI, PciIrq.MSIX):
        raise _bad(f"PCI_CONFIG: irq mode {irq_mode.name}")
    for index, name in enumerate(_COUNT_FIELDS):
        if getattr(head, name) > dev.irq(index).count:
            raise _bad(f"PCI_CONFIG: {getattr(head, name)} sub-indexes of irq {index}, "
                       f"device has {dev.irq(index).count}")
    masks = [IrqMask.unpack(payload, end + i * IrqMask.SIZE) for i in range(head.n_masked)]
    for m in masks:
        if m.index >= PCI_NUM_IRQS or not dev.irq(m.index).maskable or (
                m.sub >= dev.irq(m.index).count):
            raise _bad(f"PCI_CONFIG: mask of irq {m.index} sub-index {m.sub}")
    return head, image, masks


def _parse_msix(dev: PciDevice, payload: bytes) -> tuple[MsixStateHead, bytes, bytes]:
    msix = dev.msix
    if msix is None:
        raise _bad("MSIX record for a device without MSI-X")
    try:
        head = MsixStateHead.unpack(payload)
    except WireError as exc:
        raise _bad(f"MSIX: {exc}") from None
    lay = msix.layout
    if (head.vectors != msix.vectors or head.table_size != lay.table_size
            or head.pba_size != lay.pba_size or head.reserved or head.flags & MSIX_FLAGS_RESERVED):
        raise _bad(f"MSIX: {head} does not fit {msix.vectors} vectors")
    if len(payload) != MsixStateHead.SIZE + head.table_size + head.pba_size:
        raise _bad(f"MSIX payload of {len(payload)} bytes does not match its head")
    table = payload[MsixStateHead.SIZE:MsixStateHead.SIZE + head.table_size]
    pba = payload[MsixStateHead.SIZE + head.table_size:]
    if int.from_bytes(pba, "little") >> msix.vectors:
        raise _bad("MSIX: pending bits past the last vector")
    return head, table, pba


def check_pci_state(dev: PciDevice, record: Record) -> None:
    """Validate a PCI_CONFIG or MSIX record against ``dev`` without applying it.

    Raises:
        LocalProtocolError: EINVAL when the record is malformed or describes
            another device model (a read-only config byte differs, vector or
            irq counts do not fit).
    """
    if record.type == RecordType.PCI_CONFIG:
        _parse_config(dev, record.payload)
    elif record.type == RecordType.MSIX:
        _parse_msix(dev, record.payload)
    else:
        raise _bad(f"{record.type.name} is not a PCI state record")


def apply_pci_state(dev: PciDevice, record: Record) -> None:
    """Restore a PCI_CONFIG or MSIX record into ``dev`` (validated first).

    PCI_CONFIG sets config space as saved (bypassing the write masks, as a
    device-side update), then the interrupt configuration through the
    device's own setters: enabled counts (set to 0 and back, which drops
    the old masks) and the saved client masks.  Interrupts raised before
    the destination's client installs its eventfds stay pending and are
    delivered when it does.  MSIX restores the table, the arming of the
    table's masks, Function Mask and the pending bits.

    Raises:
        LocalProtocolError: EINVAL as :func:`check_pci_state` (nothing changed then).
    """
    if record.type == RecordType.PCI_CONFIG:
        head, image, masks = _parse_config(dev, record.payload)
        dev.config.data[:] = image
        for index, name in enumerate(_COUNT_FIELDS):
            dev.set_irq_count(index, 0)
            dev.set_irq_count(index, getattr(head, name))
        for m in masks:
            dev.irq_mask(m.index, m.sub, 1, True)
    elif record.type == RecordType.MSIX:
        mhead, table, pba = _parse_msix(dev, record.payload)
        msix = dev.msix
        assert msix is not None
        msix.write_table(0, table)
        msix.table_in_use = bool(mhead.flags & MSIX_TABLE_IN_USE)
        msix.function_mask = bool(mhead.flags & MSIX_FUNCTION_MASKED)
        bits = int.from_bytes(pba, "little")
        for vector in range(msix.vectors):
            msix.set_pending(vector, bool(bits >> vector & 1))
    else:
        raise _bad(f"{record.type.name} is not a PCI state record")


class PciMigratable:
    """:class:`Migratable` for a plain PciDevice: PCI state only, no bulk data.

    Subclasses add their own records by overriding :meth:`save_state`,
    :meth:`stage`, :meth:`commit_restore` and friends (calling up).
    """

    def __init__(self, dev: PciDevice, extra_fingerprint: bytes = b"") -> None:
        self.dev = dev
        self.extra_fingerprint = extra_fingerprint
        self.stopped = False
        self.tracking = False
        self.restored = False  # committed since the last migration_run
        self._staged: dict[RecordType, Record] = {}

    def migration_fingerprint(self) -> bytes:
        return pci_fingerprint(self.dev, self.extra_fingerprint)

    def migration_stop(self) -> None:
        self.stopped = True

    def migration_run(self) -> None:
        self.stopped = False
        if self.restored:
            # Deliver the interrupts the source had pending, in the restored mode.
            self.restored = False
            self.dev.irqs_configured(int(self.dev.irq_mode))

    def start_tracking(self) -> None:
        self.tracking = True

    def stop_tracking(self) -> None:
        self.tracking = False

    def precopy_pending(self) -> int:
        return 0

    def precopy_records(self, max_bytes: int) -> list[Record]:
        return []

    def save_state(self) -> list[Record]:
        return pci_state_records(self.dev)

    def load_records(self, records: Sequence[Record]) -> None:
        for record in records:
            self.stage(record)

    def round_received(self) -> None:
        """Nothing to sync: the PCI state is staged in memory."""

    def stage(self, record: Record) -> None:
        """Validate and keep one record for :meth:`commit_restore`.

        Raises:
            LocalProtocolError: EINVAL for a record of another kind or an
                invalid PCI record.
        """
        if record.type not in (RecordType.PCI_CONFIG, RecordType.MSIX):
            raise _bad(f"unexpected {record.type.name} record for {type(self.dev).__name__}")
        check_pci_state(self.dev, record)
        self._staged[record.type] = record

    def check_staged(self) -> None:
        """Raises:
            LocalProtocolError: EINVAL when a required record is missing.
        """
        if RecordType.PCI_CONFIG not in self._staged:
            raise _bad("the stream carried no PCI_CONFIG record")
        if self.dev.msix is not None and RecordType.MSIX not in self._staged:
            raise _bad("the stream carried no MSIX record")

    def commit_restore(self) -> None:
        self.check_staged()
        self.apply_staged()

    def apply_staged(self) -> None:
        """Apply what :meth:`check_staged` found complete (subclasses extend it)."""
        staged, self._staged = self._staged, {}
        for kind in (RecordType.PCI_CONFIG, RecordType.MSIX):
            if kind in staged:
                apply_pci_state(self.dev, staged[kind])
        self.restored = True

    def abort_restore(self) -> None:
        self._staged.clear()
