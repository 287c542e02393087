"""The OCP Datacenter NVMe SSD Error Injection feature (Feature Identifier C0h).

Theory of operation
-------------------
A host arms error injections with Set Features C0h: CDW11 bits 6:0 (NUME)
say how many 32-byte entries the data buffer holds (0-127, bits 31:7
reserved); each entry is an :class:`ErrorInjectionEntry` (flags: bit 0
enable, bit 1 single instance; the error type; 28 type-specific bytes, the
first two the Number of Reads To Trigger Device Panic, NRTDP).  A Set
replaces every injection the host armed before; NUME 0 clears them.  Get
Features C0h returns the armed entries in a 127-entry buffer and NUME in
DWORD 0 bits 6:0.  ``nvme ocp set-error-injection`` / ``get-error-injection``
(newer nvme-cli than bookworm's 2.3) send exactly these; older nvme-cli sends the same
with ``nvme set-feature -f 0xc0`` and a data file.

The controller holds a :class:`GuestFaultHook` only when the configuration
enables guest faults (``storage.guest_faults``); without one both commands
are refused with Invalid Field in Command.  The hook (the runtime's fault
set, appliance.control.guest_faults) turns entries into fault rules and
refuses an entry it cannot map with Invalid Field too.

Returns/raises: the handlers return the completion's DWORD 0 and raise
:class:`~appliance.storage.spec.CommandError` on every refusal.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Protocol

from appliance.storage.spec import Command, CommandError, Status
from appliance.wire import U8, U16, Struct

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController

FEATURE_ID = 0xC0
ENTRY_SIZE = 32
MAX_ENTRIES = 127
DATA_SIZE = ENTRY_SIZE * MAX_ENTRIES  # what Get Features returns
FLAG_ENABLE = 0x01
FLAG_SINGLE = 0x02
FLAGS_RESERVED = 0xFC
NUME_MASK = 0x7F


class ErrorType(enum.IntEnum):
    """Error Injection types (the ones the appliance maps onto fault rules)."""

    CONTROLLER_HANG = 0x01
    NAND_HANG = 0x02
    LOGICAL_FIRMWARE_ERROR = 0x04
    NAND_CORRUPTION = 0x07
    HW_MALFUNCTION = 0x09


class ErrorInjectionEntry(Struct, size=ENTRY_SIZE):
    """One Error Injection data structure entry."""

    flags: U8 = 0  # bit 0 enable, bit 1 single instance, 7:2 reserved
    reserved1: U8 = 0
    type: U16 = 0
    nrtdp: U16 = 0  # Number of Reads To Trigger Device Panic (type specific)
    specific: Annotated[bytes, "26s"] = b""

    @property
    def enabled(self) -> bool:
        return bool(self.flags & FLAG_ENABLE)

    @property
    def single(self) -> bool:
        return bool(self.flags & FLAG_SINGLE)


class GuestFaultHook(Protocol):
    """What the controller asks of the guest's fault control (the fault set)."""

    def inject(self, entries: list[ErrorInjectionEntry]) -> None:
        """Replace the host's injections by ``entries`` (all or nothing).

        Raises:
            CommandError: an entry that cannot be mapped (Invalid Field).
        """

    def injections(self) -> list[ErrorInjectionEntry]:
        """The host's armed injections (a fired single one has enable clear)."""


def _refuse(why: str) -> CommandError:
    return CommandError(Status.INVALID_FIELD, f"error injection: {why}")


def parse_entries(data: bytes, count: int) -> list[ErrorInjectionEntry]:
    """The first ``count`` entries of ``data`` (``count`` * 32 bytes).

    Raises:
        CommandError: Invalid Field for a reserved flag or byte that is set.
    """
    entries = []
    for i in range(count):
        entry = ErrorInjectionEntry.unpack(data, i * ENTRY_SIZE)
        if entry.flags & FLAGS_RESERVED or entry.reserved1:
            raise _refuse(f"entry {i}: reserved bits set (flags {entry.flags:#x})")
        entries.append(entry)
    return entries


def pack_entries(entries: list[ErrorInjectionEntry]) -> bytes:
    """The Get Features data: ``entries`` padded to :data:`MAX_ENTRIES`."""
    return b"".join(e.pack() for e in entries[:MAX_ENTRIES]).ljust(DATA_SIZE, b"\0")


def _hook(ctrl: NvmeController) -> GuestFaultHook:
    hook: GuestFaultHook | None = ctrl.guest_faults
    if hook is None:
        raise _refuse("guest faults are off (storage.guest_faults)")
    return hook


def set_feature(ctrl: NvmeController, cmd: Command,
                receive: Callable[[NvmeController, Command, int], bytes]) -> int:
    """Set Features C0h: arm the entries of the data buffer; returns DWORD 0 (0).

    Raises:
        CommandError: guest faults off, reserved CDW11 bits, a bad entry.
    """
    hook = _hook(ctrl)
    if cmd.cdw11 & ~NUME_MASK:
        raise _refuse(f"reserved CDW11 bits ({cmd.cdw11:#x})")
    count = cmd.cdw11 & NUME_MASK
    data = receive(ctrl, cmd, count * ENTRY_SIZE) if count else b""
    hook.inject(parse_entries(data, count))
    return 0


def get_feature(ctrl: NvmeController, cmd: Command,
                send: Callable[[NvmeController, Command, bytes], None]) -> int:
    """Get Features C0h: the armed entries to the data buffer; returns NUME.

    Raises:
        CommandError: guest faults off.
    """
    entries = _hook(ctrl).injections()[:MAX_ENTRIES]
    send(ctrl, cmd, pack_entries(entries))
    return len(entries)
