"""Fuzz the split-ring chain walker: rings and indirect tables in fake guest memory.

Guest memory is a memfd mapped into a ClientMemory (as a vhost-user
SET_MEM_TABLE maps it).  The input is laid out as (see :func:`layout`):

    byte 0: queue size 2**(b % 9); byte 1: bit 0 VIRTIO_F_INDIRECT_DESC,
    bit 1 EVENT_IDX; then the avail index (u16), the avail ring (u16 heads),
    the descriptor table (16 bytes each) and whatever is left as the buffer
    area (indirect tables, data) at BUFFERS.

Every chain :meth:`SplitQueue.pop` returns must lie inside guest memory, have
its readable buffers before its writable ones, add up to its own totals and
hold at most two queue sizes of buffers; a malformed chain is skipped, never
raised; the used ring is written without an exception.  When the native fast
path is built, the same input runs again on it (appliance._fastpath) and must
give the same chains, interrupt decisions, ring state and guest memory.  Flag
bits of the input also make the ring a receive ring first (frames written
into it with :func:`~appliance.net.receive.write_frame`, either header, with
or without MRG_RXBUF) and install a dirty log (whose bits must agree too).
Flag bit 64 makes the ring a port's transmit ring switched to a second port
(:meth:`VirtioNetPort.process_tx`, the native ``switch_tx``) whose receive
ring shares the descriptor table (its own avail ring: byte 3 is its index,
its heads the input's mirrored), with the responder on the switch; both paths
must agree on the ports' and the switch's counters, the MAC table and memory.

    python tests/fuzz/fuzz_virtqueue.py -max_total_time=20 tests/fuzz/corpus/virtqueue
"""

from __future__ import annotations

import mmap
import os
import struct

import common

with common.instrumented(__name__):
    from appliance import fastpath
    from appliance.memory import ClientMemory
    from appliance.net import vhost_wire as vw
    from appliance.net.dirty_log import VhostLog
    from appliance.net.native import NativeVring
    from appliance.net.port import VirtioNetPort
    from appliance.net.receive import write_frame
    from appliance.net.responder import Responder
    from appliance.net.switch import Switch
    from appliance.net.vhost_wire import Feature as F
    from appliance.net.virtqueue import SplitQueue

BASE = 0x10000
MEM_SIZE = 64 << 10
DESC, AVAIL, USED, BUFFERS = BASE, BASE + 0x1000, BASE + 0x2000, BASE + 0x3000
RX_AVAIL, RX_USED = BASE + 0x2A00, BASE + MEM_SIZE - 0x1000  # the switched-to receive ring
MACS = (bytes.fromhex("525400000010"), bytes.fromhex("525400000011"))
R_MAC = bytes.fromhex("525400000202")

_fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
os.ftruncate(_fd, MEM_SIZE)
RAM = mmap.mmap(_fd, MEM_SIZE)
MEMORY = ClientMemory()  # the memfd cannot be sealed: reached through the fd
MEMORY.map(BASE, MEM_SIZE, fd=os.dup(_fd), user_address=BASE)
MAPPED = ClientMemory(map_unsealed=True)  # the same memory mmap'd: what the native walker takes
MAPPED.map(BASE, MEM_SIZE, fd=os.dup(_fd), user_address=BASE)
ZERO = bytes(MEM_SIZE)


def layout(size: int, avail_idx: int, heads: list[int], descs: bytes, buffers: bytes,
           flags: int = 1) -> bytes:
    """An input for this harness (what the seed script writes)."""
    exp = size.bit_length() - 1
    return (bytes([exp, flags]) + struct.pack("<H", avail_idx)
            + struct.pack(f"<{size}H", *heads) + descs.ljust(16 * size, b"\0") + buffers)


def _poke(address: int, data: bytes) -> None:
    RAM[address - BASE:address - BASE + len(data)] = data


def _walk(data: bytes) -> None:
    if len(data) < 4:
        return
    python = _run(data, None)  # the reference, through the fd
    native = fastpath.module()
    if native is not None:
        assert _run(data, native) == python, "the native walker differs from the Python one"


def _run(data: bytes, native: NativeVring | None) -> tuple[object, ...]:
    """Walk the input's ring on one walker: what came out, the ring's state, the memory."""
    size = 1 << (data[0] % 9)
    RAM[:] = ZERO
    pos = 4
    heads = data[pos:pos + 2 * size]
    pos += 2 * size
    descs = data[pos:pos + 16 * size]
    pos += 16 * size
    _poke(AVAIL, struct.pack("<HH", 0, int.from_bytes(data[2:4], "little")) + heads)
    _poke(DESC, descs)
    _poke(BUFFERS, data[pos:pos + MEM_SIZE - (BUFFERS - BASE)])
    if data[1] & 64:
        _poke(AVAIL + 2, struct.pack("<H", data[2]))
        mirrored = bytes(b for i in range(0, len(heads) - 1, 2)
                         for b in struct.pack("<H", size - 1 - int.from_bytes(heads[i:i + 2], "little") % size))
        _poke(RX_AVAIL, struct.pack("<HH", 0, data[3]) + mirrored)
        return _switched(data, native, size)
    q = SplitQueue(1)
    q.native = native
    q.indirect = bool(data[1] & 1)
    q.event_idx = bool(data[1] & 2)
    q.set_num(size)
    q.set_base(0)
    q.attach(MEMORY if native is None else MAPPED)
    q.set_addr(DESC, USED, AVAIL, 0, 0)
    q.start()
    assert q.uses_native == (native is not None)
    out: list[object] = []
    memory = q.memory
    assert memory is not None
    log = VhostLog(bytearray((BASE + MEM_SIZE // 2) // 4096 // 8))  # half the memory: marks pass it
    memory.dirty_log = log if data[1] & 4 else None
    try:
        if data[1] & 8:  # a receive ring: frames written into it (receive.write_frame)
            for i in range(2 * size + 2):
                frame = data[pos + i:pos + i + 8 * (data[2] & 0x3F)]
                out.append(write_frame(q, frame, 12 if data[1] & 16 else 10, bool(data[1] & 32),
                                       log if data[1] & 4 else None))
            out.append((bytes(log.bitmap), log.beyond))
        for _ in range(2 * size + 2):
            chain = q.pop()
            if chain is None:
                break
            _check(chain, size)
            out.append(chain)
            q.push(chain.head, chain.writable)
        out.append(q.publish())
        out.append(q.arm_kick())
        return (out, q.last_avail_idx, q.used_idx, q.counters.as_dict(), q.last_error, q.broken,
                bytes(RAM))
    finally:
        memory.dirty_log = None
        q.reset()


def _switched(data: bytes, native: NativeVring | None, size: int) -> tuple[object, ...]:
    """The input's ring as port 0's transmit ring, switched (see the module docstring)."""
    memory = MEMORY if native is None else MAPPED
    switch = Switch()
    responder = Responder(ip=bytes([10, 0, 2, 2]), mac=R_MAC)
    responder.uplink = switch.forward
    switch.attach(responder, [R_MAC])
    ports = [VirtioNetPort(f"net{i}", MACS[i]) for i in range(2)]
    features = (F.VERSION_1 | (F.NET_MRG_RXBUF if data[1] & 32 else 0)
                | (F.RING_INDIRECT_DESC if data[1] & 1 else 0)
                | (F.RING_EVENT_IDX if data[1] & 2 else 0))
    for port in ports:
        port.use_native(native)
        port.uplink = switch.forward
        port.switch = switch
        port.set_features(int(features))
        port.set_memory(memory)
        switch.attach(port, [port.mac])
    try:
        for port, index, avail, used in ((ports[0], 1, AVAIL, USED), (ports[1], 0, RX_AVAIL, RX_USED)):
            port.set_vring_num(index, size)
            port.set_vring_addr(vw.VringAddr(index=index, flags=0, desc_user_addr=DESC,
                                             used_user_addr=used, avail_user_addr=avail))
            port.set_vring_base(index, 0)
            port.set_vring_kick(index, None)
        assert ports[0].rings[1].uses_native == (native is not None)
        more = ports[0].process_tx(1, 2 * size + 2)
        switch.flush()
        table = {mac: getattr(p, "name", "?") for mac, (p, _) in switch.table.items()}
        return (more, [p.stats() for p in ports], [p.rings[i].last_error for p, i in
                                                    ((ports[0], 1), (ports[1], 0))],
                switch.counters, table, responder.counters, bytes(RAM))
    finally:
        for port in ports:
            port.set_memory(None)


def _check(chain, size: int) -> None:  # type: ignore[no-untyped-def]
    assert 0 <= chain.head < size, chain
    assert len(chain.segments) <= 2 * size, chain
    seen_writable = False
    readable = writable = 0
    for addr, length, write in chain.segments:
        assert not (seen_writable and not write), f"readable after writable: {chain}"
        seen_writable |= write
        if length:
            assert BASE <= addr and addr + length <= BASE + MEM_SIZE, f"outside memory: {chain}"
        readable += 0 if write else length
        writable += length if write else 0
    assert (readable, writable) == (chain.readable, chain.writable), chain


one_input = common.checked(_walk)

if __name__ == "__main__":
    common.run_fuzzer(one_input)
