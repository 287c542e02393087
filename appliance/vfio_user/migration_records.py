"""The migration stream's records: types, heads, payload layouts, limits (sans-I/O).

Every record is a fixed 24-byte :class:`RecordHead` (magic, type, flags,
payload length, sequence number, checksum) followed by ``length`` payload
bytes; :data:`PAYLOAD_SIZES` bounds each type's payload, checked from the head
before anything is buffered.  The payload layouts of the typed records are
declared here as :class:`~appliance.wire.Struct` s, with their flags and
reserved masks; :mod:`appliance.vfio_user.migration_payloads` builds and
checks them, :mod:`appliance.vfio_user.migration_stream` frames them into a
stream (docs/migration.md describes the format).
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Annotated

import xxhash

from appliance.errors import StreamRefused
from appliance.wire import U16, U32, U64, Struct

MAGIC = b"AMIG"
FORMAT_VERSION = 2  # 2: xxh3_64 checksums and digest (1: xxh64)
MAX_PAYLOAD = 16 << 20  # one record's payload, at most
MAX_FINGERPRINT = 1024


class RecordType(enum.IntEnum):
    """What a record's payload holds."""

    HEADER = 1  # StreamHeader + fingerprint
    PCI_CONFIG = 2  # PCI config space + interrupt configuration (migrate.device)
    MSIX = 3  # MSI-X table, PBA, mask state (migrate.device)
    DEVICE_STATE = 4  # DeviceStateHead + a device type's own blob
    NAMESPACE_BLOCKS = 5  # BlocksHead + data
    DIRTY_ROUND = 6  # DirtyRound marker
    END = 7  # EndPayload
    # Live handoff only (appliance.runtime.handoff.channel): a JSON manifest of the
    # connections that move with their fds; never part of a vfio-user stream.
    HANDOFF = 8
    NAMESPACE_METADATA = 9  # MetadataHead + the metadata of a run of blocks
    # Data channel only (a stream whose HEADER has DATA_CHANNEL): the channel's
    # record and byte counts so far (appliance.vfio_user.migration_channel).
    CHANNEL_SYNC = 10


# Records a device gets; HEADER, DIRTY_ROUND, END (and HANDOFF) belong to the stream.
DEVICE_RECORDS = frozenset({RecordType.PCI_CONFIG, RecordType.MSIX, RecordType.DEVICE_STATE,
                            RecordType.NAMESPACE_BLOCKS, RecordType.NAMESPACE_METADATA})
# What a shared-storage stream never carries: the namespaces' contents.
DATA_RECORDS = frozenset({RecordType.NAMESPACE_BLOCKS, RecordType.NAMESPACE_METADATA})
# Record flags: none defined yet; every bit is reserved and must be 0.
RECORD_FLAGS_RESERVED = 0xFFFF
# Types that may appear at most once per stream.
ONCE = frozenset({RecordType.HEADER, RecordType.PCI_CONFIG, RecordType.MSIX, RecordType.END,
                  RecordType.HANDOFF})


class RecordHead(Struct, size=24):
    magic: Annotated[bytes, "4s"] = MAGIC
    type: U16 = 0
    flags: U16 = 0
    length: U32 = 0  # payload bytes
    seq: U32 = 0  # record index from 0
    checksum: U64 = 0  # xxh3_64(head[:16] + payload)


CHECKED_HEAD = 16  # bytes of the head covered by its checksum


class StreamHeader(Struct, size=8):
    """HEADER payload; ``fingerprint_len`` bytes of fingerprint follow."""

    version: U16 = FORMAT_VERSION
    flags: U16 = 0  # HeaderFlag
    fingerprint_len: U16 = 0
    reserved: U16 = 0


class HeaderFlag(enum.IntFlag):
    """HEADER ``flags``: how the stream was made."""

    # Both sides use the same images: no DATA_RECORDS follow (device state
    # only).  A reader expecting the other mode refuses the stream at its HEADER.
    SHARED_STORAGE = 0x1
    # The bulk data travels on the negotiated data channel: no NAMESPACE_BLOCKS
    # follow, CHANNEL_SYNC records say how much the channel carried.
    DATA_CHANNEL = 0x2


HEADER_FLAGS_RESERVED = 0xFFFF & ~int(HeaderFlag.SHARED_STORAGE | HeaderFlag.DATA_CHANNEL)


# Streams whose bulk data does not travel in NAMESPACE_BLOCKS records.
BULK_ELSEWHERE = HeaderFlag.SHARED_STORAGE | HeaderFlag.DATA_CHANNEL


class DeviceStateHead(Struct, size=8):
    """DEVICE_STATE payload head; the device type's blob follows."""

    kind: U16 = 0
    version: U16 = 1
    reserved: U32 = 0


class DeviceKind(enum.IntEnum):
    NVME_CONTROLLER = 1
    NVME_NAMESPACES = 2  # a full stream's namespaces created at run time, before their data


class BlocksHead(Struct, size=24):
    """NAMESPACE_BLOCKS payload head; ``length`` data bytes follow (none with ZEROES)."""

    nsid: U32 = 0
    flags: U32 = 0
    offset: U64 = 0
    length: U64 = 0


class BlocksFlag(enum.IntFlag):
    ZEROES = 0x1  # the range reads as zeroes; no data bytes follow


BLOCKS_FLAGS_RESERVED = 0xFFFFFFFF & ~int(BlocksFlag.ZEROES)
MAX_ZERO_RUN = 1 << 40  # a ZEROES record covers at most this many bytes


class MetadataHead(Struct, size=24):
    """NAMESPACE_METADATA payload head; blocks ``slba .. slba+nlb-1``'s metadata
    follows as a Read returns it in a separate buffer.  Only for blocks the
    stream carried: NAMESPACE_BLOCKS leaves their metadata unwritten (FFh)."""

    nsid: U32 = 0
    reserved: U32 = 0
    slba: U64 = 0
    nlb: U64 = 0


class DirtyRoundFlag(enum.IntFlag):
    FINAL = 0x1  # the stop-and-copy round: what follows is the rest of the stream


class DirtyRound(Struct, size=16):
    """DIRTY_ROUND payload: a round of pre-copy (or the final one) begins."""

    round: U32 = 0
    flags: U32 = 0
    pending: U64 = 0


class ChannelSync(Struct, size=24):
    """CHANNEL_SYNC payload: what the data channel carried before this record."""

    records: U64 = 0
    bytes: U64 = 0
    flags: U32 = 0  # ChannelSyncFlag
    reserved: U32 = 0


class ChannelSyncFlag(enum.IntFlag):
    FINAL = 0x1  # the channel carries nothing more in this stream


class EndPayload(Struct, size=16):
    """END payload: how many records came before, and the xxh3_64 of their bytes."""

    records: U32 = 0
    reserved: U32 = 0
    digest: U64 = 0


ROUND_MARKER_SIZE = RecordHead.SIZE + DirtyRound.SIZE


class StreamError(StreamRefused):
    """The stream is malformed, corrupt, out of order or for another device."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message, err)


@dataclass(frozen=True)
class Record:
    """One record's type and payload (framing is the stream's business)."""

    type: RecordType
    payload: bytes

    @property
    def size(self) -> int:
        """Bytes this record takes in the stream."""
        return RecordHead.SIZE + len(self.payload)


def record_checksum(head: bytes, payload: bytes | bytearray | memoryview) -> int:
    """xxh3_64 over the head's first 16 bytes and the payload."""
    h = xxhash.xxh3_64(head[:CHECKED_HEAD])
    h.update(payload)
    return h.intdigest()


def stream_digest() -> xxhash.xxh3_64:
    """A fresh hasher of END's digest (xxh3_64, seed 0) over the stream's bytes."""
    return xxhash.xxh3_64()


# Payload size limits per type (min, max), checked from the head before buffering.
PAYLOAD_SIZES: dict[RecordType, tuple[int, int]] = {
    RecordType.HEADER: (StreamHeader.SIZE, StreamHeader.SIZE + MAX_FINGERPRINT),
    RecordType.PCI_CONFIG: (1, MAX_PAYLOAD),
    RecordType.MSIX: (1, MAX_PAYLOAD),
    RecordType.DEVICE_STATE: (DeviceStateHead.SIZE, MAX_PAYLOAD),
    RecordType.NAMESPACE_BLOCKS: (BlocksHead.SIZE, MAX_PAYLOAD),
    RecordType.DIRTY_ROUND: (DirtyRound.SIZE, DirtyRound.SIZE),
    RecordType.END: (EndPayload.SIZE, EndPayload.SIZE),
    RecordType.HANDOFF: (2, MAX_PAYLOAD),
    RecordType.NAMESPACE_METADATA: (MetadataHead.SIZE + 1, MAX_PAYLOAD),
    RecordType.CHANNEL_SYNC: (ChannelSync.SIZE, ChannelSync.SIZE),
}
