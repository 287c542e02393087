"""One mapped range of client memory (:class:`Region`) and the checked address
arithmetic every access starts with (:func:`checked_end`).

A region is reached by mmap, through its fd, or by message DMA (see
:mod:`appliance.memory`, whose :class:`~appliance.memory.ClientMemory` keeps
the regions and re-exports these names); a region reached through its fd reads
and writes it here, refusing what lies beyond the end of a file the client
shrank.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass, field
from typing import Literal

from appliance.memory_fd import GuestMemoryError, file_size
from appliance.protocol_common import close_quietly

ADDRESS_LIMIT = 1 << 64

log = logging.getLogger("appliance.memory")


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
