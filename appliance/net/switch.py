"""L2 learning switch joining every port and the responder (device layer).

Theory of operation
-------------------
Each frame entering from a port teaches the switch that its source MAC lives
behind that port (unicast sources only).  A frame for a known unicast MAC goes
to that one port (or nowhere when that is the port it came from); a frame for a
broadcast, multicast or unknown MAC is flooded to every other port.  Entries
age out after ``ageing`` seconds; the table holds at most ``max_entries``
(oldest evicted first).  A port going down takes its entries with it
(:meth:`forget`), so traffic for it floods again until it is relearned.

The native fast path switches a transmit batch in C
(:mod:`appliance.net.native_switch`); the table stays here: the C code reads
a snapshot (:meth:`native_table`) and reports what this code must apply
(:meth:`apply_native`), the same learning and ageing :meth:`forward` does.

Ports deliver synchronously but publish lazily: :meth:`flush` asks every port
to make what it received visible (one used-index update and interrupt per
batch instead of per frame).  The clock is injected: this layer keeps no time
of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

BROADCAST = b"\xff" * 6
REFRESH = 1.0  # seconds between timestamp refreshes of a busy entry


class SwitchPort(Protocol):
    name: str

    def deliver(self, frame: bytes) -> None: ...

    def flush(self) -> None: ...


class Switch:
    """MAC learning and forwarding between :class:`SwitchPort` objects."""

    def __init__(self, clock: Callable[[], float] = lambda: 0.0, ageing: float = 300.0,
                 max_entries: int = 4096) -> None:
        self.clock = clock
        self.ageing = ageing
        self.max_entries = max_entries
        self.ports: list[Any] = []
        self.table: dict[bytes, tuple[Any, float]] = {}
        self.counters = {"frames": 0, "forwarded": 0, "flooded": 0, "filtered": 0,
                         "runts": 0, "learned": 0, "moved": 0, "evicted": 0}
        self._version = 0  # bumped by every change of the table or the ports
        self._snapshot: tuple[int, float, bytes | None] | None = None  # native_table's cache

    def attach(self, port: SwitchPort, macs: Iterable[bytes] = ()) -> None:
        """Add a port; ``macs`` are known to live behind it from the start."""
        self.ports.append(port)
        self._version += 1
        for mac in macs:
            self.learn(mac, port)

    def detach(self, port: SwitchPort) -> None:
        self.forget(port)
        self.ports = [p for p in self.ports if p is not port]
        self._version += 1

    def forget(self, port: SwitchPort) -> None:
        """Drop every MAC learned behind ``port`` (it went down)."""
        for mac in [m for m, (p, _) in self.table.items() if p is port]:
            del self.table[mac]
        self._version += 1

    def learn(self, mac: bytes, port: SwitchPort) -> None:
        if mac[0] & 1:
            return
        self._version += 1
        now = self.clock()
        entry = self.table.get(mac)
        if entry is not None:
            if entry[0] is not port:
                self.counters["moved"] += 1
            self.table[mac] = (port, now)
            return
        if len(self.table) >= self.max_entries:
            self._evict(now)
        self.table[mac] = (port, now)
        self.counters["learned"] += 1

    def _evict(self, now: float) -> None:
        stale = [m for m, (_, t) in self.table.items() if now - t > self.ageing]
        for mac in stale:
            del self.table[mac]
        evicted = len(stale)
        if len(self.table) >= self.max_entries:
            del self.table[min(self.table, key=lambda m: self.table[m][1])]
            evicted += 1
        self.counters["evicted"] += evicted

    def lookup(self, mac: bytes) -> Any | None:
        """The port behind ``mac`` if learned and not aged out."""
        entry = self.table.get(mac)
        if entry is None:
            return None
        if self.clock() - entry[1] > self.ageing:
            del self.table[mac]
            self._version += 1
            return None
        return entry[0]

    def forward(self, src: SwitchPort, frame: bytes) -> None:
        """Switch one Ethernet frame that entered through ``src``."""
        counters = self.counters
        counters["frames"] += 1
        if len(frame) < 14:
            counters["runts"] += 1
            return
        smac = frame[6:12]
        if not smac[0] & 1:
            now = self.clock()
            entry = self.table.get(smac)
            if entry is None or entry[0] is not src or now - entry[1] > REFRESH:
                self.learn(smac, src)
        dmac = frame[0:6]
        if not dmac[0] & 1:
            port = self.lookup(dmac)
            if port is not None:
                if port is src:
                    counters["filtered"] += 1
                else:
                    counters["forwarded"] += 1
                    port.deliver(frame)
                return
        counters["flooded"] += 1
        for port in self.ports:
            if port is not src:
                port.deliver(frame)

    # ------------------------------------------------------------ native fast path
    def native_table(self) -> bytes | None:
        """The table as the native switch reads it, or None when it cannot (more
        than 255 ports, a key that is not a MAC).

        Returns:
            8-byte records sorted by MAC: the MAC, the index of its port in
            :attr:`ports` (255: not one of them) and its state now, two flags
            (either may be set without the other: ``ageing`` may be shorter than
            the refresh): 1 due for a refresh (:meth:`forward` would learn it
            again), 2 aged (:meth:`lookup` would remove it).  Cached until the
            table or the ports change or the clock reaches the next state change.
        """
        now = self.clock()
        snap = self._snapshot
        if snap is not None and snap[0] == self._version and now < snap[1]:
            return snap[2]  # before the next change: (t + limit) - t may exceed limit as floats
        index = {id(port): i for i, port in enumerate(self.ports)}
        until = math.inf
        records = []
        for mac, (port, t) in self.table.items():
            age = now - t
            state = (2 if age > self.ageing else 0) | (1 if age > REFRESH else 0)
            for limit in (REFRESH, self.ageing):
                if age <= limit:
                    until = min(until, t + limit)
            records.append(mac + bytes((index.get(id(port), 255), state)))
        table = None
        if len(self.ports) <= 255 and all(len(r) == 8 for r in records):
            records.sort()
            table = b"".join(records)
        self._snapshot = (self._version, until, table)
        return table

    def apply_native(self, src: SwitchPort, counts: tuple[int, int, int, int, int],
                     events: bytes) -> None:
        """What the native switch did with frames from ``src``: its counter increments
        ``(frames, forwarded, flooded, filtered, runts)`` and its ``events``, 7-byte
        records in order: ``b"L"`` and a source MAC :meth:`forward` learns behind
        ``src``, or ``b"A"`` and an aged MAC :meth:`lookup` removed."""
        c = self.counters
        for name, n in zip(("frames", "forwarded", "flooded", "filtered", "runts"), counts,
                           strict=True):
            c[name] += n
        for i in range(0, len(events), 7):
            mac = events[i + 1:i + 7]
            if events[i] == 0x4C:  # "L"
                self.learn(mac, src)
            elif self.table.pop(mac, None) is not None:
                self._version += 1

    def flush(self) -> None:
        """Let every port publish what it received."""
        for port in self.ports:
            port.flush()

    # ------------------------------------------------------------ live handoff
    def handoff_state(self) -> tuple[dict[str, int], tuple[tuple[bytes, str, float], ...]]:
        """The counters and the MAC table: (MAC, port name, age in seconds) entries."""
        now = self.clock()
        return dict(self.counters), tuple((mac, getattr(port, "name", "?"), now - t)
                                          for mac, (port, t) in self.table.items())

    def handoff_restore(self, counters: dict[str, int],
                        table: list[tuple[bytes, SwitchPort, float]]) -> None:
        """Replace counters and table with another process's (validated by the caller);
        ``table`` holds (mac, port, age in seconds)."""
        now = self.clock()
        self.counters = {**self.counters, **counters}
        self.table = {mac: (port, now - age) for mac, port, age in table}
        self._version += 1

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "entries": len(self.table),
                "table": {":".join(f"{b:02x}" for b in mac): getattr(p, "name", "?")
                          for mac, (p, _) in sorted(self.table.items())}}
