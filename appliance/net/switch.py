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

Ports deliver synchronously but publish lazily: :meth:`flush` asks every port
to make what it received visible (one used-index update and interrupt per
batch instead of per frame).  The clock is injected: this layer keeps no time
of its own.
"""

from __future__ import annotations

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

    def attach(self, port: SwitchPort, macs: Iterable[bytes] = ()) -> None:
        """Add a port; ``macs`` are known to live behind it from the start."""
        self.ports.append(port)
        for mac in macs:
            self.learn(mac, port)

    def detach(self, port: SwitchPort) -> None:
        self.forget(port)
        self.ports = [p for p in self.ports if p is not port]

    def forget(self, port: SwitchPort) -> None:
        """Drop every MAC learned behind ``port`` (it went down)."""
        for mac in [m for m, (p, _) in self.table.items() if p is port]:
            del self.table[mac]

    def learn(self, mac: bytes, port: SwitchPort) -> None:
        if mac[0] & 1:
            return
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

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "entries": len(self.table),
                "table": {":".join(f"{b:02x}" for b in mac): getattr(p, "name", "?")
                          for mac, (p, _) in sorted(self.table.items())}}
