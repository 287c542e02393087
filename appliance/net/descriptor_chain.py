"""One descriptor chain of a split virtqueue, walked and checked (device layer;
virtio 1.2 §2.7.5).

:func:`walk_chain` follows one available chain from its head with these
bounds: head and every ``next`` inside the table, at most queue-size
descriptors (so loops end), an indirect table a multiple of 16 bytes and at
most queue-size entries (virtio 1.2 §2.7.5.3.1: "A driver MUST NOT create a
descriptor chain longer than the Queue Size of the device"), no indirect
inside indirect, no INDIRECT together with NEXT, readable descriptors before
writable ones, every buffer inside mapped memory, and the chain's readable and
writable byte totals within the queue's limits (the owner's: a transmit ring's
frame size, none of the other kind; at most :data:`MAX_CHAIN_BYTES` each).
Totals are summed as the walk goes (Python integers do not wrap) and the walk
stops at the first descriptor that passes a limit, before any buffer is read,
so a guest cannot make the device copy more than the limit.  A chain that
breaks a rule raises :class:`MalformedChain`, whose message says which; the
queue (:class:`~appliance.net.virtqueue.SplitQueue`) returns it to the driver
with length 0, counts it and skips it.

Descriptors are only read, and only while the driver leaves them alone, so
they are decoded with ``struct``.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.memory import ClientMemory, FdArea, GuestMemoryError
from appliance.net import vhost_wire as vw

_DESC = vw.DESC_CODEC
_NEXT = int(vw.DescFlag.NEXT)
_WRITE = int(vw.DescFlag.WRITE)
_INDIRECT = int(vw.DescFlag.INDIRECT)

MAX_CHAIN_BYTES = 0xFFFF_FFFF  # a used element's length is 32 bits: no chain may hold more


class MalformedChain(Exception):
    """The chain being walked breaks a rule; the message says which (the queue
    counts it and gives the chain back with length 0: it never leaves the device)."""


@dataclass(slots=True)
class Chain:
    """One descriptor chain: head id and its buffers as (address, length, writable)."""

    head: int
    segments: list[tuple[int, int, bool]]
    readable: int  # bytes in device-readable buffers
    writable: int  # bytes in device-writable buffers


def walk_chain(desc: memoryview | FdArea | bytes | None, head: int, size: int, indirect: bool,
               max_readable: int, max_writable: int, memory: ClientMemory | None,
               spans: list[tuple[int, int, bool]]) -> Chain:
    """Walk the chain at ``head`` of a descriptor table of ``size`` entries.

    ``desc`` is the table (a view of mapped memory, or an fd stand-in read with
    pread), ``indirect`` whether VIRTIO_F_INDIRECT_DESC was negotiated,
    ``max_readable``/``max_writable`` the byte limits per chain, ``memory`` the
    client memory indirect tables are read from and ``spans`` its regions as
    (start, end, writable).

    Returns:
        The chain's head and buffers.

    Raises:
        MalformedChain: the chain breaks one of the rules above.
    """
    if head >= size:
        raise MalformedChain(f"head {head} outside a queue of {size}")
    if isinstance(desc, FdArea):  # not mmap'd: the head, then the table for a chain
        addr, length, flags, _ = _DESC.unpack(desc.read(16 * head, 16))  # zeroes if it shrank
        if flags & (_NEXT | _INDIRECT):
            desc = desc.read(0, 16 * size)
    else:
        addr, length, flags, _ = _DESC.unpack_from(desc, 16 * head)  # type: ignore[arg-type]
    if not flags & (_NEXT | _INDIRECT):  # the common case: one buffer
        write = bool(flags & _WRITE)
        if length > (max_writable if write else max_readable):
            raise _too_long(write, max_readable, max_writable)
        if length and not _inside(spans, memory, addr, length, write):
            raise MalformedChain(f"buffer {addr:#x}+{length:#x} outside memory")
        return Chain(head, [(addr, length, write)], 0 if write else length,
                     length if write else 0)
    table: memoryview | bytes = desc  # type: ignore[assignment]
    table_len = size
    ttl = size
    idx = head
    nested = False
    segments: list[tuple[int, int, bool]] = []
    readable = writable = 0
    while True:
        if ttl == 0:
            raise MalformedChain("chain longer than its table (a loop?)")
        ttl -= 1
        addr, length, flags, nxt = _DESC.unpack_from(table, 16 * idx)
        if flags & _INDIRECT:
            if nested:
                raise MalformedChain("indirect descriptor inside an indirect table")
            if not indirect:
                raise MalformedChain("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
            if flags & _NEXT:
                raise MalformedChain("descriptor has both INDIRECT and NEXT")
            if length == 0 or length % 16 or length // 16 > size:
                raise MalformedChain(f"indirect table of {length} bytes")
            try:
                table = memory.read(addr, length)  # type: ignore[union-attr]
            except GuestMemoryError as exc:
                raise MalformedChain(f"indirect table outside memory: {exc}") from None
            table_len = ttl = length // 16
            idx = 0
            nested = True
            continue
        if flags & _WRITE:
            writable += length
            if writable > max_writable:
                raise _too_long(True, max_readable, max_writable)
            if length and not _inside(spans, memory, addr, length, True):
                raise MalformedChain(f"writable buffer {addr:#x}+{length:#x} outside memory")
            segments.append((addr, length, True))
        else:
            if segments and segments[-1][2]:  # a zero-length writable one counts too
                raise MalformedChain("readable descriptor after a writable one")
            readable += length
            if readable > max_readable:
                raise _too_long(False, max_readable, max_writable)
            if length and not _inside(spans, memory, addr, length, False):
                raise MalformedChain(f"buffer {addr:#x}+{length:#x} outside memory")
            segments.append((addr, length, False))
        if not flags & _NEXT:
            return Chain(head, segments, readable, writable)
        if nxt >= table_len:
            raise MalformedChain(f"next {nxt} outside a table of {table_len}")
        idx = nxt


def _too_long(write: bool, max_readable: int, max_writable: int) -> MalformedChain:
    if write:
        return MalformedChain(f"writable buffers exceed {max_writable} bytes")
    return MalformedChain(f"readable buffers exceed {max_readable} bytes")


def _inside(spans: list[tuple[int, int, bool]], memory: ClientMemory | None,
            addr: int, length: int, write: bool) -> bool:
    end = addr + length
    for start, stop, writable in spans:
        if start <= addr and end <= stop:
            return writable or not write
    # possibly split across adjacent regions: the accessor decides (marking nothing:
    # the walk writes nothing, the writes mark what they write)
    return memory is not None and memory.reaches(addr, length, write)
