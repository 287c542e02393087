"""Two vhost-user front-ends through a real ``appliance run``'s switch, on both data paths.

The same traffic runs against the pure-Python path (``fastpath: false``) and
the native one (the transmit batch switched by ``appliance._fastpath.switch_tx``,
guest memory a sealed memfd, so mmap'd): unicast frames to a learned MAC, an
ARP request for the responder in the middle of a batch (handed back to
Python, answered), a frame with a bad virtio-net header, a receive chain with
a readable buffer (refused) and a receive ring with no buffer left.  Both must
deliver the same bytes in the same order and report the same counters.
"""

from __future__ import annotations

import array
import ipaddress
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile import wait_until

from appliance.net import vhost_wire as vw
from appliance.net.responder import ArpPacket, EthHeader
from appliance.net.vhost_wire import Feature as F
from appliance.net.vhost_wire import ProtocolFeature as PF
from appliance.net.vhost_wire import Request as R
from appliance.runtime.control import ControlClient
from appliance.testing.process import ApplianceProcess, make_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from test_vhost_frontend import DriverRing, GuestMemory

MAC_A = bytes.fromhex("525400aa0001")  # the guest behind p0
MAC_B = bytes.fromhex("525400aa0002")  # the guest behind p1
HDR = bytes(vw.NetHdr.SIZE)


def frame(dst: bytes, src: bytes, tag: int) -> bytes:
    return dst + src + b"\x88\xb5" + bytes([tag]) * 46


class Guest:
    """A front-end with a receive and a transmit ring in its own memfd (``sealable``:
    one the appliance seals and mmaps; else DPDK's kind, which it cannot seal)."""

    def __init__(self, path: str, sealable: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        self.sock.connect(path)
        self.mem = GuestMemory(1 << 20, sealable=sealable)
        self.rx = DriverRing(self.mem, 0, 16)
        self.tx = DriverRing(self.mem, 1, 16)
        self.rx_bufs: dict[int, int] = {}
        self.next_rx = self.next_tx = 0

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             ack: bool = False) -> None:
        flags = vw.VERSION | (vw.FLAG_NEED_REPLY if ack else 0)
        data = vw.Header(request=request, flags=flags, size=len(payload)).pack() + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)
        if ack or request in (R.GET_FEATURES, R.GET_PROTOCOL_FEATURES):
            self.reply = self._read(vw.Header.unpack(self._read(vw.HEADER_SIZE)).size)

    def _read(self, n: int) -> bytes:
        got = b""
        while len(got) < n:
            chunk = self.sock.recv(n - len(got))
            assert chunk, "the appliance closed the connection"
            got += chunk
        return got

    def setup(self) -> Guest:
        self.send(R.SET_OWNER)
        self.send(R.GET_FEATURES)
        self.send(R.GET_PROTOCOL_FEATURES)
        self.send(R.SET_PROTOCOL_FEATURES, vw.U64(value=int(PF.REPLY_ACK)).pack())
        features = F.VERSION_1 | F.NET_MRG_RXBUF | F.PROTOCOL_FEATURES
        self.send(R.SET_FEATURES, vw.U64(value=int(features)).pack())
        body = vw.MemoryHeader(nregions=1).pack() + self.mem.region().pack()
        self.send(R.SET_MEM_TABLE, body, fds=[self.mem.fd], ack=True)
        for ring in (self.rx, self.tx):
            self.send(R.SET_VRING_NUM, vw.VringState(index=ring.index, num=ring.size).pack())
            self.send(R.SET_VRING_BASE, vw.VringState(index=ring.index, num=0).pack())
            self.send(R.SET_VRING_ADDR, ring.addr_payload())
            self.send(R.SET_VRING_CALL, vw.U64(value=ring.index).pack(), fds=[ring.call_fd])
            self.send(R.SET_VRING_KICK, vw.U64(value=ring.index).pack(), fds=[ring.kick_fd])
            self.send(R.SET_VRING_ENABLE, vw.VringState(index=ring.index, num=1).pack(), ack=True)
        return self

    def give_rx(self, n: int, readable: bool = False) -> None:
        for _ in range(n):
            head = self.next_rx
            self.next_rx = (head + 1) % self.rx.size
            addr = self.mem.alloc(2048)
            self.rx.set_desc(head, addr, 2048, 0 if readable else vw.DescFlag.WRITE)
            self.rx_bufs[head] = addr
            self.rx.make_available(head)

    def transmit(self, frames: list[bytes]) -> None:
        for data in frames:
            head = self.next_tx
            self.next_tx = (head + 1) % self.tx.size
            self.tx.add_buffer(head, data)
        os.eventfd_write(self.tx.kick_fd, 1)
        want = self.next_tx
        assert wait_until(lambda: self.tx.used_idx() == want, 10)

    def received(self) -> list[bytes]:
        """The frames written into receive buffers since the last call (headers checked)."""
        out = []
        for head, length in self.rx.take_used():
            if length:
                data = self.mem.read(self.rx_bufs[head], length)
                assert data[:vw.NetHdr.SIZE] == HDR[:10] + b"\x01\x00", data[:12]  # num_buffers 1
                out.append(data[vw.NetHdr.SIZE:])
        return out

    def close(self) -> None:
        self.sock.close()
        self.rx.close()
        self.tx.close()
        self.mem.close()


@pytest.fixture(params=["python", "native"])
def appliance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApplianceProcess]:
    yield from run_appliance(request.param, tmp_path, 2)


@pytest.fixture(params=["python", "native"])
def appliance3(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApplianceProcess]:
    """The appliance with three ports."""
    yield from run_appliance(request.param, tmp_path, 3)


def run_appliance(path: str, tmp_path: Path, nports: int) -> Iterator[ApplianceProcess]:
    """``appliance run`` with ``nports`` ports on data path ``path``, checked at the end."""
    run = tmp_path / "run"
    ports = [{"socket": str(run / f"p{i}.sock"), "mac": f"52:54:00:00:00:1{i}"} for i in range(nports)]
    cfg = make_config(tmp_path, net={"ports": ports}, fastpath=path == "native")
    with ApplianceProcess(cfg, tmp_path / "proc") as proc:
        line = next(line for line in proc.stdout_lines if "data path:" in line)
        assert ("data path: native fast path" in line) == (path == "native"), line
        yield proc
        assert proc.alive, proc.log_text()
        assert "Traceback" not in proc.log_text()


def status(proc: ApplianceProcess) -> dict[str, Any]:
    with ControlClient(proc.config.control.socket, timeout=5.0) as ctl:
        net: dict[str, Any] = ctl("status")["net"]
    return net


def test_switch_delivers_the_same_on_both_paths(appliance: ApplianceProcess) -> None:
    resp = appliance.config.net.responder
    r_mac = bytes.fromhex(resp.mac.replace(":", ""))
    r_ip = ipaddress.IPv4Interface(resp.ip).ip.packed
    run = Path(appliance.config.run_dir)
    a, b = Guest(str(run / "p0.sock")).setup(), Guest(str(run / "p1.sock")).setup()
    try:
        assert wait_until(lambda: all(p["link"] == "up" for p in status(appliance)["ports"].values()))
        a.give_rx(4)
        b.give_rx(1, readable=True)  # refused: a receive chain with a readable buffer
        b.give_rx(4)
        b.transmit([HDR + frame(b"\xff" * 6, MAC_B, 0)])  # broadcast: B learned behind net1
        arp = ArpPacket(op=1, sha=MAC_A, spa=bytes([10, 0, 2, 15]), tha=bytes(6), tpa=r_ip)
        arp_frame = EthHeader(dst=b"\xff" * 6, src=MAC_A, ethertype=0x0806).pack() + arp.pack()
        gso = bytearray(HDR)
        gso[1] = 1  # GSO_TCPV4: never offered, dropped
        a.transmit([HDR + frame(MAC_B, MAC_A, 1), HDR + frame(MAC_B, MAC_A, 2), HDR + arp_frame,
                    bytes(gso) + frame(MAC_B, MAC_A, 3), HDR + frame(MAC_B, MAC_A, 4),
                    HDR + frame(MAC_B, MAC_A, 5), HDR + frame(MAC_B, MAC_A, 6)])
        assert wait_until(lambda: status(appliance)["ports"]["net1"]["tx_dropped"] == 2)
        got_b = b.received()
        got_a = a.received()
        assert got_b == [frame(MAC_B, MAC_A, 1), frame(MAC_B, MAC_A, 2), arp_frame,
                         frame(MAC_B, MAC_A, 4)]  # then no buffer left: frames 5 and 6 dropped
        assert len(got_a) == 2 and got_a[0] == frame(b"\xff" * 6, MAC_B, 0)
        assert got_a[1][:12] == MAC_A + r_mac and got_a[1][12:14] == b"\x08\x06"  # the ARP reply
        net = status(appliance)
        p0, p1 = net["ports"]["net0"], net["ports"]["net1"]
        assert (p0["rx_packets"], p0["rx_dropped"], p0["tx_packets"]) == (7, 1, 2)
        assert (p1["rx_packets"], p1["tx_packets"], p1["tx_dropped"], p1["malformed_chains"]) \
            == (1, 4, 2, 1)
        sw = net["switch"]  # learned: the ports' and the responder's MACs at start, A and B
        assert (sw["frames"], sw["forwarded"], sw["flooded"], sw["learned"]) == (8, 6, 2, 5), sw
        assert sw["table"]["52:54:00:aa:00:01"] == "net0" and sw["table"]["52:54:00:aa:00:02"] == "net1"
        assert net["responder"]["arp_replies"] == 1
    finally:
        a.close()
        b.close()


def used_lengths(guest: Guest, ring: DriverRing, count: int) -> list[int]:
    """The lengths of ``ring``'s first ``count`` used elements, read through the fd
    (the test's own mapping of a shrunk file is not touched)."""
    raw = os.pread(guest.mem.fd, 8 * count, ring.used + 4 - guest.mem.gpa)
    return [int.from_bytes(raw[8 * i + 4:8 * i + 8], "little") for i in range(count)]


def test_front_end_shrinks_its_memory_while_frames_flow(appliance3: ApplianceProcess) -> None:
    """Guest C's memory is a memfd that cannot be sealed (DPDK's): the native path
    reaches it through a mapping under the SIGBUS guard, Python through the fd.
    C shrinks it under frames A sends to B and C in one batch: first past its
    rings (the frames for C fault in its buffers, which it gets back empty), then
    to nothing (its rings break).  B gets every frame meant for it, the appliance
    lives on and logs the shrink once, on both paths."""
    run = Path(appliance3.config.run_dir)
    mac_c = bytes.fromhex("525400aa0003")
    a, b = Guest(str(run / "p0.sock")).setup(), Guest(str(run / "p1.sock")).setup()
    c = Guest(str(run / "p2.sock"), sealable=False).setup()
    try:
        assert wait_until(lambda: all(p["link"] == "up" for p in status(appliance3)["ports"].values()))
        a.give_rx(4)
        b.give_rx(8)
        c.give_rx(8)
        b.transmit([HDR + frame(b"\xff" * 6, MAC_B, 0)])  # learned: B behind net1, C behind net2
        c.transmit([HDR + frame(b"\xff" * 6, mac_c, 0)])
        a.transmit([HDR + frame(mac_c, MAC_A, 1)])  # into C's memory while it is whole
        assert c.received() == [frame(b"\xff" * 6, MAC_B, 0), frame(mac_c, MAC_A, 1)]
        assert [f[:6] for f in a.received()] == [b"\xff" * 6, b"\xff" * 6]
        assert b.received() == [frame(b"\xff" * 6, mac_c, 0)]

        c.mem.mm.close()  # from here on the test reaches C's memory through the fd only
        os.ftruncate(c.mem.fd, 0x1000)  # C's rings stay, its buffers go
        a.transmit([HDR + frame(MAC_B, MAC_A, 2), HDR + frame(mac_c, MAC_A, 3),
                    HDR + frame(MAC_B, MAC_A, 4), HDR + frame(mac_c, MAC_A, 5)])
        assert b.received() == [frame(MAC_B, MAC_A, 2), frame(MAC_B, MAC_A, 4)]
        assert used_lengths(c, c.rx, 4) == [vw.NetHdr.SIZE + 60] * 2 + [0, 0]  # given back empty
        net2 = status(appliance3)["ports"]["net2"]
        assert (net2["tx_packets"], net2["malformed_chains"]) == (2, 2)
        assert "broken" not in net2["queues"][0]

        os.ftruncate(c.mem.fd, 0)  # and now the rings
        a.transmit([HDR + frame(mac_c, MAC_A, 6), HDR + frame(MAC_B, MAC_A, 7)])
        assert wait_until(lambda: "broken" in status(appliance3)["ports"]["net2"]["queues"][0])
        assert b.received() == [frame(MAC_B, MAC_A, 7)]
        b.transmit([HDR + frame(MAC_A, MAC_B, 8)])  # the others are served as before
        assert a.received() == [frame(MAC_A, MAC_B, 8)]
        log = appliance3.log_text()
        assert log.count("client memory region 0x100000+0x100000") == 1, log
        native = "native" in next(line for line in appliance3.stdout_lines if "data path:" in line)
        assert ("shrank to 4096 bytes under a native call" in log) == native, log
    finally:
        a.close()
        b.close()
        c.close()
