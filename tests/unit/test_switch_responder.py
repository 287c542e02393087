"""L2 learning switch, the responder (ARP, ICMP echo, UDP echo) with checksum checks, pcap."""

from __future__ import annotations

import io
import struct

import pytest
from test_vhost_frontend import HDR, Rig, Sink

from appliance.net.pcap import PcapWriter
from appliance.net.responder import (
    ArpPacket,
    EthHeader,
    IcmpEcho,
    Ipv4Header,
    Responder,
    UdpHeader,
    internet_checksum,
    pseudo_header_sum,
    udp_checksum,
)
from appliance.net.switch import Switch

MAC1 = bytes.fromhex("020000000001")
MAC2 = bytes.fromhex("020000000002")
MAC3 = bytes.fromhex("020000000003")
BCAST = b"\xff" * 6
R_MAC = bytes.fromhex("525400000202")
R_IP = bytes([10, 0, 2, 2])
G_IP = bytes([10, 0, 2, 15])


def eth(dst: bytes, src: bytes, ethertype: int = 0x0800, payload: bytes = bytes(46)) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


class Named(Sink):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def net() -> tuple[Switch, Named, Named, Named, Clock]:
    clock = Clock()
    sw = Switch(clock=clock, ageing=300.0, max_entries=4)
    a, b, c = Named("a"), Named("b"), Named("c")
    for p in (a, b, c):
        sw.attach(p)
    return sw, a, b, c, clock


# ---------------------------------------------------------------- switch
def test_unknown_and_broadcast_flood_except_source(net) -> None:
    sw, a, b, c, _ = net
    f = eth(MAC3, MAC1)
    sw.forward(a, f)
    assert a.frames == [] and b.frames == [f] and c.frames == [f]
    g = eth(BCAST, MAC2)
    sw.forward(b, g)
    assert a.frames == [g] and b.frames == [f] and c.frames == [f, g]
    assert sw.counters["flooded"] == 2


def test_learning_then_unicast(net) -> None:
    sw, a, b, c, _ = net
    sw.forward(a, eth(BCAST, MAC1))
    for p in (a, b, c):
        p.frames.clear()
    f = eth(MAC1, MAC2)
    sw.forward(b, f)
    assert a.frames == [f] and b.frames == [] and c.frames == []
    assert sw.lookup(MAC1) is a and sw.lookup(MAC2) is b
    assert sw.counters["forwarded"] == 1


def test_frame_for_the_source_port_is_filtered(net) -> None:
    sw, a, _b, _c, _ = net
    sw.forward(a, eth(BCAST, MAC1))
    sw.forward(a, eth(MAC1, MAC2))  # MAC2 says it is behind a too, talks to MAC1 there
    assert sw.counters["filtered"] == 1


def test_station_move(net) -> None:
    sw, a, b, _c, _ = net
    sw.forward(a, eth(BCAST, MAC1))
    sw.forward(b, eth(BCAST, MAC1))
    assert sw.lookup(MAC1) is b and sw.counters["moved"] == 1


def test_multicast_source_not_learned(net) -> None:
    sw, a, _b, _c, _ = net
    sw.forward(a, eth(BCAST, b"\x01" + MAC1[1:]))
    assert sw.table == {}


def test_ageing(net) -> None:
    sw, a, b, c, clock = net
    sw.forward(a, eth(BCAST, MAC1))
    clock.now = 301.0
    for p in (a, b, c):
        p.frames.clear()
    sw.forward(b, eth(MAC1, MAC2))
    assert a.frames and c.frames  # aged out: flooded again


def test_forget_port(net) -> None:
    sw, a, _b, c, _ = net
    sw.forward(a, eth(BCAST, MAC1))
    sw.forget(a)
    assert sw.lookup(MAC1) is None
    sw.detach(c)
    assert c not in sw.ports


def test_table_limit_evicts_oldest(net) -> None:
    sw, a, _b, _c, clock = net
    for i in range(5):
        clock.now = float(i)
        sw.forward(a, eth(BCAST, bytes([2, 0, 0, 0, 1, i])))
    assert len(sw.table) == 4
    assert bytes([2, 0, 0, 0, 1, 0]) not in sw.table
    assert sw.counters["evicted"] == 1


def test_runts_dropped_and_flush_reaches_ports(net) -> None:
    sw, a, b, c, _ = net
    sw.forward(a, b"short")
    assert sw.counters["runts"] == 1 and not b.frames
    sw.flush()
    assert (a.flushes, b.flushes, c.flushes) == (1, 1, 1)


def test_seeded_mac_and_stats(net) -> None:
    sw, _a, _b, _c, _ = net
    sw.attach(Named("d"), [MAC3])
    st = sw.stats()
    assert st["entries"] == 1 and st["table"] == {"02:00:00:00:00:03": "d"}


# ---------------------------------------------------------------- checksums
def test_internet_checksum_rfc1071_example() -> None:
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert internet_checksum(data) == 0x220D
    assert internet_checksum(data + struct.pack("!H", 0x220D)) == 0


def test_internet_checksum_odd_length() -> None:
    assert internet_checksum(b"\x01") == (~0x0100) & 0xFFFF


def test_ipv4_header_checksum_known_value() -> None:
    # Well-known example header (Wikipedia "IPv4 header checksum"): checksum b861.
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(hdr) == 0xB861


# ---------------------------------------------------------------- responder
def responder() -> tuple[Responder, list[bytes]]:
    r = Responder(R_IP, R_MAC, udp_echo_port=7)
    out: list[bytes] = []
    r.uplink = lambda port, frame: out.append(frame)
    return r, out


def arp_request(target: bytes = R_IP) -> bytes:
    arp = ArpPacket(op=1, sha=MAC1, spa=G_IP, tha=bytes(6), tpa=target)
    return EthHeader(dst=BCAST, src=MAC1, ethertype=0x0806).pack() + arp.pack()


def ipv4(proto: int, payload: bytes, dst: bytes = R_IP, frag: int = 0, corrupt: bool = False) -> bytes:
    hdr = Ipv4Header(total_length=20 + len(payload), ident=7, flags_fragment=frag, ttl=64,
                     protocol=proto, src=G_IP, dst=dst)
    hdr.checksum = internet_checksum(hdr.pack()) ^ (1 if corrupt else 0)
    return EthHeader(dst=R_MAC, src=MAC1, ethertype=0x0800).pack() + hdr.pack() + payload


def icmp_echo(data: bytes = b"ping-data!", corrupt: bool = False) -> bytes:
    msg = IcmpEcho(type=8, code=0, ident=0x1234, sequence=5)
    msg.checksum = internet_checksum(msg.pack() + data) ^ (1 if corrupt else 0)
    return msg.pack() + data


def udp(data: bytes, dport: int = 7, checksum: bool = True, corrupt: bool = False) -> bytes:
    hdr = UdpHeader(sport=40000, dport=dport, length=8 + len(data))
    if checksum:
        hdr.checksum = udp_checksum(G_IP, R_IP, hdr.pack() + data) ^ (1 if corrupt else 0)
    return hdr.pack() + data


def check_ipv4_reply(frame: bytes, proto: int) -> tuple[Ipv4Header, bytes]:
    eth_hdr = EthHeader.unpack(frame)
    assert (eth_hdr.dst, eth_hdr.src, eth_hdr.ethertype) == (MAC1, R_MAC, 0x0800)
    assert len(frame) >= 60
    ip = Ipv4Header.unpack(frame, 14)
    assert internet_checksum(frame[14:34]) == 0, "IPv4 header checksum"
    assert (ip.version_ihl, ip.protocol, ip.src, ip.dst, ip.ttl) == (0x45, proto, R_IP, G_IP, 64)
    return ip, frame[34:14 + ip.total_length]


def test_arp_reply() -> None:
    r, out = responder()
    r.deliver(arp_request())
    (frame,) = out
    assert len(frame) == 60
    e = EthHeader.unpack(frame)
    assert (e.dst, e.src, e.ethertype) == (MAC1, R_MAC, 0x0806)
    arp = ArpPacket.unpack(frame, 14)
    assert (arp.op, arp.sha, arp.spa, arp.tha, arp.tpa) == (2, R_MAC, R_IP, MAC1, G_IP)
    assert r.counters["arp_replies"] == 1


def test_arp_for_someone_else_ignored() -> None:
    r, out = responder()
    r.deliver(arp_request(bytes([10, 0, 2, 3])))
    assert out == [] and r.counters["ignored"] == 1


def test_icmp_echo_reply_with_checksums() -> None:
    r, out = responder()
    data = bytes(range(57))  # odd length on purpose
    r.deliver(ipv4(1, icmp_echo(data)))
    (frame,) = out
    _ip, payload = check_ipv4_reply(frame, 1)
    assert internet_checksum(payload) == 0, "ICMP checksum"
    echo = IcmpEcho.unpack(payload)
    assert (echo.type, echo.code, echo.ident, echo.sequence) == (0, 0, 0x1234, 5)
    assert payload[8:] == data


def test_icmp_bad_checksum_dropped() -> None:
    r, out = responder()
    r.deliver(ipv4(1, icmp_echo(corrupt=True)))
    assert out == [] and r.counters["bad_checksum"] == 1


def test_ip_header_bad_checksum_dropped() -> None:
    r, out = responder()
    r.deliver(ipv4(1, icmp_echo(), corrupt=True))
    assert out == [] and r.counters["bad_checksum"] == 1


def test_udp_echo_reply_with_pseudo_header_checksum() -> None:
    r, out = responder()
    data = b"hello, echo" * 5 + b"!"
    r.deliver(ipv4(17, udp(data)))
    (frame,) = out
    _ip, payload = check_ipv4_reply(frame, 17)
    hdr = UdpHeader.unpack(payload)
    assert (hdr.sport, hdr.dport, hdr.length) == (7, 40000, 8 + len(data))
    assert hdr.checksum != 0
    assert internet_checksum(payload, pseudo_header_sum(R_IP, G_IP, 17, len(payload))) == 0
    assert payload[8:] == data
    assert r.counters["udp_replies"] == 1


def test_udp_without_checksum_accepted() -> None:
    r, out = responder()
    r.deliver(ipv4(17, udp(b"no checksum", checksum=False)))
    assert len(out) == 1


def test_udp_bad_checksum_and_other_port() -> None:
    r, out = responder()
    r.deliver(ipv4(17, udp(b"x", corrupt=True)))
    r.deliver(ipv4(17, udp(b"x", dport=9)))
    assert out == []
    assert r.counters["bad_checksum"] == 1 and r.counters["ignored"] == 1


def test_fragments_other_hosts_and_padding() -> None:
    r, out = responder()
    r.deliver(ipv4(1, icmp_echo(), frag=0x2000))  # MF set
    r.deliver(ipv4(1, icmp_echo(), dst=bytes([10, 0, 2, 9])))
    assert out == []
    padded = ipv4(1, icmp_echo(b"")) + bytes(20)  # Ethernet padding after the datagram
    r.deliver(padded)
    assert len(out) == 1


def test_malformed_ip_never_raises() -> None:
    r, out = responder()
    base = ipv4(17, udp(b"abc"))
    for cut in range(14, len(base)):
        r.deliver(base[:cut])
    bad_ihl = bytearray(base)
    bad_ihl[14] = 0x4F  # IHL 60 bytes, longer than the packet
    r.deliver(bytes(bad_ihl))
    assert out == []
    assert r.counters["malformed"] > 0


def test_not_for_us_is_not_even_counted() -> None:
    r, out = responder()
    r.deliver(eth(MAC2, MAC1))
    assert out == [] and sum(r.counters.values()) == 0


def test_guest_arp_and_ping_through_switch_and_port() -> None:
    """A frame from the guest's TX ring reaches the responder and the reply its RX ring."""
    rig = Rig()
    try:
        r = Responder(R_IP, R_MAC)
        r.uplink = rig.switch.forward
        rig.switch.attach(r)
        bufs = [rig.rx.add_buffer(i, writable=2048) for i in range(2)]
        req = arp_request()
        rig.tx.add_buffer(0, HDR + req[:6] + rig.port.mac + req[12:])
        rig.port.process_tx(1, 64)
        rig.switch.flush()
        (used,) = rig.rx.take_used()
        reply = rig.mem.read(bufs[0], used[1])[12:]
        assert ArpPacket.unpack(reply, 14).spa == R_IP
        ping = ipv4(1, icmp_echo())
        rig.tx.add_buffer(1, HDR + ping[:6] + rig.port.mac + ping[12:])
        rig.port.process_tx(1, 64)
        rig.switch.flush()
        (used,) = rig.rx.take_used()
        reply = rig.mem.read(bufs[1], used[1])[12:]
        assert EthHeader.unpack(reply).dst == rig.port.mac
        assert IcmpEcho.unpack(reply, 34).type == 0
        assert rig.port.stats()["tx_packets"] == 2
    finally:
        rig.close()


# ---------------------------------------------------------------- pcap
def test_pcap_format() -> None:
    sink = io.BytesIO()
    w = PcapWriter(sink, clock=lambda: 1700000000.25, snaplen=100)
    w.write(b"\x01" * 60)
    w.write(b"\x02" * 150)
    data = sink.getvalue()
    magic, vmaj, vmin, _zone, _sigfigs, snaplen, linktype = struct.unpack("<IHHiIII", data[:24])
    assert (magic, vmaj, vmin, snaplen, linktype) == (0xA1B2C3D4, 2, 4, 100, 1)
    sec, usec, incl, orig = struct.unpack("<IIII", data[24:40])
    assert (sec, usec, incl, orig) == (1700000000, 250000, 60, 60)
    off = 40 + 60
    assert struct.unpack("<IIII", data[off:off + 16])[2:] == (100, 150)
    assert len(data) == 24 + 16 + 60 + 16 + 100
