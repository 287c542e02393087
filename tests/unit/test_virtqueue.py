"""Split virtqueue: chain walking bounds, ring state, suppression (virtio 1.2 §2.7).

Every ring test runs on both data paths (``fastpath``: the Python walker and the
native one, appliance._fastpath) and, for the mmap'd ones, both memory kinds.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from fastpath_support import PATHS, walker
from test_memory import survives
from test_vhost_frontend import DriverRing, GuestMemory

from appliance.memory import ClientMemory, FdWords
from appliance.net import vhost_wire as vw
from appliance.net.descriptor_chain import MAX_CHAIN_BYTES
from appliance.net.virtqueue import SplitQueue
from appliance.net.vring_state import RING_ALLOWED, RING_TRANSITIONS, RingError, RingState

NEXT, WRITE, INDIRECT = int(vw.DescFlag.NEXT), int(vw.DescFlag.WRITE), int(vw.DescFlag.INDIRECT)


class Bench:
    """A started queue of ``size`` over one guest memory region, plus its driver.

    ``fd_io``: the region cannot be sealed, so the rings are reached with pread/pwrite
    (and the Python walker runs whatever ``fastpath`` says).
    ``fastpath``: "python" or "native" (appliance._fastpath).
    """

    def __init__(self, size: int = 8, indirect: bool = True, fd_io: bool = False,
                 mem_size: int = 1 << 16, fastpath: str = "python") -> None:
        self.mem = GuestMemory(mem_size, sealable=not fd_io)
        self.cm = ClientMemory()
        self.cm.map(self.mem.gpa, self.mem.size, fd=os.dup(self.mem.fd), user_address=self.mem.uva)
        self.drv = DriverRing(self.mem, 1, size)
        self.q = SplitQueue(1)
        self.q.native = walker(fastpath)
        self.q.indirect = indirect
        self.q.set_num(size)
        self.q.set_base(0)
        self.q.attach(self.cm)
        self.q.set_addr(self.mem.uva_of(self.drv.desc), self.mem.uva_of(self.drv.used),
                        self.mem.uva_of(self.drv.avail), 0, 0)
        self.q.start()
        assert self.q.uses_native == (fastpath == "native" and not fd_io)

    def close(self) -> None:
        self.q.reset()
        self.cm.unmap_all()
        self.drv.close()
        self.mem.close()


@pytest.fixture(params=PATHS)
def fastpath(request: pytest.FixtureRequest) -> str:
    """Which walker runs: "python" or "native"."""
    return str(request.param)


@pytest.fixture(params=[False, True], ids=["mmap", "fd-io"])
def bench(request: pytest.FixtureRequest, fastpath: str) -> Iterator[Bench]:
    b = Bench(fd_io=request.param, fastpath=fastpath)
    yield b
    b.close()


def publish(b: Bench) -> list[tuple[int, int]]:
    b.q.publish()
    return b.drv.take_used()


def test_tables() -> None:
    assert set(RING_TRANSITIONS) == set(RingState) == set(RING_ALLOWED)
    assert "set_num" not in RING_ALLOWED[RingState.STARTED]


def test_simple_and_multi_descriptor_chains(bench: Bench) -> None:
    a = bench.drv.add_buffer(2, b"hello")
    chain = bench.q.pop()
    assert chain is not None and chain.head == 2
    assert chain.segments == [(a, 5, False)] and (chain.readable, chain.writable) == (5, 0)
    addrs = bench.drv.add_chain([4, 0, 7], [(b"ab", False), (b"cde", False), (100, True)])
    chain = bench.q.pop()
    assert chain is not None and chain.head == 4
    assert chain.segments == [(addrs[0], 2, False), (addrs[1], 3, False), (addrs[2], 100, True)]
    assert (chain.readable, chain.writable) == (5, 100)
    assert bench.q.pop() is None


def test_indirect_chain(bench: Bench) -> None:
    addrs = bench.drv.add_indirect(3, [(b"12", False), (b"3456", False), (64, True)])
    chain = bench.q.pop()
    assert chain is not None and chain.head == 3
    assert [s[0] for s in chain.segments] == addrs
    assert (chain.readable, chain.writable) == (6, 64)


def expect_malformed(b: Bench, head: int, returned: bool = True) -> None:
    """The next pop skips a malformed chain (counted, given back) and the queue goes on."""
    before = b.q.counters.malformed
    good = b.drv.mem.alloc(4)
    b.drv.set_desc(6, good, 4)
    b.drv.make_available(6)  # a good chain behind the bad one
    chain = b.q.pop()
    assert chain is not None and chain.head == 6, b.q.last_error
    assert b.q.counters.malformed == before + 1
    assert publish(b) == ([(head, 0)] if returned else [])


def test_loop_is_malformed(bench: Bench) -> None:
    buf = bench.mem.alloc(8)
    bench.drv.set_desc(0, buf, 8, NEXT, 1)
    bench.drv.set_desc(1, buf, 8, NEXT, 0)
    bench.drv.make_available(0)
    chain = bench.q.pop()
    assert chain is None  # only the looping chain is available
    assert bench.q.counters.malformed == 1 and "loop" in bench.q.last_error
    assert publish(bench) == [(0, 0)]
    bench.drv.add_buffer(5, b"ok")
    chain = bench.q.pop()
    assert chain is not None and chain.head == 5


def test_loop_then_good_chain(bench: Bench) -> None:
    buf = bench.mem.alloc(8)
    bench.drv.set_desc(0, buf, 8, NEXT, 0)  # self loop
    bench.drv.make_available(0)
    expect_malformed(bench, 0)


def test_chain_longer_than_queue_via_next_walk(bench: Bench) -> None:
    buf = bench.mem.alloc(8)
    for i in range(8):  # 0 -> 1 -> ... -> 7 -> 0: 9th descriptor exceeds queue size
        bench.drv.set_desc(i, buf, 8, NEXT, (i + 1) % 8)
    bench.drv.make_available(3)
    assert bench.q.pop() is None
    assert bench.q.counters.malformed == 1


def test_next_out_of_range(bench: Bench) -> None:
    buf = bench.mem.alloc(8)
    bench.drv.set_desc(0, buf, 8, NEXT, 8)
    bench.drv.make_available(0)
    expect_malformed(bench, 0)


def test_head_out_of_range_is_skipped_not_returned(bench: Bench) -> None:
    bench.drv.make_available(99)
    expect_malformed(bench, 99, returned=False)
    assert "head 99" in bench.q.last_error


def test_nested_indirect(bench: Bench) -> None:
    inner = bench.mem.alloc(16, 16)
    table = bench.mem.alloc(16, 16)
    bench.mem.write(table, struct.pack("<QIHH", inner, 16, INDIRECT, 0))
    bench.drv.set_desc(0, table, 16, INDIRECT)
    bench.drv.make_available(0)
    expect_malformed(bench, 0)
    assert "inside an indirect" in bench.q.last_error or bench.q.counters.malformed


@pytest.mark.parametrize("length", [0, 8, 24, 16 * 9])
def test_bad_indirect_table_size(bench: Bench, length: int) -> None:
    table = bench.mem.alloc(16 * 10, 16)
    bench.drv.set_desc(0, table, length, INDIRECT)
    bench.drv.make_available(0)
    expect_malformed(bench, 0)


def test_indirect_with_next_flag(bench: Bench) -> None:
    table = bench.mem.alloc(16, 16)
    bench.mem.write(table, struct.pack("<QIHH", bench.mem.alloc(4), 4, 0, 0))
    bench.drv.set_desc(0, table, 16, INDIRECT | NEXT, 1)
    bench.drv.make_available(0)
    expect_malformed(bench, 0)


def test_indirect_not_negotiated(fastpath: str) -> None:
    b = Bench(indirect=False, fastpath=fastpath)
    try:
        b.drv.add_indirect(0, [(b"x", False)])
        expect_malformed(b, 0)
    finally:
        b.close()


def test_indirect_table_outside_memory(bench: Bench) -> None:
    bench.drv.set_desc(0, bench.mem.gpa + bench.mem.size - 16, 32, INDIRECT)
    bench.drv.make_available(0)
    expect_malformed(bench, 0)


def test_indirect_next_outside_table(bench: Bench) -> None:
    table = bench.mem.alloc(32, 16)
    buf = bench.mem.alloc(4)
    bench.mem.write(table, struct.pack("<QIHH", buf, 4, NEXT, 2) + struct.pack("<QIHH", buf, 4, 0, 0))
    bench.drv.set_desc(0, table, 32, INDIRECT)
    bench.drv.make_available(0)
    expect_malformed(bench, 0)


@pytest.mark.parametrize("where", ["below", "above", "straddle", "overflow"])
def test_buffer_outside_memory(bench: Bench, where: str) -> None:
    m = bench.mem
    addr, length = {
        "below": (m.gpa - 0x1000, 16),
        "above": (m.gpa + m.size, 16),
        "straddle": (m.gpa + m.size - 8, 16),
        "overflow": ((1 << 64) - 8, 16),
    }[where]
    bench.drv.set_desc(0, addr, length, 0)
    bench.drv.make_available(0)
    expect_malformed(bench, 0)


def test_readable_after_writable(bench: Bench) -> None:
    bench.drv.add_chain([0, 1], [(16, True), (b"late", False)])
    expect_malformed(bench, 0)


def test_avail_index_running_ahead_breaks_the_ring(bench: Bench) -> None:
    bench.drv.set_avail_idx(9)  # 9 > queue size 8
    assert bench.q.pop() is None
    assert bench.q.broken and not bench.q.ready
    assert bench.q.counters.malformed == 1
    bench.q.stop()
    bench.q.set_base(9)  # reconfiguring clears it
    assert not bench.q.broken


def test_wraparound_of_16_bit_indices(fastpath: str) -> None:
    b = Bench(fastpath=fastpath)
    try:
        b.q.stop()
        b.q.set_base(0xFFFE)
        b.drv.avail_idx = 0xFFFE
        b.drv.mem.write(b.drv.used + 2, struct.pack("<H", 0xFFFE))
        b.drv.used_seen = 0xFFFE
        b.q.attach(b.cm)  # re-sync with the used index in memory
        b.q.start()
        for head in (1, 2, 3):
            b.drv.add_buffer(head, b"x")
        heads = []
        while (chain := b.q.pop()) is not None:
            heads.append(chain.head)
            b.q.push(chain.head, 0)
        assert heads == [1, 2, 3]
        assert b.q.last_avail_idx == 1
        assert publish(b) == [(1, 0), (2, 0), (3, 0)]
        assert b.drv.used_idx() == 1
    finally:
        b.close()


def test_base_and_stop(bench: Bench) -> None:
    bench.drv.add_buffer(0, b"a")
    bench.drv.add_buffer(1, b"b")
    chain = bench.q.pop()
    assert chain is not None
    bench.q.push(chain.head, 0)
    bench.q.publish()
    assert bench.q.stop() == 1
    assert bench.q.state is RingState.STOPPED and not bench.q.ready
    assert bench.q.pop() is None  # a stopped ring is not processed
    bench.q.set_num(8)  # configuration is allowed again
    bench.q.set_base(1)
    bench.q.start()
    chain = bench.q.pop()
    assert chain is not None and chain.head == 1


def test_start_syncs_with_the_drivers_used_index(bench: Bench) -> None:
    """Entries taken but never completed are redone after a restart (no in-flight state)."""
    bench.drv.add_buffer(0, b"a")
    assert bench.q.pop() is not None  # taken, never completed
    assert bench.q.stop() == 1
    bench.q.set_base(1)
    bench.q.start()
    chain = bench.q.pop()
    assert chain is not None and chain.head == 0


@pytest.mark.parametrize("num", [0, 3, 6, 65536])
def test_set_num_rejects(num: int) -> None:
    q = SplitQueue(0)
    with pytest.raises(RingError):
        q.set_num(num)


def test_configuration_allowed_only_when_stopped(bench: Bench) -> None:
    with pytest.raises(RingError):
        bench.q.set_num(16)
    with pytest.raises(RingError):
        bench.q.set_base(0)
    # addresses may change while started (VHOST_VRING_F_LOG toggling)
    m = bench.mem
    bench.q.set_addr(m.uva_of(bench.drv.desc), m.uva_of(bench.drv.used), m.uva_of(bench.drv.avail),
                     0x1000, int(vw.VringAddrFlag.LOG))
    assert bench.q.addr_flags == vw.VringAddrFlag.LOG


def test_bad_addresses_keep_the_old_ones(bench: Bench) -> None:
    old = (bench.q.desc_user, bench.q.avail_user, bench.q.used_user)
    with pytest.raises(RingError):
        bench.q.set_addr(bench.mem.uva + bench.mem.size, bench.q.used_user or 0,
                         bench.q.avail_user or 0, 0, 0)
    with pytest.raises(RingError):
        bench.q.set_addr((bench.q.desc_user or 0) + 4, bench.q.used_user or 0,
                         bench.q.avail_user or 0, 0, 0)
    assert (bench.q.desc_user, bench.q.avail_user, bench.q.used_user) == old
    bench.drv.add_buffer(0, b"still works")
    assert bench.q.pop() is not None


def test_start_requires_configuration() -> None:
    q = SplitQueue(0)
    with pytest.raises(RingError):
        q.start()
    q.set_num(8)
    with pytest.raises(RingError):
        q.start()


def test_detach_attach_keeps_indices(bench: Bench) -> None:
    bench.drv.add_buffer(0, b"a")
    chain = bench.q.pop()
    assert chain is not None
    bench.q.push(chain.head, 0)
    bench.q.publish()
    bench.q.detach()
    assert not bench.q.ready
    bench.q.attach(bench.cm)
    assert bench.q.ready and bench.q.last_avail_idx == 1 and bench.q.used_idx == 1
    bench.drv.add_buffer(1, b"b")
    chain = bench.q.pop()
    assert chain is not None and chain.head == 1


def test_attach_to_memory_without_the_ring_marks_it_broken(bench: Bench) -> None:
    bench.q.detach()
    bench.q.attach(ClientMemory())
    assert bench.q.broken and not bench.q.ready


def test_checkpoint_rollback(bench: Bench) -> None:
    for h in (0, 1):
        bench.drv.add_buffer(h, b"z")
    mark = bench.q.checkpoint()
    assert bench.q.pop() is not None and bench.q.pop() is not None
    bench.q.rollback(mark)
    chain = bench.q.pop()
    assert chain is not None and chain.head == 0


def test_publish_and_no_interrupt(bench: Bench) -> None:
    assert bench.q.publish() is False  # nothing to publish
    bench.drv.add_buffer(0, b"a")
    chain = bench.q.pop()
    assert chain is not None
    bench.q.push(chain.head, 7)
    assert bench.q.publish() is True
    assert bench.drv.take_used() == [(0, 7)]
    bench.drv.set_avail_flags(vw.VRING_AVAIL_F_NO_INTERRUPT)
    bench.drv.add_buffer(1, b"b")
    chain = bench.q.pop()
    assert chain is not None
    bench.q.push(chain.head, 0)
    assert bench.q.publish() is False


def test_event_idx_need_event(bench: Bench) -> None:
    bench.q.event_idx = True
    bench.drv.set_used_event(1)  # interrupt when used idx passes 1 (becomes 2)
    for h in range(3):
        bench.drv.add_buffer(h, b"x")
    chain = bench.q.pop()
    assert chain is not None
    bench.q.push(chain.head, 0)
    assert bench.q.publish() is False  # used idx 1: not past used_event
    for _ in range(2):
        chain = bench.q.pop()
        assert chain is not None
        bench.q.push(chain.head, 0)
    assert bench.q.publish() is True  # 1 -> 3 crossed 2
    assert bench.q.arm_kick() is False
    assert bench.drv.avail_event() == 3


def test_suppress_and_arm_kicks(bench: Bench) -> None:
    bench.drv.add_buffer(0, b"x")
    bench.q.suppress_kicks()
    assert bench.drv.used_flags() == vw.VRING_USED_F_NO_NOTIFY
    assert bench.q.arm_kick() is True  # re-armed, and something is pending
    assert bench.drv.used_flags() == 0


def test_ring_writes_are_single_stores(fastpath: str) -> None:
    """The used index is written whole (never zero-filled first, as pack_into would)."""
    bench = Bench(fastpath=fastpath)
    bench.drv.add_buffer(0, b"x")
    chain = bench.q.pop()
    assert chain is not None
    bench.q.push(chain.head, 0)
    bench.q.publish()
    used = bench.q._used
    assert used is not None and used.format == "H" and used[1] == 1
    assert bench.q._used_elems is not None and bench.q._used_elems.format == "I"
    bench.close()


def test_rings_in_shrunk_memory_break_the_ring() -> None:
    """Rings in memory the front-end can shrink are read through the fd: a shrink
    marks the ring broken at the next look, never a SIGBUS (checked in a child)."""
    survives(ring_after_shrink)


def ring_after_shrink() -> None:
    bench = Bench(fd_io=True)
    try:
        assert bench.cm.regions[0].access == "fd" and isinstance(bench.q._used, FdWords)
        bench.drv.add_buffer(0, b"x")
        os.ftruncate(bench.mem.fd, 0)
        assert bench.q.pop() is None
        assert "ring memory unreachable" in bench.q.broken and not bench.q.ready
        assert bench.q.counters.malformed == 1
        assert bench.q.avail_pending() == 0 and bench.q.arm_kick() is False
    finally:
        bench.close()  # the test's own mapping of the memfd is not touched again


def test_a_used_entry_into_shrunk_memory_breaks_the_ring() -> None:
    """A push into rings the front-end shrank away is refused (the ring breaks)
    instead of growing the file back, where zeroes would read as a ring."""
    survives(push_after_shrink)


def push_after_shrink() -> None:
    bench = Bench(fd_io=True)
    try:
        bench.drv.add_buffer(0, b"x")
        chain = bench.q.pop()
        assert chain is not None
        os.ftruncate(bench.mem.fd, 0)
        bench.q.push(chain.head, 0)
        assert "ring memory unreachable" in bench.q.broken and not bench.q.ready
        bench.q.publish()
        assert os.fstat(bench.mem.fd).st_size == 0 and bench.q.counters.malformed == 1
    finally:
        bench.close()


# ---------------------------------------------------------------- per-chain byte limits
def whole_memory_table(b: Bench, n: int, flags: int = 0) -> int:
    """An indirect table of ``n`` descriptors, each naming the whole guest memory."""
    table = b.mem.alloc(16 * n, 16)
    entries = [struct.pack("<QIHH", b.mem.gpa, b.mem.size, flags | (NEXT if i + 1 < n else 0), i + 1)
               for i in range(n)]
    b.mem.write(table, b"".join(entries))
    return table


@pytest.mark.parametrize("write", [False, True])
def test_chain_over_the_byte_limit_is_malformed_before_its_buffers(bench: Bench, write: bool) -> None:
    """The walk stops at the first descriptor past the limit: every descriptor is
    inside memory and the total is only 8 x 64 KiB, yet the chain is refused."""
    if write:
        bench.q.max_writable = bench.mem.size
    else:
        bench.q.max_readable = bench.mem.size
    table = whole_memory_table(bench, 8, WRITE if write else 0)
    bench.drv.set_desc(0, table, 16 * 8, INDIRECT)
    bench.drv.make_available(0)
    expect_malformed(bench, 0)
    kind = "writable" if write else "readable"
    assert f"{kind} buffers exceed {bench.mem.size} bytes" in bench.q.last_error


@pytest.mark.parametrize("limit", [99, 100])
def test_byte_limit_is_inclusive_across_direct_descriptors(bench: Bench, limit: int) -> None:
    bench.q.max_readable = limit
    bench.drv.add_chain([1, 2], [(bytes(60), False), (bytes(40), False)])
    chain = bench.q.pop()
    if limit == 100:
        assert chain is not None and chain.readable == 100
    else:
        assert chain is None and "readable buffers exceed 99" in bench.q.last_error
        assert publish(bench) == [(1, 0)]


def test_single_descriptor_over_the_limit(bench: Bench) -> None:
    bench.q.max_writable = 0  # a transmit ring: nothing writable
    bench.drv.add_buffer(0, writable=4)
    expect_malformed(bench, 0)
    bench.drv.add_buffer(1, writable=0)  # zero bytes writable is no byte over
    chain = bench.q.pop()
    assert chain is not None and chain.head == 1


def test_default_limit_is_what_a_used_length_can_say(fastpath: str) -> None:
    """Without an owner's limit a chain still holds at most 2^32 - 1 bytes: two
    descriptors of 4 GiB - 1 each (lengths are 32 bits) exceed it (8 GiB of
    sparse guest memory: nothing is touched)."""
    b = Bench(size=8, mem_size=1 << 33, fastpath=fastpath)
    try:
        assert b.q.max_readable == b.q.max_writable == MAX_CHAIN_BYTES
        b.drv.set_desc(0, b.mem.gpa, 0xFFFF_FFFF, NEXT, 1)
        b.drv.set_desc(1, b.mem.gpa, 0xFFFF_FFFF, 0)
        b.drv.make_available(0)
        expect_malformed(b, 0)
        assert "exceed 4294967295" in b.q.last_error
    finally:
        b.close()


# ---------------------------------------------------------------- transmit batches
def test_drain_gives_each_chains_bytes_and_returns_it_used(bench: Bench) -> None:
    bench.drv.add_buffer(0, b"hello")
    bench.drv.make_available(99)  # malformed: skipped, not returned
    bench.drv.add_chain([1, 2], [(b"ab", False), (b"cd", False)])
    bench.drv.add_indirect(3, [(b"ef", False), (b"gh", False)])
    assert bench.q.drain(2) == [b"hello", b"abcd"]  # the budget counts chains taken
    assert bench.q.counters.malformed == 1 and "head 99" in bench.q.last_error
    assert bench.q.avail_pending() == 1
    assert bench.q.drain(8) == [b"efgh"] and bench.q.drain(8) == []
    assert publish(bench) == [(0, 0), (1, 0), (3, 0)]


def test_drain_of_a_stopped_or_broken_ring_takes_nothing(bench: Bench) -> None:
    bench.drv.set_avail_idx(9)  # more than a queue size ahead
    assert bench.q.drain(8) == [] and bench.q.broken
    assert bench.q.drain(8) == [] and bench.q.counters.malformed == 1
