"""NetService over real unix sockets with SCM_RIGHTS, driven on one thread.

The test plays the front-end on a socket and pumps the service's EventLoop with
bounded ``run_once`` calls until what it waits for has happened.
"""

from __future__ import annotations

import array
import logging
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastpath_support import PATHS, walker
from test_vhost_frontend import HDR, DriverRing, GuestMemory, fd_open

import appliance.runtime.vhost_session as rt
from appliance import config
from appliance.config import NetConfig
from appliance.errors import ApplianceError
from appliance.net import vhost_wire as vw
from appliance.net.vhost_wire import Feature as F
from appliance.net.vhost_wire import ProtocolFeature as PF
from appliance.net.vhost_wire import Request as R
from appliance.runtime.loop import EventLoop
from appliance.runtime.vhost_user import NetService

GUEST_A = bytes.fromhex("525400aa0001")
GUEST_B = bytes.fromhex("525400bb0002")


def cfg(tmp: Path, *modes: str, pcap: bool = False, first: dict[str, Any] | None = None,
        **net: Any) -> NetConfig:
    """The ``net`` configuration: ports p0.. under ``tmp``, one per mode (server when
    none); ``first``: keys changed in p0; ``net``: other keys of ``net``."""
    ports = []
    for i, mode in enumerate(modes or ("server",)):
        ports.append({"socket": str(tmp / f"p{i}.sock"), "mac": f"52:54:00:00:00:0{i + 1}",
                      "queues": 1, "mode": mode, "pcap": str(tmp / f"p{i}.pcap") if pcap else None})
    ports[0].update(first or {})
    return config.load(overrides={"net": {"ports": ports, **net}}).net


def pump(loop: EventLoop, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        loop.run_once(0.01)


class SockFrontend:
    """A vhost-user front-end on a real socket."""

    def __init__(self, loop: EventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        sock.setblocking(False)
        self.buf = b""

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False, flags: int | None = None) -> None:
        if flags is None:
            flags = vw.VERSION | (vw.FLAG_NEED_REPLY if need_reply else 0)
        data = vw.Header(request=request, flags=flags, size=len(payload)).pack() + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)

    def reply(self, timeout: float = 5.0) -> tuple[vw.Header, bytes]:
        def have() -> bool:
            try:
                self.buf += self.sock.recv(4096)
            except BlockingIOError:
                pass
            if len(self.buf) < 12:
                return False
            return len(self.buf) >= 12 + vw.Header.unpack(self.buf).size
        pump(self.loop, have, timeout)
        hdr = vw.Header.unpack(self.buf)
        body = self.buf[12:12 + hdr.size]
        self.buf = self.buf[12 + hdr.size:]
        return hdr, body

    def call(self, request: int, payload: bytes = b"", **kw: Any) -> int:
        self.send(request, payload, **kw)
        hdr, body = self.reply()
        assert hdr.flags == vw.REPLY_FLAGS and hdr.request == request
        return vw.U64.unpack(body).value if len(body) == 8 else -1

    def u64(self, request: int, value: int, **kw: Any) -> None:
        self.send(request, vw.U64(value=value).pack(), **kw)

    def state(self, request: int, index: int, num: int, **kw: Any) -> None:
        self.send(request, vw.VringState(index=index, num=num).pack(), **kw)

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(4096) == b""
        except BlockingIOError:
            return False

    def setup(self, mem: GuestMemory, rings: list[DriverRing]) -> None:
        """DPDK's sequence: owner, features, memory, rings, enable, DRIVER_OK."""
        self.send(R.SET_OWNER)
        feats = self.call(R.GET_FEATURES)
        pf = self.call(R.GET_PROTOCOL_FEATURES)
        self.u64(R.SET_PROTOCOL_FEATURES, pf & int(PF.MQ | PF.REPLY_ACK | PF.STATUS))
        self.u64(R.SET_FEATURES, feats & int(F.VERSION_1 | F.NET_MRG_RXBUF | F.PROTOCOL_FEATURES))
        body = vw.MemoryHeader(nregions=1).pack() + mem.region().pack()
        assert self.call(R.SET_MEM_TABLE, body, fds=[mem.fd], need_reply=True) == 0
        for ring in rings:
            self.state(R.SET_VRING_NUM, ring.index, ring.size)
            self.state(R.SET_VRING_BASE, ring.index, 0)
            self.send(R.SET_VRING_ADDR, ring.addr_payload())
            self.u64(R.SET_VRING_CALL, ring.index, fds=[ring.call_fd])
            self.u64(R.SET_VRING_KICK, ring.index, fds=[ring.kick_fd])
        for ring in rings:
            self.state(R.SET_VRING_ENABLE, ring.index, 1)
        assert self.call(R.SET_STATUS, vw.U64(value=0xF).pack(), need_reply=True) == 0


class Guest:
    """Guest memory, one queue pair, and a front-end connected to ``path``."""

    def __init__(self, loop: EventLoop, path: str, sock: socket.socket | None = None) -> None:
        self.mem = GuestMemory(1 << 20)
        self.rx = DriverRing(self.mem, 0, 16)
        self.tx = DriverRing(self.mem, 1, 16)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
        self.fe = SockFrontend(loop, sock)
        self.rx_bufs = [self.rx.add_buffer(i, writable=2048) for i in range(8)]
        self.next_tx = 0

    def setup(self) -> Guest:
        self.fe.setup(self.mem, [self.rx, self.tx])
        return self

    def transmit(self, frame: bytes) -> None:
        self.tx.add_buffer(self.next_tx % self.tx.size, HDR + frame)
        self.next_tx += 1
        os.eventfd_write(self.tx.kick_fd, 1)

    def received(self) -> list[bytes]:
        return [self.mem.read(self.rx_bufs[i % 8], n)[12:] for i, n in self.rx.take_used()]

    def close(self) -> None:
        self.fe.sock.close()
        self.rx.close()
        self.tx.close()
        self.mem.close()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop()
    yield lp
    lp.close()


def frame(dst: bytes, src: bytes, n: int = 46) -> bytes:
    return dst + src + b"\x88\xb5" + bytes(range(n))


def test_listening_socket_mode_and_stale_socket(tmp_path: Path, loop: EventLoop) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "p0.sock"))
    stale.close()
    svc = NetService(loop, cfg(tmp_path))
    try:
        mode = os.stat(tmp_path / "p0.sock").st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    finally:
        svc.close()
    assert not (tmp_path / "p0.sock").exists()


def test_refuses_a_regular_file_at_the_socket_path(tmp_path: Path, loop: EventLoop) -> None:
    (tmp_path / "p0.sock").write_text("not a socket")
    with pytest.raises(ApplianceError, match=r"net.ports\[0\].socket"):
        NetService(loop, cfg(tmp_path))


@pytest.mark.parametrize("fastpath", PATHS)
def test_frames_between_two_ports_and_disconnect(tmp_path: Path, loop: EventLoop,
                                                 caplog: pytest.LogCaptureFixture,
                                                 fastpath: str) -> None:
    caplog.set_level(logging.INFO, logger="appliance.net")
    svc = NetService(loop, cfg(tmp_path, "server", "server"), native=walker(fastpath))
    a = Guest(loop, str(tmp_path / "p0.sock")).setup()
    b = Guest(loop, str(tmp_path / "p1.sock")).setup()
    try:
        pump(loop, lambda: svc.stats()["ports"]["net1"]["link"] == "up")
        tx_ring = svc.services[0].port.rings[1]
        assert tx_ring.uses_native == (fastpath == "native")
        a.transmit(frame(b"\xff" * 6, GUEST_A))  # broadcast: floods to b (and the responder)
        pump(loop, lambda: svc.stats()["ports"]["net1"]["tx_packets"] == 1)
        assert b.received() == [frame(b"\xff" * 6, GUEST_A)]
        b.transmit(frame(GUEST_A, GUEST_B))  # GUEST_A was learned behind net0
        pump(loop, lambda: svc.stats()["ports"]["net0"]["tx_packets"] == 1)
        assert a.received() == [frame(GUEST_A, GUEST_B)]
        st = svc.stats()
        assert st["ports"]["net0"]["rx_packets"] == 1 and st["ports"]["net1"]["rx_packets"] == 1
        assert st["switch"]["table"]["52:54:00:aa:00:01"] == "net0"
        kick = svc.services[0].port.kick[1]
        a.close()
        pump(loop, lambda: svc.services[0].session is None)
        assert kick is not None and not fd_open(kick)
        assert svc.stats()["ports"]["net0"]["link"] == "down"
        assert "net0: front-end disconnected" in caplog.text and '"rx_packets": 1' in caplog.text
        # traffic for the gone guest is dropped, not queued
        b.transmit(frame(GUEST_A, GUEST_B))
        pump(loop, lambda: svc.stats()["ports"]["net1"]["rx_packets"] == 2)
        # the next connection brings the port up again
        a2 = Guest(loop, str(tmp_path / "p0.sock")).setup()
        pump(loop, lambda: svc.stats()["ports"]["net0"]["link"] == "up")
        b.transmit(frame(b"\xff" * 6, GUEST_B))
        pump(loop, lambda: svc.stats()["ports"]["net0"]["tx_packets"] == 2)
        assert a2.received() == [frame(b"\xff" * 6, GUEST_B)]
        a2.close()
    finally:
        b.close()
        svc.close()


def test_second_front_end_refused(tmp_path: Path, loop: EventLoop) -> None:
    svc = NetService(loop, cfg(tmp_path))
    a = Guest(loop, str(tmp_path / "p0.sock")).setup()
    try:
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.connect(str(tmp_path / "p0.sock"))
        fe = SockFrontend(loop, other)
        pump(loop, fe.closed_by_peer)
        other.close()
        assert svc.services[0].session is not None
    finally:
        a.close()
        svc.close()


def test_malformed_message_closes_only_that_connection(tmp_path: Path, loop: EventLoop) -> None:
    svc = NetService(loop, cfg(tmp_path, "server", "server"))
    a = Guest(loop, str(tmp_path / "p0.sock")).setup()
    b = Guest(loop, str(tmp_path / "p1.sock")).setup()
    try:
        fds = [os.eventfd(0), os.eventfd(0)]
        a.fe.send(R.SET_VRING_NUM, bytes(3), fds=fds)  # short payload, stray fds, no need_reply
        pump(loop, a.fe.closed_by_peer)
        assert svc.services[1].session is not None
        b.transmit(frame(b"\xff" * 6, GUEST_B))
        pump(loop, lambda: svc.stats()["ports"]["net1"]["rx_packets"] == 1)
        for fd in fds:
            os.close(fd)
    finally:
        a.close()
        b.close()
        svc.close()


def test_nack_keeps_connection(tmp_path: Path, loop: EventLoop) -> None:
    svc = NetService(loop, cfg(tmp_path))
    a = Guest(loop, str(tmp_path / "p0.sock")).setup()
    try:
        assert a.fe.call(R.SET_VRING_NUM, vw.VringState(index=9, num=16).pack(), need_reply=True) != 0
        assert a.fe.call(R.GET_STATUS) == 0xF
    finally:
        a.close()
        svc.close()


def test_client_mode_connects_and_reconnects(tmp_path: Path, loop: EventLoop,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "RECONNECT_DELAY", 0.02)
    path = str(tmp_path / "p0.sock")
    svc = NetService(loop, cfg(tmp_path, "client"))  # nobody listens yet: retries
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        loop.run_once(0.05)
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)

        def accept() -> socket.socket | None:
            try:
                return listener.accept()[0]
            except BlockingIOError:
                return None

        got: list[socket.socket] = []
        pump(loop, lambda: bool(got.append(s) if (s := accept()) else None) or bool(got))
        g = Guest(loop, path, sock=got[0]).setup()
        pump(loop, lambda: svc.stats()["ports"]["net0"]["link"] == "up")
        g.close()  # the front-end goes away: the service reconnects
        got.clear()
        pump(loop, lambda: bool(got.append(s) if (s := accept()) else None) or bool(got))
        pump(loop, lambda: svc.stats()["ports"]["net0"]["connections"] == 2)
        g2 = Guest(loop, path, sock=got[0]).setup()
        pump(loop, lambda: svc.stats()["ports"]["net0"]["link"] == "up")
        g2.close()
    finally:
        listener.close()
        svc.close()


def test_polling_ring_without_kick_fd(tmp_path: Path, loop: EventLoop) -> None:
    svc = NetService(loop, cfg(tmp_path, "server", "server"))
    b = Guest(loop, str(tmp_path / "p1.sock")).setup()
    a = Guest(loop, str(tmp_path / "p0.sock"))
    try:
        fe = a.fe
        fe.send(R.SET_OWNER)
        fe.u64(R.SET_FEATURES, int(F.VERSION_1))
        body = vw.MemoryHeader(nregions=1).pack() + a.mem.region().pack()
        fe.send(R.SET_MEM_TABLE, body, fds=[a.mem.fd])
        for ring in (a.rx, a.tx):
            fe.state(R.SET_VRING_NUM, ring.index, ring.size)
            fe.send(R.SET_VRING_ADDR, ring.addr_payload())
            fe.u64(R.SET_VRING_KICK, ring.index | vw.VRING_NOFD)  # poll, please
        pump(loop, lambda: svc.services[0].port.rings[1].started)
        a.tx.add_buffer(0, HDR + frame(b"\xff" * 6, GUEST_A))  # no kick at all
        pump(loop, lambda: svc.stats()["ports"]["net0"]["rx_packets"] == 1)
        pump(loop, lambda: svc.stats()["ports"]["net1"]["tx_packets"] == 1)
    finally:
        a.close()
        b.close()
        svc.close()


def test_pcap_written(tmp_path: Path, loop: EventLoop) -> None:
    svc = NetService(loop, cfg(tmp_path, pcap=True))
    a = Guest(loop, str(tmp_path / "p0.sock")).setup()
    try:
        a.transmit(frame(b"\xff" * 6, GUEST_A))
        pump(loop, lambda: svc.stats()["ports"]["net0"]["rx_packets"] == 1)
    finally:
        a.close()
        svc.close()
    data = (tmp_path / "p0.pcap").read_bytes()
    assert data[:4] == b"\xd4\xc3\xb2\xa1" and len(data) == 24 + 16 + 60


def test_responder_answers_arp_over_sockets(tmp_path: Path, loop: EventLoop) -> None:
    svc = NetService(loop, cfg(tmp_path))
    a = Guest(loop, str(tmp_path / "p0.sock")).setup()
    try:
        arp = (b"\xff" * 6 + GUEST_A + b"\x08\x06" + bytes.fromhex("0001080006040001") + GUEST_A
               + bytes([10, 0, 2, 15]) + bytes(6) + bytes([10, 0, 2, 2]))
        a.transmit(arp)
        pump(loop, lambda: svc.stats()["ports"]["net0"]["tx_packets"] == 1)
        (reply,) = a.received()
        assert reply[:6] == GUEST_A and reply[12:14] == b"\x08\x06" and reply[20:22] == b"\x00\x02"
        assert svc.stats()["responder"]["arp_replies"] == 1
    finally:
        a.close()
        svc.close()


def test_qemu_args_make_qemu_the_server_for_client_mode_ports() -> None:
    from appliance import config
    from appliance.testing.qemu import qemu_args

    cfg = config.load(None, {"net": {"ports": [
        {"socket": "/tmp/a.sock", "mac": "52:54:00:00:00:01"},
        {"socket": "/tmp/b.sock", "mac": "52:54:00:00:00:02", "mode": "client"}]}})
    chardevs = [a for a in qemu_args(cfg, net=True) if a.startswith("socket,id=net")]
    assert chardevs == ["socket,id=net0c,path=/tmp/a.sock",
                        "socket,id=net1c,path=/tmp/b.sock,server=on,wait=off"]


# ---------------------------------------------------------------- peers that cannot stall us
GET_FEATURES = vw.Header(request=R.GET_FEATURES, flags=vw.VERSION).pack()
REPLY_SIZE = vw.HEADER_SIZE + 8


def pipeline(sock: socket.socket, requests: bytes) -> None:
    """Send what the socket takes now (the front-end never waits, never reads)."""
    try:
        sock.send(requests)
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass


def test_replies_wait_for_a_slow_reader_and_arrive_in_order(tmp_path: Path, loop: EventLoop) -> None:
    """Replies the socket cannot take now are queued and written when it is
    writable; meanwhile another port is served; the handoff waits for them."""
    svc = NetService(loop, cfg(tmp_path, "server", "server"))
    lazy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lazy.connect(str(tmp_path / "p0.sock"))
    lazy.setblocking(False)
    other = Guest(loop, str(tmp_path / "p1.sock")).setup()
    try:
        pump(loop, lambda: svc.services[0].session is not None)
        session = svc.services[0].session
        assert session is not None and session.sock.getblocking() is False
        sent = 0
        while not session.out:  # until the kernel's buffers are full and ours holds the rest
            try:
                sent += lazy.send(GET_FEATURES * 256)
            except BlockingIOError:
                pass
            loop.run_once(0)
        assert 0 < len(session.out) <= rt.DEFAULT_MAX_BACKLOG
        assert other.fe.call(R.GET_STATUS) == 0xF  # the loop waits on no one
        assert "replies not yet read by the front-end" in svc.handoff_blocker()
        got = bytearray()

        def all_read() -> bool:
            try:
                got.extend(lazy.recv(1 << 16))
            except BlockingIOError:
                pass
            return len(got) == sent // vw.HEADER_SIZE * REPLY_SIZE

        pump(loop, all_read)
        for off in range(0, len(got), REPLY_SIZE):
            head = vw.Header.unpack(got[off:off + vw.HEADER_SIZE])
            assert head.request == R.GET_FEATURES and head.size == 8
        assert not session.out and svc.handoff_blocker() == ""
        key = loop.selector.get_key(session.sock.fileno())
        assert key.events == selectors.EVENT_READ  # not watched for writing once empty
    finally:
        lazy.close()
        other.close()
        svc.close()


def test_front_end_that_never_reads_is_disconnected_past_the_backlog_limit(
        tmp_path: Path, loop: EventLoop, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.net")
    svc = NetService(loop, cfg(tmp_path, "server", "server", max_backlog=64 << 10))
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(str(tmp_path / "p0.sock"))
    hog.setblocking(False)
    other = Guest(loop, str(tmp_path / "p1.sock")).setup()
    try:
        pump(loop, lambda: svc.services[0].session is not None)
        burst = GET_FEATURES * 1024

        def disconnected() -> bool:
            pipeline(hog, burst)
            return svc.services[0].session is None

        pump(loop, disconnected, timeout=30)
        lines = [r for r in caplog.records if "net.max_backlog" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        assert lines[0].getMessage().startswith("net0: front-end disconnected (")
        assert "over net.max_backlog (65536)" in lines[0].getMessage()
        assert other.fe.call(R.GET_STATUS) == 0xF
    finally:
        hog.close()
        other.close()
        svc.close()


def test_client_mode_socket_is_non_blocking(tmp_path: Path, loop: EventLoop) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "p0.sock"))
    listener.listen(1)
    svc = NetService(loop, cfg(tmp_path, "client"))
    try:
        peer, _ = listener.accept()
        session = svc.services[0].session
        assert session is not None and session.sock.getblocking() is False
        peer.close()
    finally:
        listener.close()
        svc.close()


def test_kick_fd_at_end_of_file_is_dropped_not_spun_on(
        tmp_path: Path, loop: EventLoop, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a kick fd ever at EOF (the eventfd check let a pipe through here), the
    loop drops it with one warning and serves on."""
    monkeypatch.setattr("appliance.runtime.unix.is_eventfd", lambda fd: True)
    caplog.set_level(logging.INFO, logger="appliance.net")
    svc = NetService(loop, cfg(tmp_path))
    g = Guest(loop, str(tmp_path / "p0.sock"))
    r, w = os.pipe()
    os.close(w)
    os.close(g.tx.kick_fd)
    g.tx.kick_fd = r
    try:
        g.setup()
        pump(loop, lambda: "no longer watched" in caplog.text)
        for _ in range(50):
            loop.run_once(0)
        lines = [rec.getMessage() for rec in caplog.records if "no longer watched" in rec.getMessage()]
        assert lines == ["net0: kick fd of vring 1: end of file; no longer watched"]
        kick = svc.services[0].port.kick[1]
        assert kick is not None
        with pytest.raises(KeyError):
            loop.selector.get_key(kick)
        assert g.fe.call(R.GET_STATUS) == 0xF  # later requests do not watch it again
        assert len([rec for rec in caplog.records if "no longer watched" in rec.getMessage()]) == 1
    finally:
        g.close()
        svc.close()
