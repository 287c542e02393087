"""Client memory reached through its fd: which files may be mapped (the seals),
and the pread/pwrite stand-ins for views of a region that is not mapped.

A file a peer can shrink must never be mapped (a page past its end raises
SIGBUS, which a Python process does not survive): :func:`seal_against_shrink`
decides, :func:`mmap_unshrinkable` maps only such a file.  A region reached
through its fd gives holders of long-lived views (a virtqueue's rings)
:class:`FdArea` and :class:`FdWords` instead of ``memoryview`` slices and
casts.  :mod:`appliance.memory` is the accessor that uses them; this module
also holds the two errors of client memory, which it re-exports.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable
from typing import Literal, Protocol

from appliance.errors import ApplianceError

# File seals (fcntl(2), memfd_create(2)); older Pythons' fcntl lacks the names.
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x1)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x4)
F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x8)


class GuestMemoryError(ApplianceError):
    """A client address range is not (wholly) reachable.

    Attributes:
        address: first client address of the failed access.
        expected: bytes the access asked for.
        completed: bytes that were reachable before the hole.
    """

    def __init__(self, address: int, expected: int, completed: int, why: str = "unmapped") -> None:
        super().__init__(
            f"client memory {why} at {address + completed:#x} "
            f"(access {address:#x}+{expected:#x}, {completed} bytes completed)"
        )
        self.address = address
        self.expected = expected
        self.completed = completed


class MapError(ApplianceError):
    """A map/unmap request is invalid; ``errno`` is what the wire should report."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def seal_against_shrink(fd: int) -> bool:
    """Make sure the file behind ``fd`` can never shrink; True when it cannot.

    True when the file already carries F_SEAL_SHRINK, or when it still
    allows sealing and we could add it (F_ADD_SEALS needs an fd open for
    writing).  False for everything else: a memfd created without
    MFD_ALLOW_SEALING or sealed with F_SEAL_SEAL alone, a file on tmpfs or
    hugetlbfs, a file on a filesystem without seals, a read-only fd.
    """
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:  # EINVAL: the filesystem has no seals
        return False
    if seals & F_SEAL_SHRINK:
        return True
    if seals & F_SEAL_SEAL:
        return False
    try:
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK)
    except OSError:  # EPERM: not open for writing
        return False
    return True


def mmap_unshrinkable(fd: int, size: int, offset: int = 0) -> mmap.mmap:
    """Map ``size`` bytes of ``fd`` at ``offset`` (shared, read/write), only when
    its file can never shrink (:func:`seal_against_shrink`) and is long enough:
    for a client's file we must write into directly (the vhost-user dirty log).

    Raises:
        MapError: EPERM when the file could shrink, EINVAL when it is not a
            regular file or ends before ``offset + size``, else the mmap errno.
    """
    if not seal_against_shrink(fd):
        raise MapError(errno.EPERM, "its file could shrink under us (not a memfd that "
                                    "allows sealing, nor one sealed with F_SEAL_SHRINK)")
    try:
        length = file_size(fd)
        if length is None or length < offset + size:
            raise MapError(errno.EINVAL, f"{offset:#x}+{size:#x} ends past its file ({length} bytes)")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=offset)
    except (OSError, ValueError, OverflowError) as exc:
        err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
        raise MapError(err, f"cannot mmap {offset:#x}+{size:#x}: {exc}") from None


def file_size(fd: int) -> int | None:
    """The size of the regular file behind ``fd``; None for anything else.

    Raises:
        OSError: fstat failed.
    """
    st = os.fstat(fd)
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class FdRegion(Protocol):
    """What :class:`FdArea` needs of a region (:class:`appliance.memory.Region`)."""

    address: int
    fd: int | None
    fd_offset: int

    def pread(self, address: int, offset: int, n: int) -> bytes: ...

    def pwrite(self, address: int, offset: int, data: bytes | bytearray | memoryview) -> None: ...


OnError = Callable[[GuestMemoryError], None]


class FdArea:
    """A byte range of one fd region: what a holder of long-lived views (a
    virtqueue's rings) keeps instead of a ``memoryview`` when the region is
    not mmap'd.  Slicing gives a sub-area, :meth:`cast` gives :class:`FdWords`.

    A failed access (the client shrank the file) never raises: it calls
    ``on_error`` once with the :class:`GuestMemoryError`, reads as zeroes and
    drops the write; the holder marks itself broken there.  A write past the
    end of the file fails like a read there: it never grows the file back.
    """

    def __init__(self, region: FdRegion, offset: int, length: int, on_error: OnError) -> None:
        self.region, self.offset, self.length = region, offset, length
        self.on_error = on_error

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> FdArea:
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise ValueError("fd areas slice with step 1 only")
        return FdArea(self.region, self.offset + start, max(0, stop - start), self.on_error)

    def cast(self, fmt: Literal["H", "I", "Q"]) -> FdWords:
        """The area as little-endian unsigned items of ``fmt``'s width."""
        return FdWords(self, {"H": 2, "I": 4, "Q": 8}[fmt])

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` in the area (zeroes after a failure)."""
        if offset < 0 or offset + n > self.length:
            raise IndexError(f"{offset:#x}+{n:#x} outside an area of {self.length:#x}")
        pos = self.offset + offset
        try:
            return self.region.pread(self.region.address + pos, pos, n)
        except GuestMemoryError as exc:
            self.on_error(exc)
            return bytes(n)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` in the area (dropped after a failure, or
        when the file now ends before it: an fstat first, as for every fd write)."""
        if offset < 0 or offset + len(data) > self.length:
            raise IndexError(f"{offset:#x}+{len(data):#x} outside an area of {self.length:#x}")
        pos = self.offset + offset
        try:
            self.region.pwrite(self.region.address + pos, pos, data)
        except GuestMemoryError as exc:
            self.on_error(exc)

    def release(self) -> None:
        """Nothing to release (the memoryview interface)."""


class FdWords:
    """Items of :class:`FdArea`, indexed like ``memoryview.cast``: each access is
    one pread/pwrite of ``width`` bytes (not one store, unlike the cast).  A ring
    reads these on every frame, so the common read calls ``os.pread`` directly
    (a short read goes through the area); a write goes through the area, whose
    fstat keeps it from growing back a file the client shrank."""

    def __init__(self, area: FdArea, width: int) -> None:
        assert area.region.fd is not None
        self.area, self.width, self.count = area, width, area.length // width
        self._fd = area.region.fd
        self._base = area.region.fd_offset + area.offset

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:
        if 0 <= i < self.count:
            try:
                data = os.pread(self._fd, self.width, self._base + i * self.width)
                if len(data) == self.width:
                    return int.from_bytes(data, "little")
            except OSError:
                pass
        return int.from_bytes(self.area.read(i * self.width, self.width), "little")

    def __setitem__(self, i: int, value: int) -> None:
        if not 0 <= i < self.count:
            raise IndexError(f"item {i} outside {self.count}")
        self.area.write(i * self.width, value.to_bytes(self.width, "little"))

    def release(self) -> None:
        """Nothing to release (the memoryview interface)."""
