"""A namespace's per-block metadata in a side file (device layer).

Theory of operation
-------------------
The image stays plain data, block after block, exactly as for a namespace
without metadata: any tool that reads the image reads the blocks.  The
metadata of a namespace whose LBA format has some (8, 16 or 64 bytes per
block) lives beside it in ``<image>.md``: block ``n``'s metadata at byte
``n * metadata``.  Each byte is stored inverted (XOR FFh), so a hole (a block
never written, deallocated or formatted) reads back as FFh bytes: an
application tag of FFFFh and a reference tag of FFFFFFFFh, the escape values
that turn every protection check off for that block, which is how a host
reads a block it never wrote without an integrity error.

The side file is sparse and created on first use; Format NVM empties it,
Write Zeroes and a deallocating Dataset Management punch its ranges (Write
Uncorrectable leaves it alone: its marks are controller state).  A full-copy
migration carries the written metadata in NAMESPACE_METADATA records and
stages a new side file beside the staged image
(:mod:`~appliance.storage.staging`), renamed over this one with it
(:meth:`MetadataFile.replace`); a shared-storage migration or a live handoff
keeps using the same file (same name plus ``.md``).
"""

from __future__ import annotations

import os

from appliance.storage.fileops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    fallocate,
    replace_file,
)
from appliance.storage.spec import CommandError, Status

SUFFIX = ".md"
_INVERT = bytes(b ^ 0xFF for b in range(256))


def stored(metadata: bytes | memoryview) -> bytes:
    """The side file's bytes for ``metadata`` as a host reads it, and back (each
    byte XOR FFh: its own inverse)."""
    return bytes(metadata).translate(_INVERT)


def side_file(image: str) -> str:
    """Returns:
        The path of the metadata side file of ``image``.
    """
    return image + SUFFIX


class MetadataFile:
    """``metadata`` bytes per block for ``nlbas`` blocks, in ``path``."""

    def __init__(self, path: str, nlbas: int, metadata: int, read_only: bool = False,
                 nofollow: bool = False) -> None:
        """Open (creating sparse if missing, extending if short) the side file;
        ``nofollow``: never through a symlink.

        Raises:
            ValueError: ``metadata`` or ``nlbas`` not positive.
            OSError: the file cannot be created or opened (ELOOP: ``nofollow``
                and a symlink).
        """
        if metadata <= 0 or nlbas <= 0:
            raise ValueError(f"{path}: {metadata} metadata bytes for {nlbas} blocks")
        self.path, self.nlbas, self.metadata, self.read_only = path, nlbas, metadata, read_only
        size = nlbas * metadata
        self.fd = -1
        if read_only and not os.path.exists(path):
            return  # a read-only image that never had metadata: every block reads FFh
        flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
        self.fd = os.open(path, flags | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0), 0o644)
        try:
            if not read_only and os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        """Close the side file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, slba: int, nlb: int) -> bytes:
        """The metadata of blocks ``slba .. slba+nlb-1`` (FFh bytes for holes).

        Raises:
            CommandError: UNRECOVERED_READ_ERROR when the file read fails.
        """
        length, offset = nlb * self.metadata, slba * self.metadata
        parts, total = [], 0
        try:
            while total < length and self.fd >= 0:
                chunk = os.pread(self.fd, length - total, offset + total)
                if not chunk:
                    break
                parts.append(chunk)
                total += len(chunk)
        except OSError as exc:
            raise CommandError(Status.UNRECOVERED_READ_ERROR, str(exc), dnr=False) from None
        return b"".join(parts).ljust(length, b"\0").translate(_INVERT)

    def write(self, slba: int, data: bytes | memoryview) -> None:
        """Store ``data`` (whole blocks' metadata) from block ``slba``.

        Raises:
            CommandError: WRITE_FAULT when the file write fails.
        """
        raw = memoryview(stored(data))
        offset, done = slba * self.metadata, 0
        try:
            while done < len(raw):
                done += os.pwrite(self.fd, raw[done:], offset + done)
        except OSError as exc:
            raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None

    def real_path(self) -> str:
        """The side file's real path (symlinks resolved): where a replacement is renamed to."""
        return os.path.realpath(self.path)

    def replace(self, path: str) -> int:
        """Make the file at ``path`` (in :meth:`real_path`'s directory, durable)
        the side file: renamed over it, ``fd`` keeps its number.

        Returns:
            An fd of the old side file, now without a name: the caller closes it.

        Raises:
            ValueError: a read-only or closed side file, or ``path`` is shorter
                than ``nlbas`` x ``metadata`` bytes.
            OSError: ``path`` cannot be opened or renamed (the side file is
                then unchanged), or the directory sync failed after the swap.
        """
        if self.read_only or self.fd < 0:
            raise ValueError(f"{self.path}: read-only or closed")
        return replace_file(self.fd, path, self.real_path(), self.nlbas * self.metadata)

    def deallocate(self, slba: int, nlb: int) -> None:
        """Blocks ``slba .. slba+nlb-1`` read back as FFh metadata again.

        Raises:
            CommandError: WRITE_FAULT when the file cannot be changed.
        """
        offset, length = slba * self.metadata, nlb * self.metadata
        try:
            if not fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
                self.write(slba, b"\xff" * length)
        except OSError as exc:
            raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None

    def erase(self) -> None:
        """Every block's metadata reads FFh (Format NVM).

        Raises:
            CommandError: WRITE_FAULT when the file cannot be truncated.
        """
        try:
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, self.nlbas * self.metadata)
        except OSError as exc:
            raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None

    def drop(self) -> None:
        """Empty the side file and close it (Format NVM to another format).

        Raises:
            CommandError: WRITE_FAULT when the file cannot be truncated.
        """
        try:
            os.ftruncate(self.fd, 0)
        except OSError as exc:
            raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None
        finally:
            self.close()

    def flush(self) -> None:
        """Make the metadata durable (fdatasync).

        Raises:
            CommandError: WRITE_FAULT when the sync fails.
        """
        if self.read_only:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None


def interleave(data: bytes, metadata: bytes, block_size: int, ms: int) -> bytes:
    """Extended LBAs: each block's data followed by its ``ms`` metadata bytes.

    Returns:
        The bytes of the data buffer (``metadata`` left out when ``ms`` is 0).
    """
    if not ms:
        return data
    nlb = len(data) // block_size
    return b"".join(data[i * block_size:(i + 1) * block_size] + metadata[i * ms:(i + 1) * ms]
                    for i in range(nlb))


def split(extended: bytes, block_size: int, ms: int) -> tuple[bytes, bytes]:
    """The inverse of :func:`interleave`.

    Returns:
        (data, metadata) of the blocks in ``extended``.
    """
    if not ms:
        return extended, b""
    step = block_size + ms
    nlb = len(extended) // step
    data = b"".join(extended[i * step:i * step + block_size] for i in range(nlb))
    md = b"".join(extended[i * step + block_size:(i + 1) * step] for i in range(nlb))
    return data, md
