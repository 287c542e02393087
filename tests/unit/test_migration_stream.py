"""The migration stream: round trips, corruption, truncation, order, chunking."""

from __future__ import annotations

import errno

import pytest
import xxhash

from appliance.vfio_user import migration_stream as s
from appliance.vfio_user.migration_stream import (
    MAX_PAYLOAD,
    Record,
    RecordHead,
    RecordType,
    StreamError,
    StreamReader,
    StreamWriter,
)

FP = b"\x11" * 32


def sample_records() -> list[Record]:
    """One record of every type a writer may add."""
    return [
        Record(RecordType.PCI_CONFIG, bytes(range(256)) * 2),
        Record(RecordType.MSIX, b"\x01" * 48),
        s.device_state(s.DeviceKind.NVME_CONTROLLER, b"controller-blob"),
        s.namespace_blocks(1, 4096, b"\xaa" * 512),
        s.namespace_metadata(1, 8, 1, b"\xbb" * 8),
        s.dirty_round(3, 1 << 20),
    ]


def full_stream(records: list[Record] | None = None, fingerprint: bytes = FP) -> bytes:
    writer = StreamWriter(fingerprint)
    writer.add_all(sample_records() if records is None else records)
    writer.finish()
    data = writer.read(1 << 30)
    assert writer.pending == 0
    return data


def read_all(data: bytes, fingerprint: bytes | None = FP) -> list[Record]:
    reader = StreamReader(fingerprint)
    records = reader.feed(data)
    reader.check_complete()
    return records


def spans(data: bytes) -> list[tuple[RecordType, int, int]]:
    """(type, start, end) of every record in a well-formed stream."""
    out, pos = [], 0
    while pos < len(data):
        head = RecordHead.unpack(data, pos)
        end = pos + RecordHead.SIZE + head.length
        out.append((RecordType(head.type), pos, end))
        pos = end
    return out


def reseal(data: bytes, index: int, *, payload: bytes | None = None, **fields: int) -> bytes:
    """Rewrite record ``index`` (fields, payload) with a valid checksum, keeping the rest."""
    _, start, end = spans(data)[index]
    head = RecordHead.unpack(data, start)
    body = data[start + RecordHead.SIZE:end] if payload is None else payload
    head = head.replace(length=len(body), **fields)
    raw = head.pack()
    head.checksum = s.record_checksum(raw, body)
    return data[:start] + head.pack() + body + data[end:]


# ------------------------------------------------------------ round trips
def test_round_trip_every_record_type() -> None:
    records = read_all(full_stream())
    kinds = [r.type for r in records]
    assert kinds[0] == RecordType.HEADER and kinds[-1] == RecordType.END
    assert records[1:-1] == sample_records()


def test_header_carries_version_and_fingerprint() -> None:
    reader = StreamReader(None)
    reader.feed(full_stream())
    assert reader.finished and reader.fingerprint == FP and reader.version == s.FORMAT_VERSION


def test_empty_stream_is_header_and_end() -> None:
    records = read_all(full_stream([]))
    assert [r.type for r in records] == [RecordType.HEADER, RecordType.END]


def test_payload_helpers_round_trip() -> None:
    assert s.parse_namespace_blocks(s.namespace_blocks(7, 1 << 40, b"xyz")) == (7, 1 << 40, b"xyz")
    assert s.parse_device_state(s.device_state(1, b"blob", 2)) == (1, 2, b"blob")
    marker = s.parse_dirty_round(s.dirty_round(5, 99, final=True))
    assert (marker.round, marker.pending, marker.flags) == (5, 99, s.DirtyRoundFlag.FINAL)
    assert s.ROUND_MARKER_SIZE == s.dirty_round(0, 0).size
    head, md = s.parse_metadata_head(s.namespace_metadata(2, 1 << 33, 2, b"m" * 32))
    assert (head.nsid, head.slba, head.nlb, bytes(md)) == (2, 1 << 33, 2, b"m" * 32)


def test_payload_helpers_refuse_malformed() -> None:
    blocks = s.namespace_blocks(1, 0, b"abcd")
    with pytest.raises(StreamError):
        s.parse_namespace_blocks(Record(blocks.type, blocks.payload[:-1]))
    with pytest.raises(StreamError):
        s.parse_namespace_blocks(s.dirty_round(0, 0))
    with pytest.raises(StreamError):
        s.parse_dirty_round(Record(RecordType.DIRTY_ROUND, b"\0" * 4 + b"\x02" + b"\0" * 11))
    with pytest.raises(StreamError):
        s.parse_device_state(Record(RecordType.DEVICE_STATE, b"\0" * 4 + b"\x01" + b"\0" * 3))
    for nlb, reserved, data in ((0, 0, b"m" * 8), (3, 0, b"m" * 8), (1, 1, b"m" * 8)):
        head = s.MetadataHead(nsid=1, reserved=reserved, slba=0, nlb=nlb)
        with pytest.raises(StreamError, match="NAMESPACE_METADATA"):
            s.parse_metadata_head(Record(RecordType.NAMESPACE_METADATA, head.pack() + data))
    for nlb, data in ((0, b"m" * 8), (2, b"m" * 3), (1, b"")):
        with pytest.raises(ValueError):
            s.namespace_metadata(1, 0, nlb, data)


def test_end_digest_is_xxh3_64_of_everything_before_it() -> None:
    data = full_stream()
    _, end_start, _ = spans(data)[-1]
    end = s.EndPayload.unpack(data, end_start + RecordHead.SIZE)
    assert end.digest == xxhash.xxh3_64(data[:end_start]).intdigest()
    assert end.records == len(spans(data)) - 1


def test_writer_read_takes_at_most_n_bytes() -> None:
    writer = StreamWriter(FP)
    writer.add_all(sample_records())
    writer.finish()
    total = writer.pending
    pieces = []
    while chunk := writer.read(7):
        assert len(chunk) <= 7
        pieces.append(chunk)
    assert sum(map(len, pieces)) == total and writer.read(100) == b""
    assert b"".join(pieces) == full_stream()


def test_writer_refuses_misuse() -> None:
    writer = StreamWriter(FP)
    with pytest.raises(ValueError):
        writer.add(Record(RecordType.END, bytes(16)))
    with pytest.raises(ValueError):
        writer.add(Record(RecordType.HEADER, bytes(8)))
    with pytest.raises(ValueError):
        writer.add(Record(RecordType.DIRTY_ROUND, bytes(3)))
    with pytest.raises(ValueError):
        writer.add(Record(RecordType.NAMESPACE_BLOCKS, bytes(MAX_PAYLOAD + 1)))
    writer.finish()
    with pytest.raises(ValueError):
        writer.add(s.dirty_round(0, 0))
    with pytest.raises(ValueError):
        writer.finish()
    with pytest.raises(ValueError):
        StreamWriter(bytes(s.MAX_FINGERPRINT + 1))


# ------------------------------------------------------------ chunking
def test_every_split_point_gives_the_same_records() -> None:
    data = full_stream()
    expected = read_all(data)
    for cut in range(len(data) + 1):
        reader = StreamReader(FP)
        got = reader.feed(data[:cut]) + reader.feed(data[cut:])
        reader.check_complete()
        assert got == expected, cut


def test_byte_by_byte() -> None:
    data = full_stream()
    reader = StreamReader(FP)
    got: list[Record] = []
    for i in range(len(data)):
        got += reader.feed(data[i:i + 1])
    reader.check_complete()
    assert got == read_all(data)


def test_records_come_out_as_soon_as_complete() -> None:
    data = full_stream()
    reader = StreamReader(FP)
    for kind, _, end in spans(data):
        got = reader.feed(b"")  # nothing new
        assert got == []
        got = reader.feed(data[reader.bytes_fed:end])
        assert [r.type for r in got] == [kind]


# ------------------------------------------------------------ corruption
@pytest.mark.parametrize("index", range(7))  # HEADER, 5 records, END
def test_a_flipped_bit_anywhere_in_any_record_is_caught(index: int) -> None:
    data = full_stream()
    kind, start, end = spans(data)[index]
    step = max(1, (end - start) * 8 // 200)  # every bit of small records, a spread of big ones
    for bit in range(0, (end - start) * 8, step):
        pos = start + bit // 8
        bad = bytearray(data)
        bad[pos] ^= 1 << (bit % 8)
        reader = StreamReader(FP)
        applied: list[Record] = []
        with pytest.raises(StreamError):
            for i in range(0, len(bad), 97):
                applied += reader.feed(bad[i:i + 97])
            reader.check_complete()
        # Nothing from the corrupted record (or after it) was handed out.
        assert len(applied) <= index, (kind, bit)
        assert all(r in read_all(data) for r in applied)


def test_checksum_mismatch_message_names_the_record() -> None:
    data = bytearray(full_stream())
    _, start, _ = spans(bytes(data))[4]
    data[start + RecordHead.SIZE] ^= 0x80
    with pytest.raises(StreamError, match=r"record 4 \(NAMESPACE_BLOCKS\): checksum"):
        read_all(bytes(data))


def test_end_digest_mismatch_is_caught() -> None:
    data = full_stream()
    end_payload = s.EndPayload(records=len(spans(data)) - 1, digest=12345).pack()
    with pytest.raises(StreamError, match="digest"):
        read_all(reseal(data, len(spans(data)) - 1, payload=end_payload))


def test_end_record_count_mismatch_is_caught() -> None:
    data = full_stream()
    _, start, _ = spans(data)[-1]
    end = s.EndPayload.unpack(data, start + RecordHead.SIZE)
    with pytest.raises(StreamError, match="counts"):
        read_all(reseal(data, len(spans(data)) - 1, payload=end.replace(records=2).pack()))


# ------------------------------------------------------------ framing errors
def test_bad_magic() -> None:
    with pytest.raises(StreamError, match="magic"):
        read_all(reseal(full_stream(), 2, magic=b"AMIH"))


def test_unknown_type() -> None:
    with pytest.raises(StreamError, match="unknown record type"):
        read_all(reseal(full_stream(), 2, type=99))


def test_reserved_flags() -> None:
    with pytest.raises(StreamError, match="reserved flags"):
        read_all(reseal(full_stream(), 2, flags=1))


def test_oversized_length_refused_before_buffering() -> None:
    head = RecordHead(type=RecordType.NAMESPACE_BLOCKS, length=MAX_PAYLOAD + 1, seq=1).pack()
    data = full_stream()
    header_end = spans(data)[0][2]
    reader = StreamReader(FP)
    reader.feed(data[:header_end])
    with pytest.raises(StreamError, match="exceeds") as info:
        reader.feed(head)  # the head alone: no payload byte was needed to refuse
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(("kind", "length"), [
    (RecordType.DIRTY_ROUND, 15), (RecordType.END, 17), (RecordType.NAMESPACE_BLOCKS, 10),
    (RecordType.PCI_CONFIG, 0), (RecordType.HEADER, 4), (RecordType.NAMESPACE_METADATA, 24),
])
def test_length_out_of_range_for_type(kind: RecordType, length: int) -> None:
    data = full_stream()
    header_end = spans(data)[0][2]
    reader = StreamReader(FP)
    reader.feed(data[:header_end])
    with pytest.raises(StreamError):
        reader.feed(RecordHead(type=kind, length=length, seq=1).pack())


# ------------------------------------------------------------ order
def test_stream_must_start_with_header() -> None:
    data = full_stream()
    body = b"".join(data[a:b] for _, a, b in spans(data)[1:])
    with pytest.raises(StreamError, match="not HEADER|sequence"):
        read_all(body)


def test_records_swapped_are_caught_by_sequence() -> None:
    data = full_stream()
    sp = spans(data)
    (_, a0, a1), (_, b0, b1) = sp[2], sp[3]
    swapped = data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:]
    with pytest.raises(StreamError, match="sequence"):
        read_all(swapped)


def test_dropped_record_is_caught() -> None:
    data = full_stream()
    _, a, b = spans(data)[3]
    with pytest.raises(StreamError, match="sequence"):
        read_all(data[:a] + data[b:])


def test_repeated_record_is_caught() -> None:
    data = full_stream()
    _, a, b = spans(data)[3]
    with pytest.raises(StreamError, match="sequence"):
        read_all(data[:b] + data[a:b] + data[b:])


def test_second_header_refused_even_with_a_consistent_sequence() -> None:
    data = full_stream()
    header = Record(RecordType.HEADER, s.StreamHeader(fingerprint_len=len(FP)).pack() + FP)
    doubled = reseal(data, 1, type=RecordType.HEADER, payload=header.payload)
    with pytest.raises(StreamError, match="second HEADER"):
        read_all(doubled)


def test_second_pci_config_refused() -> None:
    data = full_stream([Record(RecordType.PCI_CONFIG, b"a"), Record(RecordType.PCI_CONFIG, b"b")])
    with pytest.raises(StreamError, match="second PCI_CONFIG"):
        read_all(data)


def test_nothing_after_end() -> None:
    data = full_stream()
    reader = StreamReader(FP)
    reader.feed(data)
    with pytest.raises(StreamError, match="after END"):
        reader.feed(b"\0")
    with pytest.raises(StreamError, match="already failed"):
        reader.feed(b"")  # sticky


def test_a_second_stream_after_end_is_refused_in_the_same_chunk() -> None:
    data = full_stream()
    with pytest.raises(StreamError, match="after END"):
        read_all(data + data)


# ------------------------------------------------------------ truncation
def test_truncated_streams_are_incomplete() -> None:
    data = full_stream()
    for cut in [0, 1, 23, 24, *(b for _, _, b in spans(data)[:-1]), len(data) - 1]:
        reader = StreamReader(FP)
        reader.feed(data[:cut])
        with pytest.raises(StreamError, match="truncated"):
            reader.check_complete()


# ------------------------------------------------------------ header checks
def test_fingerprint_mismatch_is_refused_at_the_header() -> None:
    data = full_stream(fingerprint=b"\x22" * 32)
    header_end = spans(data)[0][2]
    reader = StreamReader(FP)
    with pytest.raises(StreamError, match="fingerprint") as info:
        reader.feed(data[:header_end])  # at once: nothing after the header is needed
    assert info.value.errno == errno.EINVAL


def test_unknown_format_version() -> None:
    writer = StreamWriter(FP, version=s.FORMAT_VERSION + 1)
    writer.finish()
    with pytest.raises(StreamError, match=f"version {s.FORMAT_VERSION + 1}") as info:
        read_all(writer.read(1 << 20))
    assert info.value.errno == errno.ENOTSUP


def test_malformed_header_payload() -> None:
    data = full_stream()
    bad = s.StreamHeader(fingerprint_len=31).pack() + FP
    with pytest.raises(StreamError, match="malformed HEADER"):
        read_all(reseal(data, 0, payload=bad), fingerprint=None)


def test_watcher_accepts_any_fingerprint() -> None:
    assert len(read_all(full_stream(fingerprint=b"other"), fingerprint=None)) == 8


def test_zero_runs_are_elided_and_expanded() -> None:
    run = s.namespace_blocks(1, 8192, bytes(4096), elide_zeroes=True)
    assert len(run.payload) == s.BlocksHead.SIZE
    assert s.parse_namespace_blocks(run) == (1, 8192, bytes(4096))
    assert len(s.namespace_blocks(1, 0, b"\0\1", elide_zeroes=True).payload) == 24 + 2
    assert read_all(full_stream([run]))[1] == run
    zeroes = s.BlocksFlag.ZEROES
    for bad in (s.BlocksHead(flags=zeroes, length=0).pack(),
                s.BlocksHead(flags=zeroes, length=4).pack() + b"abcd",
                s.BlocksHead(flags=zeroes, length=s.MAX_ZERO_RUN + 1).pack(),
                s.BlocksHead(flags=2, length=1).pack() + b"a"):
        with pytest.raises(StreamError):
            s.parse_namespace_blocks(Record(RecordType.NAMESPACE_BLOCKS, bad))


# ------------------------------------------------------------ HEADER flags
def test_header_flags_shared_storage_must_match() -> None:
    w = StreamWriter(b"fp", flags=s.HeaderFlag.SHARED_STORAGE)
    with pytest.raises(ValueError):
        w.add(s.namespace_blocks(1, 0, b"x" * 512))
    w.finish()
    data = w.read(1 << 20)
    assert StreamReader(b"fp", s.HeaderFlag.SHARED_STORAGE).feed(data)[-1].type == RecordType.END
    assert StreamReader(None, None).feed(data)
    with pytest.raises(StreamError, match="shared-storage mode differs"):
        StreamReader(b"fp").feed(data)
    full = StreamWriter(b"fp")
    full.finish()
    with pytest.raises(StreamError, match="shared-storage mode differs"):
        StreamReader(b"fp", s.HeaderFlag.SHARED_STORAGE).feed(full.read(1 << 20))


def test_header_reserved_flags_and_blocks_in_shared_stream_refused() -> None:
    bad = StreamWriter(b"fp", flags=0x4)
    with pytest.raises(StreamError, match="malformed HEADER"):
        StreamReader(None, None).feed(bad.read(1 << 20))
    # A shared-storage stream that carries blocks anyway (a forged writer).
    w = StreamWriter(b"fp", flags=s.HeaderFlag.SHARED_STORAGE)
    w.flags = 0
    w.add(s.namespace_blocks(1, 0, b"x" * 512))
    with pytest.raises(StreamError, match="NAMESPACE_BLOCKS in a shared-storage stream"):
        StreamReader(b"fp", None).feed(w.read(1 << 20))


def test_metadata_in_a_shared_storage_stream_refused() -> None:
    w = StreamWriter(b"fp", flags=s.HeaderFlag.SHARED_STORAGE)
    with pytest.raises(ValueError, match="NAMESPACE_METADATA in a shared-storage or data-channel stream"):
        w.add(s.namespace_metadata(1, 0, 1, b"m" * 8))
    w.flags = 0  # a forged writer
    w.add(s.namespace_metadata(1, 0, 1, b"m" * 8))
    with pytest.raises(StreamError, match="NAMESPACE_METADATA in a shared-storage stream"):
        StreamReader(b"fp", None).feed(w.read(1 << 20))


# ------------------------------------------------------------ copies
def test_read_parts_are_views_of_what_read_returns() -> None:
    data = full_stream()
    writer = StreamWriter(FP)
    writer.add_all(sample_records())
    writer.finish()
    got = b""
    while parts := writer.read_parts(333):
        assert all(isinstance(p, memoryview) for p in parts)
        assert sum(len(p) for p in parts) <= 333
        got += b"".join(parts)
    assert got == data and writer.pending == 0


def test_a_mutable_chunk_is_copied_not_kept() -> None:
    data = full_stream()
    reader = StreamReader(FP)
    records: list[Record] = []
    for at in range(0, len(data), 100):  # one reused buffer, as a receive loop might have
        buf = bytearray(data[at:at + 100])
        records += reader.feed(buf)
        buf[:] = bytes(len(buf))
    reader.check_complete()
    assert records == read_all(data)


@pytest.mark.parametrize("step", [1, 77, 1 << 16, 1 << 20])
def test_views_of_immutable_chunks_give_the_same_records(step: int) -> None:
    data = full_stream([s.namespace_blocks(1, 0, bytes(range(256)) * 1024)])  # 256 KiB
    reader = StreamReader(FP)
    view = memoryview(data)
    records: list[Record] = []
    for at in range(0, len(data), step):
        records += reader.feed(view[at:at + step])
        assert len(reader._parts) <= 2 * (256 << 10) // s.KEEP_VIEW + 1  # 1-byte chunks too
    reader.check_complete()
    assert records == read_all(data)
    assert all(type(r.payload) is bytes for r in records)
