"""Write ordering of what the host polls: CQE phase tags and shadow EventIdx values.

A guest driver on another vCPU polls the phase tag of the next CQ slot while
the controller writes it, so the entry must be whole before its phase tag
flips: DW0-DW2 and the CID first, then the status word as one 2-byte store.
"""

from __future__ import annotations

import mmap
import os

import pytest
from test_memory import message_memory

from appliance.memory import ClientMemory, DmaScope, GuestMemoryError
from appliance.storage.queues import CQE_STATUS_OFFSET, CompletionQueue, Shadow
from appliance.storage.spec import Completion, status_field

pytestmark = pytest.mark.usefixtures("nvme_fastpath")  # both I/O queue paths

BASE = 0x200000


class RecordingMemory(ClientMemory):
    """mmap'd memory that logs which accessor each store went through."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        self.calls.append(("write", address, len(data)))
        super().write(address, data)

    def write_uint(self, address: int, value: int, size: int) -> None:
        self.calls.append(("write_uint", address, size))
        super().write_uint(address, value, size)


def memfd(size: int) -> tuple[int, mmap.mmap]:
    """A memfd the server can seal against shrinking, so it mmaps it."""
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def test_cqe_status_word_is_the_last_store_through_a_fake_region() -> None:
    mem, transport = message_memory(1 << 16, BASE)  # no fd: every store is a message we see
    cq = CompletionQueue(1, BASE, 4, vector=1, ien=True)
    entry = Completion(dw0=0x11223344, dw1=0x55667788, sq_head=3, sq_id=1, cid=0xBEEF,
                       status=status_field(0x02, True, 0))
    cq.tail = 2
    cq.push(mem, entry)
    slot = BASE + 2 * 16
    assert [(a, len(d)) for a, d in transport.writes] == [(slot, CQE_STATUS_OFFSET),
                                                           (slot + CQE_STATUS_OFFSET, 2)]
    first, last = transport.writes[0][1], transport.writes[1][1]
    assert first == entry.pack()[:CQE_STATUS_OFFSET]
    assert int.from_bytes(last, "little") == entry.status and entry.status & 1 == 1
    assert Completion.unpack(transport.data, 2 * 16) == entry


def test_cqe_phase_store_goes_last_through_write_uint_on_mmap() -> None:
    mem = RecordingMemory()
    fd, view = memfd(1 << 16)
    mem.map(BASE, 1 << 16, fd=fd)
    cq = CompletionQueue(1, BASE, 2, vector=1, ien=True)
    cq.push(mem, Completion(cid=5, dw0=7))
    cq.set_head(1)
    cq.push(mem, Completion(cid=6, dw0=8))  # wraps: phase tag 0 now
    assert mem.calls == [("write", BASE, 14), ("write_uint", BASE + 14, 2),
                         ("write", BASE + 16, 14), ("write_uint", BASE + 30, 2)]
    entries = [Completion.unpack(view, i * 16) for i in range(2)]
    assert [(e.cid, e.dw0, e.status & 1) for e in entries] == [(5, 7, 1), (6, 8, 1)]
    assert cq.phase == 0


def test_a_stale_slot_keeps_its_old_phase_until_the_status_store() -> None:
    """Between the two stores the host sees the old phase: the entry is not yet posted."""
    mem, transport = message_memory(1 << 12, BASE)
    old = Completion(cid=1, status=0)  # phase 0: what the host consumed last lap
    transport.data[0:16] = old.pack()
    cq = CompletionQueue(1, BASE, 4, vector=1, ien=True)
    seen = []
    real_write = transport.dma_write

    def spy(address: int, data: bytes, scope: DmaScope) -> None:
        real_write(address, data, scope)
        seen.append(transport.data[CQE_STATUS_OFFSET] & 1)  # what a polling host reads now

    transport.dma_write = spy  # type: ignore[method-assign]
    cq.push(mem, Completion(cid=2))
    assert seen == [0, 1]


def test_event_idx_is_one_four_byte_store() -> None:
    mem, transport = message_memory(1 << 12, BASE)
    shadow = Shadow.for_queue((BASE, BASE + 0x800), qid=2, is_cq=True)
    shadow.publish(mem, 0x1234)
    shadow.publish(mem, 0x1234)  # unchanged: not written again
    assert transport.writes == [(BASE + 0x800 + 5 * 4, (0x1234).to_bytes(4, "little"))]


def test_write_uint_stores_and_marks_dirty() -> None:
    from appliance.memory import DirtyLog

    mem = ClientMemory()
    fd, view = memfd(8192)
    mem.map(0x10000, 8192, fd=fd)
    mem.dirty_log = DirtyLog()
    mem.write_uint(0x10000 + 14, 0xA5F1, 2)
    mem.write_uint(0x11000 + 8, 0xDEADBEEF, 4)
    mem.write_uint(0x10000 + 32, 0x0102030405060708, 8)
    assert view[14:16] == b"\xf1\xa5" and view[4096 + 8:4096 + 12] == b"\xef\xbe\xad\xde"
    assert view[32:40] == bytes(range(8, 0, -1))
    assert mem.dirty_log.pages == {0x10, 0x11}


def test_write_uint_falls_back_when_unaligned_or_split() -> None:
    mem = ClientMemory()
    fd1, m1 = memfd(4096)
    fd2, m2 = memfd(4096)
    mem.map(0x10000, 4096, fd=fd1)
    mem.map(0x11000, 4096, fd=fd2)
    mem.write_uint(0x10001, 0xBBAA, 2)  # unaligned
    mem.write_uint(0x10FFE, 0x44332211, 4)  # crosses into the next region
    assert m1[1:3] == b"\xaa\xbb" and m1[4094:] == b"\x11\x22" and m2[:2] == b"\x33\x44"


def test_write_uint_refuses_bad_input() -> None:
    mem = ClientMemory()
    fd, _ = memfd(4096)
    mem.map(0x10000, 4096, fd=fd, writable=False)
    with pytest.raises(ValueError):
        mem.write_uint(0x10000, 1, 3)
    with pytest.raises(ValueError):
        mem.write_uint(0x10000, 1 << 16, 2)
    with pytest.raises(GuestMemoryError):
        mem.write_uint(0x10000, 1, 2)  # read-only region
    with pytest.raises(GuestMemoryError):
        mem.write_uint(0x20000, 1, 2)  # unmapped
