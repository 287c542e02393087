"""The client memory accessor: bounds, splitting, holes, dirty log, zero copy."""

import errno
import fcntl
import mmap
import os
import signal
import traceback
from collections.abc import Callable

import pytest

from appliance import memory_region
from appliance.memory import (
    F_ADD_SEALS,
    F_GET_SEALS,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    ClientMemory,
    DirtyLog,
    DmaScope,
    GuestMemoryError,
    MapError,
    mmap_unshrinkable,
)
from appliance.vfio_user.wire import Header


def memfd(size: int) -> tuple[int, mmap.mmap]:
    """A memfd that allows sealing, as QEMU's memory-backend-memfd (the mmap path)."""
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
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


# ---------------------------------------------------------------- memory that can vanish
def survives(body: Callable[[], None]) -> None:
    """Run ``body`` in a forked child: were a shrink to raise SIGBUS, it would
    kill the child (a failure here), not pytest."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        except BaseException:  # noqa: BLE001 -- reported through the exit status
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert not os.WIFSIGNALED(status), f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    assert os.WEXITSTATUS(status) == 0, "the check failed in the child (traceback above)"


def plain_memfd(size: int) -> tuple[int, mmap.mmap]:
    """A memfd without MFD_ALLOW_SEALING (as DPDK's --no-huge memory): it cannot be sealed."""
    fd = os.memfd_create("plain")
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def test_a_sealable_memfd_is_sealed_and_mapped() -> None:
    mem = ClientMemory()
    fd, m = memfd(2 * 4096)
    mem.map(0x0, 2 * 4096, fd=os.dup(fd))
    assert mem.regions[0].access == "mmap"
    assert fcntl.fcntl(fd, F_GET_SEALS) & F_SEAL_SHRINK
    with pytest.raises(PermissionError):  # EPERM: the client can no longer shrink it
        os.ftruncate(fd, 0)
    mem.write(0x10, b"sealed")
    assert m[0x10:0x16] == b"sealed" and mem.buffers(0x10, 6, write=False) is not None
    os.ftruncate(fd, 4 * 4096)  # growing stays allowed (it cannot hurt a mapping)
    mem.unmap_all()


def test_an_already_shrink_sealed_memfd_is_mapped() -> None:
    """QEMU's memory-backend-memfd: F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL."""
    mem = ClientMemory()
    fd, _ = memfd(4096)
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL)
    mem.map(0x0, 4096, fd=fd)
    assert mem.regions[0].access == "mmap"
    mem.unmap_all()


def test_map_unsealed_maps_what_cannot_be_sealed() -> None:
    """The operator's opt-in for trusted front-ends (net.map_unsealed_memory): an
    unsealable memfd is mmap'd (fast) and left unsealed (its owner can still shrink it)."""
    fd, m = plain_memfd(4096)
    mem = ClientMemory(map_unsealed=True)
    mem.map(0x0, 4096, fd=os.dup(fd))
    assert mem.regions[0].access == "mmap" and mem.buffers(0, 16, write=False) is not None
    mem.write(0x8, b"mapped")
    assert m[0x8:0xE] == b"mapped"
    mem.unmap_all()
    m.close()
    os.close(fd)


@pytest.mark.parametrize("kind", ["plain-memfd", "seal-sealed", "read-only-fd", "tmpfs-file"])
def test_an_unsealable_file_is_reached_through_its_fd(kind: str) -> None:
    survives(lambda: reached_through_fd(kind))


def reached_through_fd(kind: str) -> None:
    if kind == "tmpfs-file":  # a file on /dev/shm or hugetlbfs: F_SEAL_SEAL from the start
        fd = os.open("/dev/shm", os.O_RDWR | os.O_TMPFILE)
        os.ftruncate(fd, 4096)
    elif kind == "seal-sealed":
        fd, _ = memfd(4096)
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL)
    else:
        fd, _ = plain_memfd(4096) if kind == "plain-memfd" else memfd(4096)
    given = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY) if kind == "read-only-fd" else os.dup(fd)
    mem = ClientMemory()
    mem.map(0x0, 4096, fd=given, writable=kind != "read-only-fd")
    assert mem.regions[0].access == "fd"
    assert mem.buffers(0, 16, write=False) is None  # callers fall back to read/write
    os.pwrite(fd, b"through the fd", 0x20)
    assert mem.read(0x20, 14) == b"through the fd"
    if kind != "read-only-fd":
        mem.dirty_log = DirtyLog()
        mem.write_uint(0x40, 0xBEEF, 2)
        mem.write(0x1000 - 2, b"ok")
        assert os.pread(fd, 2, 0x40) == b"\xef\xbe" and mem.dirty_log.take(0, 4096) == [0]
    os.ftruncate(fd, 0x30)  # the client shrinks it: errors, never a SIGBUS
    with pytest.raises(GuestMemoryError) as info:
        mem.read(0x20, 0x20)
    assert (info.value.expected, info.value.completed) == (0x20, 0x10)
    if kind != "read-only-fd":
        with pytest.raises(GuestMemoryError):
            mem.write(0x100, b"x")
        assert os.fstat(fd).st_size == 0x30  # refused, not grown back
    mem.unmap_all()
    os.close(fd)


def test_a_shrunk_fd_region_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    survives(lambda: logged_once(caplog))


def logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fd, _ = plain_memfd(4096)
    mem = ClientMemory()
    mem.map(0x8000, 4096, fd=os.dup(fd))
    os.ftruncate(fd, 0)
    for _ in range(3):
        with pytest.raises(GuestMemoryError):
            mem.read(0x8000, 8)
    lines = [r for r in caplog.records if r.name == "appliance.memory"]
    assert len(lines) == 1 and "0x8000+0x1000" in lines[0].getMessage()
    mem.unmap_all()
    os.close(fd)


def test_a_region_past_the_end_of_its_file_is_refused() -> None:
    """Mapped, its tail would be a SIGBUS from the start."""
    mem = ClientMemory()
    for fd, _ in (memfd(4096), plain_memfd(4096)):
        with pytest.raises(MapError) as e:
            mem.map(0x0, 2 * 4096, fd=os.dup(fd))
        assert e.value.errno == errno.EINVAL
        with pytest.raises(MapError):
            mem.map(0x0, 4096, fd=os.dup(fd), fd_offset=4096)
        os.close(fd)
    assert mem.regions == ()


def test_fd_area_reports_a_shrink_instead_of_raising() -> None:
    survives(fd_area_after_shrink)


def fd_area_after_shrink() -> None:
    fd, _ = plain_memfd(4096)
    mem = ClientMemory()
    mem.map(0x0, 4096, fd=os.dup(fd))
    errors: list[GuestMemoryError] = []
    area = mem.fd_area(0x100, 0x40, True, errors.append)
    assert area is not None and len(area) == 0x40
    words = area[4:12].cast("H")
    words[1] = 0x1234
    assert os.pread(fd, 2, 0x106) == b"\x34\x12" and words[1] == 0x1234 and len(words) == 4
    os.ftruncate(fd, 0)
    assert words[1] == 0 and len(errors) == 1
    words[2] = 7  # refused like a read there: the file is not grown back
    area.write(0x20, b"used")
    assert os.fstat(fd).st_size == 0 and len(errors) == 3
    mem.unmap_all()
    os.close(fd)


def test_a_write_the_file_shrank_under_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    survives(lambda: shrunk_under_the_write(monkeypatch))


def shrunk_under_the_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client shrinks the file between the write's fstat and its pwrite (a
    virtqueue's first drain racing the front-end's ftruncate): the pwrite grows
    the file back to where it ended, and the second fstat fails the write, so
    the ring breaks instead of going on over zeroes."""
    fd, _ = plain_memfd(4096)
    mem = ClientMemory()
    mem.map(0x0, 4096, fd=os.dup(fd))
    errors: list[GuestMemoryError] = []
    area = mem.fd_area(0x100, 0x40, True, errors.append)
    assert area is not None
    shrink = [True]  # the next fstat is followed by the client's ftruncate to 0
    real_file_size = memory_region.file_size

    def stat_then_shrink(f: int) -> int | None:
        size = real_file_size(f)
        if shrink[0]:
            shrink[0] = False
            os.ftruncate(fd, 0)
        return size

    monkeypatch.setattr(memory_region, "file_size", stat_then_shrink)
    area.cast("H")[1] = 0x1234  # the used ring's flags, say
    assert len(errors) == 1 and "shrank under the write" in str(errors[0])
    assert os.fstat(fd).st_size == 0x104  # grown back to the write's end: no fault, a failure
    os.ftruncate(fd, 4096)
    shrink[0] = True
    with pytest.raises(GuestMemoryError, match="shrank under the write"):  # the accessor too
        mem.write(0x200, b"x")
    os.ftruncate(fd, 4096)  # whole again: a write ending at the region's end is no shrink
    mem.write(0x1000 - 2, b"ok")
    assert os.pread(fd, 2, 0x1000 - 2) == b"ok"
    mem.unmap_all()
    os.close(fd)


def test_mmap_unshrinkable() -> None:
    fd, _ = memfd(8192)
    mm = mmap_unshrinkable(fd, 4096, 4096)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    mm.close()
    plain, _ = plain_memfd(8192)
    with pytest.raises(MapError) as e:
        mmap_unshrinkable(plain, 4096)
    assert e.value.errno == errno.EPERM
    with pytest.raises(MapError) as e:
        mmap_unshrinkable(fd, 8192, 4096)
    assert e.value.errno == errno.EINVAL
    os.close(fd)
    os.close(plain)


def test_an_fd_that_is_not_a_file_is_not_memory() -> None:
    """A pipe (or socket, eventfd, device) offered as guest memory is refused."""
    r, w = os.pipe()
    mem = ClientMemory()
    try:
        with pytest.raises(MapError, match="not a file") as info:
            mem.map(0x0, 4096, fd=r)  # takes the fd: closed on refusal
        assert info.value.errno == errno.EINVAL and not mem.regions
    finally:
        os.close(w)
