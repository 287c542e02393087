"""The native walker against the Python one on random rings, valid and hostile.

Each example lays out guest memory (two regions: the rings' and a second one,
adjacent or not, with random access rights), fills a split ring with random
descriptors (out-of-range addresses and indices, loops, INDIRECT in INDIRECT,
lengths up to 2^32 - 1, tables of bad sizes), an avail ring whose index may
jump past a queue size, and then runs the same operations on two identical
copies: one queue on the Python walker, one on appliance._fastpath.  The
operations include writing a frame into the ring as a receive ring
(receive.write_frame: header, MRG_RXBUF, used lengths) with a vhost-user dirty
log of random size installed or not.  After every step both must agree on
what came out (chains, frames, interrupt decisions, receive outcomes), on the
ring's state (indices, counters, last error, broken), on every byte of guest
memory and on the dirty log (its bits and the marks past its end).

Some layouts put the memory in memfds that cannot be sealed (DPDK's): the
Python walker reaches them through the fd, the native one through guarded
mappings, and the front-end may shrink either file to a page boundary (or
grow it back) at any step (its own writes store only what lies inside the
file, as a front-end whose pages are gone cannot write them; ours never grow
it back either, so the file always ends on a page, where both paths fail).
A native call that meets a vanished page gives
up and the ring runs in Python from then on, so both still agree, except on
the bytes a faulting frame write had stored before the end of the file (in
a buffer given back with length 0): that window is left out of the comparison
of the step that faulted.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastpath_support import require_native
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_vhost_frontend import GuestMemory

from appliance.memory import ClientMemory
from appliance.net.descriptor_chain import MAX_CHAIN_BYTES, Chain
from appliance.net.dirty_log import VhostLog
from appliance.net.receive import Outcome, write_frame
from appliance.net.virtqueue import SplitQueue

A_GPA = 0x100000
A_SIZE = 0x10000
B_SIZE = 0x4000
UVA = 0x7F0000000000
DESC, AVAIL, USED, TABLES, BUFFERS = 0x0, 0x400, 0x800, 0x1000, 0x2000
TABLE_SLOT = 0x200  # bytes per indirect table slot (up to 32 descriptors)
N_TABLES = 8


@dataclass
class Layout:
    size: int
    base: int  # the ring's starting index (SET_VRING_BASE)
    b_gap: int  # bytes between region A's end and region B
    b_access: tuple[bool, bool]  # region B (readable, writable)
    a_image: bytes
    b_image: bytes
    indirect: bool
    event_idx: bool
    max_readable: int
    max_writable: int
    ops: list[tuple[Any, ...]]
    log_bytes: int | None = None  # the vhost-user log bitmap's size (None: not logging)
    unsealed: bool = False  # memfds without MFD_ALLOW_SEALING: fd I/O vs guarded mappings

    @property
    def b_gpa(self) -> int:
        return A_GPA + A_SIZE + self.b_gap


def desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


@st.composite
def descriptors(draw: st.DrawFn, size: int, b_gpa: int, count: int, sane: bool = False) -> bytes:
    """``count`` random descriptors, mostly plausible, often hostile; ``sane``: chains
    of in-range buffers (descriptor i followed by i + 1), rarely hostile."""
    if sane and draw(st.integers(0, 9)):
        out = b""
        for i in range(count):
            flags = draw(st.sampled_from([0, 0, 1, 1, 2, 3, 4] if i == 0 else [0, 1, 2, 3]))
            length = 16 * draw(st.integers(1, 4)) if flags == 4 else draw(st.integers(0, 0x600))
            buffers = st.one_of(st.integers(A_GPA + BUFFERS, A_GPA + A_SIZE - 0x800),
                                st.integers(A_GPA + BUFFERS, A_GPA + A_SIZE - 0x800),
                                st.integers(b_gpa - 0x400, b_gpa + B_SIZE - 0x800))  # B, or across
            where = (st.sampled_from([A_GPA + TABLES + k * TABLE_SLOT for k in range(N_TABLES)])
                     if flags == 4 else buffers)
            out += desc(draw(where), length, flags, (i + 1) % max(count, 1))
        return out
    tables = [A_GPA + TABLES + i * TABLE_SLOT for i in range(N_TABLES)]
    plausible_addr = st.integers(A_GPA + BUFFERS, A_GPA + A_SIZE - 0x800)  # region A's buffers
    addr = st.one_of(
        plausible_addr, plausible_addr, plausible_addr,
        st.sampled_from(tables),  # an indirect table
        st.integers(b_gpa, b_gpa + B_SIZE - 1),  # in region B
        st.sampled_from([A_GPA + A_SIZE - 8, b_gpa - 8, b_gpa + B_SIZE - 4,  # straddling
                         A_GPA - 16, b_gpa + B_SIZE, 0, (1 << 64) - 8, (1 << 64) - 1]),
        st.integers(0, (1 << 64) - 1))
    plausible_length = st.integers(0, 0x600)
    length = st.one_of(
        plausible_length, plausible_length,
        st.sampled_from([0, 16, 32, 48, 16 * size, 16 * size + 16, 24, 0xFFFF_FFFF, 0x8000_0000]),
        st.integers(0, 0x3000))
    plausible_flags = st.sampled_from([0, 1, 2, 3, 4])  # none, NEXT, WRITE, both, INDIRECT
    flags = st.one_of(plausible_flags, plausible_flags, st.integers(0, 0xFFFF))
    nxt = st.one_of(st.integers(0, size - 1), st.integers(0, size - 1), st.integers(0, 0xFFFF))
    out = b""
    for _ in range(count):
        out += desc(draw(addr), draw(length), draw(flags), draw(nxt))
    return out


@st.composite
def layouts(draw: st.DrawFn, vanishing: bool = False) -> Layout:
    """``vanishing``: sane rings in unsealed memory that the front-end shrinks
    between two runs of operations."""
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    b_gap = draw(st.sampled_from([0, 0x1000]))
    b_gpa = A_GPA + A_SIZE + b_gap
    a = bytearray(draw(st.binary(min_size=64, max_size=64)) * (A_SIZE // 64))
    sane = vanishing or draw(st.booleans())
    a[DESC:DESC + 16 * size] = draw(descriptors(size, b_gpa, size, sane))
    for i in range(N_TABLES):
        n = draw(st.integers(1, TABLE_SLOT // 16))
        table = draw(descriptors(n, b_gpa, n, sane))
        a[TABLES + i * TABLE_SLOT:TABLES + i * TABLE_SLOT + 16 * n] = table
    base = draw(st.sampled_from([0, 1, 0xFFFE, 0xFFFF, 0x8000]))
    heads = st.one_of(st.integers(0, size - 1), st.integers(0, size - 1), st.integers(0, 0xFFFF))
    avail_ring = b"".join(struct.pack("<H", draw(heads)) for _ in range(size))
    ahead = draw(st.integers(0, size) if sane else
                 st.one_of(st.integers(0, size), st.integers(0, size), st.integers(0, 0xFFFF)))
    avail_flags = draw(st.sampled_from([0, 1, 0xFFFF]))
    used_event = draw(st.one_of(st.integers(0, 0xFFFF), st.just(base)))
    a[AVAIL:AVAIL + 6 + 2 * size] = (struct.pack("<HH", avail_flags, (base + ahead) & 0xFFFF)
                                     + avail_ring + struct.pack("<H", used_event))
    a[USED:USED + 6 + 8 * size] = struct.pack("<HH", 0, base) + bytes(8 * size + 2)
    limit = st.sampled_from([MAX_CHAIN_BYTES, 0x3000, 1526, 64, 0])
    op = st.one_of(
        st.tuples(st.just("pop")),
        st.tuples(st.just("drain"), st.integers(1, 2 * size + 1)),
        st.tuples(st.just("publish")),
        st.tuples(st.just("push"), st.integers(0, size - 1), st.integers(0, 0xFFFF_FFFF)),
        st.tuples(st.just("avail"), st.integers(0, size if sane else size + 2),  # the driver
                  st.integers(0, size - 1) if sane else st.integers(0, 0xFFFF)),  # adds heads
        st.tuples(st.just("desc"), st.integers(0, size - 1), descriptors(size, b_gpa, 1, sane)),
        st.tuples(st.just("receive"), st.binary(max_size=64).map(lambda b: b * draw(
            st.sampled_from([1, 1, 8, 40]))), st.sampled_from([10, 12]), st.booleans()))
    pages = st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, A_SIZE // 0x1000))
    shrink = st.tuples(st.just("truncate"), st.sampled_from(["a", "b"]), pages.map(lambda n: n << 12))
    regrow = st.tuples(st.just("truncate"), st.sampled_from(["a", "b"]), st.just(None))
    if vanishing:
        ops = (draw(st.lists(op, max_size=4)) + [draw(shrink)]
               + draw(st.lists(st.one_of(op, op, op, shrink, regrow), min_size=1, max_size=8)))
    else:
        if draw(st.booleans()):
            op = st.one_of(op, shrink, regrow)
        ops = draw(st.lists(op, min_size=1, max_size=12))
    return Layout(
        size=size, base=base, b_gap=b_gap, unsealed=vanishing or draw(st.booleans()),
        b_access=draw(st.sampled_from([(True, True), (True, False), (False, True)])),
        a_image=bytes(a), b_image=draw(st.binary(min_size=16, max_size=16)) * (B_SIZE // 16),
        indirect=draw(st.booleans()), event_idx=draw(st.booleans()),
        max_readable=MAX_CHAIN_BYTES if sane else draw(limit),
        max_writable=MAX_CHAIN_BYTES if sane else draw(limit),
        ops=ops,
        log_bytes=draw(st.sampled_from([None, 0, 33, 40, 0x40])))


class FdGuestMemory(GuestMemory):
    """Guest memory in a memfd that cannot be sealed, reached by the test through
    its fd (the file may shrink under the mapping: a read past the end is short)."""

    def __init__(self, size: int, gpa: int, uva: int) -> None:
        super().__init__(size, gpa=gpa, uva=uva, sealable=False)

    def write(self, gpa: int, data: bytes) -> None:
        """Store what lies inside the file now: the front-end's own pages past
        its end are gone (it would fault on them itself)."""
        off = gpa - self.gpa
        keep = max(0, min(len(data), os.fstat(self.fd).st_size - off))
        os.pwrite(self.fd, data[:keep], off)

    def read(self, gpa: int, n: int) -> bytes:
        return os.pread(self.fd, n, gpa - self.gpa)


class Side:
    """One copy of the guest memory and a queue over it, on one walker."""

    def __init__(self, layout: Layout, native: Any) -> None:
        kind = FdGuestMemory if layout.unsealed else GuestMemory
        self.a = kind(A_SIZE, gpa=A_GPA, uva=UVA)
        self.b = kind(B_SIZE, gpa=layout.b_gpa, uva=UVA + (layout.b_gpa - A_GPA))
        self.a.write(A_GPA, layout.a_image)
        self.b.write(layout.b_gpa, layout.b_image)
        self.unsealed = layout.unsealed
        self.cm = ClientMemory(guard_unsealed=layout.unsealed)
        self.cm.map(A_GPA, A_SIZE, fd=os.dup(self.a.fd), user_address=UVA)
        readable, writable = layout.b_access
        self.cm.map(layout.b_gpa, B_SIZE, fd=os.dup(self.b.fd), readable=readable,
                    writable=writable, user_address=self.b.uva)
        self.log = None if layout.log_bytes is None else VhostLog(bytearray(layout.log_bytes))
        self.cm.dirty_log = self.log
        q = self.q = SplitQueue(1)
        q.native = native
        q.indirect, q.event_idx = layout.indirect, layout.event_idx
        q.max_readable, q.max_writable = layout.max_readable, layout.max_writable
        q.set_num(layout.size)
        q.set_base(layout.base)
        q.attach(self.cm)
        q.set_addr(UVA + DESC, UVA + USED, UVA + AVAIL, 0, 0)
        q.start()
        assert q.uses_native == (native is not None)
        self.avail_idx = struct.unpack_from("<H", layout.a_image, AVAIL + 2)[0]

    def run(self, op: tuple[Any, ...], size: int) -> Any:
        q = self.q
        if op[0] == "pop":
            return q.pop()
        if op[0] == "drain":
            return q.drain(op[1])
        if op[0] == "publish":
            return q.publish()
        if op[0] == "push":
            return q.push(op[1], op[2])
        if op[0] == "receive":  # a frame behind a header of op[2] bytes, op[3]: MRG_RXBUF
            return write_frame(q, op[1], op[2], op[3], self.log)
        if op[0] == "truncate":  # the front-end shrinks (or regrows) a region's file
            if self.unsealed:
                mem = self.a if op[1] == "a" else self.b
                os.ftruncate(mem.fd, mem.size if op[2] is None else min(op[2], mem.size))
            return None
        if op[0] == "avail":  # the driver makes op[1] more heads available
            for _ in range(op[1]):
                self.a.write(A_GPA + AVAIL + 4 + 2 * (self.avail_idx % size), struct.pack("<H", op[2]))
                self.avail_idx = (self.avail_idx + 1) & 0xFFFF
            self.a.write(A_GPA + AVAIL + 2, struct.pack("<H", self.avail_idx))
            return None
        self.a.write(A_GPA + DESC + 16 * op[1], op[2])  # the driver rewrites a descriptor
        return None

    def state(self, fault_window: bool = False) -> tuple[Any, ...]:
        """``fault_window``: zero the last 4 KiB before the end of each shrunk file (what a
        frame write that faulted there may have stored, natively only)."""
        q = self.q
        log = None if self.log is None else (bytes(self.log.bitmap), self.log.beyond)
        images = []
        for mem in (self.a, self.b):
            image = bytearray(mem.read(mem.gpa, mem.size))
            if fault_window and len(image) < mem.size:
                start = max(0, len(image) - 0x1000)
                image[start:] = bytes(len(image) - start)
            images.append(bytes(image))
        return (q.last_avail_idx, q.used_idx, q.unpublished, q.counters.as_dict(), q.last_error,
                q.broken, q.ready, *images, log)

    def close(self) -> None:
        self.q.reset()
        self.cm.unmap_all()
        self.a.close()
        self.b.close()


@contextmanager
def sides(layout: Layout) -> Iterator[tuple[Side, Side]]:
    python = Side(layout, None)
    try:
        native = Side(layout, require_native())
        try:
            yield python, native
        finally:
            native.close()
    finally:
        python.close()


def outcome(result: Any, q: SplitQueue) -> str:
    """What a step did, for hypothesis' statistics (``pytest --hypothesis-show-statistics``)."""
    if q.broken:
        return "ring broken"
    if isinstance(result, list):
        return f"{min(len(result), 3)}+ frames" if len(result) >= 3 else f"{len(result)} frames"
    if result is None:
        return "nothing"
    if isinstance(result, Outcome):
        return result.name.lower()
    if isinstance(result, Chain):
        return f"a chain of {min(len(result.segments), 3)}{'+' if len(result.segments) > 2 else ''}"
    return f"{type(result).__name__}, {min(q.counters.malformed, 2)}{'+' if q.counters.malformed > 1 else ''} malformed"


def differences(got: tuple[Any, ...], want: tuple[Any, ...]) -> list[str]:
    """Which fields of two states differ (for memory images: the first offset)."""
    out = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g == w:
            continue
        if isinstance(g, bytes) and isinstance(w, bytes):
            at = next((k for k, (x, y) in enumerate(zip(g, w)) if x != y), min(len(g), len(w)))
            out.append(f"field {i}: bytes differ at {at:#x} (lengths {len(g):#x}, {len(w):#x})")
        else:
            out.append(f"field {i}: native {g!r}, python {w!r}")
    return out


def check_same(layout: Layout, record: bool = False) -> None:
    with sides(layout) as (python, native):
        assert python.state() == native.state()
        for step, op in enumerate(layout.ops):
            was_native = native.cm.native_ok
            want = python.run(op, layout.size)
            got = native.run(op, layout.size)
            assert got == want, f"step {step} {op[0]}: native {got!r}, python {want!r}"
            faulted = was_native and not native.cm.native_ok
            assert native.state(faulted) == python.state(faulted), (
                f"after step {step} {op[0]}: {differences(native.state(faulted), python.state(faulted))}")
            if record and faulted:
                event(f"{op[0]}: a native call faulted in a vanished page")
            if record:
                event(f"{op[0]}: {outcome(want, python.q)}")


@settings(max_examples=int(os.environ.get("APPLIANCE_DIFF_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layouts())
def test_native_walker_matches_python(layout: Layout) -> None:
    check_same(layout, record=True)


@settings(max_examples=int(os.environ.get("APPLIANCE_DIFF_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layouts(vanishing=True))
def test_native_walker_matches_python_when_memory_vanishes(layout: Layout) -> None:
    """Unsealed memory (guarded mappings natively, the fd in Python) that the
    front-end shrinks to a page boundary, or grows back, at a random step."""
    check_same(layout, record=True)


def test_regression_used_entry_into_a_file_shrunk_to_nothing() -> None:
    """Region A's file shrinks to 0, then a used entry is pushed (in Python on
    both sides) and a chain drained.  The fd write once grew the file back to
    just past the entry (0x87c bytes, not a page): Python then walked zeroes
    as a ring and grew it again, while the native drain wrote its used entry
    into the rest of that page without a fault and without growing the file.
    Now the write is refused and the ring breaks on both sides."""
    a = bytearray(A_SIZE)
    for i in range(16):
        a[DESC + 16 * i:DESC + 16 * i + 16] = desc(A_GPA + BUFFERS, 0, 0, (i + 1) % 16)
    a[AVAIL:AVAIL + 4] = struct.pack("<HH", 0, 0xFFFE)
    a[USED:USED + 4] = struct.pack("<HH", 0, 0xFFFE)
    check_same(Layout(size=16, base=0xFFFE, b_gap=0, b_access=(True, True), a_image=bytes(a),
                      b_image=bytes(B_SIZE), indirect=False, event_idx=False,
                      max_readable=MAX_CHAIN_BYTES, max_writable=MAX_CHAIN_BYTES,
                      ops=[("truncate", "a", 0), ("push", 0, 0), ("drain", 1)], unsealed=True))


def test_every_refusal_is_met() -> None:
    """Hand-made rings covering each rule, compared the same way (hypothesis may
    miss one in a short run)."""
    size = 4
    b_gpa = A_GPA + A_SIZE
    buf, table = A_GPA + BUFFERS, A_GPA + TABLES
    nested = desc(table + TABLE_SLOT, 16, 4, 0)
    cases: list[tuple[bytes, bytes]] = [
        (desc(buf, 60, 0, 0), b""),  # fine: one buffer
        (desc(buf, 8, 1, 1) + desc(buf, 8, 3, 0), b""),  # fine: readable then writable
        (desc(buf, 8, 1, 0), b""),  # a loop
        (desc(buf, 8, 1, 9), b""),  # next outside the table
        (desc(table, 16, 4, 0), nested),  # INDIRECT inside INDIRECT
        (desc(table, 16, 5, 1), desc(buf, 4, 0, 0)),  # INDIRECT with NEXT
        (desc(table, 24, 4, 0), desc(buf, 4, 0, 0)),  # table not a multiple of 16
        (desc(table, 16 * 5, 4, 0), desc(buf, 4, 0, 0) * 5),  # table longer than the queue
        (desc(b_gpa + B_SIZE - 8, 16, 4, 0), b""),  # table past the memory
        (desc(table, 32, 4, 0), desc(buf, 4, 1, 2) + desc(buf, 4, 0, 0)),  # next outside it
        (desc(buf, 8, 3, 1) + desc(buf, 8, 0, 0), b""),  # readable after writable
        (desc(buf, 0, 3, 1) + desc(buf, 8, 0, 0), b""),  # ... after a zero-length writable
        (desc((1 << 64) - 8, 16, 0, 0), b""),  # address overflow
        (desc(b_gpa - 8, 16, 0, 0), b""),  # straddles the two regions (adjacent: fine)
        (desc(buf, 0xFFFF_FFFF, 1, 1) + desc(buf, 0xFFFF_FFFF, 0, 0), b""),  # over 2^32 - 1
        (desc(b_gpa + 16, 16, 2, 0), b""),  # writable, in region B
        (desc(buf, 8, 1, 1) + desc(b_gpa + 16, 16, 2, 0), b""),  # the same, in a chain
        (desc(buf, 8, 1, 1) + desc(b_gpa - 8, 16, 2, 0), b""),  # writable across A and B
        (desc(table, 16, 4, 0), desc(b_gpa + 16, 16, 0, 0)),  # readable in B, indirect
        (desc(b_gpa + 16, 16, 4, 0), desc(buf, 16, 0, 0)),  # an indirect table in B
    ]
    for head_descs, table_bytes in cases:
        a = bytearray(A_SIZE)
        a[DESC:DESC + len(head_descs)] = head_descs
        a[TABLES:TABLES + len(table_bytes)] = table_bytes
        a[AVAIL:AVAIL + 6 + 2 * size] = struct.pack("<HHHHHHH", 0, 1, 0, 0, 0, 0, 0)
        for access in ((True, True), (True, False), (False, True)):
            check_same(Layout(size=size, base=0, b_gap=0, b_access=access, a_image=bytes(a),
                              b_image=bytes(B_SIZE), indirect=True, event_idx=False,
                              max_readable=MAX_CHAIN_BYTES, max_writable=MAX_CHAIN_BYTES,
                              ops=[("pop",), ("publish",), ("avail", 1, 0), ("drain", 4),
                                   ("publish",), ("avail", 1, 0), ("receive", b"x" * 60, 12, True),
                                   ("receive", b"y" * 30, 10, False), ("publish",)],
                              log_bytes=40))
