"""The virtio-net port device behind one vhost-user socket (device layer).

Theory of operation
-------------------
A :class:`VirtioNetPort` is the handler a
:class:`~appliance.net.vhost_protocol.BackendConnection` calls, one method per
request, and a port of the :class:`~appliance.net.switch.Switch`.  It lives as
long as the service; connections come and go (a disconnect stops and forgets
every ring, the next connection configures them again), and its counters
survive them.

Queues follow virtio-net (virtio 1.2 §5.1.2): ring ``2k`` is receiveq k (we
write frames *to* the guest), ring ``2k+1`` is transmitq k (the guest sends).
Counters use the switch-port view: ``rx_*`` are frames received from the
guest (its transmit rings), ``tx_*`` frames transmitted to the guest.

* Transmit rings (guest → us) are drained on kicks by the runtime calling
  :meth:`process_tx` with a budget, which takes the batch with
  :meth:`SplitQueue.drain <appliance.net.virtqueue.SplitQueue.drain>` (one
  native call when the fast path runs, :meth:`use_native`); each chain's readable bytes are one
  virtio-net header (12 bytes with VERSION_1 or MRG_RXBUF, else 10) and one
  Ethernet frame.  A ring that is started but disabled is processed and its
  frames discarded (vhost-user.rst "Ring states").  The walker refuses, as
  malformed and before a byte is read, chains with writable buffers and
  chains with more readable bytes than the header plus :attr:`max_frame`;
  headers asking for GSO or checksum offload (never offered) and runts are
  dropped.
* Frames for the guest arrive through :meth:`deliver`.  One receive ring is
  chosen among the ready, enabled ones by a hash of the MAC pair; with
  MRG_RXBUF a frame may span several chains (``num_buffers``), otherwise one
  chain must hold header and frame.  Chains with readable buffers are
  malformed (refused by the walker).  Whatever a chain's writable total, only
  the header and frame are written and nothing is allocated for the rest.  No
  buffer means a drop: the switch does not queue.  The ring work is
  :func:`~appliance.net.receive.write_frame` (one native call when the fast
  path runs); the port counts its outcome.  Used indices are
  published, and the guest interrupted, once per batch in :meth:`flush`.
* With the native fast path and the port on a switch (:attr:`switch`), a
  transmit batch is drained, checked, switched and written into the
  destination ports' receive rings in one native call
  (:mod:`appliance.net.native_switch`), same checks, counters and writes;
  frames one of Python's destinations must see are handed back to the switch.

Offered features: VERSION_1, MRG_RXBUF, RING_EVENT_IDX, RING_INDIRECT_DESC,
MTU, STATUS, MQ, VHOST_F_LOG_ALL and VHOST_USER_F_PROTOCOL_FEATURES; no
checksum or segmentation offloads, no packed rings.

Dirty logging (migration): with a log shared (SET_LOG_BASE, :meth:`set_log`)
and LOG_ALL negotiated, the port installs a
:class:`~appliance.net.dirty_log.VhostLog` as the memory's dirty log, so every
receive-buffer write marks its pages inside the accessor, and each time a
ring's used index is published the whole used ring is marked at its
``log_guest_addr`` when the ring has VHOST_VRING_F_LOG.  Marks follow the
writes in the same loop turn, before any reply (GET_VRING_BASE included) goes
out, so a front-end that syncs the log after stopping the rings sees them all.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.errors import LocalProtocolError
from appliance.memory import ClientMemory
from appliance.net import native_switch
from appliance.net import vhost_wire as vw
from appliance.net.descriptor_chain import MAX_CHAIN_BYTES
from appliance.net.dirty_log import VhostLog
from appliance.net.native import NativePortOut, NativeTarget, NativeVring
from appliance.net.receive import Outcome, write_frame
from appliance.net.switch import Switch
from appliance.net.vhost_wire import Feature as F
from appliance.net.virtqueue import SplitQueue
from appliance.net.vring_state import QueueCounters, VringState
from appliance.protocol_common import close_quietly

log = logging.getLogger("appliance.net")

OFFERED_FEATURES = int(F.VERSION_1 | F.NET_MRG_RXBUF | F.RING_EVENT_IDX | F.RING_INDIRECT_DESC
                       | F.NET_MTU | F.NET_STATUS | F.NET_MQ | F.PROTOCOL_FEATURES | F.LOG_ALL)
_VRING_F_LOG = int(vw.VringAddrFlag.LOG)
ETH_HEADER = 14
ETH_VLAN_HEADER = 18  # Ethernet header with one 802.1Q tag
MIN_MTU, MAX_MTU = 68, 65535
MAX_FRAME = MAX_MTU + ETH_VLAN_HEADER  # the largest frame we forward (no GSO)
DEFAULT_MTU = 1500
_GSO_NONE = vw.NET_HDR_GSO_NONE
_NEEDS_CSUM = int(vw.NetHdrFlag.NEEDS_CSUM)


@dataclass(frozen=True)
class PortRingState:
    """One ring of a port as a value: the ring, its SET_VRING_ENABLE (None:
    never sent) and whether the front-end polls it (no kick fd)."""

    ring: VringState
    enable: bool | None
    polled: bool


@dataclass(frozen=True)
class PortDeviceState:
    """What a front-end set on a port besides its rings' fds (:meth:`VirtioNetPort.handoff_state`)."""

    status: int
    mtu: int
    mtu_told: bool
    vrings: tuple[PortRingState, ...]


class FrameSink(Protocol):
    def write(self, frame: bytes) -> None: ...


Uplink = Callable[[Any, bytes], None]


def rarp_frame(mac: bytes) -> bytes:
    """The broadcast RARP request a migrated guest's backend sends for it (SEND_RARP)."""
    arp = (b"\x00\x01\x08\x00\x06\x04\x00\x03" + mac + bytes(4) + mac + bytes(4))
    frame = b"\xff" * 6 + mac + b"\x80\x35" + arp
    return frame + bytes(60 - len(frame))


class VirtioNetPort:
    """One virtio-net device: vhost-user request handler and switch port."""

    def __init__(self, name: str, mac: bytes, queue_pairs: int = 1,
                 pcap: FrameSink | None = None) -> None:
        self.name = name
        self.mac = mac
        self.queue_pairs = queue_pairs
        self.pcap = pcap
        #: mmap guest memory that could still shrink (net.map_unsealed_memory: trusted only)
        self.map_unsealed_memory = False
        self.rings = [SplitQueue(i) for i in range(2 * queue_pairs)]
        self.kick: list[int | None] = [None] * len(self.rings)
        self.call: list[int | None] = [None] * len(self.rings)
        self.err: list[int | None] = [None] * len(self.rings)
        self.kick_polled = [False] * len(self.rings)
        self._explicit_enable: list[bool | None] = [None] * len(self.rings)
        self.features = 0
        self.protocol_negotiated = False
        self.status = 0
        self.mtu = DEFAULT_MTU
        self.mtu_told = False  # NET_SET_MTU came on this connection
        self.hdr_len = vw.NetHdr.SIZE
        self.mrg = False
        self.memory: ClientMemory | None = None
        self.connected = False
        self.connections = 0
        self.rarps = 0
        self.tx_no_queue = 0  # frames for the guest while no receive ring was usable
        # Runtime hooks: signal an eventfd; give up an fd (unwatch, close); the switch.
        self.notify: Callable[[int], None] = lambda fd: None
        self.retire_fd: Callable[[int], None] = close_quietly
        self.uplink: Uplink = lambda port, frame: None
        #: the switch ``uplink`` forwards to (None: not known, every batch runs in Python)
        self.switch: Switch | None = None
        #: True while hooks around ``deliver`` / ``uplink`` must see every frame
        #: (the control plane: a fault rule, the link down): no native switching then
        self.hooked: Callable[[], bool] = lambda: False
        self._rx_active: list[SplitQueue] = []
        self._dirty: set[int] = set()
        self._log_bitmap: Any = None  # the shared log (mmap) from SET_LOG_BASE
        self.log: VhostLog | None = None  # set while LOG_ALL is negotiated and a log is shared
        self._apply_limits()

    # ------------------------------------------------------------ handler: negotiation
    @property
    def num_vrings(self) -> int:
        return len(self.rings)

    def device_features(self) -> int:
        return OFFERED_FEATURES

    def max_queue_pairs(self) -> int:
        return self.queue_pairs

    def set_features(self, features: int) -> None:
        self.features = features
        self.mrg = bool(features & F.NET_MRG_RXBUF)
        modern = features & (F.VERSION_1 | F.NET_MRG_RXBUF)
        self.hdr_len = vw.NetHdr.SIZE if modern else vw.NET_HDR_LEGACY_SIZE
        for ring in self.rings:
            ring.event_idx = bool(features & F.RING_EVENT_IDX)
            ring.indirect = bool(features & F.RING_INDIRECT_DESC)
        self._apply_limits()
        self._apply_log()
        self._refresh()

    def set_protocol_features(self, features: int) -> None:
        self.protocol_negotiated = True
        self._refresh()

    def set_status(self, status: int) -> None:
        old, self.status = self.status, status
        if status & vw.DeviceStatus.DRIVER_OK and not old & vw.DeviceStatus.DRIVER_OK:
            log.info("%s: driver ok (features %#x)", self.name, self.features)

    def get_status(self) -> int:
        return self.status

    def set_mtu(self, mtu: int) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise LocalProtocolError(f"MTU {mtu} outside {MIN_MTU}..{MAX_MTU}")
        self.mtu = mtu
        self.mtu_told = True
        self._apply_limits()

    @property
    def max_frame(self) -> int:
        """The largest frame the driver may transmit (Ethernet header and VLAN tag included).

        The MTU the front-end told (NET_SET_MTU) binds a driver that negotiated
        VIRTIO_NET_F_MTU (virtio 1.2 §5.1.4.1: it "MUST NOT transmit packets
        of size exceeding the value of mtu (plus low level ethernet header
        length)"); otherwise any MTU up to 65535 is the driver's to choose.
        """
        if self.mtu_told and self.features & F.NET_MTU:
            return self.mtu + ETH_VLAN_HEADER
        return MAX_FRAME

    def _apply_limits(self) -> None:
        """Per-chain byte limits for the walker: a transmit chain holds one header
        and one frame and nothing writable; a receive chain nothing readable."""
        tx_bytes = self.hdr_len + self.max_frame
        for i, ring in enumerate(self.rings):
            ring.max_readable, ring.max_writable = (tx_bytes, 0) if i % 2 else (0, MAX_CHAIN_BYTES)

    def use_native(self, native: NativeVring | None) -> None:
        """Run the rings' walks on the native fast path (None: the Python one)."""
        for ring in self.rings:
            ring.native = native
            if self.memory is not None:
                ring.attach(self.memory)  # the native views of its areas, or none

    def send_rarp(self, mac: bytes) -> None:
        self.rarps += 1
        self.uplink(self, rarp_frame(mac))

    # ------------------------------------------------------------ handler: memory and rings
    def set_memory(self, memory: ClientMemory | None) -> None:
        if memory is None:
            self.flush()
            for ring in self.rings:
                ring.detach()
        else:
            self.connected = True
            for ring in self.rings:
                ring.attach(memory)
        self.memory = memory
        self._apply_log()
        self._refresh()

    def set_log(self, bitmap: Any) -> None:
        """SET_LOG_BASE: the shared log bitmap (an mmap), or None when it goes away."""
        self._log_bitmap = bitmap
        self._apply_log()

    def _apply_log(self) -> None:
        if self._log_bitmap is not None and self.features & F.LOG_ALL:
            if self.log is None or self.log.bitmap is not self._log_bitmap:
                self.log = VhostLog(self._log_bitmap)
        else:
            self.log = None
        if self.memory is not None:
            self.memory.dirty_log = self.log

    def _log_used(self, q: SplitQueue) -> None:
        """Mark ring ``q``'s used ring (flags, idx, ring[size], avail_event) in the log."""
        if self.log is not None and q.addr_flags & _VRING_F_LOG:
            self.log.mark(q.log_guest_addr, 6 + 8 * q.size)

    def set_vring_num(self, index: int, num: int) -> None:
        self.rings[index].set_num(num)

    def set_vring_addr(self, addr: vw.VringAddr) -> None:
        self.rings[addr.index].set_addr(addr.desc_user_addr, addr.used_user_addr,
                                        addr.avail_user_addr, addr.log_guest_addr, addr.flags)
        self._refresh()

    def set_vring_base(self, index: int, base: int) -> None:
        self.rings[index].set_base(base)

    def get_vring_base(self, index: int) -> int:
        """Stop the ring: what the driver already made available on a transmit
        ring is taken first, so nothing it counted as sent goes missing."""
        ring = self.rings[index]
        if index % 2:
            for _ in range(ring.size + 1):
                if not self.process_tx(index, ring.size or 1):
                    break
        if self._dirty:
            self.flush()
        base = ring.stop()
        fd, self.kick[index] = self.kick[index], None
        self.kick_polled[index] = False
        if fd is not None:
            self.retire_fd(fd)
        self._refresh()
        return base

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self.rings[index].start()
        old, self.kick[index] = self.kick[index], fd
        self.kick_polled[index] = fd is None
        if old is not None and old != fd:
            self.retire_fd(old)
        self._refresh()

    def set_vring_call(self, index: int, fd: int | None) -> None:
        old, self.call[index] = self.call[index], fd
        if old is not None and old != fd:
            self.retire_fd(old)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        old, self.err[index] = self.err[index], fd
        if old is not None and old != fd:
            self.retire_fd(old)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._explicit_enable[index] = enable
        self._refresh()

    def reset(self) -> None:
        """RESET_OWNER / RESET_DEVICE: every ring stopped and unconfigured."""
        self.flush()
        for i, ring in enumerate(self.rings):
            for fds in (self.kick, self.call, self.err):
                fd, fds[i] = fds[i], None
                if fd is not None:
                    self.retire_fd(fd)
            ring.reset()
            if self.memory is not None:
                ring.attach(self.memory)
        self.kick_polled = [False] * len(self.rings)
        self._explicit_enable = [None] * len(self.rings)
        self.status = 0
        self.set_features(self.features)  # rings forgot EVENT_IDX / INDIRECT_DESC; refreshes

    def disconnect(self) -> None:
        """The front-end is gone: forget the connection's state (counters stay)."""
        self.reset()
        for ring in self.rings:
            ring.detach()
        self.memory = None
        self.connected = False
        self.features = 0
        self.protocol_negotiated = False
        self.mtu = DEFAULT_MTU
        self.mtu_told = False
        self._log_bitmap = None
        self.set_features(0)
        self._dirty.clear()
        self._refresh()

    def _refresh(self) -> None:
        default = not (self.protocol_negotiated or self.features & F.PROTOCOL_FEATURES)
        for i, ring in enumerate(self.rings):
            explicit = self._explicit_enable[i]
            ring.enabled = default if explicit is None else explicit
        self._rx_active = [r for r in self.rings[0::2] if r.ready and r.enabled]

    # ------------------------------------------------------------ runtime surface
    def kick_fds(self) -> dict[int, int]:
        """Kick eventfds worth watching: started transmit rings (fd -> ring index).

        Receive-ring kicks only say "more buffers"; frames are dropped rather
        than queued when there are none, so nobody needs to wake for those.
        """
        return {fd: i for i, fd in enumerate(self.kick)
                if fd is not None and i % 2 and self.rings[i].started}

    def polled_rings(self) -> list[int]:
        """Started transmit rings whose front-end asked for polling (no kick fd)."""
        return [i for i in range(1, len(self.rings), 2)
                if self.kick_polled[i] and self.rings[i].started]

    @property
    def link_up(self) -> bool:
        return bool(self._rx_active) or any(r.ready for r in self.rings[1::2])

    # ------------------------------------------------------------ guest -> switch
    def process_tx(self, index: int, budget: int) -> bool:
        """Take up to ``budget`` frames from transmit ring ``index``.

        Returns:
            True when more chains are waiting (call again without a kick).
        """
        q = self.rings[index]
        if not q.ready:
            return False
        switch = self.switch
        if (switch is None or q.native is None or self.pcap is not None or self.hooked()
                or not native_switch.run(self, q, budget, switch, self.uplink)):
            self._process_tx_python(q, budget)
        call = self.call[index]
        wants_irq = q.publish()
        self._log_used(q)
        if wants_irq and call is not None:
            self.notify(call)
        if q.avail_pending():
            q.suppress_kicks()  # the runtime calls again without waiting for a kick
            return True
        return q.arm_kick()

    def _process_tx_python(self, q: SplitQueue, budget: int) -> None:
        """The reference of a transmit batch: drain, check and count, forward."""
        c = q.counters
        hdr_len = self.hdr_len
        forward = self.uplink
        pcap = self.pcap
        enabled = q.enabled
        for data in q.drain(budget):  # the walker refused writable and oversized chains
            size = len(data) - hdr_len
            if size < 0:
                c.malformed += 1
                continue
            c.packets += 1
            c.bytes += size
            if (not enabled or data[1] != _GSO_NONE or data[0] & _NEEDS_CSUM
                    or size < ETH_HEADER):
                c.dropped += 1
                continue
            frame = data[hdr_len:]
            if pcap is not None:
                pcap.write(frame)
            forward(self, frame)

    # ------------------------------------------------------------ switch -> guest
    def deliver(self, frame: bytes) -> None:
        """Write one frame into a receive ring (published at :meth:`flush`)."""
        active = self._rx_active
        if not active:
            self.tx_no_queue += 1
            return
        q = active[0] if len(active) == 1 else active[zlib.crc32(frame[:12]) % len(active)]
        c = q.counters
        outcome = write_frame(q, frame, self.hdr_len, self.mrg, self.log)
        if outcome is Outcome.NO_BUFFER:
            c.dropped += 1
            return
        self._dirty.add(q.index)
        if outcome is Outcome.TOO_SMALL:
            c.dropped += 1
            return
        if outcome is Outcome.FAULT:
            c.malformed += 1
            return
        c.packets += 1
        c.bytes += len(frame)
        if self.pcap is not None:
            self.pcap.write(frame)

    def native_target(self) -> NativeTarget:
        """This port as a destination of the native switch, or None when every frame
        for it must go through :meth:`deliver` in Python (a pcap, a hook, a usable
        receive ring that does not run natively, memory whose dirty log is not ours).

        Returns:
            ``(hdr_len, mrg, log bitmap or None, rings)``, ``rings`` the usable
            receive rings in :meth:`deliver`'s order as ``(ready, *native_args)``.
        """
        if self.pcap is not None or self.hooked():
            return None
        rings = []
        for q in self._rx_active:
            args = q.native_args()
            if args is None:
                return None
            rings.append((q.ready, *args))
        if rings and (self.memory is None or self.memory.dirty_log is not self.log):
            return None
        return (self.hdr_len, self.mrg, None if self.log is None else self.log.bitmap,
                tuple(rings))

    def native_applied(self, out: NativePortOut) -> None:
        """Adopt what the native switch did to this port (its :meth:`native_target`)."""
        assert out is not None
        no_queue, beyond, rings = out
        self.tx_no_queue += no_queue
        if self.log is not None:
            self.log.beyond += beyond
        for q, ring in zip(self._rx_active, rings, strict=True):
            last_avail_idx, used_idx, malformed, error, broken, packets, nbytes, dropped, dirty = ring
            q.native_done(last_avail_idx, used_idx, malformed, error, broken)
            c = q.counters
            c.packets += packets
            c.bytes += nbytes
            c.dropped += dropped
            if dirty:
                self._dirty.add(q.index)

    def flush(self) -> None:
        """Publish receive-ring progress; interrupt the guest where it asks."""
        if not self._dirty:
            return
        for index in self._dirty:
            call = self.call[index]
            q = self.rings[index]
            wants_irq = q.publish()
            self._log_used(q)
            if wants_irq and call is not None:
                self.notify(call)
        self._dirty.clear()

    # ------------------------------------------------------------ live handoff
    def handoff_blocker(self) -> str:
        """Why this port's connection cannot move to another process faithfully ("" if it can)."""
        if self._log_bitmap is not None or self.features & F.LOG_ALL:
            return "dirty logging is active (the front-end is live-migrating the guest)"
        for ring in self.rings:
            if ring.broken:
                return f"vring {ring.index} is broken ({ring.broken})"
            if ring.unpublished:
                return f"vring {ring.index} has used entries not yet published"
        return ""

    def handoff_state(self) -> PortDeviceState:
        """The connection's device state (the runtime adds the fds).

        Per ring: :meth:`SplitQueue.handoff_state`, the explicit SET_VRING_ENABLE
        value (None: never sent) and whether the front-end asked for polling.
        """
        return PortDeviceState(self.status, self.mtu, self.mtu_told, tuple(
            PortRingState(ring.handoff_state(), self._explicit_enable[i], self.kick_polled[i])
            for i, ring in enumerate(self.rings)))

    def counters_state(self) -> dict[str, Any]:
        """Counters that outlive connections (restored by :meth:`restore_counters`)."""
        return {"connections": self.connections, "rarps": self.rarps,
                "tx_no_queue": self.tx_no_queue,
                "vrings": [ring.counters.as_dict() for ring in self.rings]}

    def restore_counters(self, state: dict[str, Any]) -> None:
        """Take over another process's counters (already validated by the caller)."""
        self.connections = state["connections"]
        self.rarps = state["rarps"]
        self.tx_no_queue = state["tx_no_queue"]
        for ring, counters in zip(self.rings, state["vrings"], strict=True):
            ring.counters = QueueCounters(**counters)

    # ------------------------------------------------------------ counters
    def stats(self) -> dict[str, Any]:
        tx_rings, rx_rings = self.rings[1::2], self.rings[0::2]
        return {
            "mac": ":".join(f"{b:02x}" for b in self.mac),
            "connected": self.connected,
            "connections": self.connections,
            "link": "up" if self.link_up else "down",
            "features": f"{self.features:#x}",
            "status": self.status,
            "mtu": self.mtu,
            "rx_packets": sum(r.counters.packets for r in tx_rings),
            "rx_bytes": sum(r.counters.bytes for r in tx_rings),
            "rx_dropped": sum(r.counters.dropped for r in tx_rings),
            "tx_packets": sum(r.counters.packets for r in rx_rings),
            "tx_bytes": sum(r.counters.bytes for r in rx_rings),
            "tx_dropped": sum(r.counters.dropped for r in rx_rings) + self.tx_no_queue,
            "malformed_chains": sum(r.counters.malformed for r in self.rings),
            "rarps": self.rarps,
            "dirty_logging": self.log is not None,
            "queues": [
                {"index": r.index, "kind": "tx" if r.index % 2 else "rx", "state": r.state.value,
                 "enabled": r.enabled, "size": r.size, "packets": r.counters.packets,
                 "bytes": r.counters.bytes, "dropped": r.counters.dropped,
                 "malformed": r.counters.malformed, **({"broken": r.broken} if r.broken else {})}
                for r in self.rings
            ],
        }
