"""The NVMe host driver against an in-process controller (no socket, no process).

:class:`ControllerBus` is the :class:`~appliance.client.nvme_bus.HostBus` the
unit tests drive an :class:`~appliance.storage.NvmeController` through: guest
memory is a sealable memfd mapped into a :class:`~appliance.memory.ClientMemory`,
interrupts go to a recording :class:`InterruptLog`, BAR0 and config space are
reached through the device's region entry points exactly as the vfio-user
server calls them.  Every doorbell write is handled before the call returns, so
a completion is in the CQ as soon as its submission rang.

``controller_driver(ctrl)`` gives the one driver,
:class:`~appliance.client.nvme.NvmeDriver`, on such a bus.
"""

from __future__ import annotations

import mmap
import os

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import MemoryArea
from appliance.memory import ClientMemory
from appliance.pci.config import COMMAND, PciCommand
from appliance.storage import NvmeController
from appliance.vfio_user.wire import PciIrq, PciRegion

BASE = 0x10_0000  # guest "RAM" starts at 1 MiB
SIZE = 8 << 20


class InterruptLog:
    """The device's irq sink: records (irq index, vector); every eventfd 'exists'.

    With ``eventfds`` (a count) each MSI-X vector below it also has a real
    eventfd, written for every signal as the vfio-user server does and offered
    to the device (:meth:`eventfd`), so native code may write it itself: then
    only :meth:`signalled` (the eventfd counts) sees every interrupt.
    """

    def __init__(self, eventfds: int = 0) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(eventfds)]

    def __call__(self, index: int, sub: int) -> bool:
        self.calls.append((index, sub))
        fd = self.eventfd(index, sub)
        if fd is not None:
            os.eventfd_write(fd, 1)
        return True

    def eventfd(self, index: int, sub: int) -> int | None:
        """The eventfd of MSI-X vector ``sub`` (None: another irq, or no eventfds)."""
        return self.fds[sub] if index == PciIrq.MSIX and 0 <= sub < len(self.fds) else None

    def signalled(self) -> list[int]:
        """Per vector, the eventfd writes since the last call (and reset them)."""
        counts = []
        for fd in self.fds:
            try:
                counts.append(os.eventfd_read(fd))
            except BlockingIOError:
                counts.append(0)
        return counts

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def take(self) -> list[tuple[int, int]]:
        """The interrupts recorded since the last take (and forget them)."""
        calls, self.calls = self.calls, []
        return calls


class ControllerBus:
    """A :class:`~appliance.client.nvme_bus.HostBus` calling an NvmeController directly.

    At construction the controller is attached (guest memory, the interrupt
    log), memory space and bus mastering are enabled, and interrupts are
    configured: every MSI-X vector, or with ``msix`` False the INTx pin (the
    driver still numbers vectors as MSI-X would; the pin carries them all).
    ``auto_poll``: after a store into the doorbell page, run the controller's
    poll (what the runtime's timer does); False leaves it to the test.
    """

    def __init__(self, ctrl: NvmeController, *, msix: bool = True, auto_poll: bool = True,
                 eventfds: bool = False) -> None:
        self.ctrl = ctrl
        self.memory = ClientMemory()
        self.interrupts = InterruptLog(ctrl.vectors if eventfds and msix else 0)
        self.auto_poll = auto_poll
        self._doorbell_mm: mmap.mmap | None = None
        self._mappings: list[mmap.mmap] = []  # this side's view of guest memory
        ctrl.attach(self.memory, self.interrupts,
                    self.interrupts.eventfd if self.interrupts.fds else None)
        cmd = PciCommand.MEMORY | PciCommand.BUS_MASTER
        ctrl.region_write(PciRegion.CONFIG, COMMAND, int(cmd).to_bytes(2, "little"))
        irq = PciIrq.MSIX if msix else PciIrq.INTX
        ctrl.set_irq_count(irq, ctrl.vectors if msix else 1)
        ctrl.irqs_configured(irq)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return self.ctrl.region_read(index, offset, count)

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        self.ctrl.region_write(index, offset, data)

    def map_memory(self, address: int, size: int, *, share: bool) -> MemoryArea:
        """A sealable memfd (as QEMU's), which the controller's ClientMemory mmaps.

        Raises:
            ValueError: ``share`` False (message DMA needs a client; see test_nvme_dma_wait).
        """
        if not share:
            raise ValueError("an in-process controller reaches guest memory through its fd")
        fd = os.memfd_create("guest", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        self._mappings.append(mm)
        self.memory.map(address, size, fd=fd)  # (the memory owns the fd from now on)
        return MemoryArea(address, size, mm, fd)

    def map_doorbells(self) -> memoryview:
        """Map the controller's doorbell page (``doorbells="mmap"``) from its region fd."""
        desc = self.ctrl.region(PciRegion.BAR0)
        if desc.mmap_fd is None or (0x1000, 0x1000) not in desc.mmap_areas:
            raise ValueError(f"BAR0 has no mmap area over the doorbells: {desc.mmap_areas}")
        self._doorbell_mm = mmap.mmap(desc.mmap_fd, 0x1000, offset=0x1000)
        return memoryview(self._doorbell_mm).cast("I")

    def doorbell_stored(self) -> None:
        if self.auto_poll:
            self.ctrl.poll()

    def setup_interrupts(self, enabled: bool) -> tuple[int, list[int]]:
        """Configured at construction; every vector is delivered before the call returns."""
        return (self.ctrl.vectors if enabled else 0), []

    def forget_interrupts(self) -> None:
        self.interrupts.take()

    def close(self) -> None:
        """Unmap guest memory (closing its memfds) and the doorbell page."""
        _open_buses.discard(self)
        if self._doorbell_mm is not None:
            self._doorbell_mm.close()
            self._doorbell_mm = None
        self.memory.unmap_all()
        self.interrupts.close()
        for mm in self._mappings:
            try:
                mm.close()
            except BufferError:  # a view of it is still held: the mapping goes with it
                pass
        self._mappings.clear()


def controller_driver(ctrl: NvmeController, *, msix: bool = True, doorbells: str = "message",
                      auto_poll: bool = True, eventfds: bool = False) -> NvmeDriver:
    """An :class:`NvmeDriver` on a :class:`ControllerBus` of ``ctrl``: guest memory
    at :data:`BASE`, :data:`SIZE` bytes; not enabled yet (``ready()`` or ``setup()``).
    ``eventfds``: every MSI-X vector gets a real eventfd (:class:`InterruptLog`)."""
    bus = ControllerBus(ctrl, msix=msix, auto_poll=auto_poll, eventfds=eventfds)
    _open_buses.add(bus)
    return NvmeDriver(bus, mem_base=BASE, mem_size=SIZE, doorbells=doorbells)


#: the buses :func:`controller_driver` made and nobody closed yet (a driver's
#: ``close()`` closes its bus, which leaves this set)
_open_buses: set[ControllerBus] = set()


def close_all() -> None:
    """Close every bus :func:`controller_driver` made that is still open (a test's
    teardown: guest-memory memfds are fds, which garbage collection does not close)."""
    for bus in list(_open_buses):
        bus.close()
