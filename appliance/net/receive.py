"""One frame into a virtio-net receive ring (device layer; virtio 1.2 §5.1.6.3).

:func:`write_frame` is the receive half of the port's per-frame work: it takes
chains from a receive ring until they hold the virtio-net header and the frame
(with MRG_RXBUF as many as that needs, ``num_buffers`` in the header saying
how many; without it one chain must hold everything), writes header and frame
across their buffers in order, and pushes each chain used with the bytes
written into it.  Only the header and the frame are written, whatever a
chain's writable total.  Nothing is published here (the port's ``flush``).

Every write goes through :meth:`ClientMemory.write
<appliance.memory.ClientMemory.write>`, which marks the memory's dirty log
(the port's :class:`~appliance.net.dirty_log.VhostLog` while the front-end
logs).  The native fast path does the same work in one C call
(``appliance._fastpath.receive``, native/fastpath/netrx.c) when the ring runs
natively (:attr:`SplitQueue.uses_native
<appliance.net.virtqueue.SplitQueue.uses_native>`) and is ready, and the
memory's dirty log is the port's own log or none; the code below stays the reference: same
chains, bytes, used entries, marks and outcomes.
"""

from __future__ import annotations

import enum

from appliance.memory import GuestMemoryError
from appliance.net import vhost_wire as vw
from appliance.net.descriptor_chain import Chain
from appliance.net.dirty_log import VhostLog
from appliance.net.virtqueue import SplitQueue

_HDR12 = [vw.NET_HDR_CODEC.pack(0, vw.NET_HDR_GSO_NONE, 0, 0, 0, 0, n) for n in range(4)]
_HDR10 = bytes(vw.NET_HDR_LEGACY_SIZE)


class Outcome(enum.IntEnum):
    """What became of a frame (the native call returns the same values)."""

    DELIVERED = 0
    NO_BUFFER = 1  # not enough buffers: none taken (the ring's indices are as they were)
    TOO_SMALL = 2  # without MRG_RXBUF, the one chain was too small: given back empty
    FAULT = 3  # a buffer could not be written: the chains given back empty


def write_frame(q: SplitQueue, frame: bytes, hdr_len: int, mrg: bool,
                log: VhostLog | None) -> Outcome:
    """Write ``frame`` behind a ``hdr_len``-byte header (10 or 12) into ring ``q``.

    ``log`` is the port's dirty log (None: not logging), which the memory's
    writes mark.  Returns the outcome; the caller counts it.
    """
    mem = q.memory
    assert mem is not None
    if q.uses_native and q.ready and mem.dirty_log is log:  # else pop says there is nothing
        native_out = q.native_receive(frame, hdr_len, mrg, None if log is None else log.bitmap)
        if native_out is not None:  # else the call faulted in a guarded mapping: the fd path
            outcome, beyond = native_out
            if log is not None:
                log.beyond += beyond
            return Outcome(outcome)
    need = hdr_len + len(frame)
    mark = q.checkpoint()
    chains: list[Chain] = []
    room = 0
    while room < need:
        chain = q.pop()
        if chain is None:
            q.rollback(mark)
            return Outcome.NO_BUFFER
        chains.append(chain)  # the walker refused readable buffers
        room += chain.writable
        if not mrg and room < need:
            q.push(chain.head, 0)
            return Outcome.TOO_SMALL
    if hdr_len == vw.NET_HDR_LEGACY_SIZE:
        head = _HDR10
    else:
        n = len(chains)
        head = _HDR12[n] if n < 4 else vw.NET_HDR_CODEC.pack(0, 0, 0, 0, 0, 0, n)
    data = memoryview(head + frame)
    off = 0
    done = 0
    try:
        for chain in chains:
            start = off
            for addr, length, _ in chain.segments:
                if off >= need:
                    break
                k = min(length, need - off)
                mem.write(addr, data[off:off + k])
                off += k
            q.push(chain.head, off - start)
            done += 1
    except GuestMemoryError:
        for chain in chains[done:]:
            q.push(chain.head, 0)  # hand the buffers back unused
        return Outcome.FAULT
    finally:
        data.release()
    return Outcome.DELIVERED
