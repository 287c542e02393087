"""Linux file calls the standard library lacks (device layer): fallocate(2)
with hole punching and range zeroing, through libc."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_fallocate: Callable[..., int] | None = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Linux fallocate(2) with ``mode``; False when the file system cannot do it.

    Raises:
        OSError: any other failure.
    """
    global _fallocate
    if _fallocate is None:
        try:
            func = ctypes.CDLL(None, use_errno=True).fallocate
        except (OSError, AttributeError):
            return False
        func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        func.restype = ctypes.c_int
        _fallocate = func
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def replace_file(fd: int, path: str, target: str, min_size: int) -> int:
    """Rename the file at ``path`` over ``target`` and make ``fd`` (open on the
    old ``target``) refer to it (``dup2``: whoever holds ``fd`` sees the new
    file).  ``path`` must be in ``target``'s directory (the rename is atomic
    there) and its data durable; the directory is synced.

    Returns:
        An fd of the old file, now without a name: the caller closes it
        (freeing a large file's blocks takes time).

    Raises:
        ValueError: ``path`` holds fewer than ``min_size`` bytes.
        OSError: ``path`` cannot be opened or renamed (``target`` is then
            unchanged); a failing directory sync is raised after the swap.
    """
    new = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    old = -1
    try:
        if os.fstat(new).st_size < min_size:
            raise ValueError(f"{path}: shorter than {min_size} bytes")
        old = os.dup(fd)
        os.rename(path, target)
        os.dup2(new, fd, inheritable=False)
    except BaseException:
        if old >= 0:
            os.close(old)
        raise
    finally:
        os.close(new)
    try:
        dirfd = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except BaseException:
        os.close(old)
        raise
    return old


SYNC_FILE_RANGE_WRITE = 0x2  # <fcntl.h>: start writeback of the range's dirty pages

_sync_file_range: Callable[..., int] | None = None


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> bool:
    """Start writing back the dirty pages of ``[offset, offset+length)`` (length 0:
    to the end of the file) without waiting for them: Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``.  Durable they are not (no
    metadata, no device cache flush): an ``fdatasync`` still decides that, and
    finds less to wait for.

    Returns:
        False when the call is not available here (nothing was started).

    Raises:
        OSError: the call failed (EIO: an earlier writeback failed).
    """
    global _sync_file_range
    if _sync_file_range is None:
        try:
            func = ctypes.CDLL(None, use_errno=True).sync_file_range
        except (OSError, AttributeError):
            return False
        func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        func.restype = ctypes.c_int
        _sync_file_range = func
    if _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err))
