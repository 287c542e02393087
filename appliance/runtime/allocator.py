"""glibc's allocator, told to keep large buffers (runtime layer: process-wide).

A MIG_DATA chunk is a 1 MiB buffer, and each of the three processes of a
migration makes a few per chunk (what a socket read returns, a record, a
reply).  glibc's defaults serve such a size with a fresh ``mmap`` (or give the
heap's top back to the kernel as soon as it is freed), so each new buffer
page-faults in all its 256 pages again: measured here, a third of the
processes' CPU time in a migration went to that.  :func:`keep_large_buffers`
has glibc serve buffers up to :data:`HEAP_LIMIT` from the heap and keep up to
:data:`KEEP_FREE` bytes of freed heap for the next ones.  It is what the
entry points of long-running processes call (``appliance run``,
``appliance migrate``); a library never changes it behind its caller.
"""

from __future__ import annotations

import ctypes
import logging

HEAP_LIMIT = 4 << 20  # buffers up to this size come from the heap (M_MMAP_THRESHOLD)
KEEP_FREE = 32 << 20  # freed heap kept at its top before any goes back (M_TRIM_THRESHOLD)
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3

log = logging.getLogger("appliance")


def keep_large_buffers(heap_limit: int = HEAP_LIMIT, keep_free: int = KEEP_FREE) -> bool:
    """Have glibc serve buffers up to ``heap_limit`` bytes from the heap and keep
    ``keep_free`` bytes of freed heap (both settings, or glibc's dynamic
    threshold would undo one).

    Returns:
        Whether the C library took both (False elsewhere than glibc: nothing
        changed then, or only the first).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, heap_limit) == 1 and mallopt(_M_TRIM_THRESHOLD, keep_free) == 1
    if not done:
        log.debug("mallopt refused the large-buffer settings; glibc defaults stay")
    return done
