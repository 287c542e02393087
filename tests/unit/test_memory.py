"""The client memory accessor: bounds, splitting, holes, dirty log, zero copy."""

import errno
import mmap
import os

import pytest

from appliance.memory import ClientMemory, DmaScope, GuestMemoryError, MapError
from appliance.vfio_user.wire import Header


def memfd(size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("t")
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def test_read_write_split_across_adjacent_regions() -> None:
    mem = ClientMemory()
    fd1, m1 = memfd(4096)
    fd2, m2 = memfd(4096)
    mem.map(0x10000, 4096, fd=os.dup(fd1))
    mem.map(0x11000, 4096, fd=os.dup(fd2))
    mem.write(0x10ffe, b"abcd")
    assert m1[4094:4096] == b"ab" and m2[0:2] == b"cd"
    assert mem.read(0x10ffe, 4) == b"abcd"


def test_hole_reports_expected_and_completed() -> None:
    mem = ClientMemory()
    fd, _ = memfd(4096)
    mem.map(0x0, 4096, fd=fd)
    with pytest.raises(GuestMemoryError) as info:
        mem.read(0xff0, 0x20)
    assert (info.value.expected, info.value.completed) == (0x20, 0x10)


def test_overflow_and_unmapped_are_errors_not_crashes() -> None:
    mem = ClientMemory()
    with pytest.raises(GuestMemoryError):
        mem.read((1 << 64) - 2, 4)
    with pytest.raises(GuestMemoryError):
        mem.write(0x1234, b"x")


def test_map_errors() -> None:
    mem = ClientMemory(max_regions=2)
    fd, _ = memfd(8192)
    mem.map(0x0, 8192, fd=os.dup(fd))
    with pytest.raises(MapError) as e:
        mem.map(0x1000, 4096, fd=os.dup(fd))
    assert e.value.errno == errno.EEXIST
    with pytest.raises(MapError) as e:
        mem.unmap(0x0, 4096)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(MapError) as e:
        mem.map(0x10000, 0)
    assert e.value.errno == errno.EINVAL
    mem.map(0x10000, 4096)
    with pytest.raises(MapError) as e:
        mem.map(0x20000, 4096)
    assert e.value.errno == errno.ENOSPC


def test_dirty_log_marked_by_accessor() -> None:
    from appliance.memory import DirtyLog

    mem = ClientMemory()
    fd, _ = memfd(4 * 4096)
    mem.map(0x0, 4 * 4096, fd=fd)
    mem.dirty_log = DirtyLog()
    mem.write(0x0ffc, b"12345678")
    mem.buffers(0x3000, 16, write=True)
    assert mem.dirty_log.take(0, 4 * 4096) == [0, 1, 3]


def test_read_obj_and_readonly_region() -> None:
    mem = ClientMemory()
    fd, m = memfd(4096)
    m[0:16] = Header(msg_id=7, command=1).pack()
    mem.map(0x0, 4096, fd=fd, writable=False)
    assert mem.read_obj(0, Header).msg_id == 7
    with pytest.raises(GuestMemoryError):
        mem.write(0, b"x")


class ImmediateTransport:
    """A message-only region that answers at once (the real transport,
    appliance.vfio_user.dma, never does): a bytearray from ``base``, with every
    call and every write recorded in order.  Other test modules import it."""

    writes_in_flight = 0

    def __init__(self, size: int, base: int = 0) -> None:
        self.data = bytearray(size)
        self.base = base
        self.calls = 0
        self.writes: list[tuple[int, bytes]] = []
        self.scopes: list[DmaScope] = []

    def dma_read(self, address: int, count: int, scope: DmaScope) -> bytes:
        self.calls += 1
        self.scopes.append(scope)
        return bytes(self.data[address - self.base:address - self.base + count])

    def dma_write(self, address: int, data: bytes, scope: DmaScope) -> None:
        self.calls += 1
        self.scopes.append(scope)
        self.writes.append((address, bytes(data)))
        self.data[address - self.base:address - self.base + len(data)] = data


def message_memory(size: int, base: int = 0) -> tuple[ClientMemory, ImmediateTransport]:
    """A ClientMemory whose one region, ``base``+``size``, is message-only."""
    transport = ImmediateTransport(size, base)
    mem = ClientMemory(transport=transport)
    mem.map(base, size)
    mem.scope = DmaScope()
    return mem, transport


def test_message_only_region_goes_through_transport_in_its_scope() -> None:
    mem, t = message_memory(8192)
    scope, mem.scope = mem.scope, None
    with pytest.raises(GuestMemoryError, match="outside any device work"):
        mem.read(0x100, 5)
    mem.scope = scope
    mem.write(0x100, b"hello")
    assert t.data[0x100:0x105] == b"hello" and t.scopes == [scope]
    assert mem.read(0x100, 5) == b"hello"
    assert mem.buffers(0x100, 5, write=False) is None
