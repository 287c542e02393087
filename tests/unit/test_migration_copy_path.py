"""The MIG_DATA copy path's shortcuts keep what the stream says: one SEEK_HOLE per
data extent on the source (tmpfs walks every page for each one), a
punched-since range still read right, a message body that arrives in one
chunk is the frame's payload as is (no copy); stream format 2 (xxh3_64)
refuses a version 1 stream by name; a staging image's writeback is started
every 16 MiB, waited for only at a sync.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import xxhash
from test_nvme_driver import make_controller

from appliance.framing import Frame
from appliance.storage import migration as nvme_migration
from appliance.storage import staging as staging_module
from appliance.storage.fileops import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from appliance.storage.migration import NvmeMigratable
from appliance.storage.staging import Staging
from appliance.vfio_user import migration_stream as s
from appliance.vfio_user import wire as w
from appliance.vfio_user.framing import Framer
from appliance.vfio_user.migration_stream import Record, RecordType

MiB = 1 << 20


def drain(mig: NvmeMigratable) -> list[Record]:
    out: list[Record] = []
    while records := mig.precopy_records(MiB):
        out += records
    return out


def image_of(records: list[Record], size: int) -> bytes:
    """The namespace the NAMESPACE_BLOCKS records describe."""
    out = bytearray(size)
    for r in records:
        if r.type == RecordType.NAMESPACE_BLOCKS:
            _, offset, data = s.parse_namespace_blocks(r)
            out[offset:offset + len(data)] = data
    return bytes(out)


def test_one_seek_hole_per_data_extent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctrl = make_controller(tmp_path, size=8 * MiB)
    data = os.urandom(8 * MiB)
    (tmp_path / "ns1.img").write_bytes(data)
    calls: list[int] = []
    real = nvme_migration.data_end

    def counted(fd: int, pos: int, stop: int, page: int) -> int:
        calls.append(pos)
        return real(fd, pos, stop, page)

    monkeypatch.setattr(nvme_migration, "data_end", counted)
    mig = NvmeMigratable(ctrl)
    mig.start_tracking()
    records = drain(mig)
    assert calls == [0]  # eight 1 MiB records, one SEEK_HOLE
    assert image_of(records, 8 * MiB) == data
    ctrl.close()


def test_a_hole_punched_inside_a_known_extent_reads_as_zeroes(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path, size=4 * MiB)
    data = bytearray(os.urandom(4 * MiB))
    (tmp_path / "ns1.img").write_bytes(data)
    mig = NvmeMigratable(ctrl)
    mig.start_tracking()
    first = mig.precopy_records(MiB)  # the extent [0, 4 MiB) is known now
    # Punched behind the device's back (no dirty mark): the pages are dirty anyway.
    assert fallocate(ctrl.namespaces[1].fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     2 * MiB, MiB)
    data[2 * MiB:3 * MiB] = bytes(MiB)
    records = first + drain(mig)
    assert image_of(records, 4 * MiB) == data
    zeroes = [s.parse_blocks_head(r)[0] for r in records
              if s.parse_blocks_head(r)[0].flags & s.BlocksFlag.ZEROES]
    assert [(h.offset, h.length) for h in zeroes] == [(2 * MiB, MiB)]
    ctrl.close()


def test_a_hole_filled_after_the_sweep_began_is_sent(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path, size=4 * MiB)
    with (tmp_path / "ns1.img").open("r+b") as f:
        f.write(os.urandom(MiB))  # data, then a 3 MiB hole
    mig = NvmeMigratable(ctrl)
    mig.start_tracking()
    first = mig.precopy_records(MiB)
    late = os.urandom(MiB)
    os.pwrite(ctrl.namespaces[1].fd, late, 2 * MiB)  # behind the device's back too
    records = first + drain(mig)
    assert image_of(records, 4 * MiB)[2 * MiB:3 * MiB] == late
    ctrl.close()


def frames_of(framer: Framer, chunks: list[bytes]) -> list[Frame[w.Header]]:
    out = []
    for chunk in chunks:
        assert len(chunk) <= framer.bytes_wanted()
        framer.feed(chunk, [])
        while (frame := framer.next_frame()) is not None:
            out.append(frame)
    return out


def test_a_body_in_one_chunk_is_the_payload_itself() -> None:
    framer = Framer(max_size=2 * MiB)
    body = os.urandom(MiB)
    head = w.Header(msg_id=7, command=w.Command.MIG_DATA_WRITE, size=w.HEADER_SIZE + MiB).pack()
    assert framer.bytes_wanted() == w.HEADER_SIZE
    [frame] = frames_of(framer, [head, body])
    assert frame.payload is body and frame.header.msg_id == 7
    assert framer.bytes_wanted() == w.HEADER_SIZE  # ready for the next header


@pytest.mark.parametrize("cut", [1, 4096, MiB - 1])
def test_a_body_in_pieces_is_joined(cut: int) -> None:
    framer = Framer(max_size=2 * MiB)
    body = os.urandom(MiB)
    head = w.Header(msg_id=1, command=w.Command.MIG_DATA_WRITE, size=w.HEADER_SIZE + MiB).pack()
    [frame] = frames_of(framer, [head, body[:cut], body[cut:]])
    assert frame.payload == body and isinstance(frame.payload, bytes)


def test_a_pending_whole_body_travels_in_a_handoff() -> None:
    framer = Framer(max_size=2 * MiB)
    head = w.Header(msg_id=1, command=w.Command.MIG_DATA_WRITE, size=w.HEADER_SIZE + 8).pack()
    framer.feed(head, [])
    assert framer.next_frame() is None
    framer.feed(b"12345678", [])
    assert framer.bytes_wanted() == 0
    assert framer.pending() == (head + b"12345678", [])


# ------------------------------------------------------------ stream format version 2
def version_1_stream() -> bytes:
    """What a format version 1 writer made: xxh64 checksums, version 1 in HEADER."""
    writer = s.StreamWriter(b"fp", version=1)
    writer.add(s.dirty_round(0, 0))
    writer.finish()
    data, out, pos = writer.read(writer.pending), bytearray(), 0
    while pos < len(data):
        head = s.RecordHead.unpack(data, pos)
        payload = data[pos + s.RecordHead.SIZE:pos + s.RecordHead.SIZE + head.length]
        h = xxhash.xxh64(head.replace(checksum=0).pack()[:s.CHECKED_HEAD])
        h.update(payload)
        out += head.replace(checksum=h.intdigest()).pack() + payload
        pos += s.RecordHead.SIZE + head.length
    return bytes(out)


def test_a_version_1_stream_is_refused_by_name() -> None:
    reader = s.StreamReader(b"fp")
    with pytest.raises(s.StreamError, match="format version 1 .*xxh64") as info:
        reader.feed(version_1_stream())
    assert info.value.errno == errno.ENOTSUP


def test_a_damaged_header_is_a_checksum_mismatch_still() -> None:
    data = bytearray(version_1_stream())
    data[s.RecordHead.SIZE + 1] ^= 0x40  # the version field: not 1, not verified by xxh64
    with pytest.raises(s.StreamError, match="checksum mismatch") as info:
        s.StreamReader(b"fp").feed(bytes(data))
    assert info.value.errno == errno.EINVAL


def test_checksums_are_xxh3_64() -> None:
    writer = s.StreamWriter(b"fp")
    data = writer.read(writer.pending)
    head = s.RecordHead.unpack(data)
    payload = data[s.RecordHead.SIZE:]
    assert head.checksum == xxhash.xxh3_64(data[:s.CHECKED_HEAD] + payload).intdigest()
    assert s.StreamHeader.unpack(payload).version == s.FORMAT_VERSION == 2


def test_glibc_takes_the_large_buffer_settings() -> None:
    from appliance.runtime.allocator import keep_large_buffers

    assert keep_large_buffers()  # this machine's C library is glibc
    buffers = [bytearray(MiB) for _ in range(4)]  # served from the heap now; still usable
    assert all(len(b) == MiB for b in buffers)


def test_an_accepted_client_socket_takes_a_whole_reply(tmp_path: Path) -> None:
    import socket

    from appliance.runtime.loop import EventLoop
    from appliance.runtime.vfio_user import SEND_BUFFER, VfioUserService

    loop = EventLoop()
    ctrl = make_controller(tmp_path)
    service = VfioUserService(loop, str(tmp_path / "nvme.sock"), ctrl)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(tmp_path / "nvme.sock"))
        for _ in range(100):  # a bound: each pass waits up to 10 ms for the accept
            if service.client is not None:
                break
            loop.run_once(0.01)
        assert service.client is not None
        with open("/proc/sys/net/core/wmem_max") as f:
            cap = int(f.read())
        got = service.client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert got == 2 * min(SEND_BUFFER, cap)  # the kernel doubles what it grants
    finally:
        client.close()
        service.close()
        loop.close()
        ctrl.close()


# ------------------------------------------------------------ staging: writeback, not waits
def staged_40_mib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  started: bool) -> tuple[list[int], list[int], Staging]:
    ctrl = make_controller(tmp_path, size=64 * MiB)
    starts: list[int] = []
    syncs: list[int] = []
    real_sync = os.fdatasync

    def start(fd: int, offset: int = 0, length: int = 0) -> bool:
        starts.append(fd)
        return started

    def sync(fd: int) -> None:
        syncs.append(fd)
        real_sync(fd)

    monkeypatch.setattr(staging_module, "start_writeback", start)
    monkeypatch.setattr(os, "fdatasync", sync)
    staging = Staging(ctrl.namespaces[1])
    block = os.urandom(MiB)
    for i in range(40):
        staging.write(i * MiB, block)
    ctrl.close()
    return starts, syncs, staging


def test_staging_starts_writeback_every_16_mib_and_waits_only_when_synced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    starts, syncs, staging = staged_40_mib(tmp_path, monkeypatch, started=True)
    assert starts == [staging.fd, staging.fd] and syncs == []
    assert staging.unsynced == 40 * MiB
    staging.sync()  # a round marker or the commit: durable now
    assert syncs == [staging.fd] and staging.unsynced == 0
    staging.discard()


def test_staging_syncs_where_writeback_cannot_be_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    starts, syncs, staging = staged_40_mib(tmp_path, monkeypatch, started=False)
    assert len(starts) == 2 and syncs == [staging.fd, staging.fd]
    assert staging.unsynced == 8 * MiB
    staging.discard()


def test_start_writeback_is_linux_sync_file_range(tmp_path: Path) -> None:
    from appliance.storage.fileops import start_writeback

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, os.urandom(MiB))
        assert start_writeback(fd)
        with pytest.raises(OSError):
            start_writeback(fd, -1, 0)  # EINVAL from the kernel: raised, not ignored
    finally:
        os.close(fd)


# ------------------------------------------------------------ a MIG_DATA_READ reply, gathered
def test_a_mig_data_read_reply_is_queued_as_views_of_the_stream() -> None:
    from test_vfio_user_migration import Disk

    from appliance.vfio_user.framing import encode
    from appliance.vfio_user.migration_states import MigState
    from appliance.vfio_user.server import ServerConnection

    disk = Disk(blocks=64, fill=7)
    conn = ServerConnection(disk.dev, notify=lambda fd: None,
                            migration=disk.dev.migration_handler)
    def request(msg_id: int, command: w.Command, payload: bytes) -> list[bytes | memoryview]:
        message = encode(w.Header(msg_id=msg_id, command=command), payload)
        while message:  # as the runtime does: never more than bytes_wanted() at a time
            n = conn.bytes_wanted()
            conn.receive_data(message[:n], [])
            message = message[n:]
        conn.process()
        return [data for data, _ in conn.data_to_send()]

    request(0, w.Command.VERSION, w.VersionHead().pack() + b"{}\0")
    assert conn.migration is not None
    conn.migration.handle(w.Command.DEVICE_FEATURE, w.DeviceFeatureHead(
        argsz=16, flags=w.FEATURE_SET | w.Feature.MIG_DEVICE_STATE).pack()
        + w.MigStateData(device_state=MigState.PRE_COPY).pack())
    size = 128 * 1024
    pieces = request(1, w.Command.MIG_DATA_READ,
                     w.MigDataHead(argsz=w.MigDataHead.SIZE + size, size=size).pack())
    assert len(pieces) > 2 and any(isinstance(p, memoryview) for p in pieces)
    message = b"".join(pieces)
    head = w.Header.unpack(message)
    assert head.size == len(message) and head.flags & w.MsgFlag.REPLY and not head.error
    data = message[w.HEADER_SIZE + w.MigDataHead.SIZE:]
    assert w.MigDataHead.unpack(message, w.HEADER_SIZE).size == len(data) == size
    records = s.StreamReader(None, None).feed(data)
    assert records[0].type == RecordType.HEADER  # the stream, as written
    [reply] = request(2, w.Command.DEVICE_FEATURE, w.DeviceFeatureHead(
        argsz=16, flags=w.FEATURE_GET | w.Feature.MIG_DEVICE_STATE).pack())
    assert isinstance(reply, bytes)  # other replies: one piece, as before
    conn.close()
