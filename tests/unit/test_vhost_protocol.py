"""vhost-user back-end connection: the malformed-input catalogue and request semantics.

Each rejection must close every fd the message carried and answer with the
protocol's own error: a NACK (non-zero u64) when REPLY_ACK is negotiated and
need_reply is set on a request without a reply body, else close this connection.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct

import pytest
from test_vhost_frontend import (
    MAC_A,
    DriverRing,
    Frontend,
    GuestMemory,
    Rig,
    fd_open,
)

from appliance.errors import LocalProtocolError, RemoteProtocolError
from appliance.net import vhost_wire as vw
from appliance.net.port import OFFERED_FEATURES, VirtioNetPort
from appliance.net.vhost_protocol import (
    ALLOWED,
    OFFERED_PROTOCOL_FEATURES,
    SPECS,
    TRANSITIONS,
    BackendConnection,
    ConnState,
)
from appliance.net.vhost_wire import Feature as F
from appliance.net.vhost_wire import ProtocolFeature as PF
from appliance.net.vhost_wire import Request as R
from appliance.runtime.unix import is_eventfd


def evfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def make(owned: bool = True, reply_ack: bool = True) -> tuple[BackendConnection, Frontend, VirtioNetPort]:
    port = VirtioNetPort("net0", MAC_A)
    conn = BackendConnection(port, name="net0")
    fe = Frontend(conn)
    if owned:
        fe.send(R.SET_OWNER)
    pf = OFFERED_PROTOCOL_FEATURES if reply_ack else OFFERED_PROTOCOL_FEATURES & ~int(PF.REPLY_ACK)
    fe.u64(R.SET_PROTOCOL_FEATURES, pf)
    return conn, fe, port


def nacked(replies: list) -> bool:
    return len(replies) == 1 and replies[0].u64 != 0


# ---------------------------------------------------------------- tables
def test_state_tables_are_consistent() -> None:
    assert set(TRANSITIONS) == set(ConnState) == set(ALLOWED)
    assert R.SET_OWNER in ALLOWED[ConnState.AWAIT_OWNER]
    assert R.SET_MEM_TABLE not in ALLOWED[ConnState.AWAIT_OWNER]
    assert ALLOWED[ConnState.CLOSED] == frozenset()
    for request, spec in SPECS.items():
        assert spec.sizes is None or all(s <= vw.MAX_PAYLOAD for s in spec.sizes), request


def test_wire_sizes_match_the_spec() -> None:
    assert vw.Header.SIZE == 12
    assert vw.VringAddr.SIZE == 40 and vw.VringState.SIZE == 8
    assert vw.MemoryRegion.SIZE == 32 and vw.SingleMemoryRegion.SIZE == 40
    assert vw.NetHdr.SIZE == 12 and vw.Descriptor.SIZE == 16


def test_offers() -> None:
    _conn, fe, _ = make(owned=False)
    feats = fe.send(R.GET_FEATURES)[0].u64
    assert feats == OFFERED_FEATURES
    for f in (F.VERSION_1, F.NET_MRG_RXBUF, F.RING_INDIRECT_DESC, F.RING_EVENT_IDX, F.NET_MTU,
              F.NET_STATUS, F.NET_MQ, F.PROTOCOL_FEATURES):
        assert feats & f
    for f in (F.NET_CSUM, F.NET_GUEST_CSUM, F.NET_HOST_TSO4, F.NET_GUEST_TSO4, F.RING_PACKED):
        assert not feats & f
    pf = fe.send(R.GET_PROTOCOL_FEATURES)[0].u64
    for p in (PF.MQ, PF.REPLY_ACK, PF.STATUS, PF.MTU, PF.CONFIGURE_MEM_SLOTS, PF.LOG_SHMFD,
              PF.RARP, PF.RESET_DEVICE):
        assert pf & p
    assert all(r.header.flags == vw.REPLY_FLAGS for r in fe.replies)


# ---------------------------------------------------------------- framing
def test_short_header_then_eof_closes_and_closes_fds() -> None:
    conn, _fe, _ = make()
    fd = evfd()
    conn.receive_data(b"\x01\x00\x00", [fd])
    conn.receive_data(b"", [])
    assert conn.closed and not fd_open(fd)


def test_eof_inside_payload_closes_fds() -> None:
    conn, _fe, _ = make()
    fd = evfd()
    hdr = vw.Header(request=R.SET_VRING_KICK, size=8).pack()
    conn.receive_data(hdr, [fd])
    conn.receive_data(b"\x01\x00", [])
    conn.receive_data(b"", [])
    assert conn.closed and not fd_open(fd)


def test_oversized_payload_is_unframeable() -> None:
    conn, _fe, _ = make()
    fd = evfd()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(vw.Header(request=R.SET_FEATURES, size=vw.MAX_PAYLOAD + 1).pack(), [fd])
    assert conn.closed and not fd_open(fd)


def test_chunk_larger_than_wanted_is_refused() -> None:
    conn, _fe, _ = make()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(bytes(13), [])
    assert conn.closed


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x1 | vw.FLAG_REPLY, 0x1 | 0x10, 0x1 | 0x80000000])
def test_bad_header_flags_close(flags: int) -> None:
    conn, fe, _ = make()
    fd = evfd()
    assert fe.send(R.GET_FEATURES, flags=flags, fds=[fd]) == []
    assert conn.closed and not fd_open(fd)


def test_byte_by_byte_feed_works() -> None:
    conn, _fe, _port = make(owned=False)
    data = vw.Header(request=R.SET_OWNER).pack() + vw.Header(request=R.GET_FEATURES).pack()
    for b in data:
        assert conn.bytes_wanted() >= 1
        conn.receive_data(bytes([b]), [])
    conn.process()
    (reply,) = conn.data_to_send()
    assert vw.Header.unpack(reply).flags == vw.REPLY_FLAGS
    assert vw.U64.unpack(reply, vw.HEADER_SIZE).value == OFFERED_FEATURES


def test_random_input_never_escapes_and_fds_are_closed() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        conn, fe, _ = make(owned=rng.random() < 0.5, reply_ack=rng.random() < 0.5)
        fds = [evfd() for _ in range(rng.randrange(3))]
        request = rng.choice([*range(45), 99, 0xFFFFFFFF])
        size = rng.choice([0, 4, 8, 16, 40, 72, rng.randrange(300)])
        flags = rng.choice([1, 1 | vw.FLAG_NEED_REPLY, rng.randrange(1 << 32)])
        body = bytes(rng.randrange(256) for _ in range(size))
        try:
            fe.raw(vw.Header(request=request, flags=flags, size=size).pack() + body, fds)
        except RemoteProtocolError:
            pass
        conn.close()
        for fd in fds:
            assert not fd_open(fd), (request, size, flags)


# ---------------------------------------------------------------- allow-list and gates
def test_requests_before_set_owner() -> None:
    _conn, fe, _ = make(owned=False)
    assert fe.send(R.GET_FEATURES)[0].u64 == OFFERED_FEATURES  # allowed
    fd = evfd()
    assert nacked(fe.u64(R.SET_VRING_CALL, 0, fds=[fd], need_reply=True))
    assert not fd_open(fd)


def test_set_features_before_owner_nacked_with_reply_ack() -> None:
    conn, fe, _ = make(owned=False)
    replies = fe.u64(R.SET_FEATURES, int(F.VERSION_1), need_reply=True)
    assert nacked(replies) and not conn.closed
    fe.send(R.SET_OWNER)
    assert fe.u64(R.SET_FEATURES, int(F.VERSION_1), need_reply=True)[0].u64 == 0


def test_second_set_owner_rejected() -> None:
    _conn, fe, _ = make()
    assert nacked(fe.send(R.SET_OWNER, need_reply=True))


def test_messages_before_set_owner_close_without_reply_ack() -> None:
    conn, fe, _ = make(owned=False, reply_ack=False)
    fe.send(R.SET_MEM_TABLE, vw.MemoryHeader(nregions=0).pack())
    assert conn.closed


def test_gated_requests_need_their_protocol_feature() -> None:
    port = VirtioNetPort("net0", MAC_A, queue_pairs=2)
    conn = BackendConnection(port)
    fe = Frontend(conn)
    fe.send(R.SET_OWNER)
    fe.u64(R.SET_PROTOCOL_FEATURES, int(PF.REPLY_ACK))
    assert nacked(fe.u64(R.SET_STATUS, 1, need_reply=True))
    assert nacked(fe.u64(R.NET_SET_MTU, 1500, need_reply=True))
    assert nacked(fe.send(R.RESET_DEVICE, need_reply=True))
    fe.send(R.GET_QUEUE_NUM)  # has a reply body: rejection closes
    assert conn.closed
    conn2 = BackendConnection(port)
    fe2 = Frontend(conn2)
    fe2.u64(R.SET_PROTOCOL_FEATURES, int(PF.MQ | PF.CONFIGURE_MEM_SLOTS))
    assert fe2.send(R.GET_QUEUE_NUM)[0].u64 == 2
    assert fe2.send(R.GET_MAX_MEM_SLOTS)[0].u64 == conn2.max_mem_slots


def test_unoffered_features_rejected() -> None:
    conn, fe, _ = make()
    assert nacked(fe.u64(R.SET_FEATURES, int(F.VERSION_1 | F.NET_CSUM), need_reply=True))
    assert nacked(fe.u64(R.SET_PROTOCOL_FEATURES, int(PF.BACKEND_REQ), need_reply=True))
    assert nacked(fe.u64(R.SET_PROTOCOL_FEATURES, 1 << 40, need_reply=True))
    assert conn.features == 0


def test_unknown_and_unsupported_requests() -> None:
    conn, fe, _ = make()
    assert nacked(fe.send(99, need_reply=True))
    assert nacked(fe.send(R.SET_BACKEND_REQ_FD, need_reply=True))
    fe.send(R.GET_CONFIG, bytes(12))  # expects a reply body we cannot give: close
    assert conn.closed


def test_vring_enable_requires_protocol_features() -> None:
    port = VirtioNetPort("net0", MAC_A)
    conn = BackendConnection(port)
    fe = Frontend(conn)
    fe.send(R.SET_OWNER)
    fe.state(R.SET_VRING_ENABLE, 0, 1)
    assert conn.closed


# ---------------------------------------------------------------- sizes and fds
@pytest.mark.parametrize("request_,size", [
    (R.SET_FEATURES, 4), (R.SET_FEATURES, 16), (R.SET_VRING_NUM, 4), (R.SET_VRING_ADDR, 32),
    (R.SET_VRING_KICK, 4), (R.SET_STATUS, 0), (R.SET_OWNER, 8), (R.GET_VRING_BASE, 0),
    (R.ADD_MEM_REG, 32), (R.SET_MEM_TABLE, 4), (R.SET_MEM_TABLE, 8 + 32 + 4),
])
def test_wrong_payload_size(request_: int, size: int) -> None:
    conn, fe, _ = make()
    replies = fe.send(request_, bytes(size), need_reply=True)
    if SPECS[R(request_)].reply:
        assert conn.closed
    else:
        assert nacked(replies) and not conn.closed


def test_wrong_size_closes_without_reply_ack() -> None:
    conn, fe, _ = make(reply_ack=False)
    fe.send(R.SET_FEATURES, bytes(4))
    assert conn.closed


def test_fds_on_request_that_takes_none_are_all_closed() -> None:
    conn, fe, _ = make()
    fds = [evfd(), evfd(), evfd()]
    assert nacked(fe.state(R.SET_VRING_NUM, 0, 16, fds=fds, need_reply=True))
    assert not any(fd_open(fd) for fd in fds)
    assert not conn.closed
    fds = [evfd(), evfd()]
    fe.send(R.GET_FEATURES, fds=fds)
    assert conn.closed and not any(fd_open(fd) for fd in fds)


def test_kick_fd_count_must_match_nofd_bit() -> None:
    _conn, fe, _ = make()
    assert nacked(fe.u64(R.SET_VRING_CALL, 0, need_reply=True))  # no fd, no nofd bit
    fd = evfd()
    assert nacked(fe.u64(R.SET_VRING_CALL, 0 | vw.VRING_NOFD, fds=[fd], need_reply=True))
    assert not fd_open(fd)
    assert fe.u64(R.SET_VRING_CALL, 0 | vw.VRING_NOFD, need_reply=True)[0].u64 == 0
    fds = [evfd(), evfd()]
    assert nacked(fe.u64(R.SET_VRING_CALL, 0, fds=fds, need_reply=True))
    assert not any(fd_open(fd) for fd in fds)


def test_reserved_bits_in_vring_file_payload() -> None:
    _conn, fe, _ = make()
    fd = evfd()
    assert nacked(fe.u64(R.SET_VRING_CALL, 1 << 12, fds=[fd], need_reply=True))
    assert not fd_open(fd)


def test_vring_index_out_of_range() -> None:
    conn, fe, port = make()
    assert port.num_vrings == 2
    assert nacked(fe.state(R.SET_VRING_NUM, 2, 16, need_reply=True))
    assert nacked(fe.state(R.SET_VRING_BASE, 7, 0, need_reply=True))
    fd = evfd()
    assert nacked(fe.u64(R.SET_VRING_KICK, 5, fds=[fd], need_reply=True))
    assert not fd_open(fd)
    fe.state(R.GET_VRING_BASE, 2, 0)
    assert conn.closed


def test_vring_num_must_be_power_of_two_and_ring_stopped() -> None:
    rig = Rig()
    try:
        fe = rig.fe
        for bad in (0, 3, 100, 65536):
            assert nacked(fe.state(R.SET_VRING_NUM, 0, bad, need_reply=True)), bad
        assert nacked(fe.state(R.SET_VRING_NUM, 1, 32, need_reply=True))  # started
        assert nacked(fe.state(R.SET_VRING_BASE, 1, 0, need_reply=True))  # started
        assert nacked(fe.state(R.SET_VRING_BASE, 0, 0x10000, need_reply=True))
    finally:
        rig.close()


# ---------------------------------------------------------------- memory table
def test_ring_addresses_outside_memory() -> None:
    conn, fe, _port = make()
    mem = GuestMemory(1 << 16)
    try:
        fe.mem_table([mem])
        fe.state(R.SET_VRING_NUM, 0, 16)
        ring = DriverRing(mem, 0, 16)
        outside = vw.VringAddr(index=0, desc_user_addr=mem.uva + mem.size,
                               used_user_addr=mem.uva_of(ring.used),
                               avail_user_addr=mem.uva_of(ring.avail)).pack()
        assert nacked(fe.send(R.SET_VRING_ADDR, outside, need_reply=True))
        straddle = vw.VringAddr(index=0, desc_user_addr=mem.uva + mem.size - 16 * 8,
                                used_user_addr=mem.uva_of(ring.used),
                                avail_user_addr=mem.uva_of(ring.avail)).pack()
        assert nacked(fe.send(R.SET_VRING_ADDR, straddle, need_reply=True))
        misaligned = vw.VringAddr(index=0, desc_user_addr=mem.uva_of(ring.desc) + 8,
                                  used_user_addr=mem.uva_of(ring.used),
                                  avail_user_addr=mem.uva_of(ring.avail)).pack()
        assert nacked(fe.send(R.SET_VRING_ADDR, misaligned, need_reply=True))
        gpa_not_uva = vw.VringAddr(index=0, desc_user_addr=ring.desc, used_user_addr=ring.used,
                                   avail_user_addr=ring.avail).pack()
        assert nacked(fe.send(R.SET_VRING_ADDR, gpa_not_uva, need_reply=True))
        bad_flags = vw.VringAddr.unpack(ring.addr_payload()).replace(flags=2).pack()
        assert nacked(fe.send(R.SET_VRING_ADDR, bad_flags, need_reply=True))
        assert fe.send(R.SET_VRING_ADDR, ring.addr_payload(), need_reply=True)[0].u64 == 0
        ring.close()
    finally:
        conn.close()
        mem.close()


def test_kick_before_ring_configured_is_rejected_and_fd_closed() -> None:
    _conn, fe, _ = make()
    fd = evfd()
    assert nacked(fe.u64(R.SET_VRING_KICK, 1, fds=[fd], need_reply=True))
    assert not fd_open(fd)


def _two_regions(a: vw.MemoryRegion, b: vw.MemoryRegion) -> bytes:
    return vw.MemoryHeader(nregions=2).pack() + a.pack() + b.pack()


def test_overlapping_mem_table_regions_rejected_fds_closed_old_table_kept() -> None:
    conn, fe, _ = make()
    mem = GuestMemory(1 << 16)
    try:
        fe.mem_table([mem])
        before = conn.memory.regions
        r1 = mem.region()
        r2 = r1.replace(guest_phys_addr=r1.guest_phys_addr + 0x1000, userspace_addr=1 << 40)
        fds = [os.dup(mem.fd), os.dup(mem.fd)]
        assert nacked(fe.send(R.SET_MEM_TABLE, _two_regions(r1, r2), fds=fds, need_reply=True))
        assert not any(fd_open(fd) for fd in fds)
        assert conn.memory.regions == before
        r3 = r1.replace(guest_phys_addr=1 << 40, userspace_addr=r1.userspace_addr + 0x1000)
        fds = [os.dup(mem.fd), os.dup(mem.fd)]
        assert nacked(fe.send(R.SET_MEM_TABLE, _two_regions(r1, r3), fds=fds, need_reply=True))
        assert not any(fd_open(fd) for fd in fds)
    finally:
        conn.close()
        mem.close()


def test_mem_table_checks() -> None:
    conn, fe, _ = make()
    mem = GuestMemory(1 << 16)
    try:
        r = mem.region()
        cases = [
            (vw.MemoryHeader(nregions=0).pack(), []),
            (vw.MemoryHeader(nregions=9).pack() + r.pack() * 9, [os.dup(mem.fd) for _ in range(9)]),
            (vw.MemoryHeader(nregions=1).pack() + r.pack(), []),  # fd missing
            (vw.MemoryHeader(nregions=1).pack() + r.pack(), [os.dup(mem.fd), os.dup(mem.fd)]),
            (vw.MemoryHeader(nregions=1).pack() + r.replace(memory_size=0).pack(), [os.dup(mem.fd)]),
            (vw.MemoryHeader(nregions=1).pack() + r.replace(guest_phys_addr=(1 << 64) - 4096).pack(),
             [os.dup(mem.fd)]),
            (vw.MemoryHeader(nregions=1).pack() + r.replace(mmap_offset=100).pack(), [os.dup(mem.fd)]),
            (vw.MemoryHeader(nregions=1).pack() + r.replace(memory_size=1 << 30).pack(),
             [os.dup(mem.fd)]),  # larger than the file: mapping fails
        ]
        for body, fds in cases:
            assert nacked(fe.send(R.SET_MEM_TABLE, body, fds=fds, need_reply=True)), body[:8]
            assert not any(fd_open(fd) for fd in fds)
        # the padded 8-region form is accepted
        body = vw.MemoryHeader(nregions=1).pack() + r.pack() + bytes(32 * 7)
        assert fe.send(R.SET_MEM_TABLE, body, fds=[os.dup(mem.fd)], need_reply=True)[0].u64 == 0
        assert len(conn.memory.regions) == 1
        assert conn.memory.regions[0].user_address == mem.uva
    finally:
        conn.close()
        mem.close()


def test_add_and_remove_memory_regions() -> None:
    conn, fe, _ = make()
    a, b = GuestMemory(1 << 16), GuestMemory(1 << 16, gpa=0x400000, uva=0x7F0000400000)
    try:
        def single(m: GuestMemory) -> bytes:
            r = m.region()
            return vw.SingleMemoryRegion(guest_phys_addr=r.guest_phys_addr, memory_size=r.memory_size,
                                         userspace_addr=r.userspace_addr).pack()
        ok = fe.send(R.ADD_MEM_REG, single(a), fds=[os.dup(a.fd)], need_reply=True)
        assert ok[0].u64 == 0
        assert fe.send(R.ADD_MEM_REG, single(b), fds=[os.dup(b.fd)], need_reply=True)[0].u64 == 0
        assert len(conn.memory.regions) == 2
        fd = os.dup(a.fd)
        assert nacked(fe.send(R.ADD_MEM_REG, single(a), fds=[fd], need_reply=True))  # overlap
        assert not fd_open(fd)
        assert nacked(fe.send(R.ADD_MEM_REG, single(a), need_reply=True))  # no fd
        stray = os.dup(a.fd)
        assert fe.send(R.REM_MEM_REG, single(a), fds=[stray], need_reply=True)[0].u64 == 0
        assert not fd_open(stray)  # "the back-end MUST close it"
        assert [r.address for r in conn.memory.regions] == [b.gpa]
        assert nacked(fe.send(R.REM_MEM_REG, single(a), need_reply=True))  # gone already
    finally:
        conn.close()
        a.close()
        b.close()


def test_set_log_base_and_log_fd() -> None:
    conn, fe, _ = make()
    log = GuestMemory(1 << 14)
    try:
        fd = os.dup(log.fd)
        replies = fe.send(R.SET_LOG_BASE, vw.LogDescription(mmap_size=1 << 14).pack(), fds=[fd],
                          need_reply=True)
        assert len(replies) == 1 and replies[0].u64 == 0 and replies[0].header.flags == 0x5
        assert conn.log_mm is not None and not fd_open(fd)
        efd = evfd()
        fe.send(R.SET_LOG_FD, fds=[efd])
        assert conn.log_fd == efd
        conn.close()
        assert not fd_open(efd) and conn.log_mm is None
    finally:
        log.close()


def test_set_log_base_needs_log_shmfd() -> None:
    conn, fe, _ = make()
    fe.u64(R.SET_PROTOCOL_FEATURES, int(PF.REPLY_ACK))
    fd = evfd()
    fe.send(R.SET_LOG_BASE, vw.LogDescription(mmap_size=4096).pack(), fds=[fd], need_reply=True)
    assert conn.closed and not fd_open(fd)


# ---------------------------------------------------------------- semantics
def test_status_mtu_reset() -> None:
    rig = Rig()
    try:
        fe = rig.fe
        assert fe.send(R.GET_STATUS)[0].u64 == 0xF
        assert nacked(fe.u64(R.SET_STATUS, 0x100, need_reply=True))
        assert nacked(fe.u64(R.NET_SET_MTU, 67, need_reply=True))
        assert fe.u64(R.NET_SET_MTU, 9000, need_reply=True)[0].u64 == 0
        assert rig.port.mtu == 9000
        fe.send(R.RESET_DEVICE)
        assert not any(r.started for r in rig.port.rings)
        assert rig.port.status == 0 and rig.conn.features == 0
        assert not rig.conn.closed
    finally:
        rig.close()


def test_replies_for_need_reply_only_with_reply_ack() -> None:
    _conn, fe, _ = make(reply_ack=False)
    assert fe.u64(R.SET_FEATURES, int(F.VERSION_1), need_reply=True) == []
    _conn2, fe2, _ = make(reply_ack=True)
    assert fe2.u64(R.SET_FEATURES, int(F.VERSION_1)) == []
    assert [r.u64 for r in fe2.u64(R.SET_FEATURES, int(F.VERSION_1), need_reply=True)] == [0]


def test_get_vring_base_reply_is_a_vring_state() -> None:
    rig = Rig()
    try:
        (reply,) = rig.fe.state(R.GET_VRING_BASE, 0, 0, need_reply=True)
        assert reply.header.flags == 0x5 and reply.header.size == 8
        state = vw.VringState.unpack(reply.body)
        assert (state.index, state.num) == (0, 0)
    finally:
        rig.close()


def test_rarp_needs_unicast_mac() -> None:
    rig = Rig()
    try:
        assert nacked(rig.fe.send(R.SEND_RARP, b"\x01" + bytes(7), need_reply=True))
        assert rig.fe.send(R.SEND_RARP, MAC_A + bytes(2), need_reply=True)[0].u64 == 0
        assert rig.port.rarps == 1
    finally:
        rig.close()


def test_native_byte_order_header() -> None:
    hdr = vw.Header(request=R.GET_FEATURES, flags=1, size=0).pack()
    assert hdr == struct.pack("=III", 1, 1, 0)


# ---------------------------------------------------------------- ring fds must be eventfds
def not_eventfds() -> list[tuple[str, int]]:
    """A pipe at EOF, a regular file, a socket and a memfd: each one fd, ours to pass."""
    r, w = os.pipe()
    os.close(w)  # the read end is at end of file: readable forever
    a, b = socket.socketpair()
    b.close()
    path = os.open("/proc/self/cmdline", os.O_RDONLY)
    return [("pipe at EOF", r), ("regular file", path), ("socket", a.detach()),
            ("memfd", os.memfd_create("x"))]


@pytest.mark.parametrize("request_", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_ring_fd_that_is_not_an_eventfd_is_nacked_and_closed(request_: R) -> None:
    port = VirtioNetPort("net0", MAC_A)
    conn = BackendConnection(port, name="net0", is_eventfd=is_eventfd)
    fe = Frontend(conn)
    fe.send(R.SET_OWNER)
    fe.u64(R.SET_PROTOCOL_FEATURES, OFFERED_PROTOCOL_FEATURES)
    for what, fd in not_eventfds():
        replies = fe.u64(request_, 1, fds=[fd], need_reply=True)
        assert nacked(replies) and replies[0].u64 == errno.EBADF, what
        assert not fd_open(fd), what
    assert (port.kick[1], port.call[1], port.err[1]) == (None, None, None)
    assert fe.u64(R.SET_VRING_CALL, 1, fds=[evfd()], need_reply=True)[0].u64 == 0  # an eventfd
    assert port.call[1] is not None and not conn.closed
    conn.close()


def test_ring_fd_that_is_not_an_eventfd_closes_without_reply_ack() -> None:
    port = VirtioNetPort("net0", MAC_A)
    conn = BackendConnection(port, name="net0", is_eventfd=is_eventfd)
    fe = Frontend(conn)
    fe.send(R.SET_OWNER)
    (what, fd), *rest = not_eventfds()
    for _, other in rest:
        os.close(other)
    assert fe.u64(R.SET_VRING_KICK, 1, fds=[fd]) == []
    assert conn.closed and "not an eventfd" in conn.close_reason and not fd_open(fd), what


def test_handoff_replay_refuses_a_ring_fd_that_is_not_an_eventfd() -> None:
    port = VirtioNetPort("net0", MAC_A)
    conn = BackendConnection(port, name="net0", is_eventfd=is_eventfd)
    conn.replay(R.SET_OWNER, b"", [])
    r, w = os.pipe()
    with pytest.raises(LocalProtocolError, match="not an eventfd"):
        conn.replay(R.SET_VRING_CALL, vw.U64(value=0).pack(), [r])
    assert not fd_open(r)
    os.close(w)
    conn.close()
