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
