"""MSI-X table and Pending Bit Array (PCI Local Bus 3.0 section 6.8.2).

Theory of operation
-------------------
The table holds one 16-byte entry per vector (Message Address, Message
Upper Address, Message Data, Vector Control) and lives in a memory BAR; the
PBA holds one pending bit per vector, in QWORDs, in a BAR too.  Entries come
out of reset with their Mask bit set (section 6.8.2.9); the PBA is read-only
to software (section 6.8.2.10).

Who masks a vector
~~~~~~~~~~~~~~~~~~
A vfio-user client reaches this table in one of two ways:

* QEMU (like any vfio client) *emulates* the MSI-X table itself: the guest's
  table writes never reach the server.  It masks and unmasks vectors with
  DEVICE_SET_IRQS ACTION_MASK / ACTION_UNMASK (when the MSI-X irq is
  reported maskable) and forwards only PBA reads.  It does forward Message
  Control writes, as it forwards every config-space write.
* Our own client library drives the table directly with REGION_WRITE.

So the rule is: **the table's per-vector Mask bits and the Function Mask
bit gate delivery only after the client has written the table itself**
(:attr:`MsixTable.table_in_use`).  Until then our power-on entries, all
masked, would block every vector that QEMU unmasked in its own copy.  A
Message Control write alone does not arm the rule, because QEMU forwards
those while keeping the table to itself.  Client masks (SET_IRQS) always
apply; the device combines both (see :mod:`appliance.pci.device`).

A vector that fires while masked gets its pending bit set here; the device
clears it and delivers when the vector is unmasked.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.pci.config import check_range
from appliance.wire import U32, Struct

ENTRY_SIZE = 16
MAX_VECTORS = 2048  # Table Size is 11 bits, encoded N-1 (section 6.8.2.3)
VECTOR_CONTROL = 12  # offset of Vector Control inside an entry
VECTOR_MASKED = 0x1  # Vector Control bit 0; bits 31:1 reserved, read as 0


class MsixEntry(Struct, size=ENTRY_SIZE):
    """One MSI-X table entry (section 6.8.2.6 - 6.8.2.9)."""

    address_lo: U32 = 0
    address_hi: U32 = 0
    data: U32 = 0
    control: U32 = VECTOR_MASKED


# Client-writable bits of one entry: everything but reserved Vector Control bits.
_ENTRY_WMASK = MsixEntry(
    address_lo=0xFFFFFFFF, address_hi=0xFFFFFFFF, data=0xFFFFFFFF, control=VECTOR_MASKED
).pack()


@dataclass(frozen=True)
class MsixLayout:
    """Where the MSI-X table and PBA live: BAR index (BIR) and offset in it.

    The defaults suit an NVMe BAR0 of 16 KiB: table at 0x2000, PBA at 0x3000.
    """

    vectors: int
    table_bar: int = 0
    table_offset: int = 0x2000
    pba_bar: int = 0
    pba_offset: int = 0x3000

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X: {self.vectors} vectors not in 1..{MAX_VECTORS}")
        for name, bir, offset in (
            ("table", self.table_bar, self.table_offset),
            ("PBA", self.pba_bar, self.pba_offset),
        ):
            if not 0 <= bir <= 5:
                raise ValueError(f"MSI-X {name}: BIR {bir} not a BAR")
            if offset < 0 or offset & 7 or offset >> 32:
                raise ValueError(f"MSI-X {name}: offset {offset:#x} not a QWORD-aligned u32")
        if self.table_bar == self.pba_bar and _overlap(
            self.table_offset, self.table_size, self.pba_offset, self.pba_size
        ):
            raise ValueError("MSI-X table and PBA overlap")

    @property
    def table_size(self) -> int:
        """Bytes of the table."""
        return self.vectors * ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        """Bytes of the PBA: one bit per vector, whole QWORDs."""
        return (self.vectors + 63) // 64 * 8


def _overlap(a: int, a_size: int, b: int, b_size: int) -> bool:
    return a < b + b_size and b < a + a_size


class MsixTable:
    """The table entries, pending bits and the two mask sources they imply."""

    def __init__(self, layout: MsixLayout) -> None:
        self.layout = layout
        self.vectors = layout.vectors
        self._table = bytearray(layout.table_size)
        self._pending = 0
        self.table_in_use = False
        self.function_mask = False
        self.reset()

    def reset(self) -> None:
        """Power-on state: every entry zero but masked, nothing pending."""
        self._table[:] = MsixEntry().pack() * self.vectors
        self._pending = 0
        self.table_in_use = False
        self.function_mask = False

    # ------------------------------------------------------------ table
    def read_table(self, offset: int, count: int) -> bytes:
        """Read table bytes (any size; the spec asks for DWORD/QWORD accesses).

        Raises:
            LocalProtocolError: EINVAL when the access leaves the table.
        """
        check_range(offset, count, len(self._table), "MSI-X table")
        return bytes(self._table[offset:offset + count])

    def write_table(self, offset: int, data: bytes) -> range:
        """Write table bytes; reserved Vector Control bits stay zero.

        The first write arms the table's mask bits (see module docstring).

        Returns:
            The vectors whose entries the write touched.

        Raises:
            LocalProtocolError: EINVAL when the access leaves the table.
        """
        check_range(offset, len(data), len(self._table), "MSI-X table")
        for i, value in enumerate(data, offset):
            wmask = _ENTRY_WMASK[i % ENTRY_SIZE]
            self._table[i] = (self._table[i] & ~wmask) | (value & wmask)
        self.table_in_use = True
        return range(offset // ENTRY_SIZE, (offset + len(data) - 1) // ENTRY_SIZE + 1)

    def entry(self, vector: int) -> MsixEntry:
        """The decoded entry of ``vector``."""
        return MsixEntry.unpack(self._table, vector * ENTRY_SIZE)

    def masked(self, vector: int) -> bool:
        """Whether the table (entry Mask or Function Mask) holds ``vector`` back now.

        Returns:
            Always False until the client has written the table.
        """
        if not self.table_in_use:
            return False
        control = self._table[vector * ENTRY_SIZE + VECTOR_CONTROL]
        return self.function_mask or bool(control & VECTOR_MASKED)

    # ------------------------------------------------------------ PBA
    def read_pba(self, offset: int, count: int) -> bytes:
        """Read PBA bytes.

        Raises:
            LocalProtocolError: EINVAL when the access leaves the PBA.
        """
        check_range(offset, count, self.layout.pba_size, "MSI-X PBA")
        return self._pending.to_bytes(self.layout.pba_size, "little")[offset:offset + count]

    def pending(self, vector: int) -> bool:
        """Whether ``vector``'s pending bit is set."""
        return bool(self._pending >> vector & 1)

    def set_pending(self, vector: int, pending: bool) -> None:
        """Set or clear ``vector``'s pending bit."""
        if pending:
            self._pending |= 1 << vector
        else:
            self._pending &= ~(1 << vector)

    def pending_vectors(self) -> list[int]:
        """Every vector whose pending bit is set, in order."""
        bits, out = self._pending, []
        while bits:
            low = bits & -bits
            out.append(low.bit_length() - 1)
            bits ^= low
        return out
