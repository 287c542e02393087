"""BAR0's doorbell page as shared memory the client maps (device layer).

Theory of operation
-------------------
With ``storage.doorbells: mmap`` the doorbell page of BAR0 (1000h-1FFFh) is
backed by a memfd.  The controller reports it to the client as a sparse mmap
area of region 0 (offset 1000h, size 1000h, the fd in GET_REGION_INFO); QEMU
maps it into the guest's view of the BAR, so a doorbell write is a plain
store into the page: no message, no exit to our process.  The file holds the
page at its BAR offset (QEMU maps file offset ``region offset + area
offset``), so the memfd is 2000h bytes and we map its second page too.

Nothing tells the controller that a store happened: it *polls*.  Each
:meth:`DoorbellPage.changed` copies the page (one 4 KiB memcpy) and compares
it with the copy taken at the previous scan; every dword that differs is a
doorbell write of that value, handled exactly as a REGION_WRITE of the same
dword would be.  A value cannot come back to the one seen between two scans
without the write being seen: an SQ tail moves at most ``size - 1`` entries
ahead of the head the controller has not advanced, a CQ head at most up to
the tail.  The runtime runs the scan from a timer whose period the controller
chooses (:meth:`NvmeController.poll_interval`) and after every loop pass.

A queue created again with an id used before must not inherit the old
value in its slot (the host's first write may well be the same value): the
controller *adopts* every queue it has not seen yet, writing the queue's
tail or head into the slot before the host can ring it (:meth:`adopt`).

The page copy only *finds* candidates: a memcpy gives no guarantee that it
reads each dword whole while the guest stores into it.  The value of a slot
that differs is then read again as one aligned 4-byte load (an item of a
``memoryview.cast("I")``), and that value is what is latched and remembered.
A slot stored after the copy differs at the next scan.  Values are
little-endian, as on the wire.

The client holds the memfd, so it could shrink it and turn our next scan into
a SIGBUS: the file is sealed (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL) before
anyone sees it, and its ``ftruncate`` fails with EPERM.
"""

from __future__ import annotations

import enum
import fcntl
import mmap
import os
import sys

from appliance.memory import F_ADD_SEALS, F_GET_SEALS, F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK

PAGE_OFFSET = 0x1000  # the page's offset in BAR0 and in the memfd
PAGE_SIZE = 0x1000
SLOTS = PAGE_SIZE // 4
_SWAP = sys.byteorder != "little"


class DoorbellMode(enum.StrEnum):
    """How the host reaches the doorbells (config key ``storage.doorbells``)."""

    MESSAGE = "message"  # vfio-user region writes only
    MMAP = "mmap"  # BAR0's doorbell page is a memfd the client may map (DoorbellPage)


def _le(value: int) -> int:
    """A native-order dword as little-endian (and back): a no-op on x86."""
    return int.from_bytes(value.to_bytes(4, sys.byteorder), "little") if _SWAP else value


class DoorbellPage:
    """The memfd behind BAR0's doorbell page, and what was seen in it."""

    def __init__(self) -> None:
        """Create the memfd, seal its size and map the page.

        Raises:
            OSError: memfd_create, ftruncate, sealing or mmap failed.
        """
        fd = os.memfd_create("appliance-nvme-doorbells", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, PAGE_OFFSET + PAGE_SIZE)
            # The client gets this fd: a shrink would make our next scan a SIGBUS.
            fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
            self.mm = mmap.mmap(fd, PAGE_SIZE, flags=mmap.MAP_SHARED, offset=PAGE_OFFSET)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd  #: handed to the client with GET_REGION_INFO; closed by :meth:`close`
        self.words = memoryview(self.mm).cast("I")  # one aligned load/store per item
        self.seen = bytearray(PAGE_SIZE)
        self.known: dict[int, object] = {}  # slot -> the queue object whose value it holds

    def close(self) -> None:
        """Unmap the page and close the memfd (idempotent)."""
        if self.fd >= 0:
            self.words.release()
            self.mm.close()
            os.close(self.fd)
            self.fd = -1

    def take_over(self, fd: int, seen: bytes) -> None:
        """Use another process's page (a live handoff): the client has *that* memfd
        mapped.  ``seen`` is what that process had latched; anything the host wrote
        since shows up in the next :meth:`changed`.  The file moves under our fd
        number (dup2), so whoever holds :attr:`fd` (the BAR) keeps a valid fd;
        ``fd`` stays the caller's.

        Raises:
            OSError: ``fd`` cannot be mapped (nothing changed then).
            ValueError: ``seen`` is not one page.
        """
        self.check_take_over(fd, seen)
        mm = mmap.mmap(fd, PAGE_SIZE, flags=mmap.MAP_SHARED, offset=PAGE_OFFSET)
        self.words.release()
        self.mm.close()
        os.dup2(fd, self.fd, inheritable=False)
        self.mm = mm
        self.words = memoryview(self.mm).cast("I")
        self.seen = bytearray(seen)

    @staticmethod
    def check_take_over(fd: int, seen: bytes) -> None:
        """Refuse what :meth:`take_over` would refuse, changing nothing: a snapshot
        that is not one page, a file that could shrink (a SIGBUS at our next scan:
        ours is sealed against it) or that does not map.

        Raises:
            ValueError: ``seen`` is not one page, or the file is not sealed.
            OSError: ``fd`` cannot be mapped.
        """
        if len(seen) != PAGE_SIZE:
            raise ValueError(f"doorbell page snapshot of {len(seen)} bytes")
        try:
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & F_SEAL_SHRINK:
            raise ValueError("doorbell page file could shrink (not sealed)")
        mmap.mmap(fd, PAGE_SIZE, flags=mmap.MAP_SHARED, offset=PAGE_OFFSET).close()

    def claim(self, slot: int, queue: object) -> None:
        """Mark ``slot`` as ``queue``'s without storing (its value is the host's)."""
        self.known[slot] = queue

    def read(self, slot: int) -> int:
        """The value in dword ``slot`` now (one load)."""
        return _le(self.words[slot])

    def store(self, offset: int, value: int) -> None:
        """Put ``value`` in the dword at page ``offset`` (one store) and take it as seen."""
        slot = offset // 4
        value &= 0xFFFFFFFF
        self.words[slot] = _le(value)
        self.seen[slot * 4:slot * 4 + 4] = value.to_bytes(4, "little")

    def adopt(self, slot: int, queue: object, value: int) -> None:
        """Give ``queue``'s slot its ``value`` unless this queue was adopted already."""
        if self.known.get(slot) is not queue:
            self.store(slot * 4, value)
            self.known[slot] = queue

    def forget(self) -> None:
        """Controller reset: the queues are gone, the next ones are adopted afresh."""
        self.known.clear()

    def changed(self, first_slots: int) -> list[tuple[int, int]]:
        """(slot, value) of every dword that differs from the last scan, in slot order.

        ``first_slots`` is how many leading slots belong to possible queues;
        they are compared one by one, the rest of the page as a whole first
        (writes there are errors, and rare).
        """
        now, seen = self.mm[:], self.seen
        if now == seen:
            return []
        limit = min(first_slots, SLOTS) * 4
        offsets = [off for off in range(0, limit, 4) if now[off:off + 4] != seen[off:off + 4]]
        if now[limit:] != seen[limit:]:
            offsets += [off for off in range(limit, PAGE_SIZE, 4)
                        if now[off:off + 4] != seen[off:off + 4]]
        out = []
        for off in offsets:
            value = _le(self.words[off // 4])  # the candidate, read whole
            raw = value.to_bytes(4, "little")
            if raw != seen[off:off + 4]:
                seen[off:off + 4] = raw
                out.append((off // 4, value))
        return out
