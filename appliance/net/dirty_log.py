"""vhost-user's shared dirty-page bitmap (device layer; vhost-user.rst "Migration").

Theory of operation
-------------------
For live migration the front-end shares a log with the back-end
(SET_LOG_BASE with VHOST_USER_PROTOCOL_F_LOG_SHMFD: an fd, size and offset)
and, while it wants writes logged, sets VHOST_F_LOG_ALL in SET_FEATURES.  The
log is a bitmap over guest *physical* addresses: bit ``n`` stands for the
4 KiB page ``n`` (byte ``n // 8``, bit ``n % 8``; QEMU reads it as
little-endian 64-bit words, the same layout).  The back-end sets the bit of
every page it writes into guest memory -- receive buffers, and the used ring
at ``log_guest_addr`` when the ring's VHOST_VRING_F_LOG flag is set -- after
writing it, and the front-end clears bits as it copies pages.

:class:`VhostLog` is a :class:`~appliance.memory.DirtyLog`, so
:class:`~appliance.memory.ClientMemory` marks it inside the accessor on every
write, so no device code can forget a page it wrote; the port only installs
it and logs used rings.

Setting a bit is a read-modify-write of one byte.  The front-end clears bits
with atomic exchanges; racing with that can only set a bit again that was
just reported (one page copied twice), never lose one.  Other back-ends of the
same QEMU share the log; a byte store from us can in principle undo a bit one
of them set in the same byte at the same instant (Python has no atomic OR on
shared memory): one more reason to log conservatively (whole used ring on
each publish).
"""

from __future__ import annotations

import mmap

from appliance.memory import DirtyLog

VHOST_LOG_PAGE = 4096  # vhost-user.rst: "each bit represents a page of 4 KiB"


class VhostLog(DirtyLog):
    """Marks written guest-physical ranges in a shared vhost-user log bitmap."""

    def __init__(self, bitmap: bytearray | mmap.mmap) -> None:
        """``bitmap``: the mapped log (an ``mmap.mmap``, or a bytearray in tests)."""
        super().__init__(VHOST_LOG_PAGE)
        self.bitmap = bitmap
        self.limit = len(bitmap) * 8  # pages the log covers
        self.beyond = 0  # marks (partly) past the end of the log: counted, not written

    def mark(self, address: int, length: int) -> None:
        if length <= 0:
            return
        first = address >> self.shift
        last = (address + length - 1) >> self.shift
        if last >= self.limit:
            self.beyond += 1
            last = self.limit - 1
        buf = self.bitmap
        for page in range(first, last + 1):
            i = page >> 3
            bit = 1 << (page & 7)
            old = buf[i]
            if not old & bit:
                buf[i] = old | bit

    def dirty_pages(self) -> list[int]:
        """The pages whose bits are set (for tests and diagnostics)."""
        buf = bytes(self.bitmap)
        return [i * 8 + b for i, byte in enumerate(buf) if byte for b in range(8) if byte >> b & 1]
