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
import mmap
import os
import sys
from collections.abc import Iterator
from typing import Literal, TypeVar

from appliance.memory_dma import DmaPending, DmaScope, MessageTransport
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
from appliance.memory_region import ADDRESS_LIMIT, Region, checked_end
from appliance.wire import Struct

# The interface: the names below and those it re-exports of appliance.memory_fd (the
# seals, the fd-region stand-ins, the two errors), appliance.memory_region (Region,
# checked_end) and appliance.memory_dma (the message DMA's scope, transport, pending).
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

PAGE_SIZE = 4096
# memoryview.cast formats (native byte order) of 2, 4 and 8-byte unsigned integers
_UINT_FORMATS: dict[int, Literal["H", "I", "Q"]] = {2: "H", 4: "I", 8: "Q"}

S = TypeVar("S", bound=Struct)


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
