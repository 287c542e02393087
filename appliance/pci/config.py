"""PCI configuration space: 4 KiB of registers with per-byte write masks.

Theory of operation
-------------------
:class:`ConfigSpace` holds three byte arrays, as QEMU's ``PCIDevice`` does:

* ``data``: the current register contents;
* ``wmask``: the bits a client write may change (1 = writable);
* ``w1cmask``: the bits a client write of 1 clears (RW1C status bits).

A client write of byte ``b`` over byte ``old`` stores
``(old & ~wmask) | (b & wmask)`` and then clears ``b & w1cmask``; every other
bit is read-only.  The device model itself programs registers through
:meth:`ConfigSpace.put`, which ignores the masks.  The side effects of a write
(INTx disable, MSI-X function mask, FLR, ...) are not handled here: the device
compares register values before and after :meth:`ConfigSpace.write` and acts
on the bits that changed (edge triggered: rewriting a value does nothing).

The layout is a type-0 header (PCI Local Bus 3.0 section 6.1, 64 bytes), a
capability list at 0x40..0xFF and the PCI Express extended space
0x100..0xFFF (PCIe base 4.0 section 7.2.2), which holds a null extended
capability header.  :meth:`ConfigSpace.freeze` records the power-on image
that :meth:`ConfigSpace.reset` restores.

No I/O happens here; errors for client accesses are
:class:`~appliance.errors.LocalProtocolError` carrying ``EINVAL``.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterator
from typing import Annotated

from appliance.errors import LocalProtocolError
from appliance.wire import U8, U16, U32, Struct

CONFIG_SPACE_SIZE = 4096
LEGACY_CONFIG_SIZE = 256
HEADER_SIZE = 64
CAP_START = 0x40  # first byte after the type-0 header (PCI 3.0 section 6.7)
MAX_CAPABILITIES = 48  # (256 - 64) / 4: a walk longer than this is a loop

# Type-0 header register offsets (PCI 3.0 section 6.1, figure 6-1).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
NUM_BARS = 6
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D


class PciCommand(enum.IntFlag):
    """Command register bits (PCI 3.0 section 6.2.2)."""

    IO = 0x0001
    MEMORY = 0x0002
    BUS_MASTER = 0x0004
    SPECIAL_CYCLES = 0x0008
    MWI = 0x0010
    VGA_SNOOP = 0x0020
    PARITY = 0x0040
    STEPPING = 0x0080
    SERR = 0x0100
    FAST_BACK = 0x0200
    INTX_DISABLE = 0x0400


COMMAND_RESERVED = 0xF800
COMMAND_WRITABLE = (
    PciCommand.IO
    | PciCommand.MEMORY
    | PciCommand.BUS_MASTER
    | PciCommand.PARITY
    | PciCommand.SERR
    | PciCommand.INTX_DISABLE
)


class PciStatus(enum.IntFlag):
    """Status register bits (PCI 3.0 section 6.2.3)."""

    INTERRUPT = 0x0008
    CAP_LIST = 0x0010
    MHZ_66 = 0x0020
    FAST_BACK = 0x0080
    MASTER_PARITY_ERROR = 0x0100
    DEVSEL_MASK = 0x0600
    SIGNALED_TARGET_ABORT = 0x0800
    RECEIVED_TARGET_ABORT = 0x1000
    RECEIVED_MASTER_ABORT = 0x2000
    SIGNALED_SYSTEM_ERROR = 0x4000
    DETECTED_PARITY_ERROR = 0x8000


# The error bits are "set by hardware, cleared by writing 1" (PCI 3.0 section 6.2.3).
STATUS_W1C = (
    PciStatus.MASTER_PARITY_ERROR
    | PciStatus.SIGNALED_TARGET_ABORT
    | PciStatus.RECEIVED_TARGET_ABORT
    | PciStatus.RECEIVED_MASTER_ABORT
    | PciStatus.SIGNALED_SYSTEM_ERROR
    | PciStatus.DETECTED_PARITY_ERROR
)

# Memory BAR low bits (PCI 3.0 section 6.2.5.1).
BAR_TYPE_64 = 0x4
BAR_PREFETCH = 0x8
BAR_FLAGS_MASK = 0xF


class Type0Header(Struct, size=HEADER_SIZE):
    """The type-0 configuration header (PCI 3.0 section 6.1)."""

    vendor_id: U16 = 0xFFFF
    device_id: U16 = 0xFFFF
    command: U16 = 0
    status: U16 = 0
    revision: U8 = 0
    class_code: Annotated[bytes, "3s"] = b"\0\0\0"  # prog-if, sub-class, base class
    cache_line_size: U8 = 0
    latency_timer: U8 = 0
    header_type: U8 = 0
    bist: U8 = 0
    bar0: U32 = 0
    bar1: U32 = 0
    bar2: U32 = 0
    bar3: U32 = 0
    bar4: U32 = 0
    bar5: U32 = 0
    cardbus_cis: U32 = 0
    subsystem_vendor_id: U16 = 0
    subsystem_id: U16 = 0
    rom_address: U32 = 0
    capability_pointer: U8 = 0
    reserved: Annotated[bytes, "7s"] = b"\0" * 7
    interrupt_line: U8 = 0
    interrupt_pin: U8 = 0
    min_grant: U8 = 0
    max_latency: U8 = 0


def check_range(offset: int, count: int, size: int, what: str) -> None:
    """Refuse an access that is empty or leaves ``[0, size)``.

    Raises:
        LocalProtocolError: EINVAL naming ``what`` and the access.
    """
    if offset < 0 or count <= 0 or offset + count > size:
        raise LocalProtocolError(
            f"{what}: access {offset:#x}+{count:#x} outside {size:#x} bytes", errno.EINVAL
        )


class ConfigSpace:
    """4096 bytes of configuration space with write and write-1-to-clear masks."""

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self._power_on = bytes(CONFIG_SPACE_SIZE)
        self._cap_free = CAP_START
        self._cap_last: int | None = None

    # ------------------------------------------------------------ client access
    def read(self, offset: int, count: int) -> bytes:
        """Read ``count`` bytes at ``offset`` (any size and alignment).

        Returns:
            The register bytes, little-endian as on the bus.

        Raises:
            LocalProtocolError: EINVAL when the access leaves the 4 KiB space.
        """
        check_range(offset, count, CONFIG_SPACE_SIZE, "config space")
        return bytes(self.data[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a client write through the masks; read-only bits stay as they are.

        Raises:
            LocalProtocolError: EINVAL when the access leaves the 4 KiB space.
        """
        check_range(offset, len(data), CONFIG_SPACE_SIZE, "config space")
        for i, value in enumerate(data, offset):
            wmask = self.wmask[i]
            new = (self.data[i] & ~wmask) | (value & wmask)
            self.data[i] = new & ~(value & self.w1cmask[i]) & 0xFF

    # ------------------------------------------------------------ device access
    def get(self, offset: int, width: int) -> int:
        """The ``width``-byte little-endian register at ``offset``."""
        return int.from_bytes(self.data[offset:offset + width], "little")

    def put(self, offset: int, width: int, value: int) -> None:
        """Set a register regardless of the masks (device-side update)."""
        self.data[offset:offset + width] = value.to_bytes(width, "little")

    def set_masks(self, offset: int, width: int, wmask: int = 0, w1cmask: int = 0) -> None:
        """Declare which bits of a register a client may write or clear.

        Raises:
            ValueError: a bit is both writable and write-1-to-clear.
        """
        if wmask & w1cmask:
            raise ValueError(f"config {offset:#x}: bits {wmask & w1cmask:#x} are RW and RW1C")
        self.wmask[offset:offset + width] = wmask.to_bytes(width, "little")
        self.w1cmask[offset:offset + width] = w1cmask.to_bytes(width, "little")

    def set_bits(self, offset: int, width: int, bits: int, on: bool) -> None:
        """Set or clear ``bits`` of a register (device-side update)."""
        value = self.get(offset, width)
        self.put(offset, width, value | bits if on else value & ~bits)

    # ------------------------------------------------------------ BARs
    def add_bar(self, index: int, size: int, is_64bit: bool, prefetchable: bool) -> None:
        """Program memory BAR ``index`` (and ``index + 1`` for a 64-bit BAR).

        The address bits above the size are writable and the rest read as
        zero, so writing all-ones and reading back yields the size mask with
        the type bits (PCI 3.0 section 6.2.5.1).

        Raises:
            ValueError: bad index, size not a power of two >= 16, or too big.
        """
        slots = 2 if is_64bit else 1
        if not 0 <= index <= NUM_BARS - slots:
            raise ValueError(f"BAR{index}: no room for a {32 * slots}-bit BAR")
        limit = 1 << (63 if is_64bit else 31)
        if size < 16 or size & (size - 1) or size > limit:
            raise ValueError(f"BAR{index}: size {size:#x} not a power of two in [16, {limit:#x}]")
        flags = (BAR_TYPE_64 if is_64bit else 0) | (BAR_PREFETCH if prefetchable else 0)
        address_mask = ((1 << (32 * slots)) - size) & ~BAR_FLAGS_MASK
        offset = BAR0 + 4 * index
        self.put(offset, 4 * slots, flags)
        self.set_masks(offset, 4 * slots, wmask=address_mask)

    # ------------------------------------------------------------ capabilities
    def add_capability(self, body: bytes) -> int:
        """Append a capability (``body[0]`` is its id) to the list.

        The capability is placed at the next dword-aligned free offset and
        linked from the previous one (or from the Capabilities Pointer); its
        next pointer is 0, ending the list (PCI 3.0 section 6.7).  The body's
        bytes are read-only until :meth:`set_masks` says otherwise.

        Returns:
            The capability's offset in configuration space.

        Raises:
            ValueError: it does not fit below 0x100.
        """
        offset = self._cap_free
        if len(body) < 2 or offset + len(body) > LEGACY_CONFIG_SIZE:
            raise ValueError(f"capability {body[:1].hex()} of {len(body)} bytes does not fit")
        self.data[offset:offset + len(body)] = body
        self.data[offset + 1] = 0
        if self._cap_last is None:
            self.data[CAPABILITY_POINTER] = offset
        else:
            self.data[self._cap_last + 1] = offset
        self._cap_last = offset
        self._cap_free = (offset + len(body) + 3) & ~3
        self.set_bits(STATUS, 2, PciStatus.CAP_LIST, True)
        return offset

    def capabilities(self) -> Iterator[tuple[int, int]]:
        """Walk the capability list from the Capabilities Pointer.

        Returns:
            (capability id, offset) pairs in list order.

        Raises:
            ValueError: a pointer leaves 0x40..0xFF or the list loops.
        """
        if not self.get(STATUS, 2) & PciStatus.CAP_LIST:
            return
        offset = self.data[CAPABILITY_POINTER] & ~3  # bits 1:0 reserved (PCI 3.0 6.7)
        for _ in range(MAX_CAPABILITIES):
            if offset == 0:
                return
            if not CAP_START <= offset < LEGACY_CONFIG_SIZE:
                raise ValueError(f"capability pointer {offset:#x} outside 0x40..0xff")
            yield self.data[offset], offset
            offset = self.data[offset + 1] & ~3
        raise ValueError("capability list loops")

    def find_capability(self, cap_id: int) -> int | None:
        """Offset of the first capability with ``cap_id``, or None."""
        return next((off for cid, off in self.capabilities() if cid == cap_id), None)

    # ------------------------------------------------------------ reset
    def freeze(self) -> None:
        """Record the current contents as the power-on image."""
        self._power_on = bytes(self.data)

    def reset(self) -> None:
        """Return every register to the power-on image."""
        self.data[:] = self._power_on


def type0_config(
    *,
    vendor_id: int,
    device_id: int,
    subsystem_vendor_id: int,
    subsystem_id: int,
    revision: int,
    class_code: int,
    interrupt_pin: int,
) -> ConfigSpace:
    """A configuration space holding a type-0 header and its masks (no BARs yet).

    Writable: the command bits of :data:`COMMAND_WRITABLE`, Cache Line Size
    and Interrupt Line; the status error bits are RW1C; everything else,
    including the Expansion ROM BAR (no ROM: reads 0) is read-only.  Latency
    Timer is read-only zero: it "does not apply to PCI Express" and is
    hardwired to 00h (PCIe base 4.0 section 7.5.1.1, Latency Timer Register).

    Raises:
        ValueError: an id, the revision, the class code or the pin is out of range.
    """
    for name, value, bits in (
        ("vendor_id", vendor_id, 16),
        ("device_id", device_id, 16),
        ("subsystem_vendor_id", subsystem_vendor_id, 16),
        ("subsystem_id", subsystem_id, 16),
        ("revision", revision, 8),
        ("class_code", class_code, 24),
    ):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name} {value:#x} does not fit {bits} bits")
    if not 0 <= interrupt_pin <= 4:  # 0 none, 1..4 INTA..INTD (PCI 3.0 section 6.2.4)
        raise ValueError(f"interrupt pin {interrupt_pin} not in 0..4")
    header = Type0Header(
        vendor_id=vendor_id,
        device_id=device_id,
        revision=revision,
        class_code=class_code.to_bytes(3, "little"),
        subsystem_vendor_id=subsystem_vendor_id,
        subsystem_id=subsystem_id,
        interrupt_pin=interrupt_pin,
    )
    config = ConfigSpace()
    config.data[:HEADER_SIZE] = header.pack()
    config.set_masks(COMMAND, 2, wmask=COMMAND_WRITABLE)
    config.set_masks(STATUS, 2, w1cmask=STATUS_W1C)
    config.set_masks(CACHE_LINE_SIZE, 1, wmask=0xFF)
    config.set_masks(INTERRUPT_LINE, 1, wmask=0xFF)
    return config
