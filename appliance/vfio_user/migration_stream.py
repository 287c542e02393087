"""The migration data stream: versioned, typed, checksummed records (sans-I/O).

Theory of operation
-------------------
What a source device hands out through VFIO_USER_MIG_DATA_READ, and a
destination takes through VFIO_USER_MIG_DATA_WRITE, is one byte stream.  The
transport cuts it anywhere (the spec: "the migration data is treated like a
stream"), so the stream frames itself: a sequence of records, each a fixed
24-byte :class:`RecordHead` followed by ``length`` payload bytes::

    magic "AMIG" | type u16 | flags u16 | length u32 | seq u32 | checksum u64 | payload

* ``seq`` counts records from 0, so a record that is lost, repeated or moved
  is caught at once.
* ``checksum`` is the xxh3_64 of the first 16 bytes of the head (everything
  but the checksum itself) followed by the payload: a flipped bit anywhere in
  a record, head or payload, is caught before any field of it is used.
  (Format version 1 used xxh64, about nine times slower here: a stream of
  that version is refused at its HEADER, with ENOTSUP and a message saying
  so, not as a checksum mismatch.)
* The first record is HEADER (format version, device fingerprint); a reader
  built with the destination's fingerprint refuses a different one at once.
* The last record is END, carrying the record count and the xxh3_64 of every
  byte before it.  Nothing may follow END.

:class:`StreamWriter` serializes records into a byte queue from which
:meth:`StreamWriter.read` takes at most N bytes at a time (one MIG_DATA_READ).
:class:`StreamReader` accepts chunks cut anywhere, down to single bytes, and
returns only records whose checksum verified; it never buffers more than one
record (head + at most :data:`MAX_PAYLOAD` bytes) and stops for good at the
first error (:class:`StreamError`, whose ``errno`` is what the vfio-user
error reply carries).  Record layouts are declared in
:mod:`~appliance.vfio_user.migration_records`, their builders and parsers are
:mod:`~appliance.vfio_user.migration_payloads` (both re-exported here, where
their callers import them); docs/migration.md describes the format.
"""

from __future__ import annotations

import errno
from collections import deque

import xxhash

from appliance.vfio_user.migration_payloads import (
    device_state,
    dirty_round,
    namespace_blocks,
    namespace_metadata,
    parse_blocks_head,
    parse_device_state,
    parse_dirty_round,
    parse_metadata_head,
    parse_namespace_blocks,
)
from appliance.vfio_user.migration_records import (
    BLOCKS_FLAGS_RESERVED,
    BULK_ELSEWHERE,
    CHECKED_HEAD,
    DATA_RECORDS,
    DEVICE_RECORDS,
    FORMAT_VERSION,
    HEADER_FLAGS_RESERVED,
    MAGIC,
    MAX_FINGERPRINT,
    MAX_PAYLOAD,
    MAX_ZERO_RUN,
    ONCE,
    PAYLOAD_SIZES,
    RECORD_FLAGS_RESERVED,
    ROUND_MARKER_SIZE,
    BlocksFlag,
    BlocksHead,
    ChannelSync,
    ChannelSyncFlag,
    DeviceKind,
    DeviceStateHead,
    DirtyRound,
    DirtyRoundFlag,
    EndPayload,
    HeaderFlag,
    MetadataHead,
    Record,
    RecordHead,
    RecordType,
    StreamError,
    StreamHeader,
    record_checksum,
    stream_digest,
)

__all__ = [
    "BLOCKS_FLAGS_RESERVED", "BULK_ELSEWHERE", "CHECKED_HEAD", "DATA_RECORDS", "DEVICE_RECORDS",
    "FORMAT_VERSION", "HEADER_FLAGS_RESERVED", "KEEP_VIEW", "MAGIC", "MAX_FINGERPRINT",
    "MAX_PAYLOAD", "MAX_ZERO_RUN", "ONCE", "PAYLOAD_SIZES", "RECORD_FLAGS_RESERVED",
    "ROUND_MARKER_SIZE", "BlocksFlag", "BlocksHead", "ChannelSync", "ChannelSyncFlag",
    "DeviceKind", "DeviceStateHead", "DirtyRound", "DirtyRoundFlag", "EndPayload", "HeaderFlag",
    "MetadataHead", "Record", "RecordHead", "RecordType", "StreamError", "StreamHeader",
    "StreamReader", "StreamWriter", "device_state", "dirty_round", "namespace_blocks",
    "namespace_metadata", "parse_blocks_head", "parse_device_state", "parse_dirty_round",
    "parse_metadata_head", "parse_namespace_blocks", "record_checksum", "stream_digest",
]

KEEP_VIEW = 64 * 1024  # a reader keeps pieces this large of immutable chunks as views


def _mode(flags: int) -> str:
    mode = "shared-storage (device state only)" if flags & HeaderFlag.SHARED_STORAGE else "full"
    return mode + (" data-channel" if flags & HeaderFlag.DATA_CHANNEL else "")


def _is_version_1_header(head: bytes, payload: bytes) -> bool:
    """Whether a HEADER record whose checksum failed is a format version 1 one:
    its xxh64 checksum verifies and it says version 1 (only then is the field
    trusted)."""
    h = xxhash.xxh64(head[:CHECKED_HEAD])
    h.update(payload)
    return (h.intdigest() == RecordHead.unpack(head).checksum
            and len(payload) >= StreamHeader.SIZE and StreamHeader.unpack(payload).version == 1)


# ------------------------------------------------------------ writer
class StreamWriter:
    """Serializes records into a byte queue; HEADER is queued at construction.

    Example::

        w = StreamWriter(device.migration_fingerprint())
        w.add(namespace_blocks(1, 0, data))
        w.finish()                       # queues END
        chunk = w.read(1 << 20)          # what one MIG_DATA_READ returns
    """

    def __init__(self, fingerprint: bytes, *, version: int = FORMAT_VERSION,
                 flags: int = 0) -> None:
        """Args:
            fingerprint: the device configuration's fingerprint.
            flags: HEADER flags (:class:`HeaderFlag`).

        Raises:
            ValueError: the fingerprint is longer than MAX_FINGERPRINT bytes.
        """
        if len(fingerprint) > MAX_FINGERPRINT:
            raise ValueError(f"fingerprint of {len(fingerprint)} bytes")
        self._queue: deque[bytes] = deque()
        self._offset = 0  # bytes of _queue[0] already read
        self._queued = 0
        self._digest = stream_digest()
        self.records = 0
        self.bytes_written = 0
        self.finished = False
        self.flags = flags
        head = StreamHeader(version=version, flags=flags, fingerprint_len=len(fingerprint))
        self._put(RecordType.HEADER, head.pack() + fingerprint)

    @property
    def pending(self) -> int:
        """Bytes queued and not yet read."""
        return self._queued

    def add(self, record: Record) -> None:
        """Queue one record.

        Raises:
            ValueError: HEADER/END (the writer adds those), an oversized
                payload, or the stream is finished.
        """
        if record.type in (RecordType.HEADER, RecordType.END):
            raise ValueError(f"{record.type.name} records are written by the writer itself")
        if record.type in DATA_RECORDS and self.flags & BULK_ELSEWHERE:
            raise ValueError(f"{record.type.name} in a shared-storage or data-channel stream")
        if record.type == RecordType.CHANNEL_SYNC and not self.flags & HeaderFlag.DATA_CHANNEL:
            raise ValueError("CHANNEL_SYNC in a stream without a data channel")
        lo, hi = PAYLOAD_SIZES[record.type]
        if not lo <= len(record.payload) <= hi:
            raise ValueError(f"{record.type.name} payload of {len(record.payload)} bytes")
        self._put(record.type, record.payload)

    def add_all(self, records: list[Record]) -> None:
        """Queue several records in order (see :meth:`add`)."""
        for record in records:
            self.add(record)

    def finish(self) -> None:
        """Queue END (record count and digest of everything before it).

        Raises:
            ValueError: already finished.
        """
        end = EndPayload(records=self.records, digest=self._digest.intdigest())
        self._put(RecordType.END, end.pack())
        self.finished = True

    def read(self, size: int) -> bytes:
        """Take up to ``size`` queued bytes (fewer only when the queue runs dry)."""
        return b"".join(self.read_parts(size))

    def read_parts(self, size: int) -> list[memoryview]:
        """Take up to ``size`` queued bytes as views of the queued records (no copy).

        For a caller that adds its own bytes and copies once (a MIG_DATA_READ
        reply: its head, then these).
        """
        out: list[memoryview] = []
        want = size
        while want > 0 and self._queue:
            first = self._queue[0]
            piece = memoryview(first)[self._offset:self._offset + want]
            out.append(piece)
            want -= len(piece)
            self._offset += len(piece)
            if self._offset == len(first):
                self._queue.popleft()
                self._offset = 0
        self._queued -= size - want
        return out

    def _put(self, kind: RecordType, payload: bytes) -> None:
        if self.finished:
            raise ValueError("the stream is finished")
        head = RecordHead(type=kind, length=len(payload), seq=self.records)
        raw = head.pack()
        head.checksum = record_checksum(raw, payload)
        raw = head.pack()
        self._digest.update(raw)
        self._digest.update(payload)
        self._queue.append(raw)
        if payload:
            self._queue.append(payload)
        self._queued += len(raw) + len(payload)
        self.bytes_written += len(raw) + len(payload)
        self.records += 1


# ------------------------------------------------------------ reader
class StreamReader:
    """Incremental, verifying parser of a migration stream (sans-I/O).

    Example::

        r = StreamReader(fingerprint=device.migration_fingerprint())
        for chunk in chunks:             # MIG_DATA_WRITE payloads, cut anywhere
            device.load_records(r.feed(chunk))
        r.check_complete()               # END seen and its digest verified
    """

    def __init__(self, fingerprint: bytes | None, flags: int | None = 0) -> None:
        """Args:
            fingerprint: what the HEADER must carry; None accepts any (a
                client watching a stream pass through).
            flags: the HEADER flags (:class:`HeaderFlag`) this reader takes;
                None accepts any known ones.
        """
        self.expected_fingerprint = fingerprint
        self.expected_flags = flags
        self.flags = 0
        self.fingerprint: bytes | None = None
        self.version: int | None = None
        self.records = 0
        self.bytes_fed = 0
        self.finished = False
        self.failed: StreamError | None = None
        # The record being received, in pieces joined once at its end: large
        # pieces of immutable chunks as views of them, the rest copied into a
        # bytearray (so 1-byte chunks cannot make a long list of objects).
        self._parts: list[bytearray | memoryview] = []
        self._held = 0
        self._head: RecordHead | None = None
        self._head_raw = b""
        self._seen: set[RecordType] = set()
        self._digest = stream_digest()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Record]:
        """Take the next chunk; return the records it completed, verified.

        Returns:
            Zero or more records, in stream order; an incomplete record stays
            buffered for the next chunk.

        Raises:
            StreamError: the stream is invalid (bad magic, type, flags,
                length, checksum, order, version or fingerprint, data after
                END), or an earlier chunk already failed it.
        """
        if self.failed is not None:
            raise StreamError(f"stream already failed: {self.failed}", self.failed.errno)
        try:
            return self._feed(memoryview(data).cast("B"))
        except StreamError as exc:
            self.failed = exc
            raise

    def check_complete(self) -> None:
        """Raises:
            StreamError: the stream failed, or ended before a verified END
                (truncated).
        """
        if self.failed is not None:
            raise StreamError(f"stream failed: {self.failed}", self.failed.errno)
        if not self.finished:
            held = self._held + (RecordHead.SIZE if self._head is not None else 0)
            raise StreamError(f"stream truncated after {self.records} records "
                              f"({self.bytes_fed} bytes, {held} of a partial record)")

    def _feed(self, data: memoryview) -> list[Record]:
        out: list[Record] = []
        pos = 0
        keep = isinstance(data.obj, bytes)  # immutable: pieces may stay views of it
        while pos < len(data):
            if self.finished:
                raise StreamError(f"{len(data) - pos} bytes after END")
            need = (RecordHead.SIZE if self._head is None else self._head.length) - self._held
            take = min(need, len(data) - pos)
            piece = data[pos:pos + take]
            if keep and take >= KEEP_VIEW:
                self._parts.append(piece)
            elif self._parts and isinstance(self._parts[-1], bytearray):
                self._parts[-1] += piece
            else:
                self._parts.append(bytearray(piece))
            self._held += take
            pos += take
            self.bytes_fed += take
            if take < need:
                break
            if self._head is None:
                self._head_raw = self._take()
                self._head = self._check_head(self._head_raw)
                if self._head.length:
                    continue
            out.append(self._complete())
        return out

    def _take(self) -> bytes:
        """The pieces held, as one bytes object (one copy); the holder empties."""
        parts, self._parts, self._held = self._parts, [], 0
        return b"".join(parts)

    def _check_head(self, raw: bytes) -> RecordHead:
        head = RecordHead.unpack(raw)
        where = f"record {self.records} at byte {self.bytes_fed - RecordHead.SIZE}"
        if head.magic != MAGIC:
            raise StreamError(f"{where}: bad magic {head.magic!r}")
        try:
            kind = RecordType(head.type)
        except ValueError:
            raise StreamError(f"{where}: unknown record type {head.type}") from None
        if head.flags & RECORD_FLAGS_RESERVED:
            raise StreamError(f"{where}: reserved flags {head.flags:#x}")
        if head.length > MAX_PAYLOAD:
            raise StreamError(f"{where}: {kind.name} length {head.length} exceeds {MAX_PAYLOAD}")
        lo, hi = PAYLOAD_SIZES[kind]
        if not lo <= head.length <= hi:
            raise StreamError(f"{where}: {kind.name} length {head.length} not in {lo}..{hi}")
        if head.seq != self.records:
            raise StreamError(f"{where}: sequence number {head.seq}, expected {self.records}")
        if self.records == 0 and kind != RecordType.HEADER:
            raise StreamError(f"{where}: stream starts with {kind.name}, not HEADER")
        if kind in ONCE and kind in self._seen:
            raise StreamError(f"{where}: second {kind.name} record")
        if kind in DATA_RECORDS and self.flags & BULK_ELSEWHERE:
            kind_of = ("shared-storage" if self.flags & HeaderFlag.SHARED_STORAGE
                       else "data-channel")
            raise StreamError(f"{where}: {kind.name} in a {kind_of} stream")
        if kind == RecordType.CHANNEL_SYNC and not self.flags & HeaderFlag.DATA_CHANNEL:
            raise StreamError(f"{where}: CHANNEL_SYNC in a stream without a data channel")
        return head

    def _complete(self) -> Record:
        head = self._head
        assert head is not None
        payload = self._take() if head.length else b""
        self._head = None
        kind = RecordType(head.type)
        if record_checksum(self._head_raw, payload) != head.checksum:
            if kind == RecordType.HEADER and _is_version_1_header(self._head_raw, payload):
                raise StreamError(f"stream format version 1 (xxh64 checksums: an older "
                                  f"appliance made it), this reader knows {FORMAT_VERSION} "
                                  "only: migrate between appliances of the same stream "
                                  "format version", errno.ENOTSUP)
            raise StreamError(f"record {self.records} ({kind.name}): checksum mismatch")
        if kind == RecordType.END:
            end = EndPayload.unpack(payload)
            if end.reserved or end.records != self.records:
                raise StreamError(f"END counts {end.records} records, stream had {self.records}")
            if end.digest != self._digest.intdigest():
                raise StreamError("END digest does not match the stream")
            self.finished = True
        elif kind == RecordType.HEADER:
            self._check_header(payload)
        self._digest.update(self._head_raw)
        self._digest.update(payload)
        self._seen.add(kind)
        self.records += 1
        return Record(kind, payload)

    def _check_header(self, payload: bytes) -> None:
        head = StreamHeader.unpack(payload)
        fingerprint = payload[StreamHeader.SIZE:]
        if head.version != FORMAT_VERSION:
            raise StreamError(f"stream format version {head.version}, this reader knows "
                              f"{FORMAT_VERSION}", errno.ENOTSUP)
        if (head.flags & HEADER_FLAGS_RESERVED or head.reserved
                or head.fingerprint_len != len(fingerprint)):
            raise StreamError("malformed HEADER record")
        if self.expected_flags is not None and head.flags != self.expected_flags:
            which = ("shared-storage" if (head.flags ^ self.expected_flags)
                     & HeaderFlag.SHARED_STORAGE else "data-channel")
            raise StreamError(f"the stream is a {_mode(head.flags)} stream, this side expects "
                              f"a {_mode(self.expected_flags)} one ({which} mode differs)")
        if self.expected_fingerprint is not None and fingerprint != self.expected_fingerprint:
            raise StreamError("device configuration fingerprint differs: the stream is "
                              "for another device configuration")
        self.version = head.version
        self.flags = head.flags
        self.fingerprint = fingerprint
