"""What the NVMe host driver needs of the machine it runs on: the bus.

:class:`~appliance.client.nvme.NvmeDriver` reaches its controller only through
a :class:`HostBus`: the PCI function's regions (config space, BAR0 registers
and doorbells), the guest memory it shares, the doorbell page when the
controller offers one, and interrupts.  :class:`VfioUserBus` is a real
vfio-user socket (the CLI tools, benchmarks and conformance tests);
:class:`appliance.testing.nvme.ControllerBus` drives an ``NvmeController``
in-process, exactly as the vfio-user server calls it (the unit tests).
"""

from __future__ import annotations

import mmap
import os
from typing import Protocol

from appliance.client.vfio_user import MemoryArea, VfioUserClient, eventfd_count, new_eventfd
from appliance.storage import spec
from appliance.vfio_user.wire import PciIrq, PciRegion


class HostBus(Protocol):
    """The PCI function, guest memory and interrupts as the driver sees them."""

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes of region ``index`` (a synchronous barrier)."""
        ...

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        """Write region ``index``; ``posted``: no reply is waited for (a doorbell)."""
        ...

    def map_memory(self, address: int, size: int, *, share: bool) -> MemoryArea:
        """Guest memory at ``address`` the controller may reach (``share``: with its fd)."""
        ...

    def map_doorbells(self) -> memoryview:
        """A dword view of the doorbell page from 1000h, stores land in the
        controller's page.  Raises ValueError when BAR0 has no mmap area there."""
        ...

    def doorbell_stored(self) -> None:
        """A store into the doorbell page happened (the controller polls for it)."""
        ...

    def setup_interrupts(self, enabled: bool) -> tuple[int, list[int]]:
        """Set up the MSI-X vectors; returns (vectors, the eventfd of each vector, or
        none when interrupts arrive without waiting).  ``enabled`` False: (0, [])."""
        ...

    def forget_interrupts(self) -> None:
        """Drop every interrupt signalled so far."""
        ...

    def close(self) -> None:
        """Release what the bus mapped and the fds it made."""
        ...


class VfioUserBus:
    """A :class:`HostBus` over a connected :class:`VfioUserClient`."""

    def __init__(self, client: VfioUserClient) -> None:
        self.client = client
        self.eventfds: list[int] = []
        self._doorbell_mm: mmap.mmap | None = None

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return self.client.region_read(index, offset, count)

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        self.client.region_write(index, offset, data, posted=posted)

    def map_memory(self, address: int, size: int, *, share: bool) -> MemoryArea:
        return self.client.map_memfd(address, size, share_fd=share)

    def map_doorbells(self) -> memoryview:
        """Map BAR0's doorbell page from the region fd; a dword view of it from 1000h."""
        reply = self.client.region_info(PciRegion.BAR0)
        base = reply.info.offset
        for offset, size in reply.sparse_areas:
            if reply.fd is not None and offset <= spec.DOORBELL_BASE < offset + size:
                try:
                    mm = mmap.mmap(reply.fd, size, flags=mmap.MAP_SHARED, offset=base + offset)
                finally:
                    os.close(reply.fd)
                self._doorbell_mm = mm
                return memoryview(mm)[spec.DOORBELL_BASE - offset:].cast("I")
        if reply.fd is not None:
            os.close(reply.fd)
        raise ValueError(f"BAR0 has no mmap area over the doorbells: {reply.sparse_areas}")

    def doorbell_stored(self) -> None:
        """Nothing to do: the server polls its page."""

    def setup_interrupts(self, enabled: bool) -> tuple[int, list[int]]:
        """One eventfd per MSI-X vector the server offers (SET_IRQS)."""
        nvec = self.client.irq_info(PciIrq.MSIX).count if enabled else 0
        if nvec:
            self.eventfds = [new_eventfd() for _ in range(nvec)]
            self.client.set_irq_eventfds(PciIrq.MSIX, self.eventfds)  # (the server gets copies)
        return nvec, self.eventfds

    def forget_interrupts(self) -> None:
        for fd in self.eventfds:
            eventfd_count(fd)

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds.clear()
        if self._doorbell_mm is not None:
            self._doorbell_mm.close()
            self._doorbell_mm = None
