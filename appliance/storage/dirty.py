"""Which bytes of a namespace still have to travel: the dirty page map and the
helpers that cut a dirty run into holes, zero stretches and data.

:class:`DirtyPages` is fed by each namespace's change hook; :func:`hole_end`
and :func:`data_end` find the image's holes (SEEK_DATA / SEEK_HOLE) so they go
as ZEROES records without being read; :func:`zero_runs` finds all-zero
stretches inside data that was read.
"""

from __future__ import annotations

import errno
import os


class DirtyPages:
    """The dirty pages of one namespace: one byte per page (1 = dirty) in a bytearray.

    Marking and scanning stay in C (slice assignment, ``count``, ``find``):
    256 KiB for a 1 GiB namespace at 4 KiB pages, a few microseconds per
    write.  Scans sweep from a cursor and wrap, so a round walks the whole
    namespace once even while a hot spot keeps being written.
    """

    def __init__(self, size: int, page: int) -> None:
        self.size, self.page = size, page
        self.pages = -(-size // page)
        self.map = bytearray(self.pages)
        self.count = 0  # pages set in map
        self.cursor = 0  # where the next scan starts

    def mark(self, offset: int, length: int) -> None:
        """Bytes ``offset .. offset+length-1`` changed (clipped to the namespace)."""
        if length <= 0 or offset >= self.size:
            return
        first = max(offset, 0) // self.page
        last = min(offset + length - 1, self.size - 1) // self.page
        n = last + 1 - first
        self.count += n - self.map.count(1, first, last + 1)
        self.map[first:last + 1] = b"\x01" * n

    def mark_all(self) -> None:
        self.map[:] = b"\x01" * self.pages
        self.count = self.pages

    def clear(self, first: int, n: int) -> None:
        """Pages ``first .. first+n-1`` were sent."""
        self.count -= self.map.count(1, first, first + n)
        self.map[first:first + n] = bytes(n)

    def pending_bytes(self) -> int:
        """Dirty bytes (the last page counts only up to the namespace's end)."""
        short = self.pages * self.page - self.size
        return self.count * self.page - (short if self.map and self.map[-1] else 0)

    def next_run(self) -> tuple[int, int] | None:
        """The next dirty run from the cursor on (wrapping): (first page, page after)."""
        if not self.count:
            return None
        first = self.map.find(1, self.cursor)
        if first < 0:
            first = self.map.find(1)
        end = self.map.find(0, first)
        return first, self.pages if end < 0 else end


def hole_end(fd: int, pos: int, stop: int, page: int) -> int:
    """Where the hole at ``pos`` ends (page-aligned, at most ``stop``); ``pos`` if data."""
    try:
        data = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            return pos  # no SEEK_DATA here: everything counts as data
        data = stop  # no data from pos to the end of the file
    return stop if data >= stop else data - data % page


def data_end(fd: int, pos: int, stop: int, page: int) -> int:
    """Where the data at ``pos`` ends (page-aligned, past ``pos``, at most ``stop``)."""
    try:
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
    except OSError:
        return stop
    return min(stop, max(pos + page, -(-hole // page) * page))


def zero_runs(data: bytes, page: int, min_run: int) -> list[tuple[int, int, bool]]:
    """Cut ``data`` into (start, end, all zero) pieces at page boundaries; zero
    pieces shorter than ``min_run`` bytes stay inside data pieces."""
    if not data[0] and not data[-1] and data == bytes(len(data)):
        return [(0, len(data), True)]
    zero_page = bytes(page)
    pieces: list[tuple[int, int, bool]] = []
    start = 0  # of the current data piece
    zero_from = -1  # start of the current run of zero pages
    for at in range(0, len(data), page):
        if not data[at] and data[at:at + page] == zero_page[:len(data) - at]:
            if zero_from < 0:
                zero_from = at
            continue
        if zero_from >= 0 and at - zero_from >= min_run:
            if zero_from > start:
                pieces.append((start, zero_from, False))
            pieces.append((zero_from, at, True))
            start = at
        zero_from = -1
    if zero_from >= 0 and len(data) - zero_from >= min_run:
        if zero_from > start:
            pieces.append((start, zero_from, False))
        pieces.append((zero_from, len(data), True))
    elif start < len(data):
        pieces.append((start, len(data), False))
    return pieces
