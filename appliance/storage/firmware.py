"""Firmware slots, Firmware Image Download and Firmware Commit (device layer).

Theory of operation
-------------------
This controller's firmware is a revision string.  Two slots (FRMW.NOFS = 2):
slot 1 is read-only (FRMW bit 0) and holds the controller's own revision
(``NvmeController(firmware=...)``); slot 2 holds what a host committed, empty
at power-on.  The running revision (Identify Controller FR) was loaded from
the active slot (the Firmware Slot Information log's AFI bits 2:0); replacing
that slot's image (CA 000b) does not change it until the slot is activated.

Firmware Image Download (opcode 11h) sends an image in pieces: NUMD (0-based)
and OFST count DWORDs.  :class:`FirmwareImage` keeps of an image only what the
controller uses: which DWORDs arrived (a bitmap, to find overlaps and gaps) and
the first 8 bytes, the image's revision.  Nothing else is stored, so a host
cannot make the controller hold more than that bitmap, whatever it sends; an
image ends at :data:`MAX_IMAGE` bytes at most.  A piece that overlaps one
already received fails with Overlapping Range; one past MAX_IMAGE or MDTS with
Invalid Field.  FWUG is FFh: pieces of any DWORD size and offset, in any order.

Firmware Commit (opcode 10h), by Commit Action (CA):

* 000b: the downloaded image goes to slot FS (not activated);
* 001b: the same, and slot FS is activated at the next Controller Level Reset;
* 010b: the image already in slot FS is activated at the next reset;
* 011b: immediate activation is asked for, which this controller does not do
  (FRMW bit 4 clear): a downloaded image goes to slot FS first (as 001b) when
  FS is writable, slot FS is activated at the next reset and the command
  completes with Firmware Activation Requires Controller Level Reset;
* 100b-111b: Invalid Field (reserved; no boot partitions, CAP.BPS = 0).

FS 0 means slot 2.  FS past NOFS, or a download committed to the read-only
slot 1, fails with Invalid Firmware Slot; no image (or one with a gap, or a
revision that is not printable ASCII) with Invalid Firmware Image.  A commit
that stored the downloaded image forgets it; so does every Controller Level
Reset (CC.EN 1 to 0, FLR, DEVICE_RESET), which also loads the slot chosen for
activation: :meth:`FirmwareSlots.reset`.

The revision of an image is its first 8 bytes, each printable ASCII (20h-7Eh);
an image shorter than 8 bytes is padded with spaces.  No configuration enters
the rule, so both sides of a migration read the same revision from an image.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.storage.spec import CommandError, Status

SLOTS = 2  # FRMW.NOFS
READ_ONLY_SLOT = 1
#: FRMW: slot 1 read-only (bit 0), NOFS (bits 3:1); bit 4 (activation without reset) clear
FRMW = 1 | SLOTS << 1
FWUG = 0xFF  # no granularity or alignment rule beyond DWORDs
MAX_IMAGE = 1 << 20  # bytes: the largest image a download may build
REVISION_SIZE = 8
CA_REPLACE, CA_REPLACE_ACTIVATE, CA_ACTIVATE, CA_ACTIVATE_NOW = range(4)
ST = Status


def revision_of(head: bytes) -> bytes | None:
    """The revision an image starting with ``head`` carries, or None if it has none."""
    rev = head[:REVISION_SIZE].ljust(REVISION_SIZE, b" ")
    if rev.strip(b" ") and all(0x20 <= b < 0x7F for b in rev):
        return rev
    return None


@dataclass
class FirmwareImage:
    """What a download has sent so far: ``covered`` bit i = DWORD i arrived."""

    covered: int = 0
    head: bytes = bytes(REVISION_SIZE)

    @property
    def dwords(self) -> int:
        """The image's length in DWORDs (up to its last piece's end)."""
        return self.covered.bit_length()

    def add(self, offset: int, data: bytes) -> None:
        """Take a piece of ``data`` at DWORD ``offset``.

        Raises:
            CommandError: INVALID_FIELD past MAX_IMAGE; OVERLAPPING_RANGE when a
                DWORD of it arrived before.
        """
        count = len(data) // 4
        if (offset + count) * 4 > MAX_IMAGE:
            raise CommandError(ST.INVALID_FIELD, f"image piece at DWORD {offset} + {count} "
                                                 f"ends past {MAX_IMAGE} bytes")
        mask = ((1 << count) - 1) << offset
        if self.covered & mask:
            raise CommandError(ST.OVERLAPPING_RANGE, f"image piece at DWORD {offset} + {count}")
        self.covered |= mask
        start = offset * 4
        if start < REVISION_SIZE:
            head = bytearray(self.head)
            part = data[:REVISION_SIZE - start]
            head[start:start + len(part)] = part
            self.head = bytes(head)

    def revision(self) -> bytes:
        """The complete image's revision.

        Raises:
            CommandError: INVALID_FIRMWARE_IMAGE without a piece, with a gap, or
                without a printable revision.
        """
        if not self.covered or self.covered != (1 << self.dwords) - 1:
            raise CommandError(ST.INVALID_FIRMWARE_IMAGE, "no image, or one with a gap")
        rev = revision_of(self.head[:self.dwords * 4])
        if rev is None:
            raise CommandError(ST.INVALID_FIRMWARE_IMAGE, f"revision {self.head!r} not ASCII")
        return rev


class FirmwareSlots:
    """The slots' revisions, the running one, the slot the next reset activates
    and the download in progress (device state: migrated)."""

    def __init__(self, factory: bytes) -> None:
        """``factory``: slot 1's revision (8 bytes, space padded)."""
        self.slots: list[bytes | None] = [factory] + [None] * (SLOTS - 1)
        self.running = factory
        self.active = READ_ONLY_SLOT
        self.next_active = 0  # 0: no activation pending
        self.image = FirmwareImage()

    def download(self, offset: int, data: bytes) -> None:
        """Firmware Image Download of ``data`` at DWORD ``offset`` (CommandError as
        :meth:`FirmwareImage.add`)."""
        self.image.add(offset, data)

    def commit(self, slot: int, action: int) -> None:
        """Firmware Commit of ``slot`` (0: slot 2) with Commit Action ``action``.

        Raises:
            CommandError: INVALID_FIELD for a reserved CA; INVALID_FIRMWARE_SLOT,
                INVALID_FIRMWARE_IMAGE as the module says;
                FIRMWARE_NEEDS_CONTROLLER_RESET after a successful CA 011b.
        """
        if action > CA_ACTIVATE_NOW:
            raise CommandError(ST.INVALID_FIELD, f"commit action {action}")
        slot = slot or SLOTS
        if slot > SLOTS:
            raise CommandError(ST.INVALID_FIRMWARE_SLOT, f"slot {slot} of {SLOTS}")
        store = action in (CA_REPLACE, CA_REPLACE_ACTIVATE) or (
            action == CA_ACTIVATE_NOW and slot != READ_ONLY_SLOT and self.image.covered)
        if store:
            if slot == READ_ONLY_SLOT:
                raise CommandError(ST.INVALID_FIRMWARE_SLOT, "slot 1 is read-only")
            self.slots[slot - 1] = self.image.revision()
            self.image = FirmwareImage()
        if action == CA_REPLACE:
            return
        if self.slots[slot - 1] is None:
            raise CommandError(ST.INVALID_FIRMWARE_IMAGE, f"slot {slot} is empty")
        self.next_active = slot
        if action == CA_ACTIVATE_NOW:
            raise CommandError(ST.FIRMWARE_NEEDS_CONTROLLER_RESET,
                               f"slot {slot} is activated at the next reset")

    def reset(self) -> bool:
        """Controller Level Reset: activate the slot chosen for it, forget the download.

        Returns:
            True if the running revision changed (Identify Controller FR).
        """
        self.image = FirmwareImage()
        slot, self.next_active = self.next_active, 0
        revision = self.slots[slot - 1] if slot else None
        if revision is None:
            return False
        old, self.running, self.active = self.running, revision, slot
        return old != revision

    def afi(self) -> int:
        """Active Firmware Info: bits 2:0 the running slot, 6:4 the next reset's."""
        return self.active | self.next_active << 4
