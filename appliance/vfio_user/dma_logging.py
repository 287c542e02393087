"""DMA dirty logging for migration: DMA_LOGGING_START and _REPORT (sans-I/O).

The client asks the device to log the pages its DMA writes dirty
(VFIO_DEVICE_FEATURE_DMA_LOGGING_START, with a page size hint and the IOVA
ranges to log, or none for everything), then pulls and clears a bitmap of a
range (_REPORT) and stops (_STOP).  :func:`start_logging` checks a START's data
and returns the session (:class:`DmaLog`) and the reply; :func:`logging_report`
checks a REPORT against the session and builds its bitmap
(:func:`report_bitmap`).  The pages themselves are marked by
:class:`~appliance.memory.ClientMemory`'s dirty log, whose page size is the
session's.  Every refusal is a :class:`~appliance.protocol_common.Reject` with
the errno of the error reply, as <linux/vfio.h> drivers answer.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass

from appliance.memory import DirtyLog
from appliance.protocol_common import require
from appliance.vfio_user import wire as w

MAX_LOG_RANGES = 256  # the kernel's LOG_MAX_RANGES (a page of ranges); more is E2BIG
MIN_LOG_PAGE = 4096


def _power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


@dataclass
class DmaLog:
    """A running DMA_LOGGING session."""

    page_size: int
    ranges: list[tuple[int, int]]  # sorted, non-overlapping (iova, length); [] = everything

    def covers(self, iova: int, length: int) -> bool:
        if not self.ranges:
            return True
        pos, end = iova, iova + length
        for start, size in self.ranges:
            if start <= pos < start + size:
                pos = start + size
                if pos >= end:
                    return True
        return False


def start_logging(argsz: int, data: bytes, running: DmaLog | None) -> tuple[DmaLog, bytes]:
    """Check a DMA_LOGGING_START's data (``running``: the session already on, if any).

    Returns:
        The new session and the reply data (the control with the page size
        chosen, then the ranges as sent).

    Raises:
        Reject: EBUSY while a session runs; E2BIG for too many ranges;
            EOVERFLOW for a range past 2^64; EINVAL for anything else malformed.
    """
    ctl = w.DmaLoggingControl.unpack(data)
    require(running is None, errno.EBUSY, "DMA logging already started")
    require(not ctl.reserved, errno.EINVAL, "DMA_LOGGING_START reserved field set")
    require(ctl.num_ranges <= MAX_LOG_RANGES, errno.E2BIG,
            f"{ctl.num_ranges} ranges > {MAX_LOG_RANGES}")
    needed = w.DmaLoggingControl.SIZE + ctl.num_ranges * w.DmaLoggingRange.SIZE
    require(len(data) >= needed and argsz >= w.DeviceFeatureHead.SIZE + needed, errno.EINVAL,
            f"DMA_LOGGING_START: {ctl.num_ranges} ranges need {needed} bytes")
    require(_power_of_two(ctl.page_size), errno.EINVAL,
            f"DMA logging page size {ctl.page_size:#x} is not a power of two")
    # "If the device cannot do the hinted page size then it's the driver's choice
    # which page size to pick": smaller than 4 KiB becomes 4 KiB.
    page_size = max(ctl.page_size, MIN_LOG_PAGE)
    ranges = []
    for i in range(ctl.num_ranges):
        r = w.DmaLoggingRange.unpack(data, w.DmaLoggingControl.SIZE + i * w.DmaLoggingRange.SIZE)
        require(r.length > 0 and r.iova % page_size == 0 and r.length % page_size == 0, errno.EINVAL,
                f"range {r.iova:#x}+{r.length:#x} not aligned to {page_size:#x}")
        require(r.iova + r.length <= 1 << 64, errno.EOVERFLOW,
                f"range {r.iova:#x}+{r.length:#x} overflows")
        ranges.append((r.iova, r.length))
    ranges.sort()
    for (a, a_len), (b, _) in itertools.pairwise(ranges):
        require(a + a_len <= b, errno.EINVAL, f"ranges at {a:#x} and {b:#x} overlap")
    reply = ctl.replace(page_size=page_size).pack()
    return DmaLog(page_size, ranges), reply + data[w.DmaLoggingControl.SIZE:needed]


def logging_report(argsz: int, data: bytes, dma_log: DmaLog | None, dirty: DirtyLog | None,
                   max_bitmap_size: int) -> bytes:
    """Answer a DMA_LOGGING_REPORT: the request echoed, then the bitmap of its range
    (the pages it reports are cleared in ``dirty``).

    Raises:
        Reject: EINVAL for short data, no session, a bad page size or range, or
            an ``argsz`` too small for the bitmap; EOVERFLOW for a range past
            2^64; E2BIG for a bitmap larger than ``max_bitmap_size``.
    """
    require(len(data) >= w.DmaLoggingReport.SIZE, errno.EINVAL,
            f"DMA_LOGGING_REPORT data of {len(data)} bytes")
    req = w.DmaLoggingReport.unpack(data)
    require(dma_log is not None and dirty is not None, errno.EINVAL, "DMA logging not started")
    assert dma_log is not None and dirty is not None
    require(req.page_size >= MIN_LOG_PAGE and _power_of_two(req.page_size), errno.EINVAL,
            f"report page size {req.page_size:#x}")
    require(req.length > 0, errno.EINVAL, "empty report range")
    require(req.iova + req.length <= 1 << 64, errno.EOVERFLOW,
            f"report range {req.iova:#x}+{req.length:#x} overflows")
    require(dma_log.covers(req.iova, req.length), errno.EINVAL,
            f"report range {req.iova:#x}+{req.length:#x} is not being logged")
    # The reply is built whole, so its size is what bounds the memory a request
    # costs: a bitmap larger than max_bitmap_size (announced in VERSION, at most
    # the message size limit) is refused before anything is allocated.
    nbits = -(-req.length // req.page_size)
    nbytes = -(-nbits // 64) * 8
    require(nbytes <= max_bitmap_size, errno.E2BIG,
            f"bitmap of {nbytes} bytes > {max_bitmap_size}")
    require(argsz >= w.DeviceFeatureHead.SIZE + w.DmaLoggingReport.SIZE + nbytes, errno.EINVAL,
            f"argsz {argsz} too small for a {nbytes}-byte bitmap")
    return req.pack() + report_bitmap(dirty, req.iova, req.length, req.page_size)


def report_bitmap(dirty: DirtyLog, iova: int, length: int, page_size: int) -> bytes:
    """The DMA_LOGGING_REPORT bitmap of ``[iova, iova+length)``, clearing what it reports.

    Bit ``n`` (u64 word ``n // 64``, bit ``n % 64``, little-endian) reports
    the ``page_size`` unit at ``iova + n * page_size``, as the kernel's
    iova_bitmap lays it out (the spec's formula writes ``addr % 64`` where it
    means that bit index).  Logged pages larger than ``page_size`` set
    several bits, smaller ones share a bit.  A logged page only partly inside
    the range is reported but stays dirty (it is reported again with its
    other part), so no write is ever lost.

    The bitmap is one bytearray of the reply's size, filled in place (the
    caller bounds that size); each dirty page costs work in proportion to the
    bits it sets, not to the bitmap.

    Returns:
        ``ceil(ceil(length / page_size) / 64) * 8`` bytes.
    """
    end = iova + length
    nbits = -(-length // page_size)
    bitmap = bytearray(-(-nbits // 64) * 8)
    lps = dirty.page_size
    first, last = iova // lps, (end - 1) // lps
    cleared = []
    for page in dirty.pages:
        if not first <= page <= last:
            continue
        start = page * lps
        lo, hi = max(start, iova), min(start + lps, end)
        _set_bits(bitmap, (lo - iova) // page_size, (hi - 1 - iova) // page_size)
        if iova <= start and start + lps <= end:
            cleared.append(page)
    dirty.pages.difference_update(cleared)
    return bytes(bitmap)


def _set_bits(bitmap: bytearray, first: int, last: int) -> None:
    """Set bits ``first..last`` (inclusive; bit n is bit n % 8 of byte n // 8)."""
    while first <= last and first % 8:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1
    whole = (last + 1 - first) >> 3
    if whole > 0:
        bitmap[first >> 3:(first >> 3) + whole] = b"\xff" * whole
        first += whole << 3
    while first <= last:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1
