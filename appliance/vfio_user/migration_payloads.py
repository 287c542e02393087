"""Typed migration record payloads: building them and checking them (sans-I/O).

One builder and one parser per typed record (NAMESPACE_BLOCKS,
NAMESPACE_METADATA, DEVICE_STATE, DIRTY_ROUND) over the layouts of
:mod:`appliance.vfio_user.migration_records`.  A parser checks the record's
type, its payload head (reserved fields and flags, lengths against the data)
before a field is returned, and refuses with :class:`StreamError`.
"""

from __future__ import annotations

from typing import TypeVar

from appliance.vfio_user.migration_records import (
    BLOCKS_FLAGS_RESERVED,
    MAX_ZERO_RUN,
    BlocksFlag,
    BlocksHead,
    DeviceStateHead,
    DirtyRound,
    DirtyRoundFlag,
    MetadataHead,
    Record,
    RecordType,
    StreamError,
)
from appliance.wire import Struct, WireError

_S = TypeVar("_S", bound=Struct)


def namespace_blocks(nsid: int, offset: int, data: bytes, *, elide_zeroes: bool = False) -> Record:
    """A NAMESPACE_BLOCKS record: ``data`` at byte ``offset`` of namespace ``nsid``.

    With ``elide_zeroes``, all-zero ``data`` becomes a ZEROES record carrying
    only its length.
    """
    if elide_zeroes and data and not data[0] and data == bytes(len(data)):
        head = BlocksHead(nsid=nsid, flags=BlocksFlag.ZEROES, offset=offset, length=len(data))
        return Record(RecordType.NAMESPACE_BLOCKS, head.pack())
    head = BlocksHead(nsid=nsid, offset=offset, length=len(data))
    return Record(RecordType.NAMESPACE_BLOCKS, head.pack() + data)


def parse_blocks_head(record: Record) -> tuple[BlocksHead, memoryview]:
    """The head and data bytes of a NAMESPACE_BLOCKS record (no data for ZEROES).

    The data is a view of the record's payload (no copy of a MiB record).

    Raises:
        StreamError: wrong type, short payload, reserved flags, or a length
            that disagrees with the data.
    """
    head = _head(record, RecordType.NAMESPACE_BLOCKS, BlocksHead)
    data = memoryview(record.payload)[BlocksHead.SIZE:]
    if head.flags & BLOCKS_FLAGS_RESERVED:
        raise StreamError(f"NAMESPACE_BLOCKS flags {head.flags:#x}")
    if head.flags & BlocksFlag.ZEROES:
        if data or not 0 < head.length <= MAX_ZERO_RUN:
            raise StreamError(f"NAMESPACE_BLOCKS zero run of {head.length} with {len(data)} bytes")
    elif head.length != len(data):
        raise StreamError(f"NAMESPACE_BLOCKS length {head.length} != data {len(data)}")
    return head, data


def parse_namespace_blocks(record: Record) -> tuple[int, int, bytes]:
    """``(nsid, offset, data)`` of a NAMESPACE_BLOCKS record (ZEROES expanded).

    Raises:
        StreamError: as :func:`parse_blocks_head`.
    """
    head, data = parse_blocks_head(record)
    if head.flags & BlocksFlag.ZEROES:
        return head.nsid, head.offset, bytes(head.length)
    return head.nsid, head.offset, bytes(data)


def namespace_metadata(nsid: int, slba: int, nlb: int, metadata: bytes) -> Record:
    """A NAMESPACE_METADATA record: ``metadata`` of ``nlb`` blocks from ``slba``.

    Raises:
        ValueError: no blocks, or ``metadata`` is not ``nlb`` whole parts.
    """
    if nlb <= 0 or not metadata or len(metadata) % nlb:
        raise ValueError(f"{len(metadata)} metadata bytes for {nlb} blocks")
    head = MetadataHead(nsid=nsid, slba=slba, nlb=nlb)
    return Record(RecordType.NAMESPACE_METADATA, head.pack() + metadata)


def parse_metadata_head(record: Record) -> tuple[MetadataHead, memoryview]:
    """The head and metadata bytes (a view) of a NAMESPACE_METADATA record.

    Raises:
        StreamError: wrong type, short payload, reserved field, no blocks, or
            a length that is not ``nlb`` whole parts.
    """
    head = _head(record, RecordType.NAMESPACE_METADATA, MetadataHead)
    data = memoryview(record.payload)[MetadataHead.SIZE:]
    if head.reserved:
        raise StreamError(f"NAMESPACE_METADATA reserved field {head.reserved:#x}")
    if not head.nlb or len(data) % head.nlb or not data:
        raise StreamError(f"NAMESPACE_METADATA of {head.nlb} blocks with {len(data)} bytes")
    return head, data


def device_state(kind: int, blob: bytes, version: int = 1) -> Record:
    """A DEVICE_STATE record for device type ``kind``."""
    head = DeviceStateHead(kind=kind, version=version)
    return Record(RecordType.DEVICE_STATE, head.pack() + blob)


def parse_device_state(record: Record) -> tuple[int, int, bytes]:
    """``(kind, version, blob)`` of a DEVICE_STATE record.

    Raises:
        StreamError: wrong type, short payload or reserved bits set.
    """
    head = _head(record, RecordType.DEVICE_STATE, DeviceStateHead)
    if head.reserved:
        raise StreamError("DEVICE_STATE reserved field set")
    return head.kind, head.version, record.payload[DeviceStateHead.SIZE:]


def dirty_round(number: int, pending: int, final: bool = False) -> Record:
    """A DIRTY_ROUND marker: round ``number`` starts with ``pending`` bytes dirty."""
    flags = DirtyRoundFlag.FINAL if final else 0
    marker = DirtyRound(round=number, flags=flags, pending=pending)
    return Record(RecordType.DIRTY_ROUND, marker.pack())


def parse_dirty_round(record: Record) -> DirtyRound:
    """The marker of a DIRTY_ROUND record.

    Raises:
        StreamError: wrong type or size, or unknown flags.
    """
    head = _head(record, RecordType.DIRTY_ROUND, DirtyRound)
    if head.flags & ~int(DirtyRoundFlag.FINAL):
        raise StreamError(f"DIRTY_ROUND flags {head.flags:#x}")
    return head


def _head(record: Record, kind: RecordType, cls: type[_S]) -> _S:
    if record.type != kind:
        raise StreamError(f"expected a {kind.name} record, got {record.type.name}")
    try:
        return cls.unpack(record.payload)
    except WireError as exc:
        raise StreamError(f"{kind.name}: {exc}") from None
