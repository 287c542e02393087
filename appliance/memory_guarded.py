"""Guarded mappings: client memory a peer can shrink, mapped for native calls only.

A vhost-user connection's :class:`~appliance.memory.ClientMemory` (built with
``guard_unsealed``) maps a region whose file could still shrink (DPDK's memfd)
as :attr:`Region.guarded <appliance.memory.Region.guarded>`; Python reaches the
region through its fd as before and never reads that mapping (a shrink would
kill the process with SIGBUS).  The native fast path touches it only under
its SIGBUS guard (native/fastpath/guard.c): a call that meets a page past the
end of the file gives up with ``OSError(EFAULT)`` and its caller reports it
here (:func:`native_fault`), which takes the memory off the native path.
"""

from __future__ import annotations

import logging

from appliance.memory import ClientMemory, GuestMemoryError, MappedRegions, checked_end, file_size

log = logging.getLogger("appliance.memory")


def native_regions(memory: ClientMemory, guarded: bool) -> MappedRegions | None:
    """``memory``'s regions as guarded native calls take them: as
    :meth:`ClientMemory.mapped_regions`, with the guarded mappings of fd regions
    when ``guarded`` (the caller's calls run under the SIGBUS guard); None when a
    region has no mapping to give or a guarded call faulted in this memory."""
    if not memory.native_ok:
        return None
    mapped = []
    for r in memory.regions:
        view = r.view if r.view is not None else r.guarded if guarded else None
        if view is None:
            return None
        mapped.append((r.address, view, r.readable, r.writable))
    return tuple(mapped)


def native_view(memory: ClientMemory, address: int, length: int) -> memoryview | None:
    """A view of the range for guarded native calls (a slice of its region's
    mapping, guarded or not), or None when it does not lie in one mapped region.

    Raises:
        GuestMemoryError: the range's first byte is unmapped, or it overflows.
    """
    checked_end(address, length)
    region = next((r for r in memory.regions if r.address <= address < r.end), None)
    if region is None:
        raise GuestMemoryError(address, length, 0)
    view = region.view if region.view is not None else region.guarded
    off = address - region.address
    if view is None or off + length > region.size:
        return None
    return view[off:off + length]


def native_fault(memory: ClientMemory, certain: bool) -> bool:
    """A guarded native call faulted (SIGBUS) in ``memory`` (``certain``) or
    perhaps in it.  Returns True when native calls must leave it from now on:
    ``certain``, or a guarded region's file ends before the region now (one
    warning per such region, the region's only one).  :func:`native_regions`
    then returns None: its rings run in Python, through the fd."""
    shrunk = False
    for r in memory.regions:
        if r.guarded is None or r.fd is None:
            continue
        try:
            length = file_size(r.fd)
        except OSError:
            length = None
        if length is None or length < r.fd_offset + r.size:
            shrunk = True
            if not r.reported:
                r.reported = True
                log.warning("client memory region %#x+%#x: its file shrank to %s bytes under a "
                            "native call; this memory runs in Python from now on",
                            r.address, r.size, length)
    if (shrunk or certain) and memory.native_ok:
        memory.native_ok = False
        if not shrunk:
            log.warning("client memory: a native call faulted in it (SIGBUS); it runs in Python "
                        "from now on")
    return not memory.native_ok


def has_guarded(memory: ClientMemory) -> bool:
    """Whether a region of ``memory`` has a guarded mapping."""
    return any(r.guarded is not None for r in memory.regions)
