"""A namespace's incoming image during a restore: :class:`Staging`, a complete
new sparse file beside the old image, renamed over it at commit; for a
namespace with metadata, a new side file beside the old one too, renamed
over it at the same commit.
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
from appliance.storage.metadata import MetadataFile, stored
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


def punch(fd: int, offset: int, length: int) -> None:
    """Make ``length`` bytes at ``offset`` read as zeroes (a hole where the file
    system can punch one).

    Raises:
        OSError: the file cannot be changed.
    """
    if not fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        zeros = bytes(min(length, COPY_CHUNK))
        for at in range(offset, offset + length, len(zeros)):
            pwrite_all(fd, zeros[:offset + length - at], at)


def fresh_file(target: str, like: int, size: int) -> tuple[int, str]:
    """A new empty file of ``size`` bytes beside ``target``
    (``.<name>.incoming-XXXXXXXX``, the mode of the file open as ``like``);
    such files an interrupted restore left there are removed first (regular
    files only: a directory or symlink of that name is not one).

    Returns:
        Its fd and path.

    Raises:
        OSError: it cannot be made (nothing is left behind).
    """
    directory, base = os.path.split(target)
    prefix = f".{base}.incoming-"
    for stale in os.listdir(directory):
        if stale.startswith(prefix) and len(stale) == len(prefix) + 8:
            path = os.path.join(directory, stale)
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue  # a directory or a symlink: no restore made it
                log.info("removing %s, left by an interrupted restore", stale)
                os.unlink(path)
    fd, path = tempfile.mkstemp(dir=directory, prefix=prefix, suffix="")
    try:
        os.fchmod(fd, stat.S_IMODE(os.fstat(like).st_mode))
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return fd, path


class Staging:
    """A namespace's incoming image: a complete new sparse file beside the old one.

    A hidden file in the image's directory (``.<image>.incoming-XXXXXXXX``,
    so the final rename is atomic), records written at their offsets;
    ``covered`` remembers which blocks the stream carried.  A namespace with
    metadata gets a staging side file too (``.<image>.md.incoming-XXXXXXXX``
    beside the side file): a block the stream carries has unwritten
    metadata (a hole) until a NAMESPACE_METADATA record gives it some.
    :meth:`prepare` fills what the stream did not carry from the old image
    and side file and syncs; :meth:`commit` renames the files over the
    image and side file; :meth:`discard` (abort) removes them.  A process
    killed mid-stream leaves its files behind: the next staging of the same
    image removes them.
    """

    def __init__(self, ns: Namespace) -> None:
        """Raises:
            OSError: a staging file cannot be made (nothing is left behind).
        """
        self.ns = ns
        self.covered = bytearray(ns.nlbas)  # 1 = block carried by the stream
        self.unsynced = 0  # bytes written or punched since the last fdatasync
        self.unstarted = 0  # bytes written since the last writeback start
        self.synced = False  # an fdatasync since the files were made (their sizes are durable)
        self.md_fd, self.md_path = -1, None
        self.fd, path = fresh_file(ns.image_path(), ns.fd, ns.size)
        self.path: str | None = path
        self.md: MetadataFile | None = ns.md
        if self.md is not None:
            try:
                self.md_fd, self.md_path = fresh_file(self.md.real_path(), self.md.fd,
                                                      ns.nlbas * self.md.metadata)
            except BaseException:
                self.discard()
                raise

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Blocks' data at byte ``offset``; their metadata becomes unwritten.

        Raises:
            OSError: the staging file cannot be written.
        """
        pwrite_all(self.fd, data, offset)
        self._unwrite_metadata(offset, len(data))
        self.written(offset, len(data))

    def written(self, offset: int, length: int) -> None:
        """``length`` bytes at ``offset`` were written into :attr:`fd` (by :meth:`write`,
        or spliced in by the data channel, which never carries a namespace with
        metadata): they count as carried, and as unsynced."""
        self._cover(offset, length)
        self.unsynced += length
        self.unstarted += length
        if self.unstarted >= SYNC_EVERY:  # the kernel writes while the stream flows
            self.unstarted = 0
            if not all(start_writeback(fd) for fd in (self.fd, self.md_fd) if fd >= 0):
                self.sync()

    def sync(self) -> None:
        """fdatasync what changed since the last sync; no call when nothing did
        (the commit, in the downtime, then costs no sync after a synced round).

        Raises:
            OSError: the sync failed.
        """
        if self.unsynced or not self.synced:
            os.fdatasync(self.fd)
            if self.md_fd >= 0:
                os.fdatasync(self.md_fd)
            self.unsynced = self.unstarted = 0
            self.synced = True

    def zero(self, offset: int, length: int) -> None:
        """Blocks at byte ``offset`` read zeroes; their metadata becomes unwritten.

        Raises:
            OSError: the staging file cannot be changed.
        """
        first, n = offset >> self.ns.lba_shift, length >> self.ns.lba_shift
        # A fresh file reads zeroes already: only a range sent before needs punching.
        if self.covered.find(1, first, first + n) >= 0:
            self.unsynced += length
            punch(self.fd, offset, length)
        self._unwrite_metadata(offset, length)
        self._cover(offset, length)

    def carried(self, slba: int, nlb: int) -> bool:
        """Whether the stream carried every block ``slba .. slba+nlb-1`` (in range)."""
        return 0 <= slba and slba + nlb <= len(self.covered) \
            and self.covered.find(0, slba, slba + nlb) < 0

    def write_metadata(self, slba: int, metadata: bytes | memoryview) -> None:
        """The metadata (as a host reads it) of carried blocks from ``slba``.

        Raises:
            OSError: the staging side file cannot be written.
        """
        assert self.md is not None and self.md_fd >= 0
        pwrite_all(self.md_fd, stored(metadata), slba * self.md.metadata)
        self.unsynced += len(metadata)

    def _unwrite_metadata(self, offset: int, length: int) -> None:
        """Carried blocks' metadata reads FFh again (a hole in the side file);
        a fresh side file is a hole already."""
        if self.md is None:
            return
        first, n = offset >> self.ns.lba_shift, length >> self.ns.lba_shift
        if self.covered.find(1, first, first + n) >= 0:
            ms = self.md.metadata
            punch(self.md_fd, first * ms, n * ms)
            self.unsynced += n * ms

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
            self._fill(ns.fd, self.fd, pos << shift, end << shift)
            if self.md is not None:
                ms = self.md.metadata
                self._fill(self.md.fd, self.md_fd, pos * ms, end * ms)
            pos = self.covered.find(0, end)
        self.sync()

    def _fill(self, src: int, dst: int, start: int, end: int) -> None:
        """Copy bytes ``start .. end-1`` of ``src`` to ``dst`` (a fresh file: zeroes skipped)."""
        for at in range(start, end, COPY_CHUNK):
            data = pread_all(src, min(COPY_CHUNK, end - at), at)
            if data != bytes(len(data)):
                pwrite_all(dst, data, at)
                self.unsynced += len(data)

    def commit(self) -> list[int]:
        """Rename the prepared image over the image, then the prepared side file
        over the side file; the namespace serves from them.

        Returns:
            fds of the old image and side file (see
            :meth:`Namespace.replace_image`): the caller closes them.

        Raises:
            OSError, ValueError: a rename failed (the image may be swapped
                already when the side file's fails).
        """
        assert self.path is not None
        old = [self.ns.replace_image(self.path)]
        self.path = None
        if self.md is not None:
            assert self.md_path is not None
            old.append(self.md.replace(self.md_path))
            self.md_path = None
        self.close()
        return old

    def close(self) -> None:
        for fd in (self.fd, self.md_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.md_fd = -1

    def discard(self) -> None:
        """Drop the staged image and side file (the old ones were never touched)."""
        self.close()
        for path in (self.path, self.md_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self.path = self.md_path = None
