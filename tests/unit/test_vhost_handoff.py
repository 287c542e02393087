"""Live handoff of vhost-user-net connections between two NetServices.

Both services run in this process on two EventLoops, with the same net
configuration but their own socket paths.  The front-end (SockFrontend over a
real unix socket, rings in a memfd) talks to A; A quiesces and exports; the
fds travel through a real socketpair with SCM_RIGHTS and the state through
JSON; B checks and imports; A lets go.  The front-end, with the same socket
and rings, then carries on through B.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_vhost_frontend import fd_open
from test_vhost_runtime import Guest, SockFrontend, cfg, frame, pump

import appliance.runtime.vhost_session as rt
from appliance.config import NetConfig
from appliance.errors import ApplianceError
from appliance.net import vhost_wire as vw
from appliance.net.responder import EthHeader, IcmpEcho, Ipv4Header, internet_checksum
from appliance.net.vhost_wire import Feature as F
from appliance.net.vhost_wire import ProtocolFeature as PF
from appliance.net.vhost_wire import Request as R
from appliance.runtime import unix
from appliance.runtime.handoff.net import NetState
from appliance.runtime.loop import EventLoop
from appliance.runtime.vhost_user import NetService

GUEST_MAC = bytes.fromhex("525400aa0001")
GUEST_IP = bytes([10, 0, 2, 15])
RESP_MAC = bytes.fromhex("525400000202")
RESP_IP = bytes([10, 0, 2, 2])


def arp_request() -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, GUEST_IP, bytes(6), RESP_IP)
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + arp


def ping(seq: int) -> bytes:
    data = bytes(range(32))
    echo = IcmpEcho(type=8, ident=0x4242, sequence=seq)
    echo.checksum = internet_checksum(echo.pack() + data)
    payload = echo.pack() + data
    ip = Ipv4Header(total_length=20 + len(payload), protocol=1, src=GUEST_IP, dst=RESP_IP)
    ip.checksum = internet_checksum(ip.pack())
    return EthHeader(dst=RESP_MAC, src=GUEST_MAC, ethertype=0x0800).pack() + ip.pack() + payload


def reply_seq(frame_: bytes) -> int:
    """The sequence number of an ICMP echo reply for us (asserts it is one)."""
    assert frame_[:6] == GUEST_MAC and frame_[12:14] == b"\x08\x00" and frame_[34] == 0
    return int(struct.unpack_from("!H", frame_, 40)[0])


class HGuest(Guest):
    """A guest whose receive buffers are posted again once read."""

    def replies(self) -> list[bytes]:
        out = []
        for head, n in self.rx.take_used():
            buf = self.rx_bufs[head]
            out.append(self.mem.read(buf, n)[12:])
            self.rx.set_desc(head, buf, 2048, vw.DescFlag.WRITE)
            self.rx.make_available(head)
        return out


def port(net: NetService) -> dict[str, Any]:
    return net.stats()["ports"]["net0"]


def exchange(g: HGuest, net: NetService, loop: EventLoop, seqs: range) -> None:
    """Ping the responder once per ``seqs`` through ``net``; every reply arrives."""
    for seq in seqs:
        want = port(net)["tx_packets"] + 1
        g.transmit(ping(seq))
        pump(loop, lambda: port(net)["tx_packets"] == want)  # noqa: B023 - used at once
        assert [reply_seq(f) for f in g.replies()] == [seq]


ANY_FDS = 1 << 16  # the fd count a check without fds assumes


def as_state(state: NetState | dict[str, Any], fds: list[int] | None) -> NetState:
    """A state as the destination reads it: JSON through the manifest's checker."""
    if isinstance(state, NetState):
        return state
    return NetState.from_json(state, ANY_FDS if fds is None else len(fds))


def check(svc: NetService, state: NetState | dict[str, Any], fds: list[int] | None = None) -> None:
    """The destination's check of a state (read from JSON first)."""
    svc.handoff_check(as_state(state, fds), fds)


def adopt(svc: NetService, state: NetState | dict[str, Any], fds: list[int],
          serve: bool = True) -> None:
    """The destination's import of a state (read from JSON first)."""
    svc.handoff_import(as_state(state, fds), fds, serve=serve)


def transfer(state: NetState, fds: list[int]) -> tuple[dict[str, Any], list[int]]:
    """The state through JSON, the fds through a socketpair with SCM_RIGHTS."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unix.send_message(ours, b"x", fds)
        data, received = unix.recv_chunk(theirs, 1, max(len(fds), 1))
    finally:
        ours.close()
        theirs.close()
    assert data == b"x" and len(received) == len(fds)
    return json.loads(json.dumps(state.to_json())), received


def hand_over(a: NetService, b: NetService, serve: bool = True) -> dict[str, Any]:
    """A quiesces and exports, B imports (fds through SCM_RIGHTS), A lets go."""
    a.handoff_quiesce()
    fds: list[int] = []
    state, received = transfer(a.handoff_export(fds), fds)
    adopt(b, state, received, serve=serve)
    close_all(received)
    a.handoff_release()
    return state


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def open_fds() -> set[str]:
    gc.collect()  # sockets earlier tests dropped unclosed must not close mid-comparison
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def loops() -> Iterator[tuple[EventLoop, EventLoop]]:
    a, b = EventLoop(), EventLoop()
    yield a, b
    a.close()
    b.close()


def services(tmp_path: Path, loops: tuple[EventLoop, EventLoop], *modes: str,
             b_cfg: NetConfig | None = None, **kw: Any) -> tuple[NetService, NetService]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = NetService(loops[0], cfg(tmp_path / "a", *modes))
    b = NetService(loops[1], b_cfg or cfg(tmp_path / "b", *modes), **kw)
    return a, b


def snapshot(net: NetService) -> str:
    st = net.stats()
    for p in st["ports"].values():
        p.pop("protocol", None)
    return json.dumps(st, sort_keys=True)


# ---------------------------------------------------------------- the handoff
def test_live_connection_moves_to_the_other_process(tmp_path: Path,
                                                    loops: tuple[EventLoop, EventLoop]) -> None:
    loop_a, loop_b = loops
    a, b = services(tmp_path, loops)
    path_a, path_b = str(tmp_path / "a" / "p0.sock"), str(tmp_path / "b" / "p0.sock")
    g = HGuest(loop_a, path_a).setup()
    n, m = 6, 7
    try:
        g.transmit(arp_request())
        pump(loop_a, lambda: port(a)["tx_packets"] == 1)
        assert g.replies()[0][20:22] == b"\x00\x02"  # ARP reply
        exchange(g, a, loop_a, range(1, n))
        assert port(a)["rx_packets"] == n and port(a)["tx_packets"] == n

        a.handoff_quiesce()
        g.transmit(ping(n))  # kicked while quiesced: B serves it
        for _ in range(5):
            loop_a.run_once(0.01)
        assert port(a)["rx_packets"] == n
        assert os.eventfd_read(g.rx.call_fd) >= 1  # clear: B's first call is its own
        fds: list[int] = []
        state = a.handoff_export(fds)
        a_copies = [a.services[0].session.sock.fileno(), *fds]  # type: ignore[union-attr]
        state, received = transfer(state, fds)
        check(b, state)
        adopt(b, state, received)
        close_all(received)
        a.handoff_release()
        assert not any(fd_open(fd) for fd in a_copies)
        assert os.path.exists(path_a) and not os.path.exists(path_b)

        g.fe.loop = loop_b
        pump(loop_b, lambda: port(b)["tx_packets"] == n + 1)
        assert [reply_seq(f) for f in g.replies()] == [n]
        assert os.eventfd_read(g.rx.call_fd) >= 1  # B interrupted the driver
        exchange(g, b, loop_b, range(n + 1, n + 1 + m))

        total = n + 1 + m  # the ARP and the pings, each with its reply
        st = b.stats()
        assert st["ports"]["net0"]["rx_packets"] == total
        assert st["ports"]["net0"]["tx_packets"] == total
        assert st["ports"]["net0"]["connections"] == 1
        assert st["ports"]["net0"]["rx_dropped"] == st["ports"]["net0"]["tx_dropped"] == 0
        assert st["responder"]["arp_replies"] == 1 and st["responder"]["icmp_replies"] == total - 1
        assert st["switch"]["frames"] == 2 * total
        assert st["switch"]["table"]["52:54:00:aa:00:01"] == "net0"
        # The front-end's socket is B's: requests with replies, answered by B.
        assert g.fe.call(R.GET_STATUS) == 0xF
        assert g.fe.call(R.GET_FEATURES) == a.services[0].port.device_features()
        # A's path is served by B: one front-end at a time.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path_a)
        other = SockFrontend(loop_b, sock)
        pump(loop_b, other.closed_by_peer)
        other.sock.close()
        # A's exit changes nothing the front-end sees.
        a.close()
        loop_a.run_once(0)
        assert os.path.exists(path_a) and not g.fe.closed_by_peer()
        exchange(g, b, loop_b, range(100, 102))
        g.fe.send(R.GET_VRING_BASE, vw.VringState(index=1, num=0).pack())
        _, body = g.fe.reply()
        assert vw.VringState.unpack(body).num == total + 2  # the ring's avail index continued
    finally:
        g.close()
        a.close()
        b.close()


def test_request_half_read_by_the_source_is_finished_by_the_destination(
        tmp_path: Path, loops: tuple[EventLoop, EventLoop]) -> None:
    loop_a, loop_b = loops
    a, b = services(tmp_path, loops)
    g = HGuest(loop_a, str(tmp_path / "a" / "p0.sock")).setup()
    try:
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        msg = vw.Header(request=R.SET_VRING_CALL, flags=vw.VERSION, size=8).pack()
        g.fe.sock.sendmsg([msg[:5]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       struct.pack("i", call))])
        pump(loop_a, lambda: bool(a.services[0].session.conn.pending_input()[0]))  # type: ignore[union-attr]
        a.handoff_quiesce()
        fds: list[int] = []
        state, received = transfer(a.handoff_export(fds), fds)
        assert bytes.fromhex(state["ports"][0]["session"]["partial"]) == msg[:5]
        adopt(b, state, received)
        close_all(received)
        a.handoff_release()
        g.fe.loop = loop_b
        g.fe.sock.sendall(msg[5:] + vw.U64(value=0).pack())  # ring 0 takes the new call fd
        messages = b.services[0].session.conn.counters["messages"]  # type: ignore[union-attr]
        pump(loop_b, lambda: b.services[0].session.conn.counters["messages"]  # type: ignore[union-attr]
             == messages + 1)
        new = b.services[0].port.call[0]
        assert new is not None
        os.eventfd_write(new, 7)  # B's copy and ours are one eventfd (all share an inode)
        assert os.eventfd_read(call) == 7
        assert g.fe.call(R.GET_STATUS) == 0xF
        os.close(call)
    finally:
        g.close()
        a.close()
        b.close()


def test_failed_handoff_resumes_the_source_with_exact_counters(
        tmp_path: Path, loops: tuple[EventLoop, EventLoop]) -> None:
    loop_a, loop_b = loops
    a, b = services(tmp_path, loops)
    g = HGuest(loop_a, str(tmp_path / "a" / "p0.sock")).setup()
    try:
        exchange(g, a, loop_a, range(3))
        a.handoff_quiesce()
        g.transmit(ping(3))  # waits in the ring, its kick in the eventfd
        fds: list[int] = []
        state, received = transfer(a.handoff_export(fds), fds)
        state["ports"][0]["session"]["vrings"][1]["desc"] = 0x7F00_0000_0000 + (64 << 20)
        before, b_before, b_fds = snapshot(a), snapshot(b), open_fds()
        with pytest.raises(ApplianceError, match="net0: SET_VRING_ADDR refused: .*outside"):
            adopt(b, state, received)
        assert snapshot(b) == b_before and open_fds() == b_fds
        close_all(received)
        a.handoff_resume()
        pump(loop_a, lambda: port(a)["tx_packets"] == 4)
        assert [reply_seq(f) for f in g.replies()] == [3]
        exchange(g, a, loop_a, range(4, 6))
        st = json.loads(before)["ports"]["net0"]
        assert (st["rx_packets"], st["tx_packets"]) == (3, 3)
        assert port(a)["rx_packets"] == port(a)["tx_packets"] == 6
        assert a.stats()["responder"]["icmp_replies"] == 6
        assert g.fe.call(R.GET_STATUS) == 0xF  # A's socket serves requests again
        # B was left as it was: it still serves its own path
        g2 = HGuest(loop_b, str(tmp_path / "b" / "p0.sock")).setup()
        exchange(g2, b, loop_b, range(1))
        g2.close()
    finally:
        g.close()
        a.close()
        b.close()


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize(("change", "match"), [
    ({"mac": "52:54:00:00:00:09"}, r"net.ports\[0\].mac differs"),
    ({"queues": 2}, r"net.ports\[0\].queues differs"),
    ({"mode": "client"}, r"net.ports\[0\].mode differs"),
])
def test_check_refuses_another_configuration(tmp_path: Path, loops: tuple[EventLoop, EventLoop],
                                            change: dict[str, Any], match: str) -> None:
    other = cfg(tmp_path / "b", first=change)
    a, b = services(tmp_path, loops, b_cfg=other, standby=True)
    g = HGuest(loops[0], str(tmp_path / "a" / "p0.sock")).setup()
    try:
        a.handoff_quiesce()
        fds: list[int] = []
        state = a.handoff_export(fds)
        with pytest.raises(ApplianceError, match=match):
            check(b, state)
        a.handoff_resume()
    finally:
        g.close()
        a.close()
        b.close()


def test_check_refuses_port_counts_and_connected_ports(tmp_path: Path,
                                                       loops: tuple[EventLoop, EventLoop]) -> None:
    a, b = services(tmp_path, loops)
    two = NetService(loops[1], cfg(tmp_path / "c", "server", "server"))
    g = HGuest(loops[0], str(tmp_path / "a" / "p0.sock")).setup()
    gb = HGuest(loops[1], str(tmp_path / "b" / "p0.sock")).setup()
    try:
        pump(loops[1], lambda: b.services[0].session is not None)
        a.handoff_quiesce()
        state = a.handoff_export([])
        with pytest.raises(ApplianceError, match="source has 1 ports, this process 2"):
            check(two, state)
        with pytest.raises(ApplianceError, match=r"net.ports\[0\] \(net0\): a front-end is "
                                                 "connected here already"):
            check(b, state)
        for key, value, match in (("version", 9, "version 9"),
                                  ("ports", "x", r"net.ports: expected a list")):
            with pytest.raises(ApplianceError, match=match):
                check(b, {**state.to_json(), key: value})
        a.handoff_resume()
    finally:
        g.close()
        gb.close()
        a.close()
        b.close()
        two.close()


def test_dirty_logging_refuses_the_handoff(tmp_path: Path,
                                           loops: tuple[EventLoop, EventLoop]) -> None:
    loop_a, _ = loops
    a, b = services(tmp_path, loops)
    g = HGuest(loop_a, str(tmp_path / "a" / "p0.sock")).setup()
    log_fd = os.memfd_create("log", os.MFD_ALLOW_SEALING)  # as QEMU's sealed log
    os.ftruncate(log_fd, 4096)
    try:
        a.handoff_quiesce()
        clean = json.loads(json.dumps(a.handoff_export([]).to_json()))
        a.handoff_resume()
        g.fe.u64(R.SET_PROTOCOL_FEATURES, int(PF.MQ | PF.REPLY_ACK | PF.STATUS | PF.LOG_SHMFD))
        g.fe.send(R.SET_LOG_BASE, vw.LogDescription(mmap_size=4096).pack(), fds=[log_fd])
        g.fe.reply()
        assert "dirty logging" in a.handoff_blocker()
        a.handoff_quiesce()
        fds: list[int] = []
        with pytest.raises(ApplianceError, match="net: cannot hand off: net0: dirty logging"):
            a.handoff_export(fds)
        assert fds == []
        a.handoff_resume()
        exchange(g, a, loop_a, range(2))
        # a state claiming LOG_ALL is refused by the destination
        clean["ports"][0]["session"]["features"] |= int(vw.Feature.LOG_ALL)
        with pytest.raises(ApplianceError, match=r"net0\): dirty logging \(LOG_ALL\)"):
            check(b, clean)
    finally:
        os.close(log_fd)
        g.close()
        a.close()
        b.close()


@pytest.mark.parametrize(("path", "value", "match"), [
    (("vrings", 1, "kick"), 999, r"vrings\[1\].kick: fd index 999 out of range"),
    (("vrings", 0, "num"), 3, "SET_VRING_NUM refused: .*power of two"),
    (("regions", 0, "memory_size"), 1 << 40, "SET_MEM_TABLE refused"),
    (("vrings", 1, "used_idx"), 40, "used index 40 is not within"),
    (("partial",), "zz", "partial: not hex"),
    (("socket",), "0", r"session.socket: fd index '0'"),
    (("vrings", 1, "kick"), "memory fd", "SET_VRING_KICK refused: .*not an eventfd"),
])
def test_corrupt_state_is_refused_and_leaves_the_destination_untouched(
        tmp_path: Path, loops: tuple[EventLoop, EventLoop], path: tuple[Any, ...], value: Any,
        match: str) -> None:
    loop_a = loops[0]
    a, b = services(tmp_path, loops)
    g = HGuest(loop_a, str(tmp_path / "a" / "p0.sock")).setup()
    try:
        exchange(g, a, loop_a, range(2))
        a.handoff_quiesce()
        fds: list[int] = []
        state, received = transfer(a.handoff_export(fds), fds)
        target: Any = state["ports"][0]["session"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        if value == "memory fd":  # a kick fd that is the guest memory's file
            value = state["ports"][0]["session"]["regions"][0]["fd"]
            target[path[-1]] = value
        before, fds_before = snapshot(b), open_fds()
        with pytest.raises(ApplianceError, match=match):
            check(b, state, received)  # the dry run refuses what the import would
        assert snapshot(b) == before and open_fds() == fds_before
        with pytest.raises(ApplianceError, match=match):
            adopt(b, state, received)
        assert snapshot(b) == before and open_fds() == fds_before
        assert b.services[0].session is None and b.services[0].listener is not None
        close_all(received)
        a.handoff_resume()
        exchange(g, a, loop_a, range(2, 4))
        assert port(a)["rx_packets"] == 4
    finally:
        g.close()
        a.close()
        b.close()


# ---------------------------------------------------------------- client mode
def test_client_mode_connection_moves_and_reconnects_to_its_own_path(
        tmp_path: Path, loops: tuple[EventLoop, EventLoop], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "RECONNECT_DELAY", 0.02)
    loop_a, loop_b = loops
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path_a, path_b = str(tmp_path / "a" / "p0.sock"), str(tmp_path / "b" / "p0.sock")
    listeners = []
    for path in (path_a, path_b):
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
        ls.listen(1)
        ls.setblocking(False)
        listeners.append(ls)

    def accept(ls: socket.socket, loop: EventLoop) -> socket.socket:
        got: list[socket.socket] = []

        def ready() -> bool:
            try:
                got.append(ls.accept()[0])
            except BlockingIOError:
                return False
            return True
        pump(loop, ready)
        return got[0]

    a = NetService(loop_a, cfg(tmp_path / "a", "client"))
    b = NetService(loop_b, cfg(tmp_path / "b", "client"), standby=True)  # connects nowhere yet
    g = HGuest(loop_a, path_a, sock=accept(listeners[0], loop_a)).setup()
    g2: HGuest | None = None
    try:
        exchange(g, a, loop_a, range(2))
        a.handoff_quiesce()
        fds: list[int] = []
        state, received = transfer(a.handoff_export(fds), fds)
        assert state["ports"][0]["listener"] is None
        adopt(b, state, received)
        close_all(received)
        a.handoff_release()
        g.fe.loop = loop_b
        exchange(g, b, loop_b, range(2, 5))
        assert port(b)["rx_packets"] == 5 and port(b)["connections"] == 1
        g.fe.sock.close()  # the front-end goes: B reconnects, to its own configured path
        g2 = HGuest(loop_b, path_b, sock=accept(listeners[1], loop_b)).setup()
        pump(loop_b, lambda: port(b)["connections"] == 2 and port(b)["link"] == "up")
        exchange(g2, b, loop_b, range(1))
        for _ in range(3):
            loop_a.run_once(0.03)  # A's retry timer is gone: nobody connects to path_a
        with pytest.raises(BlockingIOError):
            listeners[0].accept()
    finally:
        if g2 is not None:
            g2.close()
        g.close()
        a.close()
        b.close()
        for ls in listeners:
            ls.close()


def pcap_records(path: Path) -> int:
    """Records in a pcap file that has exactly one file header (asserts it)."""
    data = path.read_bytes()
    assert data[:4] == bytes.fromhex("d4c3b2a1"), data[:4]
    at, count = 24, 0
    while at < len(data):
        assert data[at:at + 4] != data[:4]  # no second file header
        incl = struct.unpack_from("<I", data, at + 8)[0]
        at += 16 + incl
        count += 1
    assert at == len(data)
    return count


def test_standby_destination_continues_the_sources_capture(
        tmp_path: Path, loops: tuple[EventLoop, EventLoop]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pcap = tmp_path / "a" / "p0.pcap"
    a = NetService(loops[0], cfg(tmp_path / "a", pcap=True))
    b_cfg = cfg(tmp_path / "b", pcap=True, first={"pcap": str(pcap)})  # the same file, as with one config for both
    g = HGuest(loops[0], str(tmp_path / "a" / "p0.sock")).setup()
    try:
        exchange(g, a, loops[0], range(1, 4))
        b = NetService(loops[1], b_cfg, standby=True)  # opened while A captures: not truncated
        hand_over(a, b)
        assert pcap_records(pcap) == 6  # A's three pings and replies, flushed on release
        g.fe.loop = loops[1]
        exchange(g, b, loops[1], range(4, 6))
        b.close()
        assert pcap_records(pcap) == 10
    finally:
        g.close()
        a.close()


def test_standby_destination_neither_listens_nor_connects(tmp_path: Path,
                                                          loops: tuple[EventLoop, EventLoop]) -> None:
    a, b = services(tmp_path, loops, standby=True)
    try:
        assert not os.path.exists(tmp_path / "b" / "p0.sock")
        assert b.services[0].listener is None
        hand_over(a, b, serve=False)
        g = HGuest(loops[1], str(tmp_path / "a" / "p0.sock"))
        for _ in range(3):
            loops[1].run_once(0.01)
        assert b.services[0].session is None  # paused: not accepted yet
        b.handoff_start()
        g.setup()
        exchange(g, b, loops[1], range(2))
        g.close()
    finally:
        a.close()
        b.close()


def test_frame_between_two_ports_after_handoff(tmp_path: Path,
                                               loops: tuple[EventLoop, EventLoop]) -> None:
    loop_a, loop_b = loops
    a, b = services(tmp_path, loops, "server", "server")
    g0 = HGuest(loop_a, str(tmp_path / "a" / "p0.sock")).setup()
    g1 = HGuest(loop_a, str(tmp_path / "a" / "p1.sock")).setup()
    peer = bytes.fromhex("525400bb0002")
    try:
        g1.transmit(frame(b"\xff" * 6, peer))  # B's switch must know peer is behind net1
        pump(loop_a, lambda: port(a)["tx_packets"] == 1)
        g0.replies()
        hand_over(a, b)
        g0.transmit(frame(peer, GUEST_MAC))  # unicast: forwarded, not flooded
        pump(loop_b, lambda: b.stats()["ports"]["net1"]["tx_packets"] == 1)
        assert b.stats()["switch"]["forwarded"] == 1
        assert g1.rx.take_used() == [(0, 12 + 60)]
        assert g1.mem.read(g1.rx_bufs[0], 12 + 60)[12:] == frame(peer, GUEST_MAC)
    finally:
        g0.close()
        g1.close()
        a.close()
        b.close()


# ---------------------------------------------------------------- TAP
def test_tap_fd_moves_with_its_counters(tmp_path: Path, loops: tuple[EventLoop, EventLoop]) -> None:
    """The TAP fd (faked by a SOCK_SEQPACKET socketpair, as in test_vhost_tap) moves too."""
    loop_a, loop_b = loops
    host, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host.setblocking(False)

    def opener(name: str) -> int:
        fd = os.dup(ours.fileno())
        os.set_blocking(fd, False)
        return fd

    def with_tap(path: Path) -> NetConfig:
        return cfg(path, tap={"name": "aptest0"})

    a = NetService(loop_a, with_tap(tmp_path / "a"), tap_opener=opener)
    b = NetService(loop_b, with_tap(tmp_path / "b"), standby=True)  # attaches nothing itself
    no_tap = NetService(loop_b, cfg(tmp_path / "c"))
    host_mac = bytes.fromhex("020000aabbcc")
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, host_mac, bytes([10, 0, 2, 1]),
                      bytes(6), RESP_IP)
    request = b"\xff" * 6 + host_mac + b"\x08\x06" + arp + bytes(18)

    def answered(loop: EventLoop) -> bytes:
        got: list[bytes] = []

        def ready() -> bool:
            try:
                got.append(host.recv(65536))
            except BlockingIOError:
                return False
            return True
        pump(loop, ready)
        return got[0]

    try:
        host.send(request)
        assert answered(loop_a)[12:14] == b"\x08\x06"
        a.handoff_quiesce()
        host.send(request)  # waits in the kernel's queue for B
        fds: list[int] = []
        state, received = transfer(a.handoff_export(fds), fds)
        with pytest.raises(ApplianceError, match="net.tap: only the source has a TAP interface"):
            check(no_tap, state)
        adopt(b, state, received)
        close_all(received)
        a.handoff_release()
        assert answered(loop_b)[12:14] == b"\x08\x06"
        st = b.stats()["tap"]
        assert (st["rx_packets"], st["tx_packets"]) == (2, 2)
        assert b.stats()["responder"]["arp_replies"] == 2
    finally:
        a.close()
        b.close()
        no_tap.close()
        host.close()
        ours.close()


def test_standby_client_port_connects_once_it_took_over_an_unconnected_one(
        tmp_path: Path, loops: tuple[EventLoop, EventLoop], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "RECONNECT_DELAY", 0.02)
    loop_a, loop_b = loops
    a, b = services(tmp_path, loops, "client", standby=True)  # A retries: nobody listens
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "b" / "p0.sock"))
    listener.listen(1)
    listener.setblocking(False)
    try:
        loop_a.run_once(0.05)
        a.handoff_quiesce()
        fds: list[int] = []
        state, received = transfer(a.handoff_export(fds), fds)
        assert state["ports"][0]["session"] is None and fds == []
        adopt(b, state, received)
        a.handoff_release()
        pump(loop_b, lambda: b.services[0].session is not None)
        sock, _ = listener.accept()
        sock.close()
    finally:
        listener.close()
        a.close()
        b.close()


def test_source_abort_after_adoption_destination_lets_go_and_source_serves_on(
        tmp_path: Path, loops: tuple[EventLoop, EventLoop], caplog: pytest.LogCaptureFixture) -> None:
    """B adopted (paused) but A aborted: B lets go silently, A resumes; nothing lost."""
    loop_a, loop_b = loops
    a, b = services(tmp_path, loops, standby=True)
    g = HGuest(loop_a, str(tmp_path / "a" / "p0.sock")).setup()
    try:
        exchange(g, a, loop_a, range(2))
        a.handoff_quiesce()
        g.transmit(ping(2))
        fds: list[int] = []
        state, received = transfer(a.handoff_export(fds), fds)
        adopt(b, state, received, serve=False)
        close_all(received)
        for _ in range(3):
            loop_b.run_once(0.01)
        assert port(b)["rx_packets"] == 2  # paused: the pending kick waits
        caplog.clear()
        b.handoff_release()
        assert "disconnected" not in caplog.text
        a.handoff_resume()
        pump(loop_a, lambda: port(a)["tx_packets"] == 3)
        assert [reply_seq(f) for f in g.replies()] == [2]
        exchange(g, a, loop_a, range(3, 5))
        assert port(a)["rx_packets"] == 5 and not g.fe.closed_by_peer()
        assert os.path.exists(tmp_path / "a" / "p0.sock")
    finally:
        g.close()
        a.close()
        b.close()


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and node:
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    else:
        yield path


def test_every_field_of_the_state_is_checked(tmp_path: Path,
                                             loops: tuple[EventLoop, EventLoop]) -> None:
    """Each leaf of a real state set to a wrong type or out of range: check() and
    import() either accept it or raise ApplianceError, and a refusal leaves B as it was."""
    loop_a, loop_b = loops
    a, b = services(tmp_path, loops)
    g = HGuest(loop_a, str(tmp_path / "a" / "p0.sock")).setup()
    try:
        exchange(g, a, loop_a, range(2))
        a.handoff_quiesce()
        fds: list[int] = []
        good, received = transfer(a.handoff_export(fds), fds)
        before, fds_before = snapshot(b), open_fds()
        tried = refused = 0
        for path in _leaves(good):
            for bad in (None, -1, "x", [], 1 << 70, 1.5, True):
                state = json.loads(json.dumps(good))
                target = state
                for key in path[:-1]:
                    target = target[key]
                if target[path[-1]] == bad or (bad is None and path[-1] in {"err", "log_fd"}):
                    continue
                target[path[-1]] = bad
                tried += 1
                try:
                    check(b, state)
                    adopt(b, state, received, serve=False)
                except ApplianceError:
                    refused += 1
                    assert snapshot(b) == before and open_fds() == fds_before, path
                    continue
                b.handoff_release()  # accepted (e.g. another counter value): start over
                b.close()
                b = NetService(loop_b, cfg(tmp_path / "b"))
                before, fds_before = snapshot(b), open_fds()
        assert tried > 500 and refused > tried * 0.9
        close_all(received)
        a.handoff_resume()
        exchange(g, a, loop_a, range(2, 3))
    finally:
        g.close()
        a.close()
        b.close()


def test_callbacks_dispatched_in_the_pass_that_quiesced_do_nothing(
        tmp_path: Path, loops: tuple[EventLoop, EventLoop]) -> None:
    """The loop calls what select() returned even if a handler of the same pass removed
    the reader: after quiesce those callbacks must leave kicks, bytes and frames alone."""
    loop_a = loops[0]
    a, b = services(tmp_path, loops)
    g = HGuest(loop_a, str(tmp_path / "a" / "p0.sock")).setup()
    try:
        exchange(g, a, loop_a, range(1))
        a.handoff_quiesce()
        svc = a.services[0]
        session = svc.session
        assert session is not None
        g.transmit(ping(1))
        g.fe.send(R.GET_STATUS)
        kick = next(iter(session.kicks))
        session._kicked(kick)
        session._readable()
        svc._accept()
        assert port(a)["rx_packets"] == 1 and session.conn.pending_input() == (b"", [])
        assert os.eventfd_read(g.tx.kick_fd) == 1  # the kick is still pending (same eventfd)
        os.eventfd_write(g.tx.kick_fd, 1)
        a.handoff_resume()
        pump(loop_a, lambda: port(a)["tx_packets"] == 2)
        assert g.fe.reply()[0].request == R.GET_STATUS
    finally:
        g.close()
        a.close()
        b.close()


def test_the_mtu_the_front_end_told_still_bounds_frames_after_a_handoff(
        tmp_path: Path, loops: tuple[EventLoop, EventLoop]) -> None:
    """NET_SET_MTU 1500 (the default value, but told) moves too: B refuses the same
    oversized transmit chains A would."""
    loop_a, loop_b = loops
    a, b = services(tmp_path, loops)
    g = HGuest(loop_a, str(tmp_path / "a" / "p0.sock")).setup()
    try:
        g.fe.u64(R.SET_PROTOCOL_FEATURES, int(PF.MQ | PF.REPLY_ACK | PF.STATUS | PF.MTU))
        g.fe.u64(R.SET_FEATURES, int(F.VERSION_1 | F.NET_MRG_RXBUF | F.PROTOCOL_FEATURES
                                     | F.NET_MTU))
        assert g.fe.call(R.NET_SET_MTU, vw.U64(value=1500).pack(), need_reply=True) == 0
        assert a.services[0].port.max_frame == 1518
        hand_over(a, b)
        g.fe.loop = loop_b
        assert b.services[0].port.max_frame == 1518
        assert g.fe.call(R.GET_STATUS) == 0xF
    finally:
        g.close()
        a.close()
        b.close()


@pytest.mark.parametrize("rows, match", [
    (lambda name: [[f"5254{i:08x}", name, 0.0] for i in range(4097)], "4096"),  # past the switch's
    (lambda name: [["525400aa0001", name, -5.0]], "age"),  # learned in the future
])
def test_check_refuses_a_mac_table_this_switch_would_not_hold(
        tmp_path: Path, loops: tuple[EventLoop, EventLoop], rows: Any, match: str) -> None:
    a, b = services(tmp_path, loops, standby=True)
    try:
        a.handoff_quiesce()
        fds: list[int] = []
        state, received = transfer(a.handoff_export(fds), fds)
        state["switch"]["table"] = rows(state["ports"][0]["name"])
        with pytest.raises(ApplianceError, match=match):
            check(b, state, received)
        close_all(received)
        a.handoff_resume()
    finally:
        a.close()
        b.close()
