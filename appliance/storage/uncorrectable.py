"""The LBAs a Write Uncorrectable marked (device layer).

Theory of operation
-------------------
Write Uncorrectable (NVM command set 3.3.7) marks blocks invalid: a read of
any of them (Read, Compare, Verify, a Copy source) completes with
Unrecovered Read Error until the block is written again (Write, Write
Zeroes, a Copy destination, a deallocating Dataset Management, Format NVM).
:class:`LbaRanges` keeps them per namespace as sorted disjoint ranges, at
most :data:`MAX_RANGES` of them: a Write Uncorrectable that would need more
is refused with Invalid Field, and a write that would split a range past
that bound forgets the shorter piece, so the state (which travels in the
migration stream and the live handoff) stays small whatever the host does.
"""

from __future__ import annotations

import bisect

from appliance.storage.spec import CommandError, Status

MAX_RANGES = 1024


class LbaRanges:
    """Sorted, disjoint, non-adjacent ``(first LBA, end LBA)`` ranges."""

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self.ranges: list[tuple[int, int]] = []
        for start, end in ranges or []:
            self.add(start, end - start)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def add(self, slba: int, nlb: int) -> None:
        """Mark blocks ``slba .. slba+nlb-1``.

        Raises:
            CommandError: INVALID_FIELD when that would need more than MAX_RANGES ranges.
        """
        start, end = slba, slba + nlb
        keep = [r for r in self.ranges if r[1] < start or r[0] > end]
        touching = [r for r in self.ranges if not (r[1] < start or r[0] > end)]
        if touching:
            start, end = min(start, touching[0][0]), max(end, touching[-1][1])
        if len(keep) + 1 > MAX_RANGES:
            raise CommandError(Status.INVALID_FIELD,
                               f"more than {MAX_RANGES} uncorrectable ranges")
        bisect.insort(keep, (start, end))
        self.ranges = keep

    def remove(self, slba: int, nlb: int) -> None:
        """Unmark blocks ``slba .. slba+nlb-1`` (they were written).

        A write inside one range splits it in two; when that would make more
        than MAX_RANGES ranges, the shorter piece is forgotten (its blocks read
        again) rather than the bound broken."""
        start, end = slba, slba + nlb
        out: list[tuple[int, int]] = []
        for a, b in self.ranges:
            if b <= start or a >= end:
                out.append((a, b))
                continue
            if a < start and b > end and len(self.ranges) >= MAX_RANGES:
                out.append((a, start) if start - a > b - end else (end, b))
                continue
            if a < start:
                out.append((a, start))
            if b > end:
                out.append((end, b))
        self.ranges = out

    def first(self, slba: int, nlb: int) -> int | None:
        """The first marked block in ``slba .. slba+nlb-1``, or None."""
        for a, b in self.ranges:
            if b > slba and a < slba + nlb:
                return max(a, slba)
        return None

    def check(self, nsid: int, slba: int, nlb: int) -> None:
        """Raises:
            CommandError: UNRECOVERED_READ_ERROR (DNR: it stays so until written)
                when a block of the range is marked.
        """
        bad = self.first(slba, nlb)
        if bad is not None:
            raise CommandError(Status.UNRECOVERED_READ_ERROR,
                               f"nsid {nsid}: LBA {bad} is uncorrectable")
