"""What the migration data channel needs of the NVMe device (device layer).

:class:`NvmeChannelDevice` wraps an :class:`~appliance.storage.migration.NvmeMigratable`:
on the source it hands out dirty ranges without reading them (the runtime
sends them with ``sendfile`` from :meth:`image_fd`) and tells whether a range
was written again while it was being sent; on the destination it checks a
range against the namespace and hands out the staging image's fd (the
runtime splices into it), then records what arrived.  Holes of the source
image are ZEROES ranges, found with SEEK_DATA/SEEK_HOLE as for the standard
stream.
"""

from __future__ import annotations

import errno
from typing import NamedTuple

from appliance.errors import LocalProtocolError
from appliance.storage.controller_state import state_error
from appliance.storage.dirty import data_end, hole_end
from appliance.storage.migration import NvmeMigratable
from appliance.storage.staging import Staging
from appliance.vfio_user.migration_stream import MAX_ZERO_RUN


class DirtyRange(NamedTuple):
    nsid: int
    offset: int
    length: int
    zeroes: bool  # a hole of the image: nothing to send but its length


class NvmeChannelDevice:
    """The NVMe side of a data channel (calls come from the event loop thread)."""

    def __init__(self, migratable: NvmeMigratable) -> None:
        self.migratable = migratable

    def blocker(self) -> str:
        """Why this device's data cannot use a channel ("" when it can)."""
        return self.migratable.channel_blocker()

    # ------------------------------------------------------------ source
    def take_ranges(self, max_bytes: int, max_ranges: int = 1 << 62) -> list[DirtyRange]:
        """Dirty ranges (data up to the migratable's ``max_record`` each, holes as
        ZEROES), about ``max_bytes`` in all and ``max_ranges`` at most (at least
        one range when anything is dirty), clearing them in the dirty map.

        Raises:
            LocalProtocolError: a namespace that cannot be copied (NBD,
                metadata) or was resized.
        """
        mig = self.migratable
        mig.check_copyable()
        if why := mig.channel_blocker():
            raise LocalProtocolError(f"data channel: {why}", errno.EOPNOTSUPP)
        out: list[DirtyRange] = []
        taken = 0
        for nsid in sorted(mig.dirty):
            pages, ns = mig.dirty[nsid], mig.ctrl.namespaces[nsid]
            page = pages.page
            known = (0, 0)  # a stretch known to be data: SEEK_HOLE once per stretch
            while taken < max_bytes and len(out) < max_ranges \
                    and (run := pages.next_run()) is not None:
                start, stop = run[0] * page, min(run[1] * page, ns.size)
                if known[0] <= start < known[1]:
                    end, zeroes = start, False
                else:
                    end = min(hole_end(ns.fd, start, stop, page), start + MAX_ZERO_RUN)
                    zeroes = end > start
                if not zeroes:
                    if not known[0] <= start < known[1]:
                        # (tmpfs answers SEEK_HOLE by walking its pages: asking per
                        # record would cost the square of the stretch)
                        known = (start, data_end(ns.fd, start, stop, page))
                    end = min(known[1], stop, start + mig.max_record)
                out.append(DirtyRange(nsid, start, end - start, zeroes))
                taken += end - start
                pages.clear(run[0], -(-(end - start) // page))
                pages.cursor = -(-end // page)
        return out

    def image_fd(self, nsid: int) -> int:
        """The image of namespace ``nsid``, to send a range from.

        Raises:
            LocalProtocolError: EBUSY when the namespace was deleted since its
                range was taken (Namespace Management during pre-copy).
        """
        ns = self.migratable.ctrl.namespaces.get(nsid)
        if ns is None:
            raise LocalProtocolError(f"namespace {nsid} was deleted during the migration",
                                     errno.EBUSY)
        return ns.fd

    def written_since_taken(self, rng: DirtyRange) -> bool:
        """Whether a page of ``rng`` was written since :meth:`sending` cleared it."""
        pages = self.migratable.dirty.get(rng.nsid)
        if pages is None:  # the session ended
            return False
        first = rng.offset // pages.page
        last = (rng.offset + rng.length - 1) // pages.page
        return pages.map.find(1, first, last + 1) >= 0

    def sending(self, rng: DirtyRange) -> None:
        """``rng`` (DATA) is read for sending now: a write since :meth:`take_ranges`
        travels in it, so its pages are clean again (a write from now on is one
        :meth:`written_since_taken` sees).  Writes run on the event loop, as this
        does: none lands between this call and the read of the checksum."""
        pages = self.migratable.dirty.get(rng.nsid)
        if pages is not None:
            pages.clear(rng.offset // pages.page, -(-rng.length // pages.page))

    def mark_again(self, rng: DirtyRange) -> None:
        """``rng`` must travel again (it changed while it was being sent)."""
        pages = self.migratable.dirty.get(rng.nsid)
        if pages is not None:
            pages.mark(rng.offset, rng.length)

    # ------------------------------------------------------------ destination
    def stage_target(self, nsid: int, offset: int, length: int) -> int:
        """The staging image's fd for ``length`` bytes at ``offset`` of ``nsid``.

        Raises:
            LocalProtocolError: the range is not one of a writable namespace here
                (absent, read-only, NBD, with metadata, outside, misaligned).
        """
        return self._staging(nsid, offset, length).fd

    def staged(self, nsid: int, offset: int, length: int) -> None:
        """The range was written into the staging image and verified."""
        self._staging(nsid, offset, length).written(offset, length)

    def stage_zeroes(self, nsid: int, offset: int, length: int) -> None:
        """The range reads as zeroes (checked as :meth:`stage_target`)."""
        self._staging(nsid, offset, length).zero(offset, length)

    def _staging(self, nsid: int, offset: int, length: int) -> Staging:
        """:meth:`NvmeMigratable.staging_for`, for a namespace without metadata only.

        Raises:
            LocalProtocolError: EINVAL as ``staging_for``, or a namespace with
                metadata here (the channel never carries one).
        """
        staging = self.migratable.staging_for(nsid, offset, length)
        if staging.ns.md is not None:
            raise state_error(f"channel blocks for namespace {nsid}, which has metadata here")
        return staging
