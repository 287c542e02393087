"""Namespaces backed by raw image files or NBD exports (device layer).

Theory of operation
-------------------
A :class:`Namespace` is a raw image file of ``size`` bytes cut into logical
blocks of 512 or 4096 bytes.  A missing image is created sparse; a shorter
one is extended sparse (reads past its end return zeroes either way).

Or its image is remote: a :class:`BlockExport` the runtime connected (an NBD
export, :mod:`appliance.runtime.nbd`).  Then every read, write, zeroing and
flush is a request to it (``OSError`` becomes the same NVMe status as a file's
failure); its size is the export's (a configured size must match it); a
read-only export makes the namespace read-only.  Such a namespace has no fd:
what needs one (a full-copy migration's data, a staged image, a live handoff)
is refused for it.

Data moves between the file and client memory without copies when the
client memory is mmap'd: :meth:`ClientMemory.buffers` yields memoryviews
that ``os.preadv`` / ``os.pwritev`` fill or drain directly.  When part of
the range is reachable only through messages, data goes through
``ClientMemory.read`` / ``write`` instead.

Deallocation punches holes (``fallocate(PUNCH_HOLE | KEEP_SIZE)`` through
libc, which ``os.posix_fallocate`` cannot do); a file system without hole
punching gets zeroes written instead, so deallocated blocks always read as
zeroes (Identify Namespace DLFEAT = 001b).

Every change of the data (Write, Write Zeroes, Dataset Management
deallocate, Format) ends with ``on_change(byte offset, length)`` when a hook
is set: the migration layer keeps its dirty pages with it, without
``storage`` importing ``migrate``.  A migration's destination stages a
complete new image beside the old one and swaps it in with
:meth:`Namespace.replace_image` (rename, then ``dup2`` onto the same fd).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Protocol

from appliance.memory import ClientMemory
from appliance.storage.fileops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
    replace_file,
)
from appliance.storage.formats import format_index
from appliance.storage.metadata import MetadataFile, side_file
from appliance.storage.namespace_format import NamespaceFormat
from appliance.storage.protection import PiType, Protection
from appliance.storage.prp import Segments
from appliance.storage.spec import CommandError, Status
from appliance.storage.zones import ZonedSettings

BLOCK_SIZES = (512, 4096)
IOV_MAX = 1024
ZERO_CHUNK = 1 << 20

def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of a view list."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    if n:
        views = [views[0][n:]] + views[1:]
    return views


class BlockExport(Protocol):
    """A remote image (the runtime's NBD connection).  Every call may block for a
    network round trip; each raises ``OSError`` when it fails."""

    @property
    def size(self) -> int: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def block_size(self) -> int:
        """The smallest unit a request may address (offsets and lengths)."""
    def pread(self, length: int, offset: int) -> bytes: ...
    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None: ...
    def flush(self) -> None: ...
    def write_zeroes(self, offset: int, length: int, deallocate: bool,
                     fua: bool = False) -> None: ...
    def close(self) -> None: ...


class NamespaceSettings(Protocol):
    """What a namespace is opened from (the runtime passes the configuration's
    ``storage.namespaces`` entries)."""

    @property
    def image(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def zoned(self) -> ZonedSettings | None: ...  # None: not a zoned namespace
    @property
    def metadata(self) -> int: ...  # bytes per block: 0, 8, 16 or 64
    @property
    def pi(self) -> int: ...  # protection information type 0-3 (0: none)


class Namespace(NamespaceFormat):
    """One namespace: an image file and its LBA format (Format NVM and Identify:
    :class:`~appliance.storage.namespace_format.NamespaceFormat`)."""

    def __init__(self, nsid: int, image: str, size: int, block_size: int = 512,
                 read_only: bool = False, export: BlockExport | None = None,
                 metadata: int = 0, pi: int = 0, *, existing: bool = False,
                 pi_first: bool = True, extended: bool = False) -> None:
        """Open (creating sparse if missing) the image behind namespace ``nsid``,
        or serve ``export`` (then ``image`` only names it; ``size`` 0 takes the
        export's size, rounded down to whole blocks).  ``metadata`` bytes per
        block live in the side file ``<image>.md`` (:mod:`~appliance.storage.metadata`);
        ``pi`` is the protection information type kept in them, the tuple
        first in them (``pi_first``) or last; ``extended``: the metadata is
        transferred at the end of each block's data (FLBAS bit 4).  ``existing``:
        ``image`` must be a regular file of at least ``size`` bytes already, and
        it and its side file are opened without following a symlink (a
        migrated namespace's image).

        Raises:
            ValueError: a bad block size or a size that is not a positive
                multiple of it; an export whose size differs from ``size`` or
                whose block size does not divide ``block_size``; no LBA format
                with that metadata size, a PI type other than 0-3 or one the
                metadata cannot hold, metadata for an export; ``existing`` and
                not a regular file of ``size`` bytes at least.
            OSError: the image cannot be created or opened (ELOOP: ``existing``
                and a symlink).
        """
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"namespace {nsid}: block size {block_size} not in {BLOCK_SIZES}")
        self.format_index = format_index(block_size, metadata)
        if pi not in tuple(PiType):
            raise ValueError(f"namespace {nsid}: PI type {pi} not in 0-3")
        self.protection = Protection(PiType(pi), metadata, pi_first)
        if metadata and export is not None:
            raise ValueError(f"namespace {nsid}: an NBD export cannot carry metadata")
        #: FLBAS bit 4: metadata at the end of each block's data, not in MPTR's buffer
        self.extended = extended and metadata > 0
        #: report the current format alone (nlbaf 0): a zoned namespace, whose
        #: zone size Identify gives for LBA format 0 only
        self.fixed_format = False
        self.md: MetadataFile | None = None
        self.export = export
        if export is not None:
            size, read_only = self._export_size(nsid, export, size, block_size), \
                read_only or export.read_only
        if size <= 0 or size % block_size:
            raise ValueError(f"namespace {nsid}: size {size} not a positive multiple of "
                             f"{block_size}")
        self.nsid = nsid
        self.image = image
        self.size = size
        self.block_size = block_size
        self.lba_shift = block_size.bit_length() - 1
        self.nlbas = size // block_size
        self.read_only = read_only
        # Called as on_change(byte offset, length) after every change of the data
        # (Write, Write Zeroes, Dataset Management deallocate, Format), also when
        # the change failed part-way: migration's dirty tracking hooks in here.
        self.on_change: Callable[[int, int], None] | None = None
        self.fd = -1
        if export is not None:
            return
        if existing:
            self._open_existing(image, size)
        else:
            self._open_image(image, size, read_only)
        if metadata:
            try:
                self.md = MetadataFile(side_file(image), self.nlbas, metadata, read_only,
                                       nofollow=existing)
            except BaseException:
                self.close()
                raise

    @property
    def metadata(self) -> int:
        """Metadata bytes per block (0: none)."""
        return self.protection.metadata

    def _open_image(self, image: str, size: int, read_only: bool) -> None:
        if not read_only or not os.path.exists(image):
            fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
            if not read_only:
                self.fd = fd
                return
            os.close(fd)
        self.fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)

    def _open_existing(self, image: str, size: int) -> None:
        fd = os.open(image, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < size:
                raise ValueError(f"namespace {self.nsid}: {image} is not a regular file of "
                                 f"{size} bytes")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    @staticmethod
    def _export_size(nsid: int, export: BlockExport, size: int, block_size: int) -> int:
        have = export.size - export.size % block_size
        if export.block_size > block_size or block_size % export.block_size:
            raise ValueError(f"namespace {nsid}: the export's minimum block size "
                             f"{export.block_size} does not divide block_size {block_size}")
        if size and size != export.size:
            raise ValueError(f"namespace {nsid}: size is {size} bytes, the export has "
                             f"{export.size} (leave size out to take the export's)")
        if have <= 0:
            raise ValueError(f"namespace {nsid}: the export ({export.size} bytes) is smaller "
                             f"than one {block_size}-byte block")
        return have

    @property
    def remote(self) -> bool:
        """Whether the image is a :class:`BlockExport` (no fd)."""
        return self.export is not None

    def close(self) -> None:
        """Close the image file or the export's connection (idempotent)."""
        if self.export is not None:
            self.export.close()
        if self.md is not None:
            self.md.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def image_path(self) -> str:
        """The image's real path (symlinks resolved): where a replacement is renamed to."""
        return os.path.realpath(self.image)

    def replace_image(self, path: str) -> int:
        """Make the file at ``path`` the image: rename it over :meth:`image_path`
        and serve from it from now on.

        ``path`` must be in the image's directory (the rename is atomic there)
        and hold at least ``size`` bytes; the caller has made its data durable.
        The namespace keeps its fd number (``dup2``), so whoever holds it sees
        the new file.  The directory is synced.

        Returns:
            An fd of the old image, now without a name: closing it frees the
            old file's blocks, which takes time in proportion to its size (tens
            of ms per GiB), so the caller closes it when that does not count.

        Raises:
            ValueError: a read-only or closed namespace, or ``path`` is too short.
            OSError: ``path`` cannot be opened or renamed; the image is then
                unchanged.  A failing directory sync is raised after the swap.
        """
        if self.read_only or self.fd < 0:
            raise ValueError(f"namespace {self.nsid} is read-only, closed or remote")
        return replace_file(self.fd, path, self.image_path(), self.size)

    # ------------------------------------------------------------ checks
    def check_range(self, slba: int, nlb: int) -> None:
        """Raise LBA_OUT_OF_RANGE (DNR) unless blocks ``slba .. slba+nlb-1`` exist."""
        if slba < 0 or nlb < 0 or slba + nlb > self.nlbas:
            raise CommandError(Status.LBA_OUT_OF_RANGE,
                               f"nsid {self.nsid}: LBA {slba}+{nlb} past {self.nlbas}")

    def check_writable(self) -> None:
        """Raise NS_WRITE_PROTECTED (DNR) for a read-only namespace (section 8.12)."""
        if self.read_only:
            raise CommandError(Status.NS_WRITE_PROTECTED, f"nsid {self.nsid} is read-only")

    # ------------------------------------------------------------ data
    def read(self, memory: ClientMemory, segments: Segments, slba: int) -> None:
        """Copy blocks from ``slba`` into the client memory ``segments``.

        Raises:
            GuestMemoryError: a segment is not writable client memory.
            CommandError: UNRECOVERED_READ_ERROR when the file read fails.
        """
        offset = slba << self.lba_shift
        views = None if self.export is not None else self._views(memory, segments, write=True)
        try:
            if views is not None:
                self._preadv(views, offset)
                return
            total = sum(n for _, n in segments)
            data = self._pread(total, offset)
        except OSError as exc:
            raise CommandError(Status.UNRECOVERED_READ_ERROR, str(exc), dnr=False) from None
        finally:
            if views is not None:
                for view in views:
                    view.release()
        done = 0
        for address, n in segments:
            memory.write(address, data[done:done + n])
            done += n

    def write(self, memory: ClientMemory, segments: Segments, slba: int) -> None:
        """Copy the client memory ``segments`` to blocks from ``slba``.

        Raises:
            GuestMemoryError: a segment is not readable client memory.
            CommandError: WRITE_FAULT when the file write fails.
        """
        views = self._views(memory, segments, write=False)
        if views is None:
            views = [memoryview(b"".join(memory.read(a, n) for a, n in segments))]
        try:
            self.write_views(views, slba)
        finally:
            for view in views:
                view.release()
            self.changed(slba << self.lba_shift, sum(n for _, n in segments))

    def write_views(self, views: list[memoryview], slba: int) -> None:
        """Write ``views`` to blocks from ``slba``, without the change hook.

        Touches the image (fd or export) and the views only, so a worker
        thread may call it; the loop then calls :meth:`changed`.

        Raises:
            CommandError: WRITE_FAULT when the write fails.
        """
        offset, rest = slba << self.lba_shift, views
        try:
            if self.export is not None:
                self.export.pwrite(views[0] if len(views) == 1 else b"".join(views), offset)
                return
            while rest:
                done = os.pwritev(self.fd, rest[:IOV_MAX], offset)
                offset += done
                rest = _advance(rest, done)
        except OSError as exc:
            raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None
        finally:
            del rest  # slices of the views: an exception's frame must not keep them

    def views(self, memory: ClientMemory, segments: Segments, write: bool) -> list[memoryview] | None:
        """Zero-copy views of ``segments`` (the caller releases them), or None
        when part of them is not mmap'd (then use :meth:`read` / :meth:`write`).

        Raises:
            GuestMemoryError: a segment is not client memory with that access.
        """
        return self._views(memory, segments, write)

    def read_into(self, views: list[memoryview], slba: int, *, nowait: bool = False) -> bool:
        """Read blocks from ``slba`` into ``views`` (from :meth:`views`).

        With ``nowait`` only what the page cache holds is read
        (``RWF_NOWAIT``): False when the rest would wait for the disk (nothing
        is lost: read again, without ``nowait``, off the loop).  Safe to call
        from a worker thread (the image fd and the views only).

        Raises:
            CommandError: UNRECOVERED_READ_ERROR when the file read fails.
        """
        offset, rest = slba << self.lba_shift, views
        if self.export is not None:
            return self._read_export_into(views, offset, nowait)
        try:
            while rest:
                try:
                    done = os.preadv(self.fd, rest[:IOV_MAX], offset,
                                     os.RWF_NOWAIT if nowait else 0)
                except BlockingIOError:
                    return False
                if done == 0:
                    if nowait and offset < self.file_size():
                        return False  # a short read inside the file: not cached
                    for view in rest:  # past the end of a short (read-only) image
                        view[:] = bytes(len(view))
                    return True
                offset += done
                rest = _advance(rest, done)
        except OSError as exc:
            raise CommandError(Status.UNRECOVERED_READ_ERROR, str(exc), dnr=False) from None
        return True

    def _read_export_into(self, views: list[memoryview], offset: int, nowait: bool) -> bool:
        if nowait:
            return False  # a network round trip: off the loop
        try:
            data = memoryview(self.export.pread(sum(len(v) for v in views), offset)
                              if self.export is not None else b"")
        except OSError as exc:
            raise CommandError(Status.UNRECOVERED_READ_ERROR, str(exc), dnr=False) from None
        done = 0
        for view in views:
            view[:] = data[done:done + len(view)]
            done += len(view)
        return True

    def file_size(self) -> int:
        """The image file's current size in bytes (an export's: the namespace's)."""
        if self.export is not None:
            return self.size
        return os.fstat(self.fd).st_size

    def read_bytes(self, slba: int, nbytes: int) -> bytes:
        """``nbytes`` from block ``slba`` (zeroes past the end of the file)."""
        try:
            return self._pread(nbytes, slba << self.lba_shift)
        except OSError as exc:
            raise CommandError(Status.UNRECOVERED_READ_ERROR, str(exc), dnr=False) from None

    def write_bytes(self, slba: int, data: bytes) -> None:
        """Write ``data`` (whole blocks) from block ``slba`` (Copy's destination).

        Raises:
            CommandError: WRITE_FAULT when the file write fails.
        """
        start = slba << self.lba_shift
        view, done = memoryview(data), 0
        try:
            while done < len(data):
                done += os.pwrite(self.fd, view[done:], start + done)
        except OSError as exc:
            raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None
        finally:
            view.release()
            self.changed(start, len(data))

    def write_zeroes(self, slba: int, nlb: int, deallocate: bool) -> None:
        """Zero blocks, punching holes when ``deallocate`` (else ZERO_RANGE).

        Raises:
            CommandError: WRITE_FAULT when the file cannot be changed.
        """
        try:
            self.zero_blocks(slba, nlb, deallocate)
        finally:
            self.changed(slba << self.lba_shift, nlb << self.lba_shift)

    def zero_blocks(self, slba: int, nlb: int, deallocate: bool) -> None:
        """:meth:`write_zeroes` without the change hook (a worker thread may call it;
        the loop then calls :meth:`changed`).

        Raises:
            CommandError: WRITE_FAULT when the image cannot be changed.
        """
        offset, length = slba << self.lba_shift, nlb << self.lba_shift
        mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if deallocate
                else FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        if self.md is not None:
            self.md.deallocate(slba, nlb)
        try:
            if self.export is not None:
                if length:
                    self.export.write_zeroes(offset, length, deallocate)
                return
            if length == 0 or fallocate(self.fd, mode, offset, length):
                return
            zeros = bytes(min(length, ZERO_CHUNK))
            while length:
                done = os.pwrite(self.fd, zeros[:length], offset)
                offset += done
                length -= done
        except OSError as exc:
            raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None

    def flush(self) -> None:
        """Make written data durable (fdatasync).

        Raises:
            CommandError: WRITE_FAULT when the sync fails.
        """
        if self.read_only:
            return
        if self.md is not None:
            self.md.flush()
        try:
            if self.export is not None:
                self.export.flush()
                return
            os.fdatasync(self.fd)
        except OSError as exc:
            raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None

    def format(self) -> None:
        """Erase every block (the image becomes all holes, the metadata too)."""
        if self.md is not None:
            self.md.erase()
        try:
            if self.export is not None:
                self.export.write_zeroes(0, self.size, deallocate=True)
                return
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None
        finally:
            self.changed(0, self.size)

    # ------------------------------------------------------------ internals
    def changed(self, offset: int, length: int) -> None:
        """Call the change hook for ``length`` bytes at byte ``offset`` (on the loop)."""
        if self.on_change is not None and length > 0:
            self.on_change(offset, length)

    @staticmethod
    def _views(memory: ClientMemory, segments: Segments, write: bool) -> list[memoryview] | None:
        views: list[memoryview] = []
        try:
            for address, n in segments:
                got = memory.buffers(address, n, write)
                if got is None:
                    break
                views += got
            else:
                return views
        except BaseException:
            for view in views:
                view.release()
            raise
        for view in views:
            view.release()
        return None

    def _preadv(self, views: list[memoryview], offset: int) -> None:
        while views:
            done = os.preadv(self.fd, views[:IOV_MAX], offset)
            if done == 0:  # past the end of a short (read-only) image: zeroes
                for view in views:
                    view[:] = bytes(len(view))
                return
            offset += done
            views = _advance(views, done)

    def _pread(self, nbytes: int, offset: int) -> bytes:
        if self.export is not None:
            return self.export.pread(nbytes, offset)
        parts, total = [], 0
        while total < nbytes:
            chunk = os.pread(self.fd, nbytes - total, offset + total)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
        return b"".join(parts).ljust(nbytes, b"\0")
