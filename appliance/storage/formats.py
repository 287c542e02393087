"""The LBA formats this controller offers (device layer, constants and
encoding only; Identify Namespace LBAF0-LBAF15, FLBAS, Format NVM's LBAF).

Theory of operation
-------------------
Every namespace reports the same eight formats, 512- and 4096-byte blocks each
with 0, 8, 16 or 64 bytes of metadata (:data:`LBA_FORMATS`, indexes 0-7: NLBAF
= 7).  Format 0 is 512 bytes without metadata and format 4 is 4096 bytes
without metadata, so a namespace configured without metadata reports the
format its block size always had.  FLBAS bits 3:0 name the namespace's
current format; bit 4 says whether the metadata travels at the end of each
block's data (extended LBA, one buffer) or in a separate buffer (MPTR).
Relative performance (RP) is 00b, best, for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.storage.identify_spec import LBAF

METADATA_SIZES = (0, 8, 16, 64)
FLBAS_EXTENDED = 0x10  # FLBAS bit 4: metadata at the end of each block's data


@dataclass(frozen=True)
class LbaFormat:
    """One LBA format: data bytes and metadata bytes per block."""

    block_size: int
    metadata: int

    @property
    def lbads(self) -> int:
        """log2 of the block size (Identify's LBADS)."""
        return self.block_size.bit_length() - 1

    def encode(self) -> int:
        """Returns:
            The 32-bit LBA Format Data Structure (MS, LBADS, RP 0).
        """
        return LBAF.encode(ms=self.metadata, lbads=self.lbads, rp=0)


LBA_FORMATS = tuple(LbaFormat(block, ms) for block in (512, 4096) for ms in METADATA_SIZES)
NLBAF = len(LBA_FORMATS) - 1  # Identify's NLBAF is 0-based


def format_index(block_size: int, metadata: int) -> int:
    """The index of the format with ``block_size`` data and ``metadata`` bytes.

    Raises:
        ValueError: no such format.
    """
    try:
        return LBA_FORMATS.index(LbaFormat(block_size, metadata))
    except ValueError:
        raise ValueError(f"no LBA format with {block_size}-byte blocks and {metadata} "
                         f"bytes of metadata (blocks 512 or 4096, metadata one of "
                         f"{METADATA_SIZES})") from None


def lbaf_fields() -> tuple[int, int, bytes]:
    """Returns:
        Identify Namespace's ``nlbaf``, ``lbaf0`` and ``lbaf1_15`` fields.
    """
    rest = b"".join(f.encode().to_bytes(4, "little") for f in LBA_FORMATS[1:])
    return NLBAF, LBA_FORMATS[0].encode(), rest.ljust(60, b"\0")


def flbas(index: int, extended: bool) -> int:
    """Returns:
        FLBAS for format ``index`` (bits 3:0) with bit 4 set for extended LBAs.
    """
    return index | (FLBAS_EXTENDED if extended else 0)
