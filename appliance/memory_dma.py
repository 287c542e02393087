"""Message DMA of client memory: the regions a client shared without an fd,
reached only by vfio-user DMA_READ/DMA_WRITE (see :mod:`appliance.memory`,
"Message-only regions never block").

:class:`DmaScope` is one piece of device work's message DMA (what arrived,
what is on its way); :class:`MessageTransport` is what the runtime supplies to
send the messages; :class:`DmaPending` says a read was asked for and the work
runs again once it arrived.  :mod:`appliance.memory` re-exports all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from appliance.errors import ApplianceError


class DmaPending(ApplianceError):
    """A message-only range was asked of the client: run the access again once
    its scope's ``on_ready`` fired (not an error of the guest's)."""


@dataclass(eq=False)
class DmaScope:
    """The message DMA of one piece of device work (an NVMe request, queue work).

    ``reads`` holds what arrived, by (address, count); with ``consume`` each
    arrived read answers once (queue entries and shadow doorbells change: a
    later read must ask again), else it answers every time until the scope
    is dropped (a request run again reads the same buffers).
    """

    consume: bool = False
    on_ready: Callable[[], None] | None = None
    reads: dict[tuple[int, int], bytes] = field(default_factory=dict)
    loading: set[tuple[int, int]] = field(default_factory=set)
    in_flight: int = 0  # our DMA messages without a reply yet
    error: str | None = None  # a DMA the client refused or never answered

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    def take(self, key: tuple[int, int]) -> bytes | None:
        """What arrived for ``key``, if anything."""
        return self.reads.pop(key, None) if self.consume else self.reads.get(key)

    def settle(self) -> None:
        """One DMA message of this scope got its reply (or was given up)."""
        self.in_flight -= 1
        if not self.in_flight and self.on_ready is not None:
            self.on_ready()

    def drop(self) -> None:
        """Forget it: replies still on their way change nothing."""
        self.on_ready = None
        self.reads.clear()
        self.loading.clear()


class MessageTransport(Protocol):
    """How the runtime reaches a region the client did not share as an fd."""

    @property
    def writes_in_flight(self) -> int:
        """DMA writes sent and not acknowledged yet (in any scope)."""

    def dma_read(self, address: int, count: int, scope: DmaScope) -> bytes:
        """What arrived for this range in ``scope``, else ask for it.

        Raises:
            DmaPending: asked for (or still on its way).
            GuestMemoryError: the scope's DMA failed.
        """

    def dma_write(self, address: int, data: bytes, scope: DmaScope) -> None:
        """Post a DMA write (counted in ``scope`` until acknowledged)."""
