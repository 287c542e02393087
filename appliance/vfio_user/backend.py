"""What the vfio-user server connection needs from a device (protocol layer).

The protocol layer may not import device code, so it states its needs here as
a :class:`typing.Protocol`; :class:`appliance.pci.device.PciDevice` implements
it.  Errors a device raises for a client request are
:class:`appliance.errors.LocalProtocolError` carrying the errno for the reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from appliance.memory import ClientMemory

# (irq index, sub-index) -> True if an eventfd was signalled.
IrqSink = Callable[[int, int], bool]
# (irq index, sub-index) -> the client's eventfd for it, or None (native pollers
# that signal an interrupt themselves, with write(2)).
IrqEventfd = Callable[[int, int], int | None]


@dataclass
class RegionDesc:
    """One region as DEVICE_GET_REGION_INFO reports it."""

    size: int = 0
    readable: bool = False
    writable: bool = False
    # Client-mappable areas (offset, size) inside the region, and the fd to mmap.
    mmap_areas: list[tuple[int, int]] = field(default_factory=list)
    mmap_fd: int | None = None
    # Sub-regions whose writes may arrive through an ioeventfd: (offset, size).
    io_fd_areas: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class IrqDesc:
    """One interrupt type as DEVICE_GET_IRQ_INFO reports it."""

    count: int = 0
    maskable: bool = False
    automasked: bool = False
    noresize: bool = False


class VfioUserDevice(Protocol):
    """Device side of a vfio-user connection."""

    def attach(self, memory: ClientMemory, irq: IrqSink, eventfd: IrqEventfd | None = None) -> None:
        """A client connected: its memory accessor and how to raise interrupts
        (``eventfd``: the eventfd behind an irq, for native code that signals it)."""

    def detach(self) -> None:
        """The client went away: forget its memory and irqs, back to reset state."""

    def reset(self) -> None:
        """DEVICE_RESET: the device returns to its power-on state."""

    def dma_unmapping(self) -> None:
        """The client unmaps memory: finish (wait for) any DMA the device has in flight."""

    def region(self, index: int) -> RegionDesc:
        """Describe region ``index`` (size 0 = absent)."""

    def irq(self, index: int) -> IrqDesc:
        """Describe irq type ``index`` (count 0 = absent)."""

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes; offset/count are already range-checked."""

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data``; offset/length are already range-checked."""

    def irq_mask(self, index: int, start: int, count: int, masked: bool) -> None:
        """The client masked or unmasked interrupts (ACTION_MASK/UNMASK)."""

    def set_irq_count(self, index: int, count: int) -> None:
        """How many sub-indexes of irq ``index`` the client has enabled; 0 = disabled.

        Called after every DEVICE_SET_IRQS ACTION_TRIGGER on ``index``, before
        :meth:`irqs_configured`.  ``count`` follows vfio-pci's notion of an
        enabled index: a DATA_EVENTFD trigger enables sub-indexes
        ``0 .. start+count-1`` even where no fd came with it (QEMU sends a
        trigger without fds on vector 0 to enable MSI-X with no vector in
        use yet), and only DATA_NONE with count 0 disables the index (0).
        The device picks its interrupt mode from these counts (MSI-X, else
        MSI, else INTx) and drops the client's masks of an index that gets
        enabled or disabled.

        Raises:
            LocalProtocolError: EINVAL when ``count`` exceeds :meth:`irq`'s count.
        """

    def irqs_configured(self, index: int) -> None:
        """The set of eventfds for irq ``index`` changed (e.g. MSI-X enabled)."""
