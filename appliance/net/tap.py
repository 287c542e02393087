"""The host kernel's TAP interface as one more switch port (device layer).

:class:`TapPort` is what the switch sees: frames the kernel sent arrive through
:meth:`TapPort.receive` (and go to the switch), frames the switch delivers are
handed to ``write``, a callable the runtime injects (it owns the TAP fd, which
is non-blocking: ``write`` returns ``False`` when the kernel's queue is full,
and the frame is dropped and counted).  No I/O happens here.

Counters follow a virtio-net port's naming, seen from the switch:
``rx_*`` are frames that entered from the kernel, ``tx_*`` frames sent to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ETH_HEADER = 14
MAX_FRAME = 65535


class TapPort:
    """A switch port whose far side is a kernel TAP interface."""

    def __init__(self, name: str, ifname: str) -> None:
        self.name = name
        self.ifname = ifname
        self.uplink: Callable[[TapPort, bytes], None] = lambda port, frame: None
        self.write: Callable[[bytes], bool] = lambda frame: False
        self.counters = {"rx_packets": 0, "rx_bytes": 0, "rx_dropped": 0,
                         "tx_packets": 0, "tx_bytes": 0, "tx_dropped": 0}

    def receive(self, frame: bytes) -> None:
        """One frame read from the TAP fd (IFF_NO_PI: no packet-info header)."""
        c = self.counters
        if len(frame) < ETH_HEADER:
            c["rx_dropped"] += 1
            return
        c["rx_packets"] += 1
        c["rx_bytes"] += len(frame)
        self.uplink(self, frame)

    def deliver(self, frame: bytes) -> None:
        """The switch sends ``frame`` out of this port."""
        c = self.counters
        if self.write(frame):
            c["tx_packets"] += 1
            c["tx_bytes"] += len(frame)
        else:
            c["tx_dropped"] += 1

    def flush(self) -> None:
        """Nothing to publish: each frame was written as it came."""

    def stats(self) -> dict[str, Any]:
        return {"interface": self.ifname, **self.counters}
