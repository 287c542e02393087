"""A fake vhost-user front-end (driver side) for unit tests, and end-to-end checks with it.

``GuestMemory`` is a memfd the "guest" owns, shared with the back-end through
SET_MEM_TABLE exactly as QEMU or DPDK share theirs.  ``DriverRing`` plays the
virtio driver on one split ring in that memory (descriptors, avail ring, used
ring), and ``Frontend`` sends vhost-user messages to a ``BackendConnection``
the way the runtime would feed it (chunks of ``bytes_wanted()`` bytes).

Other test modules import these helpers from here.
"""

from __future__ import annotations

import mmap
import os
import struct
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastpath_support import PATHS, walker

from appliance.net import vhost_wire as vw
from appliance.net.port import VirtioNetPort
from appliance.net.switch import Switch
from appliance.net.vhost_protocol import BackendConnection
from appliance.net.vhost_wire import Feature as F
from appliance.net.vhost_wire import ProtocolFeature as PF
from appliance.net.vhost_wire import Request as R
from appliance.net.virtqueue import SplitQueue
from appliance.protocol_common import close_quietly

GPA_BASE = 0x100000
UVA_BASE = 0x7F0000000000
MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")


class GuestMemory:
    """One memfd region of guest memory with a bump allocator.

    ``sealable``: created with MFD_ALLOW_SEALING, as QEMU's memory-backend-memfd
    (the back-end seals it and mmaps it); False: as DPDK's ``--no-huge`` memfd
    (the back-end reaches it through the fd).
    """

    def __init__(self, size: int = 1 << 20, gpa: int = GPA_BASE, uva: int = UVA_BASE,
                 sealable: bool = True) -> None:
        self.size, self.gpa, self.uva = size, gpa, uva
        self.fd = os.memfd_create("guest", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)
        self._next = gpa

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    def alloc(self, n: int, align: int = 16) -> int:
        addr = (self._next + align - 1) // align * align
        if addr + n > self.gpa + self.size:
            raise MemoryError("guest memory exhausted")
        self._next = addr + n
        return addr

    def uva_of(self, gpa: int) -> int:
        return gpa - self.gpa + self.uva

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.gpa
        self.mm[off:off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = gpa - self.gpa
        return bytes(self.mm[off:off + n])

    def region(self, mmap_offset: int = 0) -> vw.MemoryRegion:
        return vw.MemoryRegion(guest_phys_addr=self.gpa, memory_size=self.size,
                               userspace_addr=self.uva, mmap_offset=mmap_offset)


class DriverRing:
    """The driver side of one split virtqueue in ``GuestMemory``."""

    def __init__(self, mem: GuestMemory, index: int, size: int = 16) -> None:
        self.mem, self.index, self.size = mem, index, size
        self.desc = mem.alloc(16 * size, 16)
        self.avail = mem.alloc(vw.avail_ring_size(size), 2)
        self.used = mem.alloc(vw.used_ring_size(size), 4)
        self.avail_idx = 0
        self.used_seen = 0
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            close_quietly(fd)

    # descriptors -------------------------------------------------------
    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def make_available(self, head: int) -> None:
        slot = self.avail_idx % self.size
        self.mem.write(self.avail + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value))

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0]

    def used_flags(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used, 2))[0]

    def add_buffer(self, head: int, data: bytes = b"", writable: int = 0) -> int:
        """One-descriptor chain at ``head``: readable ``data`` or ``writable`` bytes."""
        n = writable or len(data)
        buf = self.mem.alloc(max(n, 1))
        if data:
            self.mem.write(buf, data)
        self.set_desc(head, buf, n, vw.DescFlag.WRITE if writable else 0)
        self.make_available(head)
        return buf

    def add_chain(self, heads: list[int], parts: list[tuple[bytes | int, bool]]) -> list[int]:
        """A chain over descriptors ``heads``: each part readable bytes or writable size."""
        addrs = []
        for i, (part, writable) in enumerate(parts):
            n = part if isinstance(part, int) else len(part)
            buf = self.mem.alloc(max(n, 1))
            if not isinstance(part, int):
                self.mem.write(buf, part)
            flags = (vw.DescFlag.WRITE if writable else 0)
            nxt = 0
            if i + 1 < len(parts):
                flags |= vw.DescFlag.NEXT
                nxt = heads[i + 1]
            self.set_desc(heads[i], buf, n, flags, nxt)
            addrs.append(buf)
        self.make_available(heads[0])
        return addrs

    def add_indirect(self, head: int, parts: list[tuple[bytes | int, bool]]) -> list[int]:
        table = self.mem.alloc(16 * len(parts), 16)
        addrs = []
        for i, (part, writable) in enumerate(parts):
            n = part if isinstance(part, int) else len(part)
            buf = self.mem.alloc(max(n, 1))
            if not isinstance(part, int):
                self.mem.write(buf, part)
            flags = (vw.DescFlag.WRITE if writable else 0)
            if i + 1 < len(parts):
                flags |= vw.DescFlag.NEXT
            self.mem.write(table + 16 * i, struct.pack("<QIHH", buf, n, flags, i + 1))
            addrs.append(buf)
        self.set_desc(head, table, 16 * len(parts), vw.DescFlag.INDIRECT)
        self.make_available(head)
        return addrs

    # used ring ---------------------------------------------------------
    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def addr_payload(self, flags: int = 0) -> bytes:
        m = self.mem
        return vw.VringAddr(index=self.index, flags=flags, desc_user_addr=m.uva_of(self.desc),
                            used_user_addr=m.uva_of(self.used),
                            avail_user_addr=m.uva_of(self.avail)).pack()


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@dataclass
class Reply:
    header: vw.Header
    body: bytes

    @property
    def u64(self) -> int:
        return vw.U64.unpack(self.body).value


@dataclass
class Frontend:
    """Sends vhost-user requests into a BackendConnection like the runtime would."""

    conn: BackendConnection
    sent: int = 0
    replies: list[Reply] = field(default_factory=list)

    def raw(self, data: bytes, fds: list[int] | None = None) -> list[Reply]:
        """Feed raw bytes (and fds with the first chunk) in bytes_wanted() chunks."""
        fds = list(fds or [])
        pos = 0
        while pos < len(data) and not self.conn.closed:
            n = min(self.conn.bytes_wanted(), len(data) - pos)
            self.conn.receive_data(data[pos:pos + n], fds)
            fds = []
            pos += n
        for fd in fds:  # never delivered (connection closed first)
            os.close(fd)
        self.conn.process()
        out = []
        for msg in self.conn.data_to_send():
            hdr = vw.Header.unpack(msg)
            out.append(Reply(hdr, msg[vw.HEADER_SIZE:]))
        self.replies += out
        return out

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False, flags: int | None = None, size: int | None = None) -> list[Reply]:
        if flags is None:
            flags = vw.VERSION | (vw.FLAG_NEED_REPLY if need_reply else 0)
        hdr = vw.Header(request=request, flags=flags, size=len(payload) if size is None else size)
        self.sent += 1
        return self.raw(hdr.pack() + payload, fds)

    def u64(self, request: int, value: int, **kw: Any) -> list[Reply]:
        return self.send(request, vw.U64(value=value).pack(), **kw)

    def state(self, request: int, index: int, num: int, **kw: Any) -> list[Reply]:
        return self.send(request, vw.VringState(index=index, num=num).pack(), **kw)

    def mem_table(self, mems: list[GuestMemory], **kw: Any) -> list[Reply]:
        body = vw.MemoryHeader(nregions=len(mems)).pack() + b"".join(m.region().pack() for m in mems)
        return self.send(R.SET_MEM_TABLE, body, fds=[os.dup(m.fd) for m in mems], **kw)

    def negotiate(self, features: int | None = None, protocol: int | None = None) -> None:
        """SET_OWNER, GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES (DPDK's order)."""
        self.send(R.SET_OWNER)
        offered = self.send(R.GET_FEATURES)[0].u64
        pf = self.send(R.GET_PROTOCOL_FEATURES)[0].u64
        self.u64(R.SET_PROTOCOL_FEATURES, pf if protocol is None else protocol)
        want = (F.VERSION_1 | F.NET_MRG_RXBUF | F.RING_INDIRECT_DESC | F.PROTOCOL_FEATURES)
        self.u64(R.SET_FEATURES, (offered & want) if features is None else features)

    def start_ring(self, ring: DriverRing, enable: bool = True) -> None:
        reply_ack = bool(self.conn.protocol_features & PF.REPLY_ACK)
        self.state(R.SET_VRING_NUM, ring.index, ring.size)
        self.state(R.SET_VRING_BASE, ring.index, 0)
        self.send(R.SET_VRING_ADDR, ring.addr_payload())
        self.u64(R.SET_VRING_CALL, ring.index, fds=[os.dup(ring.call_fd)])
        self.u64(R.SET_VRING_KICK, ring.index, fds=[os.dup(ring.kick_fd)])
        if enable:
            self.state(R.SET_VRING_ENABLE, ring.index, 1, need_reply=reply_ack)


class Sink:
    """A switch port that records what it is given."""

    name = "sink"

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes) -> None:
        self.frames.append(frame)

    def flush(self) -> None:
        pass


class Rig:
    """A port on a switch with a sink, one connection, guest memory and ring pair 0.

    ``fastpath``: the port's data path, "python" or "native" (this module's tests
    run on both).
    """

    fastpath = "python"

    def __init__(self, size: int = 16, features: int | None = None, queue_pairs: int = 1,
                 mem_size: int = 1 << 20) -> None:
        self.switch = Switch()
        self.sink = Sink()
        self.switch.attach(self.sink)
        self.port = VirtioNetPort("net0", MAC_A, queue_pairs=queue_pairs)
        self.port.use_native(walker(self.fastpath))
        self.port.uplink = self.switch.forward
        self.port.switch = self.switch  # native: a transmit batch through switch_tx
        self.notified: list[int] = []
        self.port.notify = self.notified.append
        self.switch.attach(self.port)
        self.conn = BackendConnection(self.port, name="net0")
        self.fe = Frontend(self.conn)
        self.mem = GuestMemory(mem_size)
        self.rx = DriverRing(self.mem, 0, size)
        self.tx = DriverRing(self.mem, 1, size)
        self.fe.negotiate(features)
        self.fe.mem_table([self.mem])
        self.fe.start_ring(self.rx)
        self.fe.start_ring(self.tx)
        self.fe.u64(R.SET_STATUS, 0xF)

    def close(self) -> None:
        self.conn.close()
        self.rx.close()
        self.tx.close()
        self.mem.close()


def frame(dst: bytes = b"\xff" * 6, src: bytes = MAC_B, payload: bytes = b"x" * 46) -> bytes:
    return dst + src + b"\x08\x00" + payload


HDR = bytes(12)


# ---------------------------------------------------------------- end-to-end checks
@pytest.fixture(autouse=True, params=PATHS)
def fastpath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test of this module runs on both data paths (the port's rings)."""
    monkeypatch.setattr(Rig, "fastpath", request.param)
    return str(request.param)


def test_dpdk_like_handshake_replies_with_flags_0x5() -> None:
    rig = Rig()
    try:
        for reply in rig.fe.replies:
            assert reply.header.flags == vw.REPLY_FLAGS
        assert rig.conn.state.value == "owned"
        assert all(r.started for r in rig.port.rings)
        assert rig.port.status == 0xF
        assert rig.port.link_up
    finally:
        rig.close()


def test_tx_frame_reaches_the_switch_and_buffer_is_returned() -> None:
    rig = Rig()
    try:
        rig.tx.add_buffer(3, HDR + frame())
        assert rig.port.process_tx(1, 64) is False
        assert rig.sink.frames == [frame()]
        assert rig.tx.take_used() == [(3, 0)]
        st = rig.port.stats()
        assert (st["rx_packets"], st["rx_bytes"]) == (1, len(frame()))
    finally:
        rig.close()


def test_rx_frame_written_with_header_num_buffers() -> None:
    rig = Rig()
    try:
        buf = rig.rx.add_buffer(0, writable=2048)
        rig.port.deliver(frame())
        assert rig.rx.used_idx() == 0  # published only at flush
        rig.port.flush()
        assert rig.rx.take_used() == [(0, 12 + len(frame()))]
        data = rig.mem.read(buf, 12 + len(frame()))
        hdr = vw.NetHdr.unpack(data)
        assert hdr.num_buffers == 1 and hdr.flags == 0 and hdr.gso_type == 0
        assert data[12:] == frame()
    finally:
        rig.close()


def test_rx_merges_buffers_when_mrg_rxbuf() -> None:
    rig = Rig()
    try:
        bufs = [rig.rx.add_buffer(i, writable=32) for i in range(4)]
        f = frame(payload=bytes(range(60)))  # 74 bytes + 12 header = 86 -> 3 buffers
        rig.port.deliver(f)
        rig.port.flush()
        used = rig.rx.take_used()
        assert used == [(0, 32), (1, 32), (2, 22)]
        data = b"".join(rig.mem.read(b, n) for b, (_, n) in zip(bufs, used))
        assert vw.NetHdr.unpack(data).num_buffers == 3
        assert data[12:] == f
    finally:
        rig.close()


def test_native_path_writes_received_frames_in_one_native_call(
        fastpath: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = SplitQueue.native_receive

    def spy(q: SplitQueue, *args: Any) -> tuple[int, int]:
        calls.append(q.index)
        return real(q, *args)

    monkeypatch.setattr(SplitQueue, "native_receive", spy)
    rig = Rig()
    try:
        rig.rx.add_buffer(0, writable=32)
        rig.rx.add_buffer(1, writable=128)
        rig.port.deliver(frame())
        rig.port.flush()
        assert rig.rx.take_used() == [(0, 32), (1, 40)]  # 12 + 60 bytes
        assert calls == ([0] if fastpath == "native" else [])
    finally:
        rig.close()


def test_rx_without_mrg_drops_frames_that_do_not_fit_one_buffer() -> None:
    rig = Rig(features=int(F.VERSION_1 | F.PROTOCOL_FEATURES))
    try:
        rig.rx.add_buffer(0, writable=32)
        rig.port.deliver(frame())
        rig.port.flush()
        assert rig.rx.take_used() == [(0, 0)]
        assert rig.port.stats()["tx_dropped"] == 1
    finally:
        rig.close()


def test_rx_drop_when_no_buffers_keeps_ring_untouched() -> None:
    rig = Rig()
    try:
        rig.rx.add_buffer(0, writable=16)  # too small, and nothing else
        rig.port.deliver(frame())
        rig.port.flush()
        assert rig.rx.take_used() == []
        assert rig.port.rings[0].last_avail_idx == 0  # rolled back
        assert rig.port.stats()["tx_dropped"] == 1
    finally:
        rig.close()


def test_runtime_remap_keeps_ring_state() -> None:
    rig = Rig()
    try:
        rig.tx.add_buffer(0, HDR + frame())
        rig.port.process_tx(1, 64)
        before = rig.port.rings[1].last_avail_idx
        rig.fe.send(R.SET_VRING_ENABLE, vw.VringState(index=1, num=0).pack())
        rig.fe.mem_table([rig.mem], need_reply=True)  # same memory, new mapping
        rig.fe.send(R.SET_VRING_ENABLE, vw.VringState(index=1, num=1).pack())
        assert rig.fe.replies[-1].u64 == 0
        assert rig.port.rings[1].last_avail_idx == before and rig.port.rings[1].ready
        rig.tx.add_buffer(1, HDR + frame())
        rig.port.process_tx(1, 64)
        assert len(rig.sink.frames) == 2
        assert rig.tx.take_used() == [(0, 0), (1, 0)]
    finally:
        rig.close()


def test_get_vring_base_drains_tx_and_stops() -> None:
    rig = Rig()
    try:
        for i in range(3):
            rig.tx.add_buffer(i, HDR + frame())
        reply = rig.fe.state(R.GET_VRING_BASE, 1, 0)
        assert vw.VringState.unpack(reply[0].body).num == 3
        assert len(rig.sink.frames) == 3
        assert not rig.port.rings[1].started
        assert not fd_open(rig.port.kick[1] or -1)
    finally:
        rig.close()


def test_disabled_ring_discards_tx_and_counts() -> None:
    rig = Rig()
    try:
        rig.fe.state(R.SET_VRING_ENABLE, 1, 0)
        rig.tx.add_buffer(0, HDR + frame())
        rig.port.process_tx(1, 64)
        assert rig.sink.frames == []
        st = rig.port.stats()
        assert (st["rx_packets"], st["rx_dropped"]) == (1, 1)
        assert rig.tx.take_used() == [(0, 0)]
    finally:
        rig.close()


def test_disconnect_stops_rings_and_closes_fds() -> None:
    rig = Rig()
    kick = rig.port.kick[1]
    call = rig.port.call[1]
    assert kick is not None and call is not None
    rig.conn.close("test")
    assert not fd_open(kick) and not fd_open(call)
    assert not rig.port.connected and not any(r.started for r in rig.port.rings)
    assert rig.conn.memory.regions == ()
    rig.rx.close()
    rig.tx.close()
    rig.mem.close()


def test_send_rarp_broadcasts_from_the_given_mac() -> None:
    rig = Rig()
    try:
        rig.fe.send(R.SEND_RARP, MAC_B + bytes(2))
        (f,) = rig.sink.frames
        assert f[:6] == b"\xff" * 6 and f[6:12] == MAC_B and f[12:14] == b"\x80\x35"
    finally:
        rig.close()


def test_event_idx_suppression() -> None:
    rig = Rig(features=int(F.VERSION_1 | F.RING_EVENT_IDX | F.PROTOCOL_FEATURES
                           | F.NET_MRG_RXBUF))
    try:
        ring = rig.port.rings[1]
        assert ring.event_idx
        rig.tx.set_used_event(5)  # the driver wants an interrupt only after used idx 6
        for i in range(3):
            rig.tx.add_buffer(i, HDR + frame())
        rig.port.process_tx(1, 64)
        assert rig.notified == []
        assert rig.tx.avail_event() == 3  # kick me when you pass 3
        for i in range(3, 7):
            rig.tx.add_buffer(i, HDR + frame())
        rig.port.process_tx(1, 64)
        assert rig.notified == [rig.port.call[1]]
    finally:
        rig.close()


def test_no_interrupt_flag_suppresses_calls_without_event_idx() -> None:
    rig = Rig()
    try:
        rig.tx.set_avail_flags(vw.VRING_AVAIL_F_NO_INTERRUPT)
        rig.tx.add_buffer(0, HDR + frame())
        rig.port.process_tx(1, 64)
        assert rig.notified == []
        rig.tx.set_avail_flags(0)
        rig.tx.add_buffer(1, HDR + frame())
        rig.port.process_tx(1, 64)
        assert rig.notified == [rig.port.call[1]]
    finally:
        rig.close()


def test_kicks_suppressed_while_work_remains() -> None:
    rig = Rig()
    try:
        for i in range(5):
            rig.tx.add_buffer(i, HDR + frame())
        assert rig.port.process_tx(1, 2) is True
        assert rig.tx.used_flags() == vw.VRING_USED_F_NO_NOTIFY
        assert rig.port.process_tx(1, 64) is False
        assert rig.tx.used_flags() == 0
    finally:
        rig.close()


def test_multiqueue_pairs() -> None:
    rig = Rig(queue_pairs=2)
    try:
        assert rig.fe.send(R.GET_QUEUE_NUM)[0].u64 == 2
        rx1, tx1 = DriverRing(rig.mem, 2, 16), DriverRing(rig.mem, 3, 16)
        rig.fe.start_ring(rx1)
        rig.fe.start_ring(tx1)
        tx1.add_buffer(0, HDR + frame())
        rig.port.process_tx(3, 64)
        assert rig.sink.frames == [frame()]
        for i in range(4):
            rig.rx.add_buffer(i, writable=2048)
            rx1.add_buffer(i, writable=2048)
        for i in range(64):  # different MAC pairs spread over both receive queues
            rig.port.deliver(frame(src=bytes([2, 0, 0, 0, 0, i])))
        rig.port.flush()
        assert rig.rx.take_used() and rx1.take_used()
        st = rig.port.stats()
        assert [q["kind"] for q in st["queues"]] == ["rx", "tx", "rx", "tx"]
        assert st["queues"][3]["packets"] == 1
        rx1.close()
        tx1.close()
    finally:
        rig.close()


def test_bad_tx_chains_and_headers() -> None:
    rig = Rig()
    try:
        rig.tx.add_chain([0, 1], [(HDR + frame(), False), (64, True)])  # writable part on TX
        gso = bytes([0, 1]) + bytes(10)  # gso_type TCPV4, never offered
        rig.tx.add_buffer(2, gso + frame())
        csum = bytes([1]) + bytes(11)  # NEEDS_CSUM, never offered
        rig.tx.add_buffer(3, csum + frame())
        rig.tx.add_buffer(4, HDR + b"runt")
        rig.tx.add_buffer(5, b"short")  # not even a header
        rig.port.process_tx(1, 64)
        assert rig.sink.frames == []
        st = rig.port.stats()
        assert st["malformed_chains"] == 2
        assert (st["rx_packets"], st["rx_dropped"]) == (3, 3)
        assert sorted(h for h, _ in rig.tx.take_used()) == [0, 2, 3, 4, 5]
    finally:
        rig.close()


def test_indirect_tx_chain() -> None:
    rig = Rig()
    try:
        rig.tx.add_indirect(0, [(HDR, False), (frame(), False)])
        rig.port.process_tx(1, 64)
        assert rig.sink.frames == [frame()]
    finally:
        rig.close()


def test_legacy_header_without_version_1_or_mrg() -> None:
    rig = Rig(features=int(F.PROTOCOL_FEATURES))
    try:
        assert rig.port.hdr_len == 10
        rig.tx.add_buffer(0, bytes(10) + frame())
        rig.port.process_tx(1, 64)
        assert rig.sink.frames == [frame()]
        buf = rig.rx.add_buffer(0, writable=2048)
        rig.port.deliver(frame())
        rig.port.flush()
        assert rig.rx.take_used() == [(0, 10 + len(frame()))]
        assert rig.mem.read(buf + 10, len(frame())) == frame()
    finally:
        rig.close()


def test_reset_owner_keeps_features_and_memory() -> None:
    rig = Rig(features=int(F.VERSION_1 | F.RING_EVENT_IDX | F.RING_INDIRECT_DESC
                           | F.PROTOCOL_FEATURES | F.NET_MRG_RXBUF))
    try:
        rig.fe.send(R.RESET_OWNER)
        assert not any(r.started for r in rig.port.rings)
        assert all(r.event_idx and r.indirect for r in rig.port.rings)
        assert rig.conn.memory.regions
        rig.fe.start_ring(rig.tx)  # restart works without a new memory table
        rig.tx.add_indirect(0, [(HDR, False), (frame(), False)])
        rig.port.process_tx(1, 64)
        assert rig.sink.frames == [frame()]
    finally:
        rig.close()


# ---------------------------------------------------------------- guest-controlled sizes
def whole_memory_indirect(ring: DriverRing, head: int, n: int, flags: int = 0) -> None:
    """Make ``head`` an indirect chain of ``n`` descriptors, each naming all of guest memory."""
    mem = ring.mem
    table = mem.alloc(16 * n, 16)
    mem.write(table, b"".join(
        struct.pack("<QIHH", mem.gpa, mem.size, flags | (vw.DescFlag.NEXT if i + 1 < n else 0), i + 1)
        for i in range(n)))
    ring.set_desc(head, table, 16 * n, vw.DescFlag.INDIRECT)
    ring.make_available(head)


@pytest.mark.parametrize(("queue", "entries"), [(256, 256), (4096, 4096), (256, 4096)])
def test_tx_chain_naming_gigabytes_is_refused_before_a_byte_is_read(queue: int, entries: int) -> None:
    """256 x 4 MiB asks for 1 GiB, 4096 x 4 MiB for 16 GiB: the walker stops at the
    second descriptor (past header + max frame); a table longer than the queue is
    refused by its count.  Either way: malformed, returned with length 0, and the
    next chain goes through."""
    rig = Rig(size=queue, mem_size=4 << 20)
    try:
        whole_memory_indirect(rig.tx, 0, entries)
        rig.tx.add_buffer(1, HDR + frame())
        tracemalloc.start()
        try:
            rig.port.process_tx(1, 64)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, peak
        assert rig.sink.frames == [frame()]
        assert rig.tx.take_used() == [(0, 0), (1, 0)]
        assert rig.port.stats()["malformed_chains"] == 1
        error = rig.port.rings[1].last_error
        assert ("indirect table" in error) if entries > queue else ("readable buffers exceed" in error)
    finally:
        rig.close()


def test_tx_limit_follows_the_mtu_the_front_end_told() -> None:
    """NET_SET_MTU binds a driver that negotiated VIRTIO_NET_F_MTU: header + MTU +
    18 (Ethernet + VLAN) readable bytes pass, one more is malformed."""
    feats = int(F.VERSION_1 | F.NET_MRG_RXBUF | F.PROTOCOL_FEATURES | F.NET_MTU)
    rig = Rig(features=feats)
    try:
        assert rig.port.max_frame == 65535 + 18  # told nothing yet
        rig.fe.u64(R.NET_SET_MTU, 1500)
        assert rig.port.max_frame == 1518
        rig.tx.add_buffer(0, HDR + frame(payload=bytes(1518 - 14)))
        rig.tx.add_buffer(1, HDR + frame(payload=bytes(1519 - 14)))
        rig.port.process_tx(1, 64)
        assert [len(f) for f in rig.sink.frames] == [1518]
        assert rig.port.stats()["malformed_chains"] == 1
    finally:
        rig.close()


def test_tx_limit_without_negotiated_mtu_is_the_largest_frame() -> None:
    rig = Rig(mem_size=4 << 20)
    try:
        rig.fe.u64(R.NET_SET_MTU, 1500)  # told, but the driver did not negotiate F_MTU
        rig.tx.add_buffer(0, HDR + frame(payload=bytes(9000)))
        rig.tx.add_buffer(1, HDR + frame(payload=bytes(65535 + 18 - 14)))
        rig.tx.add_buffer(2, HDR + frame(payload=bytes(65535 + 18 - 13)))
        rig.port.process_tx(1, 64)
        assert [len(f) for f in rig.sink.frames] == [9014, 65553]
        assert rig.port.stats()["malformed_chains"] == 1
    finally:
        rig.close()


def test_rx_chain_naming_gigabytes_costs_only_the_frame() -> None:
    """A receive chain whose writable buffers name 1 GiB gets the header and frame
    written and nothing allocated for the rest; a readable receive chain is malformed."""
    rig = Rig(size=256, mem_size=4 << 20)
    try:
        rig.rx.add_buffer(0, b"readable")  # device-readable on a receive ring
        whole_memory_indirect(rig.rx, 1, 256, vw.DescFlag.WRITE)
        tracemalloc.start()
        try:
            rig.port.deliver(frame())
            rig.port.flush()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, peak
        assert rig.rx.take_used() == [(0, 0), (1, 12 + len(frame()))]
        assert rig.mem.read(rig.mem.gpa + 12, len(frame())) == frame()
        assert rig.port.stats()["malformed_chains"] == 1
    finally:
        rig.close()
