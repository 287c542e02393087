"""A small host on the switch: ARP, ICMP echo and UDP echo (device layer).

Theory of operation
-------------------
The responder is a switch port with one IPv4 address and one MAC
(``net.responder``).  It answers

* ARP requests for its address (RFC 826) with an ARP reply;
* ICMP echo requests to its address (RFC 792) with an echo reply carrying the
  same identifier, sequence and data;
* UDP datagrams to its address and ``udp_echo_port`` (RFC 862) with the same
  payload, ports swapped.

Input is checked before anything is answered: Ethernet destination is ours
(or broadcast, for ARP), IPv4 version 4, header length 20..60 and within the
frame, total length consistent, header checksum correct, not a fragment;
ICMP checksum correct; UDP length consistent and its checksum correct when
present.  Anything else is counted and ignored.  Replies carry freshly
computed IPv4, ICMP and UDP checksums (RFC 1071; a computed UDP checksum of 0
is sent as 0xFFFF, RFC 768) and are padded to the 60-byte Ethernet minimum.

Wire headers are declared once below as :class:`~appliance.wire.Struct` data
in network byte order.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Annotated, Any

from appliance.wire import U8, U16, Struct

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ARP_REQUEST = 1
ARP_REPLY = 2
ETH_MIN_FRAME = 60  # without FCS
BROADCAST = b"\xff" * 6


class NetStruct(Struct):
    BYTE_ORDER = "!"


class EthHeader(NetStruct, size=14):
    dst: Annotated[bytes, "6s"] = b""
    src: Annotated[bytes, "6s"] = b""
    ethertype: U16 = 0


class ArpPacket(NetStruct, size=28):
    htype: U16 = 1
    ptype: U16 = ETH_P_IP
    hlen: U8 = 6
    plen: U8 = 4
    op: U16 = 0
    sha: Annotated[bytes, "6s"] = b""
    spa: Annotated[bytes, "4s"] = b""
    tha: Annotated[bytes, "6s"] = b""
    tpa: Annotated[bytes, "4s"] = b""


class Ipv4Header(NetStruct, size=20):
    version_ihl: U8 = 0x45
    tos: U8 = 0
    total_length: U16 = 0
    ident: U16 = 0
    flags_fragment: U16 = 0
    ttl: U8 = 64
    protocol: U8 = 0
    checksum: U16 = 0
    src: Annotated[bytes, "4s"] = b""
    dst: Annotated[bytes, "4s"] = b""


IP_MF = 0x2000
IP_OFFSET_MASK = 0x1FFF


class IcmpEcho(NetStruct, size=8):
    type: U8 = 0
    code: U8 = 0
    checksum: U16 = 0
    ident: U16 = 0
    sequence: U16 = 0


class UdpHeader(NetStruct, size=8):
    sport: U16 = 0
    dport: U16 = 0
    length: U16 = 0
    checksum: U16 = 0


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 ones' complement of the ones' complement sum of 16-bit words."""
    n = len(data)
    total: int = initial + sum(struct.unpack_from(f"!{n // 2}H", data))
    if n % 2:
        total += data[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """The IPv4 pseudo-header's contribution to a UDP/TCP checksum (not folded)."""
    words: tuple[int, ...] = struct.unpack("!HHHH", src + dst)
    return sum(words) + protocol + length


def udp_checksum(src: bytes, dst: bytes, segment: bytes) -> int:
    """The checksum field value for a UDP segment (its checksum field zeroed)."""
    value = internet_checksum(segment, pseudo_header_sum(src, dst, IPPROTO_UDP, len(segment)))
    return value or 0xFFFF


class Responder:
    """The built-in host at ``net.responder.ip`` / ``net.responder.mac``."""

    name = "responder"

    def __init__(self, ip: bytes, mac: bytes, udp_echo_port: int = 7) -> None:
        self.ip = ip
        self.mac = mac
        self.udp_echo_port = udp_echo_port
        self.uplink: Callable[[Any, bytes], None] = lambda port, frame: None
        self._ident = 0
        self.counters = {"arp_replies": 0, "icmp_replies": 0, "udp_replies": 0,
                         "bad_checksum": 0, "malformed": 0, "ignored": 0}

    # ------------------------------------------------------------ switch port
    def deliver(self, frame: bytes) -> None:
        dst = frame[0:6]
        if dst != self.mac and dst != BROADCAST:
            return  # flooded traffic for someone else: not even counted
        try:
            reply = self.answer(frame)
        except struct.error:
            self.counters["malformed"] += 1
            return
        if reply is not None:
            self.uplink(self, reply)

    def flush(self) -> None:
        pass

    def native_target(self) -> bytes:
        """What the native switch needs to know of this port: it ignores every frame
        except those for this MAC or broadcast (those go through :meth:`deliver`)."""
        return self.mac

    # ------------------------------------------------------------ protocols
    def answer(self, frame: bytes) -> bytes | None:
        """The reply to ``frame``, or None when it asks for nothing we answer."""
        if len(frame) < EthHeader.SIZE:
            self.counters["malformed"] += 1
            return None
        eth = EthHeader.unpack(frame)
        if eth.ethertype == ETH_P_ARP:
            return self._arp(eth, frame[EthHeader.SIZE:])
        if eth.ethertype == ETH_P_IP and eth.dst == self.mac:
            return self._ipv4(eth, frame[EthHeader.SIZE:])
        self.counters["ignored"] += 1
        return None

    def _frame(self, dst: bytes, ethertype: int, payload: bytes) -> bytes:
        frame = EthHeader(dst=dst, src=self.mac, ethertype=ethertype).pack() + payload
        if len(frame) < ETH_MIN_FRAME:
            frame += bytes(ETH_MIN_FRAME - len(frame))
        return frame

    def _arp(self, eth: EthHeader, body: bytes) -> bytes | None:
        if len(body) < ArpPacket.SIZE:
            self.counters["malformed"] += 1
            return None
        arp = ArpPacket.unpack(body)
        if (arp.htype, arp.ptype, arp.hlen, arp.plen) != (1, ETH_P_IP, 6, 4):
            self.counters["ignored"] += 1
            return None
        if arp.op != ARP_REQUEST or arp.tpa != self.ip or arp.sha[0] & 1:
            self.counters["ignored"] += 1
            return None
        reply = ArpPacket(op=ARP_REPLY, sha=self.mac, spa=self.ip, tha=arp.sha, tpa=arp.spa)
        self.counters["arp_replies"] += 1
        return self._frame(arp.sha, ETH_P_ARP, reply.pack())

    def _ipv4(self, eth: EthHeader, packet: bytes) -> bytes | None:
        if len(packet) < Ipv4Header.SIZE:
            self.counters["malformed"] += 1
            return None
        ip = Ipv4Header.unpack(packet)
        ihl = (ip.version_ihl & 0xF) * 4
        if ip.version_ihl >> 4 != 4 or ihl < 20 or ihl > len(packet) \
                or not ihl <= ip.total_length <= len(packet):
            self.counters["malformed"] += 1
            return None
        if internet_checksum(packet[:ihl]) != 0:
            self.counters["bad_checksum"] += 1
            return None
        if ip.dst != self.ip or ip.flags_fragment & (IP_MF | IP_OFFSET_MASK):
            self.counters["ignored"] += 1
            return None
        payload = packet[ihl:ip.total_length]  # drops Ethernet padding
        if ip.protocol == IPPROTO_ICMP:
            answer = self._icmp(payload)
        elif ip.protocol == IPPROTO_UDP:
            answer = self._udp(ip, payload)
        else:
            answer = None
            self.counters["ignored"] += 1
        if answer is None:
            return None
        self._ident = (self._ident + 1) & 0xFFFF
        hdr = Ipv4Header(total_length=Ipv4Header.SIZE + len(answer), ident=self._ident,
                         protocol=ip.protocol, src=self.ip, dst=ip.src)
        raw = hdr.pack()
        hdr.checksum = internet_checksum(raw)
        return self._frame(eth.src, ETH_P_IP, hdr.pack() + answer)

    def _icmp(self, payload: bytes) -> bytes | None:
        if len(payload) < IcmpEcho.SIZE:
            self.counters["malformed"] += 1
            return None
        if internet_checksum(payload) != 0:
            self.counters["bad_checksum"] += 1
            return None
        echo = IcmpEcho.unpack(payload)
        if echo.type != ICMP_ECHO_REQUEST or echo.code != 0:
            self.counters["ignored"] += 1
            return None
        data = payload[IcmpEcho.SIZE:]
        reply = IcmpEcho(type=ICMP_ECHO_REPLY, ident=echo.ident, sequence=echo.sequence)
        reply.checksum = internet_checksum(reply.pack() + data)
        self.counters["icmp_replies"] += 1
        return reply.pack() + data

    def _udp(self, ip: Ipv4Header, payload: bytes) -> bytes | None:
        if len(payload) < UdpHeader.SIZE:
            self.counters["malformed"] += 1
            return None
        udp = UdpHeader.unpack(payload)
        if not UdpHeader.SIZE <= udp.length <= len(payload):
            self.counters["malformed"] += 1
            return None
        segment = payload[:udp.length]
        if udp.checksum and internet_checksum(
                segment, pseudo_header_sum(ip.src, ip.dst, IPPROTO_UDP, udp.length)) != 0:
            self.counters["bad_checksum"] += 1
            return None
        if udp.dport != self.udp_echo_port:
            self.counters["ignored"] += 1
            return None
        data = segment[UdpHeader.SIZE:]
        reply = UdpHeader(sport=udp.dport, dport=udp.sport, length=udp.length)
        reply.checksum = udp_checksum(self.ip, ip.src, reply.pack() + data)
        self.counters["udp_replies"] += 1
        return reply.pack() + data

    def stats(self) -> dict[str, Any]:
        return {"ip": ".".join(str(b) for b in self.ip),
                "mac": ":".join(f"{b:02x}" for b in self.mac), **self.counters}
