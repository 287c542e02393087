"""The native switch (``switch_tx``) against the Python one on random traffic.

Each example builds the same small network twice: a switch with the
responder, 2-3 virtio-net ports (each its own guest memory, features drawn:
VERSION_1 or the 10-byte header, MRG_RXBUF, EVENT_IDX, one or two queue
pairs, a vhost-user dirty log of random size or none) and sometimes a
Python-only port (as the TAP).  One copy runs every port in Python, the other
on the native fast path with the switch in C.  Then the same steps run on
both: the driver of a port adds receive buffers (of random sizes: a frame may
need several, fit none, or find the ring empty), moves the driver's
``used_event``, the clock advances (refresh and ageing of the MAC table), or
a port transmits a batch of random frames (broadcast, multicast, learned,
unknown and the responder's MACs, its own or other ports' or random source
MACs, ARP requests for the responder, bad virtio-net headers, runts, chains
shorter than a header) that the runtime drains with a random budget.  After
every step both copies must agree on every byte of every guest memory, every
port's counters and rings (indices, last error, broken), the interrupts
signalled, the dirty logs (bits and marks past the end), the switch's counters
and MAC table, the responder's counters and what the Python-only port got.

Some scenarios put every guest's memory in a memfd that cannot be sealed
(DPDK's: the native switch reaches it through guarded mappings, Python through
the fd) and shrink one guest's file to a page boundary, or grow it back,
between steps: a batch that meets a vanished page in C is run again in Python,
so both still agree (except on the bytes a faulting frame write stored before
the end of the file, left out of the step that faulted).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastpath_support import require_native
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_vhost_frontend import GPA_BASE, UVA_BASE, DriverRing, Frontend, GuestMemory, Sink
from test_vhost_frontend import frame as make_frame
from test_virtqueue_differential import FdGuestMemory

from appliance.net import vhost_wire as vw
from appliance.net.port import VirtioNetPort
from appliance.net.responder import ArpPacket, EthHeader, Responder
from appliance.net.switch import Switch
from appliance.net.vhost_protocol import BackendConnection
from appliance.net.vhost_wire import Feature as F
from appliance.net.vhost_wire import Request as R

MACS = [bytes.fromhex(f"5254000000{i:02x}") for i in range(1, 4)]
R_MAC = bytes.fromhex("525400000202")
R_IP = bytes([10, 0, 2, 2])
OTHER = bytes.fromhex("525400000099")
MCAST = bytes.fromhex("01005e000001")
BCAST = b"\xff" * 6
RING = 16
MEM = 1 << 18


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class PortSpec:
    modern: bool  # VERSION_1 (12-byte header) or legacy (10 bytes)
    mrg: bool
    event_idx: bool
    queue_pairs: int
    log_bytes: int | None


@dataclass
class Scenario:
    ports: list[PortSpec]
    sink: bool  # a Python-only port on the switch (as the TAP)
    ops: list[tuple[Any, ...]]
    ageing: float = 5.0  # the switch's; below the 1 s refresh, an entry ages before it is due
    unsealed: bool = False  # memfds without MFD_ALLOW_SEALING (guarded mappings natively)


def arp_request(src: bytes) -> bytes:
    arp = ArpPacket(op=1, sha=src, spa=bytes([10, 0, 2, 15]), tha=bytes(6), tpa=R_IP)
    return EthHeader(dst=BCAST, src=src, ethertype=0x0806).pack() + arp.pack()


@st.composite
def tx_frames(draw: st.DrawFn, nports: int) -> tuple[bytes, int, int]:
    """(frame, kind, split): kind 0 valid, 1 GSO, 2 NEEDS_CSUM, 3 chain shorter than a
    header, 4 a buffer outside guest memory, 5 a writable buffer (both refused)."""
    src_port = draw(st.integers(0, nports - 1))
    kind = draw(st.sampled_from(["eth"] * 8 + ["arp", "runt"]))
    src = draw(st.sampled_from([MACS[src_port], MACS[src_port], MACS[(src_port + 1) % nports],
                                OTHER, MCAST, R_MAC]))
    if kind == "arp":
        frame = arp_request(src)
    elif kind == "runt":
        frame = draw(st.binary(min_size=0, max_size=13))
    else:
        dst = draw(st.sampled_from([BCAST, MCAST, OTHER, R_MAC, *MACS[:nports], *MACS[:nports]])
                   | st.binary(min_size=6, max_size=6))
        frame = make_frame(dst, src, draw(st.binary(max_size=40)) * draw(st.sampled_from([1, 4, 30])))
    return frame, draw(st.sampled_from([0] * 12 + [1, 2, 3, 4, 5])), draw(st.integers(0, 3))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    nports = draw(st.integers(2, 3))
    ports = [PortSpec(draw(st.booleans()), draw(st.booleans()), draw(st.booleans()),
                      draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([None, None, 0, 16, 64])))
             for _ in range(nports)]
    # a receive buffer's size; -1: readable (refused), -2: outside guest memory (refused)
    sizes = st.lists(st.sampled_from([20, 60, 64, 100, 1600, 2048, 2048, -1, -2]), min_size=1,
                     max_size=4)
    rx = st.tuples(st.just("rx"), st.integers(0, nports - 1), st.integers(0, 1), sizes)
    tx = st.tuples(st.just("tx"), st.integers(0, nports - 1),
                   st.lists(tx_frames(nports), min_size=1, max_size=6), st.integers(1, 8))
    op = st.one_of(rx, rx, tx, tx, tx,
                   st.tuples(st.just("event"), st.integers(0, nports - 1), st.integers(0, 0xFFFF)),
                   st.tuples(st.just("clock"), st.sampled_from([0.5, 0.9, 1.5, 4.0, 10.0])))
    prefill = [("rx", i, k, draw(sizes)) for i in range(nports) for k in range(2)]
    unsealed = draw(st.booleans())
    if unsealed:  # a guest shrinks its memory to a page boundary (None: grows it back)
        pages = st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, MEM // 0x1000))
        op = st.one_of(op, st.tuples(st.just("shrink"), st.integers(0, nports - 1),
                                     st.one_of(pages.map(lambda n: n << 12), st.none())))
    return Scenario(ports, draw(st.booleans()),
                    prefill + draw(st.lists(op, min_size=1, max_size=14)) + [draw(tx)],
                    draw(st.sampled_from([5.0, 5.0, 5.0, 0.75])), unsealed)


class Net:
    """One copy of the network, on one data path."""

    def __init__(self, scenario: Scenario, native: Any) -> None:
        self.clock = Clock()
        self.switch = Switch(clock=self.clock, ageing=scenario.ageing)
        self.responder = Responder(ip=R_IP, mac=R_MAC)
        self.responder.uplink = self.switch.forward
        self.switch.attach(self.responder, [R_MAC])
        self.sink = Sink()
        if scenario.sink:
            self.switch.attach(self.sink)
        self.ports: list[VirtioNetPort] = []
        self.mems: list[GuestMemory] = []
        self.rings: list[list[DriverRing]] = []
        self.conns: list[BackendConnection] = []
        self.notified: list[tuple[int, int]] = []
        self.logs: list[bytearray | None] = []
        self.heads: list[list[int]] = []
        for i, spec in enumerate(scenario.ports):
            port = VirtioNetPort(f"net{i}", MACS[i], queue_pairs=spec.queue_pairs)
            port.use_native(native)
            port.uplink = self.switch.forward
            port.switch = self.switch
            port.notify = lambda fd, i=i, port=port: self.notified.append((i, port.call.index(fd)))
            self.switch.attach(port, [port.mac])
            conn = BackendConnection(port, name=port.name)
            fe = Frontend(conn)
            mem = (FdGuestMemory(MEM, gpa=GPA_BASE, uva=UVA_BASE) if scenario.unsealed
                   else GuestMemory(MEM))
            rings = [DriverRing(mem, k, RING) for k in range(2 * spec.queue_pairs)]
            features = ((F.VERSION_1 if spec.modern else 0) | (F.NET_MRG_RXBUF if spec.mrg else 0)
                        | (F.RING_EVENT_IDX if spec.event_idx else 0) | F.PROTOCOL_FEATURES
                        | (F.LOG_ALL if spec.log_bytes is not None else 0))
            fe.negotiate(features)
            fe.mem_table([mem])
            for ring in rings:
                fe.start_ring(ring)
            fe.u64(R.SET_STATUS, 0xF)
            log = None
            if spec.log_bytes is not None:
                log = bytearray(spec.log_bytes)
                port.set_log(log)
            assert port.rings[1].uses_native == (native is not None)
            self.ports.append(port)
            self.mems.append(mem)
            self.rings.append(rings)
            self.conns.append(conn)
            self.logs.append(log)
            self.heads.append([0] * len(rings))

    def run(self, op: tuple[Any, ...]) -> Any:
        if op[0] == "clock":
            self.clock.now += op[1]
            return None
        port_i = op[1]
        port, rings, mem = self.ports[port_i], self.rings[port_i], self.mems[port_i]
        if op[0] == "shrink":
            os.ftruncate(mem.fd, mem.size if op[2] is None else op[2])
            return None
        if op[0] == "event":
            for ring in rings[0::2]:
                ring.set_used_event(op[2])
            return None
        if op[0] == "rx":
            ring = rings[2 * min(op[2], len(rings) // 2 - 1)]
            for size in op[3]:
                head = self.take_head(port_i, ring)
                n = abs(size) * 100 if size < 0 else size
                buf = mem.alloc(n) if mem._next + n < mem.gpa + mem.size - 0x100 else mem.gpa
                if size == -2:
                    buf = mem.gpa + mem.size - 50  # runs past the end of memory
                ring.set_desc(head, buf, n, 0 if size == -1 else vw.DescFlag.WRITE)
                ring.make_available(head)
            return None
        ring = rings[1]
        hdr_len = port.hdr_len
        for frame, bad, split in op[2]:
            hdr = bytearray(hdr_len)
            if bad == 1:
                hdr[1] = 1  # GSO_TCPV4
            elif bad == 2:
                hdr[0] = 1  # NEEDS_CSUM
            data = bytes(hdr) + frame
            if bad == 3:
                data = data[:hdr_len - 1]
            head = self.take_head(port_i, ring)
            buf = mem.alloc(max(len(data), 1)) if mem._next + len(data) < mem.gpa + mem.size - 0x100 \
                else mem.gpa + 0x8000
            mem.write(buf, data)
            if bad >= 4:  # a refused chain: past memory's end, or writable
                ring.set_desc(head, mem.gpa + mem.size - 8 if bad == 4 else buf, len(data),
                              0 if bad == 4 else vw.DescFlag.WRITE)
            elif split and len(data) > split:  # two descriptors: head and next
                nxt = (head + 1) % RING
                ring.set_desc(head, buf, split, vw.DescFlag.NEXT, nxt)
                ring.set_desc(nxt, buf + split, len(data) - split)
            else:
                ring.set_desc(head, buf, len(data))
            ring.make_available(head)
        more = port.process_tx(1, op[3])
        self.switch.flush()
        return more

    def take_head(self, port_i: int, ring: DriverRing) -> int:
        k = ring.index
        head = self.heads[port_i][k]
        self.heads[port_i][k] = (head + 2) % RING
        return head

    def native_ok(self) -> list[bool]:
        return [port.memory is None or port.memory.native_ok for port in self.ports]

    def state(self, fault_window: bool = False) -> tuple[Any, ...]:
        """``fault_window``: zero the last 4 KiB before the end of each shrunk file."""
        ports = []
        for port, mem, log in zip(self.ports, self.mems, self.logs, strict=True):
            rings = [(q.last_avail_idx, q.used_idx, q.unpublished, q.last_error, q.broken,
                      q.counters.as_dict()) for q in port.rings]
            image = bytearray(mem.read(mem.gpa, mem.size))
            if fault_window and len(image) < mem.size:
                start = max(0, len(image) - 0x1000)
                image[start:] = bytes(len(image) - start)
            ports.append((bytes(image), port.stats(), rings,
                          None if log is None else (bytes(log), port.log and port.log.beyond)))
        table = {mac: (getattr(p, "name", "?"), t) for mac, (p, t) in self.switch.table.items()}
        return (ports, self.notified, dict(self.switch.counters), table,
                dict(self.responder.counters), self.sink.frames)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        for rings in self.rings:
            for ring in rings:
                ring.close()
        for mem in self.mems:
            mem.close()


@contextmanager
def nets(scenario: Scenario) -> Iterator[tuple[Net, Net]]:
    python = Net(scenario, None)
    try:
        native = Net(scenario, require_native())
        try:
            yield python, native
        finally:
            native.close()
    finally:
        python.close()


def check_same(scenario: Scenario, record: bool = False) -> None:
    with nets(scenario) as (python, native):
        assert python.state() == native.state()
        for step, op in enumerate(scenario.ops):
            before = dict(native.switch.counters)
            was_ok = native.native_ok()
            want = python.run(op)
            got = native.run(op)
            assert got == want, f"step {step} {op[0]}: native {got!r}, python {want!r}"
            faulted = was_ok != native.native_ok()
            assert native.state(faulted) == python.state(faulted), f"after step {step} {op[0]}"
            if record and faulted:
                event(f"{op[0]}: a native call faulted in a vanished page")
            if record and op[0] == "tx":  # what the batch met (--hypothesis-show-statistics)
                for name, n in native.switch.counters.items():
                    if n > before[name]:
                        event(f"tx: {name}")
                for port in native.ports:
                    stats = port.stats()
                    for key in ("tx_packets", "tx_dropped", "malformed_chains"):
                        if stats[key]:
                            event(f"some port: {key}")


@settings(max_examples=int(os.environ.get("APPLIANCE_DIFF_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_native_switch_matches_python(scenario: Scenario) -> None:
    check_same(scenario, record=True)


def test_frames_for_python_are_handed_back_in_order() -> None:
    """An ARP request for the responder in the middle of a batch: the responder
    answers it (Python), the frames around it are switched natively, in order."""
    spec = PortSpec(True, True, False, 1, None)
    scenario = Scenario([spec, spec], True, [])
    with nets(scenario) as (python, native):
        for net in (python, native):
            net.run(("rx", 0, 0, [2048] * 4))
            net.run(("rx", 1, 0, [2048] * 4))
        batch = [(make_frame(MACS[1], MACS[0]), 0, 0), (arp_request(MACS[0]), 0, 0),
                 (make_frame(OTHER, MACS[0]), 0, 0)]
        for net in (python, native):
            net.run(("tx", 0, batch, 8))
        assert native.state() == python.state()
        assert native.responder.counters["arp_replies"] == 1
        assert native.ports[0].stats()["tx_packets"] == 1  # the reply
        assert native.ports[1].stats()["tx_packets"] == 3  # forwarded, flooded ARP, unknown
        assert len(native.sink.frames) == 2  # the flooded ARP and the unknown unicast


class Spy:
    """The native module, counting the calls made to it."""

    def __init__(self) -> None:
        self.native = require_native()
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self.native, name)


def spied_net(sink: bool = False) -> tuple[Net, Spy]:
    spy = Spy()
    spec = PortSpec(True, True, False, 1, None)
    net = Net(Scenario([spec, spec], sink, []), spy)
    net.run(("rx", 1, 0, [2048] * 4))
    net.run(("rx", 0, 0, [2048] * 4))
    spy.calls.clear()
    return net, spy


def test_native_switch_takes_the_batch_in_one_call() -> None:
    """Two ports, learned MACs: one switch_tx per batch, no per-frame receive call."""
    net, spy = spied_net()
    try:
        net.run(("tx", 0, [(make_frame(MACS[1], MACS[0]), 0, 0)] * 3, 8))
        assert spy.calls.count("switch_tx") == 1
        assert "receive" not in spy.calls and "drain" not in spy.calls
        assert net.ports[1].stats()["tx_packets"] == 3
        assert net.switch.counters["forwarded"] == 3
    finally:
        net.close()


def test_hooked_or_capturing_source_port_runs_its_batch_in_python() -> None:
    """A hook on the source (fault rule, link down) or its pcap: the batch is Python's."""
    net, spy = spied_net()
    try:
        net.ports[0].hooked = lambda: True
        net.run(("tx", 0, [(make_frame(MACS[1], MACS[0]), 0, 0)], 8))
        assert "switch_tx" not in spy.calls and spy.calls.count("receive") == 1
        net.ports[0].hooked = lambda: False
        net.ports[0].pcap = io.BytesIO()  # any frame sink
        spy.calls.clear()
        net.run(("tx", 0, [(make_frame(MACS[1], MACS[0]), 0, 0)], 8))
        assert "switch_tx" not in spy.calls and spy.calls.count("receive") == 1
        assert net.ports[1].stats()["tx_packets"] == 2
    finally:
        net.close()


def test_a_frame_for_a_hooked_destination_is_handed_back() -> None:
    """The destination's hooks must see the frame: C hands it back, Python delivers it
    through the port's deliver (whatever wraps it), the frames around it stay native."""
    net, spy = spied_net()
    try:
        net.ports[1].hooked = lambda: True
        net.run(("tx", 0, [(make_frame(MACS[1], MACS[0]), 0, 0)] * 3, 8))
        assert spy.calls.count("switch_tx") == 1 and spy.calls.count("switch_frames") == 2
        assert spy.calls.count("receive") == 3
        assert net.ports[1].stats()["tx_packets"] == 3
    finally:
        net.close()


def test_an_entry_aged_before_its_refresh_is_due_is_not_learned_again() -> None:
    """Ageing shorter than the refresh: the source's entry is aged (a lookup of it
    would remove it) but not due for a refresh, so forward does not learn it
    again; the destination's aged entry is removed and the frame flooded."""
    spec = PortSpec(True, True, False, 1, None)
    with nets(Scenario([spec, spec], False, [], ageing=0.5)) as (python, native):
        for net in (python, native):
            net.run(("rx", 1, 0, [2048] * 4))
            net.run(("clock", 0.75))
            net.run(("tx", 0, [(make_frame(MACS[1], MACS[0]), 0, 0)], 8))
        assert native.state() == python.state()
        assert MACS[1] not in native.switch.table and native.switch.counters["flooded"] == 1
        assert native.switch.table[MACS[0]][1] == 100.0  # not learned again


def test_the_table_snapshot_is_not_reused_on_the_instant_an_entry_changes_state() -> None:
    """The snapshot is cached until an entry's next state change, t + 1 s here; at
    that instant, as floats, an entry learned at t = 127.00000000000004 is already
    older than 1 s (128.00000000000006 - t > 1.0): forward learns it again."""
    spec = PortSpec(True, True, False, 1, None)
    t = 127.00000000000004
    assert (t + 1.0) - t > 1.0
    with nets(Scenario([spec, spec], False, [], ageing=1000.0)) as (python, native):
        for net in (python, native):
            net.run(("rx", 1, 0, [2048] * 4))
            for now in (t, t + 0.5, t + 1.0):  # learned, the snapshot, the refresh
                net.clock.now = now
                net.run(("tx", 0, [(make_frame(MACS[1], OTHER), 0, 0)], 8))
        assert native.state() == python.state()
        assert native.switch.table[OTHER][1] == t + 1.0


def test_a_table_that_could_evict_sends_the_rest_of_the_batch_to_python() -> None:
    """The frame Python forwarded filled the table up to where learning could evict:
    the frames after it are switched in Python, in order, with the same outcome."""
    spec = PortSpec(True, True, False, 1, None)
    with nets(Scenario([spec, spec], False, [])) as (python, native):
        batch = [(arp_request(OTHER), 0, 0), (make_frame(MACS[1], MACS[0]), 0, 0),
                 (make_frame(MACS[1], MACS[0]), 0, 0)]
        for net in (python, native):
            net.switch.max_entries = len(net.switch.table) + 4  # room for the budget of 4
            net.run(("rx", 1, 0, [2048] * 4))
            net.run(("tx", 0, batch, 4))
        assert native.state() == python.state()
        assert native.ports[1].stats()["tx_packets"] == 3
