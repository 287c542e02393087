"""A PCI Express endpoint as a vfio-user device: config space, BARs, interrupts.

Theory of operation
-------------------
:class:`PciDevice` implements :class:`~appliance.vfio_user.backend.VfioUserDevice`.
A subclass (the NVMe controller) passes its :class:`Bar` list with read/write
callbacks, an optional :class:`~appliance.pci.msix.MsixLayout`, overrides
:meth:`PciDevice.reset_device` and calls :meth:`PciDevice.signal` to raise
interrupts.  Region accesses dispatch to config space (region 7) or to a BAR;
BAR accesses that fall in the MSI-X table or PBA go to the
:class:`~appliance.pci.msix.MsixTable`, the rest to the BAR's callbacks.

Interrupts (the mode the client picks, masks, pending vectors, INTx and the
``irq_stats`` counters) are :class:`~appliance.pci.interrupts.PciInterrupts`,
a base class of :class:`PciDevice`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from appliance.errors import LocalProtocolError
from appliance.memory import PAGE_SIZE, ClientMemory
from appliance.pci.capabilities import (
    DEVCTL_FLR,
    MSIX_CONTROL,
    MSIX_FUNCTION_MASK,
    PCIE_DEVCTL,
    PM_PMCSR,
    PMCSR,
    SUPPORTED_POWER_STATES,
    add_msix,
    add_pci_express,
    add_power_management,
)
from appliance.pci.config import (
    COMMAND,
    ConfigSpace,
    PciCommand,
    check_range,
    type0_config,
)
from appliance.pci.interrupts import IRQ_NAMES, PciInterrupts
from appliance.pci.msix import MsixLayout, MsixTable
from appliance.vfio_user.backend import IrqEventfd, IrqSink, RegionDesc
from appliance.vfio_user.wire import PCI_NUM_IRQS, PCI_NUM_REGIONS, PciIrq, PciRegion

_BUS_MASTER = int(PciCommand.BUS_MASTER)  # a plain int: checked on every processing pass

CONFIG_REGION_SIZE = 4096


def _read_zeros(offset: int, count: int) -> bytes:
    return bytes(count)


def _ignore_write(offset: int, data: bytes) -> None:
    return None


@dataclass(frozen=True)
class Bar:
    """One memory BAR of the device.

    Attributes:
        index: BAR number 0..5 (a 64-bit BAR also takes ``index + 1``).
        size: bytes, a power of two >= 16.
        read: ``read(offset, count) -> bytes`` of exactly ``count`` bytes.
        write: ``write(offset, data)``.
        is_64bit: 64-bit memory BAR (two BAR slots).
        prefetchable: the Prefetchable bit.
        mmap_areas: ``(offset, size)`` ranges the client may mmap from
            ``mmap_fd`` (sparse mmap); page aligned.  The fd stays the caller's.
        mmap_fd: the fd behind ``mmap_areas``.
        io_fd_areas: ``(offset, size)`` ranges whose writes may arrive through
            an ioeventfd (DEVICE_GET_REGION_IO_FDS).
    """

    index: int
    size: int
    read: Callable[[int, int], bytes] = _read_zeros
    write: Callable[[int, bytes], None] = _ignore_write
    is_64bit: bool = False
    prefetchable: bool = False
    mmap_areas: tuple[tuple[int, int], ...] = ()
    mmap_fd: int | None = None
    io_fd_areas: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class _Window:
    """A sub-range of a BAR served by something other than the BAR callbacks."""

    start: int
    size: int
    read: Callable[[int, int], bytes]
    write: Callable[[int, bytes], None]

    @property
    def end(self) -> int:
        return self.start + self.size


def _inside(offset: int, size: int, limit: int) -> bool:
    return offset >= 0 and size > 0 and offset + size <= limit


def _overlap(a: int, a_size: int, b: int, b_size: int) -> bool:
    return a < b + b_size and b < a + a_size


class PciDevice(PciInterrupts):
    """PCI Express endpoint with PM, MSI-X (optional) and PCIe capabilities (its
    interrupts: :class:`~appliance.pci.interrupts.PciInterrupts`)."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        subsystem_vendor_id: int,
        subsystem_id: int,
        revision: int,
        class_code: int,
        bars: Sequence[Bar],
        interrupt_pin: int = 1,
        msix: MsixLayout | None = None,
    ) -> None:
        """Build config space and the BAR map.

        Raises:
            ValueError: an id does not fit, BARs collide or are malformed, or
                the MSI-X table/PBA do not fit their BARs or overlap mmap areas.
        """
        self.config: ConfigSpace = type0_config(
            vendor_id=vendor_id,
            device_id=device_id,
            subsystem_vendor_id=subsystem_vendor_id,
            subsystem_id=subsystem_id,
            revision=revision,
            class_code=class_code,
            interrupt_pin=interrupt_pin,
        )
        self.interrupt_pin = interrupt_pin
        self.bars: dict[int, Bar] = {}
        taken: set[int] = set()
        for bar in bars:
            slots = {bar.index, bar.index + 1} if bar.is_64bit else {bar.index}
            if slots & taken:
                raise ValueError(f"BAR{bar.index} collides with another BAR")
            self.config.add_bar(bar.index, bar.size, bar.is_64bit, bar.prefetchable)
            self._check_areas(bar)
            taken |= slots
            self.bars[bar.index] = bar
        self._windows: dict[int, list[_Window]] = {}
        self.msix: MsixTable | None = None
        self.pm_offset = add_power_management(self.config)
        self.msix_offset: int | None = None
        if msix is not None:
            self.msix = MsixTable(msix)
            self._map_msix(self.msix)
            self.msix_offset = add_msix(self.config, msix)
        self.pcie_offset = add_pci_express(self.config)
        self.config.freeze()

        self.memory: ClientMemory | None = None
        self._irq_sink: IrqSink | None = None
        self._irq_eventfd: IrqEventfd | None = None
        self._irq_counts = [0] * PCI_NUM_IRQS
        self._client_masked: list[set[int]] = [set() for _ in range(PCI_NUM_IRQS)]
        self._msi_pending: set[int] = set()
        self.irq_stats: dict[str, dict[str, int]] = {
            name: {"signalled": 0, "pending": 0, "dropped": 0} for name in IRQ_NAMES.values()
        }

    # ------------------------------------------------------------ construction
    @staticmethod
    def _check_areas(bar: Bar) -> None:
        for offset, size in bar.mmap_areas:
            if not _inside(offset, size, bar.size) or offset % PAGE_SIZE or size % PAGE_SIZE:
                raise ValueError(f"BAR{bar.index}: mmap area {offset:#x}+{size:#x} invalid")
        if bar.mmap_areas and bar.mmap_fd is None:
            raise ValueError(f"BAR{bar.index}: mmap areas without an fd")
        for offset, size in bar.io_fd_areas:
            if not _inside(offset, size, bar.size):
                raise ValueError(f"BAR{bar.index}: io fd area {offset:#x}+{size:#x} invalid")

    def _map_msix(self, msix: MsixTable) -> None:
        """Route the BAR ranges of the MSI-X table and PBA to ``msix``."""
        layout = msix.layout
        for name, index, window in (
            ("table", layout.table_bar, _Window(layout.table_offset, layout.table_size,
                                                msix.read_table, self._msix_table_write)),
            ("PBA", layout.pba_bar, _Window(layout.pba_offset, layout.pba_size,
                                            msix.read_pba, _ignore_write)),  # read-only
        ):
            bar = self.bars.get(index)
            if bar is None or not _inside(window.start, window.size, bar.size):
                raise ValueError(f"MSI-X {name} {window.start:#x}+{window.size:#x} "
                                 f"not inside BAR{index}")
            # The table and PBA must be served here, never mmapped past us.
            if any(_overlap(window.start, window.size, o, n) for o, n in bar.mmap_areas):
                raise ValueError(f"MSI-X {name} overlaps an mmap area of BAR{index}")
            windows = self._windows.setdefault(index, [])
            windows.append(window)
            windows.sort(key=lambda w: w.start)

    # ------------------------------------------------------------ hooks and state
    def reset_device(self) -> None:
        """Subclass hook: return device-specific state to power-on (FLR, reset)."""

    @property
    def bus_master(self) -> bool:
        """Command.Bus Master: the device may DMA (PCI 3.0 section 6.2.2)."""
        return bool(self.config.get(COMMAND, 2) & _BUS_MASTER)

    @property
    def power_state(self) -> int:
        """PMCSR PowerState: 0 = D0, 3 = D3hot."""
        return PMCSR.get(self.config.get(self.pm_offset + PM_PMCSR, 2), "power_state")

    # ------------------------------------------------------------ VfioUserDevice
    def attach(self, memory: ClientMemory, irq: IrqSink, eventfd: IrqEventfd | None = None) -> None:
        """A client connected: keep its memory accessor, irq sink and eventfd lookup."""
        self.memory = memory
        self._irq_sink = irq
        self._irq_eventfd = eventfd

    def detach(self) -> None:
        """The client left: forget memory, irqs and masks, then reset."""
        self.memory = None
        self._irq_sink = None
        self._irq_eventfd = None
        self._irq_counts = [0] * PCI_NUM_IRQS
        for masked in self._client_masked:
            masked.clear()
        self.reset()

    def dma_unmapping(self) -> None:
        """The client unmaps memory: nothing of ours is in flight (devices with DMA
        running outside the loop override this)."""

    def reset(self) -> None:
        """Power-on state: config space, MSI-X table and PBA, then :meth:`reset_device`.

        The client's interrupt configuration (eventfd counts, SET_IRQS masks)
        is the client's and stays; pending interrupts are device state and go.
        """
        self.config.reset()
        if self.msix is not None:
            self.msix.reset()
        self._msi_pending.clear()
        self.reset_device()

    def region(self, index: int) -> RegionDesc:
        """Describe region ``index``: BARs, config space; absent ones have size 0.

        Returns:
            The region's size, access and mmap/ioeventfd areas.

        Raises:
            LocalProtocolError: EINVAL for an index past the VGA region.
        """
        if not 0 <= index < PCI_NUM_REGIONS:
            raise LocalProtocolError(f"no region {index}", errno.EINVAL)
        if index == PciRegion.CONFIG:
            return RegionDesc(size=CONFIG_REGION_SIZE, readable=True, writable=True)
        bar = self.bars.get(index)
        if bar is None:
            return RegionDesc()
        return RegionDesc(
            size=bar.size,
            readable=True,
            writable=True,
            mmap_areas=list(bar.mmap_areas),
            mmap_fd=bar.mmap_fd,
            io_fd_areas=list(bar.io_fd_areas),
        )

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes of region ``index`` at ``offset``.

        Returns:
            Exactly ``count`` bytes.

        Raises:
            LocalProtocolError: EINVAL for an absent region or an access that
                is empty or leaves the region.
        """
        if index == PciRegion.CONFIG:
            return self.config.read(offset, count)
        bar = self._bar(index)
        check_range(offset, count, bar.size, f"BAR{index}")
        parts = []
        for start, size, window in self._split(index, offset, count):
            if window is not None:
                parts.append(window.read(start - window.start, size))
                continue
            data = bar.read(start, size)
            if len(data) != size:
                raise RuntimeError(f"BAR{index} read {start:#x}+{size} returned {len(data)} bytes")
            parts.append(data)
        return b"".join(parts)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` to region ``index`` at ``offset``.

        Raises:
            LocalProtocolError: EINVAL for an absent region or an access that
                is empty or leaves the region.
        """
        if index == PciRegion.CONFIG:
            self._config_write(offset, data)
            return
        bar = self._bar(index)
        check_range(offset, len(data), bar.size, f"BAR{index}")
        for start, size, window in self._split(index, offset, len(data)):
            piece = data[start - offset:start - offset + size]
            if window is not None:
                window.write(start - window.start, piece)
            else:
                bar.write(start, piece)

    # ------------------------------------------------------------ internals
    def _bar(self, index: int) -> Bar:
        bar = self.bars.get(index)
        if bar is None:
            raise LocalProtocolError(f"region {index} is absent", errno.EINVAL)
        return bar

    def _split(
        self, index: int, offset: int, count: int
    ) -> Iterator[tuple[int, int, _Window | None]]:
        """Cut a BAR access into (offset, size, window or None for the callbacks)."""
        pos, end = offset, offset + count
        for window in self._windows.get(index, ()):
            if window.end <= pos or window.start >= end:
                continue
            if pos < window.start:
                yield pos, window.start - pos, None
                pos = window.start
            size = min(end, window.end) - pos
            yield pos, size, window
            pos += size
        if pos < end:
            yield pos, end - pos, None

    def _config_write(self, offset: int, data: bytes) -> None:
        """Apply a config write, then act on the registers whose value changed."""
        config = self.config
        command = config.get(COMMAND, 2)
        pmcsr_at = self.pm_offset + PM_PMCSR
        pmcsr = config.get(pmcsr_at, 2)
        config.write(offset, data)
        end = offset + len(data)

        def touched(register: int, width: int) -> bool:
            return _overlap(offset, end - offset, register, width)

        if touched(pmcsr_at, 2):
            # PM 1.2 section 3.2.4: a write of an unsupported state is discarded.
            new = config.get(pmcsr_at, 2)
            if PMCSR.get(new, "power_state") not in SUPPORTED_POWER_STATES:
                state = PMCSR.get(pmcsr, "power_state")
                config.put(pmcsr_at, 2, PMCSR.set(new, "power_state", state))
        if touched(COMMAND, 2):
            disabled = PciCommand.INTX_DISABLE
            if command & disabled and not config.get(COMMAND, 2) & disabled:
                self._intx_update(held=False)
        if self.msix is not None and self.msix_offset is not None:
            control_at = self.msix_offset + MSIX_CONTROL
            if touched(control_at, 2):
                was_masked = self.msix.function_mask
                self.msix.function_mask = bool(config.get(control_at, 2) & MSIX_FUNCTION_MASK)
                if was_masked and not self.msix.function_mask and self.irq_mode == PciIrq.MSIX:
                    self._flush(PciIrq.MSIX)
        devctl_at = self.pcie_offset + PCIE_DEVCTL
        if touched(devctl_at, 2) and config.get(devctl_at, 2) & DEVCTL_FLR:
            # PCIe base 4.0 section 7.5.3.4: Initiate FLR always reads 0;
            # section 6.6.2: the function returns to its power-on state.
            self.reset()

    def _msix_table_write(self, offset: int, data: bytes) -> None:
        assert self.msix is not None
        touched = self.msix.write_table(offset, data)
        if self.irq_mode == PciIrq.MSIX:
            self._flush(PciIrq.MSIX, touched)
