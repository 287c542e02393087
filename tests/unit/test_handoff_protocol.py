"""The live-handoff pieces below the runtime: frames, the manifest record, a vfio-user
connection exported and adopted in-process, the doorbell page taken over."""

from __future__ import annotations

import errno
import json
import mmap
import os
from typing import Any

import pytest
from test_vfio_user_migration import Disk, handler, refused, set_state, write

from appliance.errors import LocalProtocolError
from appliance.pci import Bar, MsixLayout, PciDevice
from appliance.runtime.handoff import frames as ho
from appliance.runtime.handoff.manifest import VfioUserState
from appliance.storage.doorbells import PAGE_OFFSET, DoorbellPage
from appliance.vfio_user import wire as w
from appliance.vfio_user.handoff_state import ConnectionState
from appliance.vfio_user.migration_states import MigState
from appliance.vfio_user.migration_stream import (
    HeaderFlag,
    Record,
    RecordType,
    StreamError,
    StreamReader,
    StreamWriter,
)
from appliance.vfio_user.server import ServerConnection


# ------------------------------------------------------------ frames and the manifest
def test_frame_round_trip_and_refusals() -> None:
    raw = ho.frame(ho.FrameKind.DATA, b"abc")
    head = ho.parse_head(raw[:ho.FrameHead.SIZE], 0)
    assert (head.kind, head.length, raw[ho.FrameHead.SIZE:]) == (ho.FrameKind.DATA, 3, b"abc")
    fds = ho.frame(ho.FrameKind.FDS, nfds=3)
    assert ho.parse_head(fds, 3).nfds == 3
    assert ho.parse_head(ho.frame(ho.FrameKind.DONE), 0).kind == ho.FrameKind.DONE
    cases = [
        (b"XXXX" + fds[4:], 3, "magic"),
        (ho.FrameHead(kind=9).pack(), 0, "kind"),
        (ho.FrameHead(kind=ho.FrameKind.DATA, length=ho.MAX_FRAME + 1).pack(), 0, "bytes"),
        (ho.FrameHead(kind=ho.FrameKind.FDS, nfds=1, length=4).pack(), 1, "bytes"),
        (fds, 2, "announced 3 fds, 2 came"),
        (ho.FrameHead(kind=ho.FrameKind.DATA, nfds=1).pack(), 1, "announced"),
        (ho.FrameHead(kind=ho.FrameKind.FDS, nfds=251).pack(), 251, "251 fds"),
        (ho.FrameHead(kind=ho.FrameKind.DONE, length=1).pack(), 0, "frame of 1 bytes"),
        (ho.FrameHead(kind=ho.FrameKind.DONE, nfds=1).pack(), 1, "announced"),
    ]
    for data, nfds, why in cases:
        with pytest.raises(ho.HandoffError, match=why):
            ho.parse_head(data, nfds)


def small_manifest(nfds: int = 2) -> ho.Manifest:
    """A manifest of a process with no client, no doorbell page, no net ports."""
    return ho.Manifest(ho.HANDOFF_VERSION, nfds, VfioUserState("/run/a.sock", 0, 1, 0, None),
                       None, None, None)


def json_record(obj: Any) -> Record:
    return Record(RecordType.HANDOFF, json.dumps(obj).encode())


def test_manifest_record_is_checked() -> None:
    good = small_manifest()
    assert ho.parse_handoff(ho.handoff_record(good), 2) == good
    with pytest.raises(ho.HandoffError, match="names 2 fds, 1 came"):
        ho.parse_handoff(ho.handoff_record(good), 1)
    with pytest.raises(ho.HandoffError, match="version"):
        ho.parse_handoff(json_record({**good.to_json(), "version": 99}), 2)
    with pytest.raises(ho.HandoffError, match="not an object"):
        ho.parse_handoff(Record(RecordType.HANDOFF, b"[1, 2]"), 2)
    with pytest.raises(ho.HandoffError, match="manifest"):
        ho.parse_handoff(Record(RecordType.HANDOFF, b"{nope"), 2)


def test_handoff_record_rides_the_stream_once_and_checksummed() -> None:
    writer = StreamWriter(b"fp", flags=HeaderFlag.SHARED_STORAGE)
    writer.add(ho.handoff_record(small_manifest()))
    writer.finish()
    data = bytearray(writer.read(1 << 20))
    got = StreamReader(b"fp", HeaderFlag.SHARED_STORAGE).feed(bytes(data))
    assert [r.type for r in got] == [RecordType.HEADER, RecordType.HANDOFF, RecordType.END]
    data[-30] ^= 1  # inside the HANDOFF record's payload or the END record
    with pytest.raises(StreamError):
        StreamReader(b"fp", HeaderFlag.SHARED_STORAGE).feed(bytes(data))
    twice = StreamWriter(b"fp")
    twice.add(ho.handoff_record(small_manifest()))
    twice.add(ho.handoff_record(small_manifest()))
    with pytest.raises(StreamError, match="second HANDOFF"):
        StreamReader(b"fp").feed(twice.read(1 << 20))


def test_a_vfio_user_migration_stream_refuses_a_handoff_record() -> None:
    disk = Disk()
    h = handler(disk)
    set_state(h, MigState.RESUMING)
    writer = StreamWriter(disk.migration_fingerprint())
    writer.add(ho.handoff_record(small_manifest()))
    refused(errno.EINVAL, write, h, writer.read(1 << 20))


# ------------------------------------------------------------ a connection moves
class Card(PciDevice):
    def __init__(self) -> None:
        super().__init__(vendor_id=0xA9A9, device_id=1, subsystem_vendor_id=0xA9A9, subsystem_id=1,
                         revision=0, class_code=0x010802, bars=[Bar(0, 0x4000, is_64bit=True)],
                         msix=MsixLayout(vectors=4))


def connection() -> ServerConnection:
    return ServerConnection(Card(), notify=lambda fd: None)


def ready(conn: ServerConnection) -> None:
    body = w.VersionHead(major=0, minor=0).pack() + json.dumps(
        {"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 65536}}).encode() + b"\0"
    conn._transition("version")
    conn._apply_client_caps(json.loads(body[w.VersionHead.SIZE:-1])["capabilities"])


def readback(state: ConnectionState | dict[str, Any], fds: list[int]) -> ConnectionState:
    """A connection state as a destination reads it: through JSON and its checker."""
    obj = state.to_json() if isinstance(state, ConnectionState) else state
    return ConnectionState.from_json(json.loads(json.dumps(obj)), len(fds))


def exported() -> tuple[ServerConnection, ConnectionState, list[int], int]:
    src = connection()
    ready(src)
    memfd = os.memfd_create("guest")
    os.ftruncate(memfd, 0x4000)
    src.memory.map(0x10000, 0x4000, fd=os.dup(memfd))
    src.memory.map(0x40000, 0x1000)  # reached through DMA messages: no fd
    src.irq_fds[(int(w.PciIrq.MSIX), 1)] = os.eventfd(0)
    src.irq_enabled[int(w.PciIrq.MSIX)] = 4
    fds: list[int] = []
    return src, src.handoff_export(fds), fds, memfd


def test_a_connection_is_exported_and_adopted() -> None:
    src, state, fds, memfd = exported()
    dst = connection()
    dst.handoff_adopt(readback(state, fds), fds)
    assert dst.client_max_msg_fds == 8 and dst.client_max_data_xfer_size == 65536
    regions = dst.memory.regions
    assert [(r.address, r.size, r.fd is not None) for r in regions] == [
        (0x10000, 0x4000, True), (0x40000, 0x1000, False)]
    dst.memory.write(0x10000, b"shared")  # the same pages as the client's memfd
    assert os.pread(memfd, 6, 0) == b"shared"
    assert set(dst.irq_fds) == {(int(w.PciIrq.MSIX), 1)}
    assert dst.irq_fds[(int(w.PciIrq.MSIX), 1)] not in fds  # duplicated, not borrowed
    src.handoff_release()
    assert src.closed and not src.memory.regions and not src.irq_fds
    dst.close()
    os.close(memfd)


@pytest.mark.parametrize(("change", "why"), [
    (lambda s: s["regions"][0].update(fd=99), "fd index 99"),
    (lambda s: s["regions"][1].update(address=0x10000), "overlaps"),
    (lambda s: s["irq_fds"].append([int(w.PciIrq.MSIX), 40, 0]), "out of range"),
    (lambda s: s["irq_enabled"].append([int(w.PciIrq.MSIX), 99]), "enabled"),
    (lambda s: s["caps"].update(max_msg_fds=0), "max_msg_fds"),
    (lambda s: s.update(next_id=1 << 20), "next_id"),
    (lambda s: s.pop("regions"), "regions"),
])
def test_a_bad_state_is_refused_and_leaves_the_connection_fresh(change: Any, why: str) -> None:
    _, exported_state, fds, memfd = exported()
    state = json.loads(json.dumps(exported_state.to_json()))
    change(state)
    dst = connection()
    with pytest.raises(LocalProtocolError, match=why):
        dst.handoff_adopt(readback(state, fds), fds)
    assert not dst.memory.regions and not dst.irq_fds and not dst.closed
    assert dst.state.value == "await-version"
    os.close(memfd)


def test_a_half_message_moves_with_its_fds() -> None:
    src = connection()
    ready(src)
    msg = w.Header(msg_id=7, command=w.Command.DEVICE_RESET, size=w.HEADER_SIZE).pack()
    src.receive_data(msg[:10], [])
    fds: list[int] = []
    state = src.handoff_export(fds)
    dst = connection()
    dst.handoff_adopt(state, fds)
    dst.receive_data(msg[10:], [])
    dst.process()
    [(reply, _)] = dst.data_to_send()
    head = w.Header.unpack(reply)
    assert head.msg_id == 7 and head.flags & w.MsgFlag.REPLY and not head.flags & w.MsgFlag.ERROR


def test_adopt_only_on_a_fresh_connection() -> None:
    _, state, fds, memfd = exported()
    dst = connection()
    ready(dst)
    with pytest.raises(LocalProtocolError, match="used connection"):
        dst.handoff_adopt(state, fds)
    os.close(memfd)


# ------------------------------------------------------------ the doorbell page moves
def test_doorbell_page_taken_over_keeps_the_host_writes() -> None:
    a, b = DoorbellPage(), DoorbellPage()
    a.store(8, 5)  # a doorbell the source latched
    seen = bytes(a.seen)
    host = mmap.mmap(a.fd, 0x1000, offset=PAGE_OFFSET)  # the client's mapping
    host[8:12] = (6).to_bytes(4, "little")  # rung while the source was stopped
    fd_before = b.fd
    b.take_over(a.fd, seen)
    assert b.fd == fd_before  # the BAR's fd number stays valid
    assert b.changed(16) == [(2, 6)]  # the ring after the source's last scan shows up
    host[8:12] = (7).to_bytes(4, "little")
    assert b.changed(16) == [(2, 7)]  # the same pages as the client's
    host.close()
    a.close()
    b.close()
