"""End-to-end data protection: the T10-DIF guard and the PI tuple checks
(device layer, pure: no I/O; NVM Command Set section 5.2 / 5.3).

Theory of operation
-------------------
A namespace formatted with protection information (PI) keeps one 8-byte
tuple per logical block in its metadata: a 16-bit guard (the CRC-16/T10-DIF
of the block's data: polynomial 8BB7h, initial value 0, no reflection, no
final XOR), a 16-bit application tag and a 32-bit reference tag, each big
endian.  Identify Namespace DPS says which type (1, 2 or 3) and whether the
tuple is the first or the last 8 bytes of the metadata (:class:`Protection`).

A Read, Write, Compare or Verify carries PRINFO in CDW12 bits 29:26 (PRACT,
then PRCHK guard / application tag / reference tag), the initial logical
block reference tag (ILBRT) in CDW14 and the expected application tag and
its mask (LBAT, LBATM) in CDW15 (:class:`TagCheck`).

* With PRACT set the controller makes the tuples on a write
  (:meth:`TagCheck.generate`) and checks, then strips them on a read when the
  metadata is the tuple alone.
* The PRCHK bits choose the checks (:meth:`TagCheck.verify`): guard against
  the CRC of the data, ``application tag & LBATM`` against ``LBAT & LBATM``,
  reference tag against ILBRT plus the block's index in the command (types 1
  and 2; type 3 has no reference tag to check).  An application tag of FFFFh
  (type 3: with a reference tag of FFFFFFFFh) turns every check off for that
  block, as the T10 escape values do.
* Type 1 ties the reference tag to the LBA: ILBRT must equal the low 32 bits
  of SLBA when the reference tag is checked, else the command is refused with
  Invalid Protection Information before any data moves (:meth:`TagCheck.validate`).

A failing check raises :class:`CommandError` with the Media and Data
Integrity status (End-to-end Guard / Application Tag / Reference Tag Check
Error) and names the failing LBA in :attr:`ProtectionError.lba`, which the
error log entry reports.
"""

from __future__ import annotations

import array
import enum
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from appliance.storage.spec import CommandError, Status

PI_TUPLE_SIZE = 8
APP_TAG_ESCAPE = 0xFFFF
REF_TAG_ESCAPE = 0xFFFFFFFF
REF_TAG_MASK = 0xFFFFFFFF
#: PRINFO (CDW12 bits 29:26): PRACT and the three PRCHK bits
PRINFO_SHIFT = 26
PRACT = 0x8
PRCHK_GUARD, PRCHK_APP, PRCHK_REF = 0x4, 0x2, 0x1
#: Identify Namespace DPS: bits 2:0 the PI type, bit 3 the tuple is the first 8 metadata bytes
DPS_PI_FIRST = 0x8
CRC_POLY = 0x8BB7

_TUPLE = struct.Struct(">HHI")


def _byte_table() -> list[int]:
    """CRC-16/T10-DIF of each byte value, shifted through the register."""
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ CRC_POLY if crc & 0x8000 else crc << 1) & 0xFFFF
        table.append(crc)
    return table


_BYTE_TABLE = _byte_table()
# Sixteen bits at a time: the register is as wide as the input word, so the next
# register is a pure function of (register XOR word); the table has 2^16 entries.
_WORD_TABLE = [_BYTE_TABLE[(_BYTE_TABLE[hi] >> 8) ^ lo] ^ ((_BYTE_TABLE[hi] << 8) & 0xFFFF)
               for hi in range(256) for lo in range(256)]


def crc16_t10dif(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC-16/T10-DIF of ``data`` (continuing from ``crc``).

    Returns:
        The 16-bit guard value (``b"123456789"`` gives D0DBh).
    """
    view = memoryview(data).cast("B")
    even = len(view) & ~1
    words = array.array("H")
    words.frombytes(view[:even])
    if sys.byteorder == "little":
        words.byteswap()
    table = _WORD_TABLE
    for word in words:
        crc = table[crc ^ word]
    if even != len(view):
        crc = ((crc << 8) & 0xFFFF) ^ _BYTE_TABLE[(crc >> 8) ^ view[even]]
    return crc


class PiType(enum.IntEnum):
    """Identify Namespace DPS bits 2:0."""

    NONE = 0
    TYPE1 = 1
    TYPE2 = 2
    TYPE3 = 3


class ProtectionError(CommandError):
    """A PI check failed; ``lba`` is the block whose tuple did not match."""

    lba: int

    def __init__(self, status: Status, lba: int, message: str) -> None:
        super().__init__(status, message, lba=lba)


@dataclass(frozen=True)
class Protection:
    """A namespace's PI layout: its type, metadata bytes per block and where
    in them the tuple sits (DPS bit 3: the first 8 bytes, else the last 8)."""

    pi_type: PiType
    metadata: int
    pi_first: bool = True

    def __post_init__(self) -> None:
        if self.pi_type != PiType.NONE and self.metadata < PI_TUPLE_SIZE:
            raise ValueError(f"PI type {int(self.pi_type)} needs at least "
                             f"{PI_TUPLE_SIZE} metadata bytes (got {self.metadata})")

    @property
    def dps(self) -> int:
        """Identify Namespace DPS."""
        if self.pi_type == PiType.NONE:
            return 0
        return int(self.pi_type) | (DPS_PI_FIRST if self.pi_first else 0)

    @property
    def tuple_offset(self) -> int:
        """Where the tuple starts in a block's metadata."""
        return 0 if self.pi_first else self.metadata - PI_TUPLE_SIZE

    def strips(self, prinfo: int) -> bool:
        """True when PRACT means no metadata crosses the bus: the controller
        inserts (write) or checks and removes (read) the tuple, and the
        metadata is the tuple alone."""
        return (self.pi_type != PiType.NONE and bool(prinfo & PRACT)
                and self.metadata == PI_TUPLE_SIZE)


def pack_tuple(guard: int, app_tag: int, ref_tag: int) -> bytes:
    """One PI tuple, big endian.

    Returns:
        8 bytes: guard, application tag, reference tag.
    """
    return _TUPLE.pack(guard, app_tag, ref_tag)


def unpack_tuple(raw: bytes | memoryview) -> tuple[int, int, int]:
    """Returns:
        (guard, application tag, reference tag) of an 8-byte tuple.
    """
    guard, app_tag, ref_tag = _TUPLE.unpack(raw)
    return guard, app_tag, ref_tag


@dataclass(frozen=True)
class TagCheck:
    """The PI fields of one Read / Write / Compare / Verify command."""

    prinfo: int  # PRACT and PRCHK, CDW12 bits 29:26
    ilbrt: int  # CDW14
    lbat: int  # CDW15 bits 15:0
    lbatm: int  # CDW15 bits 31:16

    @classmethod
    def from_dwords(cls, cdw12: int, cdw14: int, cdw15: int) -> TagCheck:
        """Returns:
            The command's PI fields, each masked to its width.
        """
        return cls((cdw12 >> PRINFO_SHIFT) & 0xF, cdw14 & REF_TAG_MASK,
                   cdw15 & 0xFFFF, (cdw15 >> 16) & 0xFFFF)

    def validate(self, prot: Protection, slba: int) -> None:
        """Check the fields against the namespace before any data moves.

        Raises:
            CommandError: INVALID_PROTECTION_INFORMATION for a type 1 namespace
                whose reference tag is checked with ILBRT other than the low 32
                bits of SLBA; INVALID_FIELD for PRINFO on a namespace without PI.
        """
        if prot.pi_type == PiType.NONE:
            if self.prinfo:
                raise CommandError(Status.INVALID_FIELD,
                                   f"PRINFO {self.prinfo:#x} on a namespace without PI")
            return
        if (prot.pi_type == PiType.TYPE1 and self.prinfo & PRCHK_REF
                and self.ilbrt != slba & REF_TAG_MASK):
            raise CommandError(Status.INVALID_PROTECTION_INFORMATION,
                               f"ILBRT {self.ilbrt:#x} is not SLBA {slba:#x} (PI type 1)")

    def _ref_tag(self, prot: Protection, index: int) -> int:
        if prot.pi_type == PiType.TYPE3:
            return self.ilbrt
        return (self.ilbrt + index) & REF_TAG_MASK

    def generate(self, prot: Protection, data: memoryview, block_size: int) -> bytes:
        """PRACT on a write: the tuples the controller inserts.

        Returns:
            One 8-byte tuple per block of ``data``: the data's guard, LBAT,
            and ILBRT counting up per block (type 3: ILBRT for every block).
        """
        return b"".join(pack_tuple(crc16_t10dif(block), self.lbat, self._ref_tag(prot, i))
                        for i, block in enumerate(_blocks(data, block_size)))

    def verify(self, prot: Protection, data: memoryview, tuples: memoryview,
               block_size: int, slba: int) -> None:
        """Check each block's tuple (``tuples``: 8 bytes per block) as PRCHK asks.

        Raises:
            ProtectionError: GUARD_CHECK_ERROR, APPLICATION_TAG_CHECK_ERROR or
                REFERENCE_TAG_CHECK_ERROR for the first block that fails, in that
                order of checks within a block.
            ValueError: ``tuples`` shorter than 8 bytes per block (a caller's bug).
        """
        if len(tuples) < len(data) // block_size * PI_TUPLE_SIZE:
            raise ValueError(f"{len(tuples)} tuple bytes for {len(data) // block_size} blocks")
        for i, block in enumerate(_blocks(data, block_size)):
            guard, app_tag, ref_tag = unpack_tuple(
                tuples[i * PI_TUPLE_SIZE:(i + 1) * PI_TUPLE_SIZE])
            if app_tag == APP_TAG_ESCAPE and (
                    prot.pi_type != PiType.TYPE3 or ref_tag == REF_TAG_ESCAPE):
                continue
            lba = slba + i
            if self.prinfo & PRCHK_GUARD and guard != crc16_t10dif(block):
                raise ProtectionError(Status.GUARD_CHECK_ERROR, lba,
                                      f"LBA {lba}: guard {guard:#06x} does not match the data")
            if self.prinfo & PRCHK_APP and (app_tag ^ self.lbat) & self.lbatm:
                raise ProtectionError(Status.APPLICATION_TAG_CHECK_ERROR, lba,
                                      f"LBA {lba}: application tag {app_tag:#06x}")
            if (self.prinfo & PRCHK_REF and prot.pi_type != PiType.TYPE3
                    and ref_tag != self._ref_tag(prot, i)):
                raise ProtectionError(Status.REFERENCE_TAG_CHECK_ERROR, lba,
                                      f"LBA {lba}: reference tag {ref_tag:#x}")


def _blocks(data: memoryview, block_size: int) -> Iterator[memoryview]:
    for start in range(0, len(data) - len(data) % block_size, block_size):
        yield data[start:start + block_size]


def tuples_of(prot: Protection, metadata: bytes, nlb: int) -> memoryview:
    """The PI tuples inside ``nlb`` blocks' metadata (8 bytes per block).

    Returns:
        ``metadata`` itself when it is the tuples alone, else a copy of them.
    """
    if prot.metadata == PI_TUPLE_SIZE:
        return memoryview(metadata)
    off, ms = prot.tuple_offset, prot.metadata
    return memoryview(b"".join(metadata[i * ms + off:i * ms + off + PI_TUPLE_SIZE]
                               for i in range(nlb)))


def with_tuples(prot: Protection, metadata: bytes, tuples: bytes, nlb: int) -> bytes:
    """``metadata`` with each block's tuple replaced from ``tuples`` (PRACT
    inserting PI into longer metadata).

    Returns:
        The new metadata of ``nlb`` blocks.
    """
    if prot.metadata == PI_TUPLE_SIZE:
        return tuples
    out, off, ms = bytearray(metadata), prot.tuple_offset, prot.metadata
    for i in range(nlb):
        out[i * ms + off:i * ms + off + PI_TUPLE_SIZE] = tuples[i * 8:(i + 1) * 8]
    return bytes(out)


@dataclass(frozen=True)
class PiFault:
    """An injected fault: reads of blocks ``first .. last`` return their PI
    tuple with the guard (``reftag`` False) or the reference tag flipped, as if
    the medium had corrupted it (the stored metadata stays intact)."""

    reftag: bool
    first: int
    last: int

    def apply(self, prot: Protection, metadata: bytes, slba: int, nlb: int) -> bytes:
        """Returns:
            ``metadata`` of blocks ``slba ..`` with the fault's tuples corrupted
            (unchanged for a namespace without PI).
        """
        if prot.pi_type == PiType.NONE:
            return metadata
        out = bytearray(metadata)
        where = prot.tuple_offset + (4 if self.reftag else 0)
        for lba in range(max(slba, self.first), min(slba + nlb - 1, self.last) + 1):
            out[(lba - slba) * prot.metadata + where] ^= 0x5A
        return bytes(out)
