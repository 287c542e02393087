"""A namespace's incoming image during a restore: :class:`Staging`, a complete
new sparse file beside the old image, renamed over it at commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile

from appliance.storage.fileops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    fallocate,
    start_writeback,
)
from appliance.storage.namespace import Namespace

# Staged bytes between two starts of a staging image's writeback (sync_file_range,
# not waited for; an fdatasync where the writeback cannot be started): the sync
# at a round marker or at commit then finds little left, and the event loop
# never waits for the disk while the stream flows.
SYNC_EVERY = 16 << 20
COPY_CHUNK = 1 << 20  # bytes per read/write when filling or zeroing a staging image
log = logging.getLogger("appliance.migrate")


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (retrying short writes).

    Raises:
        OSError: the write failed.
    """
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; what lies past the end of the file reads as zeroes.

    Raises:
        OSError: the read failed.
    """
    parts, got = [], 0
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts).ljust(length, b"\0")


class Staging:
    """A namespace's incoming image: a complete new sparse file beside the old one.

    A hidden file in the image's directory (``.<image>.incoming-XXXXXXXX``,
    so the final rename is atomic), records written at their offsets;
    ``covered`` remembers which blocks the stream carried.  :meth:`prepare`
    fills what it did not carry from the old image and syncs;
    :meth:`commit` renames the file over the image; :meth:`discard` (abort)
    removes it.  A process killed mid-stream leaves its file behind: the
    next staging of the same image removes it.
    """

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.covered = bytearray(ns.nlbas)  # 1 = block carried by the stream
        self.unsynced = 0  # bytes written or punched since the last fdatasync
        self.unstarted = 0  # bytes written since the last writeback start
        self.synced = False  # an fdatasync since the file was made (its size is durable)
        directory, base = os.path.split(ns.image_path())
        prefix = f".{base}.incoming-"
        for stale in os.listdir(directory):
            if stale.startswith(prefix) and len(stale) == len(prefix) + 8:
                log.info("nsid %d: removing %s, left by an interrupted restore", ns.nsid, stale)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, stale))
        fd, path = tempfile.mkstemp(dir=directory, prefix=prefix, suffix="")
        self.fd = fd
        self.path: str | None = path
        try:
            os.fchmod(fd, stat.S_IMODE(os.fstat(ns.fd).st_mode))
            os.ftruncate(fd, ns.size)
        except BaseException:
            self.discard()
            raise

    def write(self, offset: int, data: bytes | memoryview) -> None:
        pwrite_all(self.fd, data, offset)
        self._cover(offset, len(data))
        self.unsynced += len(data)
        self.unstarted += len(data)
        if self.unstarted >= SYNC_EVERY:  # the kernel writes while the stream flows
            self.unstarted = 0
            if not start_writeback(self.fd):
                self.sync()

    def sync(self) -> None:
        """fdatasync what changed since the last sync; no call when nothing did
        (the commit, in the downtime, then costs no sync after a synced round).

        Raises:
            OSError: the sync failed.
        """
        if self.unsynced or not self.synced:
            os.fdatasync(self.fd)
            self.unsynced = self.unstarted = 0
            self.synced = True

    def zero(self, offset: int, length: int) -> None:
        first, n = offset >> self.ns.lba_shift, length >> self.ns.lba_shift
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        # A fresh file reads zeroes already: only a range sent before needs punching.
        if self.covered.find(1, first, first + n) >= 0:
            self.unsynced += length
            if not fallocate(self.fd, mode, offset, length):
                zeros = bytes(min(length, COPY_CHUNK))
                for at in range(offset, offset + length, len(zeros)):
                    pwrite_all(self.fd, zeros[:offset + length - at], at)
        self._cover(offset, length)

    def _cover(self, offset: int, length: int) -> None:
        first, n = offset >> self.ns.lba_shift, length >> self.ns.lba_shift
        self.covered[first:first + n] = b"\x01" * n

    def prepare(self) -> None:
        """Fill the blocks the stream did not carry from the old image, and sync.

        Raises:
            OSError: the image is unchanged then.
        """
        ns, shift = self.ns, self.ns.lba_shift
        pos = self.covered.find(0)
        while pos >= 0:  # none for a complete stream
            end = self.covered.find(1, pos)
            end = ns.nlbas if end < 0 else end
            for at in range(pos << shift, end << shift, COPY_CHUNK):
                data = pread_all(ns.fd, min(COPY_CHUNK, (end << shift) - at), at)
                if data != bytes(len(data)):  # the staging file reads zeroes already
                    pwrite_all(self.fd, data, at)
                    self.unsynced += len(data)
            pos = self.covered.find(0, end)
        self.sync()

    def commit(self) -> int:
        """Rename the prepared file over the image; the namespace serves from it.

        Returns:
            An fd of the old image (see :meth:`Namespace.replace_image`): the
            caller closes it.
        """
        assert self.path is not None
        old = self.ns.replace_image(self.path)
        self.path = None
        self.close()
        return old

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Drop the staged image (the old one was never touched)."""
        self.close()
        if self.path is not None:
            path, self.path = self.path, None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
