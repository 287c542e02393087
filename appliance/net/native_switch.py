"""A transmit batch switched in one native call (device layer).

Theory of operation
-------------------
:meth:`VirtioNetPort.process_tx <appliance.net.port.VirtioNetPort.process_tx>`
takes a transmit ring's batch, checks each frame's virtio-net header and
hands the frame to the switch, which learns its source and delivers it to
other ports' receive rings (:meth:`Switch.forward
<appliance.net.switch.Switch.forward>`, :meth:`VirtioNetPort.deliver
<appliance.net.port.VirtioNetPort.deliver>`).  With the native fast path,
:func:`run` does all of that in ``appliance._fastpath.switch_tx``: the drain,
the header checks and the port's counters, the switching, and each frame
written into its receive rings (``receive``'s rules, the dirty log), leaving
the used index publication and the interrupts to the ports' ``flush`` as
before (once per batch and ring).

The switch's table stays in Python.  The C code reads a snapshot
(:meth:`Switch.native_table <appliance.net.switch.Switch.native_table>`:
each MAC's port and whether it is fresh, due for a refresh or aged) and
reports, in order, what :meth:`Switch.forward` would have changed (a source
MAC to learn, an aged entry to remove), which :meth:`Switch.apply_native
<appliance.net.switch.Switch.apply_native>` applies with the same
``learn``; within one call the C code sees its own reports, so every frame is
switched against the table Python would have had.

Python keeps (the exact rule, also in docs/architecture.md "Fast path"):

* the whole batch, when the transmit ring does not run natively, the port is
  not attached to a switch, writes a pcap, or the control plane's hooks must
  see its frames (a fault rule anywhere, its link down: ``VirtioNetPort.hooked``),
  or the table is so full that learning could evict (an eviction changes what
  later lookups see);
* the whole batch, or the rest of it, when a call faulted in a guarded mapping
  (a front-end shrank its memory under it: ``OSError(EFAULT)``, nothing of the
  call adopted; the memories that shrank leave the native path);
* one frame (handed back untouched, the call stops there and continues after
  Python forwarded it), when one of its destinations is Python's: a port whose
  :meth:`native_target` is None (TAP, a port off the native path, with a pcap,
  a hook, a receive ring not on the native path), the responder for a frame to
  its MAC or broadcast (it ignores the others, so those skip it).
"""

from __future__ import annotations

from typing import Any

from appliance.net.native import (
    NativeSwitchOut,
    NativeTarget,
    NativeVring,
    is_vanished,
    native_fault,
)
from appliance.net.switch import Switch
from appliance.net.virtqueue import SplitQueue


def _target(port: Any, src: Any) -> NativeTarget:
    if port is src:
        return None  # never a destination of its own frames
    target = getattr(port, "native_target", None)
    return None if target is None else target()


def _apply(switch: Switch, src: Any, out: NativeSwitchOut) -> None:
    _, counts, events, _, _, _, ports, nomem = out
    switch.apply_native(src, counts, events)
    for port, port_out in zip(switch.ports, ports, strict=True):
        if port_out is not None:
            port.native_applied(port_out)
    if nomem:
        raise MemoryError("the native switch ran out of memory (the rest of the batch is lost)")


def _vanished(switch: Switch, port: Any) -> None:
    """A switch call faulted in a guarded mapping (a front-end shrank its memory):
    the memories whose files shrank leave the native path; when none did (it grew
    back meanwhile), every memory the call could touch with a guarded mapping."""
    memories = [port.memory, *(getattr(p, "memory", None) for p in switch.ports)]
    native_fault([m for m in memories if m is not None])


def pending_frames(rest: bytes, offset: int) -> list[bytes]:
    """The frames of a ``rest`` from ``offset`` (u32 length, bytes; built by the native call)."""
    frames = []
    off = offset
    while off < len(rest):
        n = int.from_bytes(rest[off:off + 4], "little")
        frames.append(rest[off + 4:off + 4 + n])
        off += 4 + n
    return frames


def run(port: Any, q: SplitQueue, budget: int, switch: Switch, uplink: Any) -> bool:
    """Switch up to ``budget`` chains of transmit ring ``q`` natively.

    ``uplink(port, frame)`` forwards a frame Python must see (the port's uplink:
    :meth:`Switch.forward`).  Returns False, having done nothing, when the batch
    is Python's (see the module docstring); True when it ran (the caller
    publishes the transmit ring as after its own loop).

    Raises:
        MemoryError: an allocation failed in the native call (what it did is applied).
    """
    native: NativeVring | None = q.native
    args = q.native_args()
    if native is None or args is None or port not in switch.ports:
        return False
    table = switch.native_table()
    if table is None or len(switch.table) + budget > switch.max_entries:
        return False
    src = next(i for i, p in enumerate(switch.ports) if p is port)
    targets = tuple(_target(p, port) for p in switch.ports)
    try:
        out = native.switch_tx(*args, budget, port.hdr_len, q.enabled, src, table, targets)
    except OSError as exc:
        if not is_vanished(exc):
            raise
        _vanished(switch, port)  # nothing was adopted: the batch is Python's
        return False
    tx = out[0]
    assert tx is not None
    _, last_avail_idx, used_idx, malformed, error, broken, packets, nbytes, dropped = tx
    q.native_done(last_avail_idx, used_idx, malformed, error, broken)
    c = q.counters
    c.packets += packets
    c.bytes += nbytes
    c.dropped += dropped
    _apply(switch, port, out)
    frame, rest, offset = out[3], out[4], out[5]
    while frame is not None:
        uplink(port, frame)
        if rest is None:
            break
        table = switch.native_table()
        if table is None or len(switch.table) + budget > switch.max_entries:
            for later in pending_frames(rest, offset):
                uplink(port, later)
            break
        targets = tuple(_target(p, port) for p in switch.ports)
        try:
            out = native.switch_frames(rest, offset, src, table, targets)
        except OSError as exc:
            if not is_vanished(exc):
                raise
            _vanished(switch, port)  # nothing was adopted: the rest is Python's
            for later in pending_frames(rest, offset):
                uplink(port, later)
            break
        _apply(switch, port, out)
        frame, rest, offset = out[3], out[4], out[5]
    return True
