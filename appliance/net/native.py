"""What a split virtqueue expects of the native fast path (device layer).

The C extension ``appliance._fastpath`` (native/fastpath/) implements
:class:`NativeVring`; :mod:`appliance.fastpath` decides whether it runs and the
runtime hands it to the ports (:meth:`VirtioNetPort.use_native
<appliance.net.port.VirtioNetPort.use_native>`), so nothing here imports it.
:class:`~appliance.net.virtqueue.SplitQueue` stays the reference: the native
calls mirror its ``pop``, ``drain`` and ``publish`` and
:func:`appliance.net.receive.write_frame` (same bounds, same messages, same
writes), and it only calls them for a ring whose memory is all mapped
(:func:`native_regions`): mmap'd, or an fd region's guarded mapping (a file
the front-end can shrink, :attr:`appliance.memory.Region.guarded`) when the
extension's SIGBUS guard is in place (``guard_sigbus``).  A call that touched a
guarded page past the end of a shrunk file raises ``OSError(EFAULT)`` having
changed nothing its caller adopts (used entries and frame bytes it wrote are
not published); the caller then runs the same work in Python, through the fd,
and the memory leaves the native path
(:func:`appliance.memory_guarded.native_fault`).  Message regions stay on the
Python path.
"""

from __future__ import annotations

import errno
import mmap
from typing import Any, Protocol

from appliance import memory_guarded
from appliance.memory import ClientMemory, MappedRegions

#: ClientMemory's regions in address order as (guest address, view, readable, writable)
NativeRegions = MappedRegions  # (guest address, view, readable, writable) in address order
#: (head, [(address, length, writable), ...], readable bytes, writable bytes)
NativeChain = tuple[int, list[tuple[int, int, bool]], int, int]
#: a ring as the walker takes it (SplitQueue.native_args): desc, avail, used, regions,
#: size, last_avail_idx, used_idx, indirect, max_readable, max_writable
NativeRingArgs = tuple[memoryview, memoryview, memoryview, NativeRegions, int, int, int, bool,
                       int, int]
#: a switch port as switch_tx sees it: None (Python sees every frame for it), a
#: MAC (the responder: it ignores frames neither for that MAC nor broadcast), or a
#: native port (hdr_len, mrg, log bitmap or None, its receive rings as (ready, *ring))
NativeTarget = (None | bytes
                | tuple[int, bool, bytearray | mmap.mmap | None, tuple[tuple[Any, ...], ...]])
#: a receive ring after switch_tx: last_avail_idx, used_idx, malformed, last_error,
#: broken, packets, bytes, dropped, dirty (something pushed used)
NativeRxOut = tuple[int, int, int, str | None, str | None, int, int, int, bool]
#: a native port after switch_tx: (frames it had no receive ring for, log marks past
#: its bitmap, its rings), or None for the other ports
NativePortOut = tuple[int, int, tuple[NativeRxOut, ...]] | None
#: the transmit ring after switch_tx: chains taken, last_avail_idx, used_idx,
#: malformed, last_error, broken, packets, bytes, dropped
NativeTxOut = tuple[int, int, int, int, str | None, str | None, int, int, int]
#: what switch_tx and switch_frames return: (the transmit ring or None,
#: (frames, forwarded, flooded, filtered, runts), events, a frame for Python or
#: None, the frames after it (or None) and where they start in it, per port, an
#: allocation failed)
NativeSwitchOut = tuple[NativeTxOut | None, tuple[int, int, int, int, int], bytes, bytes | None,
                        bytes | None, int, tuple[NativePortOut, ...], bool]


class NativeVring(Protocol):
    """The walker's calls; each returns ``(items, last_avail_idx, used_idx,
    malformed, last_error, broken)``: the ring's new indices, the chains it
    refused (counted), the last refusal's message and, when the ring cannot be
    followed, why (None: nothing refused / the ring is fine).

    Raises (each call): ValueError or TypeError for arguments that do not
    describe a queue (ring areas too small, a size that is not a power of two);
    MemoryError; OSError with errno EFAULT when a guarded mapping's file shrank
    under the call (SIGBUS caught: discard the call, run its work in Python).
    Guest input never raises otherwise.
    """

    def guard_sigbus(self) -> bool:
        """Put the SIGBUS guard on top of the installed handler unless it is there
        (a handler installed after the extension loaded, such as faulthandler's,
        replaced it; the guard passes it every other SIGBUS).  Returns whether the
        guard is in place: only then may the calls be given guarded mappings."""
        ...

    def pop_chains(self, desc: memoryview, avail: memoryview, used: memoryview,
                   regions: NativeRegions, size: int, last_avail_idx: int, used_idx: int,
                   indirect: bool, max_readable: int, max_writable: int, budget: int, /,
                   ) -> tuple[list[NativeChain], int, int, int, str | None, str | None]:
        """Up to ``budget`` well-formed chains (``SplitQueue.pop``, ``budget`` times)."""
        ...

    def drain(self, desc: memoryview, avail: memoryview, used: memoryview,
              regions: NativeRegions, size: int, last_avail_idx: int, used_idx: int,
              indirect: bool, max_readable: int, max_writable: int, budget: int, /,
              ) -> tuple[list[bytes], int, int, int, str | None, str | None]:
        """Up to ``budget`` chains, each pushed with length 0, as their bytes
        (``SplitQueue.drain``)."""
        ...

    def receive(self, desc: memoryview, avail: memoryview, used: memoryview,
                regions: NativeRegions, size: int, last_avail_idx: int, used_idx: int,
                indirect: bool, max_readable: int, max_writable: int, frame: bytes,
                hdr_len: int, mrg: bool, log: bytearray | mmap.mmap | None, /,
                ) -> tuple[int, int, int, int, str | None, str | None, int]:
        """One frame into a receive ring (``receive.write_frame``): ``(outcome,
        last_avail_idx, used_idx, malformed, last_error, broken, beyond)``,
        ``beyond`` the marks of ``log`` (the vhost-user log bitmap, or None)
        that reached past its end.  Also ValueError for a writable region whose
        view is read-only."""
        ...

    def switch_tx(self, desc: memoryview, avail: memoryview, used: memoryview,
                  regions: NativeRegions, size: int, last_avail_idx: int, used_idx: int,
                  indirect: bool, max_readable: int, max_writable: int, budget: int,
                  hdr_len: int, enabled: bool, src: int, table: bytes,
                  ports: tuple[NativeTarget, ...], /) -> NativeSwitchOut:
        """A transmit ring's batch through the switch (``VirtioNetPort.process_tx``
        with ``Switch.forward``; see :mod:`appliance.net.native_switch`)."""
        ...

    def switch_frames(self, pending: bytes, offset: int, src: int, table: bytes,
                      ports: tuple[NativeTarget, ...], /) -> NativeSwitchOut:
        """The frames a ``switch_tx`` left (``rest`` from ``offset``) through the switch."""
        ...

    def publish(self, avail: memoryview, used: memoryview, size: int, published: int,
                used_idx: int, event_idx: bool, /) -> bool:
        """Store the used index; True when the driver wants an interrupt."""
        ...


def native_regions(memory: ClientMemory, native: NativeVring) -> NativeRegions | None:
    """``memory``'s regions for ``native``'s calls, or None when one of them has
    no mapping they may touch (a message region, an fd region without a guarded
    mapping or without the guard in place, memory a guarded call faulted in):
    those stay on the Python path."""
    return memory_guarded.native_regions(memory, guarded=native.guard_sigbus())


def native_ring(memory: ClientMemory, native: NativeVring, areas: list[tuple[int, int]],
                ) -> tuple[memoryview, memoryview, memoryview, NativeRegions] | None:
    """A ring's descriptor table, avail and used rings (client address, length
    each) as ``native``'s calls take them, with ``memory``'s regions, or None
    when a region has no mapping they may touch (:func:`native_regions`) or an
    area does not lie in one mapped region.  The views are the caller's to release.

    Raises:
        GuestMemoryError: an area's first byte is unmapped.
    """
    regions = native_regions(memory, native)
    if regions is None:
        return None
    views: list[memoryview] = []
    for address, length in areas:
        view = memory_guarded.native_view(memory, address, length)
        if view is None:
            for v in views:
                v.release()
            return None
        views.append(view)
    desc, avail, used = views
    return desc, avail, used, regions


def native_fault(memories: list[ClientMemory]) -> None:
    """A guarded call that could touch any of ``memories`` faulted: the memories
    whose files shrank leave the native path; when none did (one grew back
    meanwhile), every one of them with a guarded mapping."""
    guarded = [m for m in memories if memory_guarded.has_guarded(m)]
    shrunk = [m for m in guarded if memory_guarded.native_fault(m, certain=False)]  # each checked
    if not shrunk:
        for m in guarded:
            memory_guarded.native_fault(m, certain=True)


def is_vanished(exc: OSError) -> bool:
    """Whether a native call's OSError says guarded memory vanished under it."""
    return exc.errno == errno.EFAULT
