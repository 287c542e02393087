"""Client memory: the one accessor devices use to reach the client's address space.

Theory of operation
-------------------
A client (QEMU, a vhost-user frontend, our own client library) tells the
server which ranges of its address space the device may reach.  Each range is
a :class:`Region` reached one of three ways (its :attr:`Region.access`):

* ``mmap``: mapped from the fd the client passed, when that file can no
  longer shrink (see below);
* ``fd``: through the same fd with ``os.pread``/``os.pwrite``, when it can;
* ``message``: no fd, only vfio-user DMA_READ/DMA_WRITE, via a
  :class:`MessageTransport` the runtime supplies.

Devices never see which: they call :meth:`ClientMemory.read` /
:meth:`ClientMemory.write` (or the ``*_obj`` forms for wire structs) with a
client address and length.

Memory that can vanish
----------------------
A page of a shared mapping beyond the end of its file raises SIGBUS on
access, and Python cannot survive a SIGBUS: a client that shrinks
(``ftruncate``) the file behind a region would kill the process at the next
access.  Checking the size first does not help (the client can shrink it
between the check and the access), so :meth:`ClientMemory.map` mmaps only a
file that cannot shrink: a memfd already sealed with F_SEAL_SHRINK (QEMU's
``memory-backend-memfd`` seals by default), or a memfd that still allows
sealing, which we seal ourselves (:func:`seal_against_shrink`; the client's
``ftruncate`` then fails with EPERM).  Every other file -- a memfd created
without MFD_ALLOW_SEALING (DPDK's ``--no-huge`` memory), a file on tmpfs or
hugetlbfs, a regular file, a read-only fd -- is reached through the fd: a
read the shrunk file cannot satisfy is short, a write beyond its end is
refused after an ``fstat``, and either raises :class:`GuestMemoryError`
(logged once per region).  Such a region has no zero-copy views
(:meth:`ClientMemory.buffers` returns None); :meth:`ClientMemory.fd_area`
gives a holder of long-lived views (a virtqueue) :class:`FdArea` and
:class:`FdWords` stand-ins instead of ``memoryview`` slices and casts.
With ``guard_unsealed`` (vhost-user) such a region is mapped as well, for
native calls under the SIGBUS guard only (:attr:`Region.guarded`,
:mod:`appliance.memory_guarded`); nothing here ever reads that mapping.

* Every access is bounds-checked; an access crossing two adjacent regions is
  split inside the accessor; an access touching a hole raises
  :class:`GuestMemoryError` reporting how many bytes were expected and how
  many were completed.  Address arithmetic that overflows 64 bits is an error.
* Every write marks the dirty log (when one is running) inside the accessor,
  so device code never has to remember to.
* :meth:`ClientMemory.buffers` hands out zero-copy ``memoryview`` slices of
  mmap'd regions for scatter/gather I/O (``os.preadv`` straight into guest
  memory); asking for write access marks those pages dirty up front.
* :meth:`ClientMemory.write_uint` stores one aligned 2, 4 or 8-byte integer
  as a single store into an mmap'd region.  A guest driver on another vCPU
  (QEMU MTTCG) polls some fields while we write them -- an NVMe CQE's phase
  tag, a shadow doorbell EventIdx -- and a slice assignment (memcpy/memmove)
  or ``struct.pack_into`` gives no guarantee about the width or order of
  its stores.  An item assignment through ``memoryview.cast`` does one
  ``memcpy`` of a constant 2/4/8 bytes, which compiles to one store; x86
  keeps stores in program order, so writing the rest of a record first and
  the polled word last publishes the record whole.

Message-only regions never block.  Each access runs in a :class:`DmaScope`
(``ClientMemory.scope``, set by the device: one per NVMe request, one for
the controller's queue work).  A read the scope does not hold yet asks the
transport for it and raises :class:`DmaPending`: the device holds whatever
needed it and runs it again once the scope's ``on_ready`` says the data
arrived; the scope then answers the same read from what arrived.  A write is
posted: the transport sends it and counts it in flight until the client
acknowledges it (a refused one sets the scope's ``error``).  Nothing here
waits for a client.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from appliance.errors import ApplianceError
from appliance.memory_fd import (
    F_ADD_SEALS,
    F_GET_SEALS,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    FdArea,
    FdWords,
    GuestMemoryError,
    MapError,
    OnError,
    file_size,
    mmap_unshrinkable,
    seal_against_shrink,
)
from appliance.protocol_common import close_quietly
from appliance.wire import Struct

# The interface: the names below and those of appliance.memory_fd (the seals, the
# fd-region stand-ins, the two errors) that it re-exports.
__all__ = [
    "ADDRESS_LIMIT",
    "F_ADD_SEALS",
    "F_GET_SEALS",
    "F_SEAL_GROW",
    "F_SEAL_SEAL",
    "F_SEAL_SHRINK",
    "F_SEAL_WRITE",
    "PAGE_SIZE",
    "ClientMemory",
    "DirtyLog",
    "DmaPending",
    "DmaScope",
    "FdArea",
    "FdWords",
    "GuestMemoryError",
    "MapError",
    "MessageTransport",
    "OnError",
    "Region",
    "checked_end",
    "file_size",
    "mmap_unshrinkable",
    "seal_against_shrink",
]

ADDRESS_LIMIT = 1 << 64
PAGE_SIZE = 4096
# memoryview.cast formats (native byte order) of 2, 4 and 8-byte unsigned integers
_UINT_FORMATS: dict[int, Literal["H", "I", "Q"]] = {2: "H", 4: "I", 8: "Q"}

S = TypeVar("S", bound=Struct)


log = logging.getLogger(__name__)


class DmaPending(ApplianceError):
    """A message-only range was asked of the client: run the access again once
    its scope's ``on_ready`` fired (not an error of the guest's)."""


@dataclass(eq=False)
class DmaScope:
    """The message DMA of one piece of device work (an NVMe request, queue work).

    ``reads`` holds what arrived, by (address, count); with ``consume`` each
    arrived read answers once (queue entries and shadow doorbells change: a
    later read must ask again), else it answers every time until the scope
    is dropped (a request run again reads the same buffers).
    """

    consume: bool = False
    on_ready: Callable[[], None] | None = None
    reads: dict[tuple[int, int], bytes] = field(default_factory=dict)
    loading: set[tuple[int, int]] = field(default_factory=set)
    in_flight: int = 0  # our DMA messages without a reply yet
    error: str | None = None  # a DMA the client refused or never answered

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    def take(self, key: tuple[int, int]) -> bytes | None:
        """What arrived for ``key``, if anything."""
        return self.reads.pop(key, None) if self.consume else self.reads.get(key)

    def settle(self) -> None:
        """One DMA message of this scope got its reply (or was given up)."""
        self.in_flight -= 1
        if not self.in_flight and self.on_ready is not None:
            self.on_ready()

    def drop(self) -> None:
        """Forget it: replies still on their way change nothing."""
        self.on_ready = None
        self.reads.clear()
        self.loading.clear()


class MessageTransport(Protocol):
    """How the runtime reaches a region the client did not share as an fd."""

    @property
    def writes_in_flight(self) -> int:
        """DMA writes sent and not acknowledged yet (in any scope)."""

    def dma_read(self, address: int, count: int, scope: DmaScope) -> bytes:
        """What arrived for this range in ``scope``, else ask for it.

        Raises:
            DmaPending: asked for (or still on its way).
            GuestMemoryError: the scope's DMA failed.
        """

    def dma_write(self, address: int, data: bytes, scope: DmaScope) -> None:
        """Post a DMA write (counted in ``scope`` until acknowledged)."""


def checked_end(address: int, length: int) -> int:
    """``address + length`` or :class:`GuestMemoryError` if it leaves 64 bits."""
    if address < 0 or length < 0 or address + length > ADDRESS_LIMIT:
        raise GuestMemoryError(address, length, 0, why="address overflow")
    return address + length


@dataclass
class Region:
    """One mapped range of client memory."""

    address: int
    size: int
    readable: bool = True
    writable: bool = True
    view: memoryview | None = None  # None: reached through the MessageTransport
    mm: mmap.mmap | None = field(default=None, repr=False)
    fd_offset: int = 0
    # Extra translation key (vhost-user: the frontend's virtual address of the region).
    user_address: int | None = None
    # The fd the region was mapped from, kept open while mapped: a live handoff
    # (appliance.runtime.handoff.channel) passes it on to the next process.
    fd: int | None = field(default=None, repr=False)
    reported: bool = field(default=False, repr=False)  # a failed fd access was logged
    # The mapping of an fd region whose file could shrink (ClientMemory's
    # guard_unsealed), for native calls under the SIGBUS guard only
    # (appliance.memory_guarded): Python never reads it (a shrink would kill the
    # process); its accesses go through the fd.
    guarded: memoryview | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def access(self) -> Literal["mmap", "fd", "message"]:
        """How the region is reached (see the module docstring)."""
        if self.view is not None:
            return "mmap"
        return "fd" if self.fd is not None else "message"

    def pread(self, address: int, offset: int, n: int) -> bytes:
        """``n`` bytes at region ``offset`` (client ``address``, for the error) through the fd.

        Raises:
            GuestMemoryError: the file ends before (it shrank) or the read failed.
        """
        assert self.fd is not None
        try:
            data = os.pread(self.fd, n, self.fd_offset + offset)
        except OSError as exc:
            raise self._failed(address, n, 0, exc.strerror or str(exc)) from None
        if len(data) < n:
            raise self._failed(address, n, len(data), "beyond the end of its file")
        return data

    def pwrite(self, address: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at region ``offset`` through the fd.

        An fstat first refuses a write past the end of the file: a write there
        would grow back a file the client shrank, to a size that need not end
        on a page (the zeroes it brings back would read as client memory, and
        a guarded native call would reach bytes past the new end without a
        fault).  The client can still shrink the file between the fstat and
        the write, and then the write grows it back (never a fault): a second
        fstat after the write finds the file ending where the write ended,
        short of the region's end, and fails the write all the same, so a
        ring does not go on over the zeroes the write brought back.  A write
        that ends at the region's end cannot tell a file grown back from a
        whole one: a shrink just before it brings the region back as zeroes
        (no fault; the client loses its own memory).

        Raises:
            GuestMemoryError: the file ends before the range, or ends where the
                write ended short of the region's end (it shrank under the
                write), or the write failed.
        """
        assert self.fd is not None
        n, pos = len(data), self.fd_offset + offset
        try:
            size = file_size(self.fd)
            if size is not None and size < pos + n:
                raise self._failed(address, n, max(0, size - pos), "beyond the end of its file")
            done = os.pwrite(self.fd, data, pos)
            after = file_size(self.fd) if size is not None else None
        except OSError as exc:
            raise self._failed(address, n, 0, exc.strerror or str(exc)) from None
        if after is not None and after <= pos + done and after < self.fd_offset + self.size:
            raise self._failed(address, n, 0, "its file shrank under the write")
        if done < n:
            raise self._failed(address, n, done, "short write to its file")

    def _failed(self, address: int, n: int, completed: int, why: str) -> GuestMemoryError:
        err = GuestMemoryError(address, n, completed, why=f"{why} (fd region {self.address:#x}+{self.size:#x})")
        if not self.reported:  # once per region: a peer that shrank it would flood the log
            self.reported = True
            log.warning("client memory region %#x+%#x: %s", self.address, self.size, err)
        return err

    def close(self) -> None:
        for view in (self.view, self.guarded):
            if view is not None:
                view.release()
        self.view = self.guarded = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd is not None:
            close_quietly(self.fd)
            self.fd = None


class DirtyLog:
    """Pages written since the log started (or since the last report)."""

    def __init__(self, page_size: int = PAGE_SIZE) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError("dirty log page size must be a power of two")
        self.page_size = page_size
        self.shift = page_size.bit_length() - 1
        self.pages: set[int] = set()

    def mark(self, address: int, length: int) -> None:
        if length <= 0:
            return
        first = address >> self.shift
        last = (address + length - 1) >> self.shift
        if first == last:
            self.pages.add(first)
        else:
            self.pages.update(range(first, last + 1))

    def take(self, address: int, length: int) -> list[int]:
        """Remove and return the dirty page numbers inside [address, address+length)."""
        first = address >> self.shift
        last = (address + length - 1) >> self.shift
        hit = sorted(p for p in self.pages if first <= p <= last)
        self.pages.difference_update(hit)
        return hit


#: mmap'd regions in address order as (guest address, view, readable, writable)
MappedRegions = tuple[tuple[int, memoryview, bool, bool], ...]


class ClientMemory:
    """The client's address space as the device may reach it."""

    def __init__(self, max_regions: int = 65535, transport: MessageTransport | None = None,
                 *, map_unsealed: bool = False, guard_unsealed: bool = False) -> None:
        """``map_unsealed``: mmap a region even when its file could still shrink
        (a peer that shrinks it then kills this process with SIGBUS): only for
        front-ends the operator trusts, for speed (DPDK's memory cannot be sealed).
        ``guard_unsealed``: map such a region for native calls under the SIGBUS
        guard only (:attr:`Region.guarded`); Python still reaches it through its fd."""
        self.max_regions = max_regions
        self.map_unsealed = map_unsealed
        self.guard_unsealed = guard_unsealed
        #: False once a guarded native call faulted in this memory
        #: (:func:`appliance.memory_guarded.native_fault`)
        self.native_ok = True
        self.transport = transport
        self.dirty_log: DirtyLog | None = None
        #: whose DMA messages an access makes (the device sets it; see DmaScope)
        self.scope: DmaScope | None = None
        self._starts: list[int] = []
        self._regions: list[Region] = []
        #: counts the changes of the region list (map, unmap): a native
        #: caller's view of the regions holds while it is unchanged
        self.generation = 0

    # ------------------------------------------------------------ mapping
    def map(
        self,
        address: int,
        size: int,
        *,
        fd: int | None = None,
        fd_offset: int = 0,
        readable: bool = True,
        writable: bool = True,
        user_address: int | None = None,
    ) -> Region:
        """Add a region; takes ownership of ``fd`` (kept with the region, closed on error).

        The fd's file is sealed against shrinking when it allows that, and then
        mmap'd; otherwise the region is reached through the fd (module docstring).

        Raises:
            MapError: EINVAL for a zero size, overflow, a bad offset or a region
                ending past the end of its file; EEXIST when it overlaps a mapped
                region; ENOSPC past ``max_regions``; the mmap errno when the fd
                cannot be mapped.
        """
        try:
            if size <= 0 or address < 0 or address + size > ADDRESS_LIMIT:
                raise MapError(errno.EINVAL, f"bad region {address:#x}+{size:#x}")
            if not (readable or writable):
                raise MapError(errno.EINVAL, "region neither readable nor writable")
            if self._overlapping(address, size):
                raise MapError(errno.EEXIST, f"region {address:#x}+{size:#x} overlaps a mapped one")
            if len(self._regions) >= self.max_regions:
                raise MapError(errno.ENOSPC, f"more than {self.max_regions} regions")
            region = Region(address, size, readable, writable, fd_offset=fd_offset,
                            user_address=user_address)
            if fd is not None:
                if fd_offset < 0 or fd_offset % mmap.ALLOCATIONGRANULARITY:
                    raise MapError(errno.EINVAL, f"fd offset {fd_offset:#x} not page aligned")
                # Seal first, then check the size: checked first, the file could
                # shrink before the seal (a refused map leaves the seal on).
                sealed = seal_against_shrink(fd)
                try:
                    length = file_size(fd)
                except OSError as exc:
                    raise MapError(exc.errno or errno.EINVAL, f"cannot stat region fd: {exc}") from None
                if length is None:  # a pipe, a socket, an eventfd, a device: not memory
                    raise MapError(errno.EINVAL, f"region {address:#x}+{size:#x}: its fd is not "
                                   "a file")
                if length < fd_offset + size:
                    raise MapError(errno.EINVAL, f"region {address:#x}+{size:#x} at offset "
                                   f"{fd_offset:#x} ends past its file ({length:#x} bytes)")
                if sealed or self.map_unsealed:
                    region.mm = self._mmap(fd, region)
                    region.view = memoryview(region.mm)
                elif self.guard_unsealed:
                    region.mm = self._mmap(fd, region)
                    region.guarded = memoryview(region.mm)
                region.fd, fd = fd, None  # kept with the region, closed with it
        finally:
            if fd is not None:
                os.close(fd)
        i = bisect.bisect(self._starts, address)
        self._starts.insert(i, address)
        self._regions.insert(i, region)
        self.generation += 1
        return region

    @staticmethod
    def _mmap(fd: int, region: Region) -> mmap.mmap:
        prot = (mmap.PROT_READ if region.readable else 0) | (mmap.PROT_WRITE if region.writable else 0)
        try:
            return mmap.mmap(fd, region.size, flags=mmap.MAP_SHARED, prot=prot,
                             offset=region.fd_offset)
        except (OSError, ValueError, OverflowError) as exc:
            err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            raise MapError(err, f"cannot mmap region {region.address:#x}+{region.size:#x}: {exc}") from None

    def unmap(self, address: int, size: int) -> None:
        """Remove the region that exactly matches ``address``/``size``.

        Raises:
            MapError: ENOENT when no region matches exactly.
        """
        i = bisect.bisect_left(self._starts, address)
        if i == len(self._starts) or self._starts[i] != address or self._regions[i].size != size:
            raise MapError(errno.ENOENT, f"no region {address:#x}+{size:#x} is mapped")
        self._starts.pop(i)
        self._regions.pop(i).close()
        self.generation += 1

    def unmap_all(self) -> None:
        for region in self._regions:
            region.close()
        self._starts.clear()
        self._regions.clear()
        self.generation += 1

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    def mapped_regions(self, partial: bool = False) -> MappedRegions | None:
        """The regions as native code takes them, (guest address, view, readable,
        writable) in address order, or None when one is not mmap'd (an fd or
        message region).  ``partial``: the mmap'd ones only (None if there is
        none), for native code that hands back whatever touches the others."""
        mapped = []
        for r in self._regions:
            if r.view is None:
                if partial:
                    continue
                return None
            mapped.append((r.address, r.view, r.readable, r.writable))
        return tuple(mapped) if mapped or not partial else None

    def _overlapping(self, address: int, size: int) -> bool:
        i = bisect.bisect(self._starts, address)
        if i and self._regions[i - 1].end > address:
            return True
        return i < len(self._starts) and self._starts[i] < address + size

    def _find(self, address: int) -> Region | None:
        i = bisect.bisect(self._starts, address) - 1
        if i >= 0 and address < self._regions[i].end:
            return self._regions[i]
        return None

    def _pieces(self, address: int, length: int, write: bool) -> Iterator[tuple[Region, int, int]]:
        """Yield (region, offset in region, length) covering the access, or raise."""
        checked_end(address, length)
        done = 0
        while done < length:
            region = self._find(address + done)
            if region is None:
                raise GuestMemoryError(address, length, done)
            if not (region.writable if write else region.readable):
                raise GuestMemoryError(address, length, done, why="not writable" if write else "not readable")
            off = address + done - region.address
            n = min(length - done, region.size - off)
            yield region, off, n
            done += n

    # ------------------------------------------------------------ access
    def read(self, address: int, length: int) -> bytes:
        """Read ``length`` bytes at client ``address``.

        Raises:
            GuestMemoryError: part of the range is unmapped or not readable.
        """
        parts = []
        for region, off, n in self._pieces(address, length, write=False):
            if region.view is not None:
                parts.append(bytes(region.view[off:off + n]))
            elif region.fd is not None:
                parts.append(region.pread(region.address + off, off, n))
            else:
                parts.append(self._transport().dma_read(region.address + off, n, self._scope()))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at client ``address`` and mark the dirty log.

        Raises:
            GuestMemoryError: part of the range is unmapped or not writable
                (nothing is written then), or an fd region's file ends before
                it (the pieces before that one are written).
        """
        pieces = list(self._pieces(address, len(data), write=True))
        done = 0
        for region, off, n in pieces:
            if region.view is not None:
                region.view[off:off + n] = data[done:done + n]
            elif region.fd is not None:
                region.pwrite(region.address + off, off, data[done:done + n])
            else:
                self._transport().dma_write(region.address + off, bytes(data[done:done + n]),
                                            self._scope())
            done += n
        self.mark_dirty(address, len(data))

    def write_uint(self, address: int, value: int, size: int) -> None:
        """Store the little-endian unsigned ``value`` of ``size`` bytes (2, 4 or 8).

        In an mmap'd region, at an offset aligned to ``size``, this is one
        store (see the module docstring); anywhere else (fd or message region,
        unaligned, crossing regions) it is :meth:`write`, whose copy gives no
        such guarantee.  Marks the dirty log.

        Raises:
            ValueError: ``size`` is not 2, 4 or 8, or ``value`` does not fit.
            GuestMemoryError: the range is unmapped or not writable.
        """
        fmt = _UINT_FORMATS.get(size)
        if fmt is None or not 0 <= value < 1 << (8 * size):
            raise ValueError(f"cannot store {value:#x} in {size} bytes")
        checked_end(address, size)
        region = self._find(address)
        off = address - region.address if region is not None else 0
        if (region is None or region.view is None or not region.writable
                or off % size or off + size > region.size):
            self.write(address, value.to_bytes(size, "little"))
            return
        if sys.byteorder != "little":
            value = int.from_bytes(value.to_bytes(size, "little"), sys.byteorder)
        with region.view[off:off + size] as piece, piece.cast(fmt) as word:
            word[0] = value
        self.mark_dirty(address, size)

    def read_obj(self, address: int, cls: type[S]) -> S:
        """Read and decode one wire struct at ``address``."""
        return cls.unpack(self.read(address, cls.SIZE))

    def write_obj(self, address: int, obj: Struct) -> None:
        """Encode and write one wire struct at ``address``."""
        self.write(address, obj.pack())

    def mark_dirty(self, address: int, length: int) -> None:
        """Mark a written range in the dirty log, if one runs: every write through
        the accessor, and ranges written later through views it handed out."""
        if self.dirty_log is not None and length > 0:
            self.dirty_log.mark(address, length)

    def reaches(self, address: int, length: int, write: bool) -> bool:
        """Whether every byte of the range is mapped with the access (nothing is
        read, written or marked dirty)."""
        try:
            for _ in self._pieces(address, length, write):
                pass
        except GuestMemoryError:
            return False
        return True

    def buffers(self, address: int, length: int, write: bool) -> list[memoryview] | None:
        """Zero-copy views of the range, or None when part of it is not mmap'd
        (an fd or message region): the caller then uses :meth:`read`/:meth:`write`.

        With ``write`` the range is marked dirty before the views are returned.

        Raises:
            GuestMemoryError: part of the range is unmapped or lacks the access.
        """
        views: list[memoryview] | None = []
        for region, off, n in self._pieces(address, length, write):  # checks the whole range
            if region.view is None:
                for view in views or ():
                    view.release()
                views = None
            elif views is not None:
                views.append(region.view[off:off + n])
        if views is None:
            return None
        if write:
            self.mark_dirty(address, length)
        return views

    def fd_area(self, address: int, length: int, write: bool, on_error: OnError) -> FdArea | None:
        """The range as an :class:`FdArea` when it lies in one fd region, else None.

        Raises:
            GuestMemoryError: part of the range is unmapped or lacks the access.
        """
        pieces = list(self._pieces(address, length, write))
        if len(pieces) != 1 or pieces[0][0].access != "fd":
            return None
        region, off, n = pieces[0]
        return FdArea(region, off, n, on_error)

    def translate_user(self, user_address: int, length: int) -> int:
        """Map a frontend virtual address (vhost-user) to a client address.

        Raises:
            GuestMemoryError: no region covers the whole range.
        """
        checked_end(user_address, length)
        for region in self._regions:
            ua = region.user_address
            if ua is not None and ua <= user_address and user_address + length <= ua + region.size:
                return region.address + (user_address - ua)
        raise GuestMemoryError(user_address, length, 0, why="no region for user address")

    @property
    def writes_in_flight(self) -> int:
        """Message DMA writes not acknowledged yet (0 without message regions)."""
        return 0 if self.transport is None else self.transport.writes_in_flight

    def _transport(self) -> MessageTransport:
        if self.transport is None:
            raise GuestMemoryError(0, 0, 0, why="message-only region without a transport")
        return self.transport

    def _scope(self) -> DmaScope:
        if self.scope is None:
            raise GuestMemoryError(0, 0, 0, why="message DMA outside any device work")
        return self.scope
