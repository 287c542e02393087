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

Interrupt mode
~~~~~~~~~~~~~~
The client picks the mode, not config space: QEMU enables MSI-X by sending
DEVICE_SET_IRQS(index=MSIX) with eventfds, as a kernel vfio-pci host driver
enables MSI-X in hardware when that ioctl arrives.  The protocol layer
reports, through :meth:`PciDevice.set_irq_count`, how many sub-indexes of each
irq index the client has enabled, then calls
:meth:`PciDevice.irqs_configured`.  The mode is MSI-X if MSI-X is enabled,
else MSI if MSI is, else INTx.  MSI-X Enable in Message Control is not
consulted.

Masking and pending interrupts
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
* MSI-X and MSI vectors the client masked with SET_IRQS ACTION_MASK are held
  pending (for MSI-X: the PBA bit) and fire on ACTION_UNMASK.  QEMU uses these
  when the MSI-X irq is reported maskable (its ``can_mask_msix``).
* The MSI-X table's Mask bits and Function Mask hold vectors back as well,
  but only once the client has written the table through REGION_WRITE; QEMU
  never does (it keeps its own copy), our client library does.  See
  :mod:`appliance.pci.msix`.  Unmasking there fires pending vectors too.
* A vector that finds no eventfd (the irq sink returns False) is counted as
  dropped and stays pending; it is retried when the client next changes its
  eventfds, so an interrupt raised while the client sets up is not lost.
* INTx is level-triggered (PCI 3.0 section 6.2.3, Interrupt Status): a
  signal sets Status.Interrupt; the line is signalled when Command.Interrupt
  Disable is clear, the mode is INTx and the client has not masked it.  As
  in vfio-pci, INTx is automasked once signalled: it stays masked until the
  client's ACTION_UNMASK, which re-signals if the device still asserts it.
  :meth:`PciDevice.deassert_intx` lowers the line.

``irq_stats`` counts, per irq type, deliveries that reached an eventfd
("signalled"), signals held back by a mask ("pending") and delivery attempts
that found no eventfd ("dropped"), for the control socket.
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
    STATUS,
    ConfigSpace,
    PciCommand,
    PciStatus,
    check_range,
    type0_config,
)
from appliance.pci.msix import MsixLayout, MsixTable
from appliance.vfio_user.backend import IrqDesc, IrqEventfd, IrqSink, RegionDesc
from appliance.vfio_user.wire import PCI_NUM_IRQS, PCI_NUM_REGIONS, PciIrq, PciRegion

_BUS_MASTER = int(PciCommand.BUS_MASTER)  # a plain int: checked on every processing pass

CONFIG_REGION_SIZE = 4096
IRQ_NAMES = {
    PciIrq.INTX: "intx",
    PciIrq.MSI: "msi",
    PciIrq.MSIX: "msix",
    PciIrq.ERR: "err",
    PciIrq.REQ: "req",
}


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


class PciDevice:
    """PCI Express endpoint with PM, MSI-X (optional) and PCIe capabilities."""

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
    def vectors(self) -> int:
        """How many interrupt vectors :meth:`signal` accepts (MSI-X table size, or 1)."""
        return self.msix.vectors if self.msix is not None else 1

    @property
    def irq_mode(self) -> PciIrq:
        """The interrupt type :meth:`signal` uses now: MSIX, MSI or INTX."""
        if self._irq_counts[PciIrq.MSIX]:
            return PciIrq.MSIX
        if self._irq_counts[PciIrq.MSI]:
            return PciIrq.MSI
        return PciIrq.INTX

    @property
    def intx_asserted(self) -> bool:
        """Status.Interrupt: the device asserts its INTx line."""
        return bool(self.config.get(STATUS, 2) & PciStatus.INTERRUPT)

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

    def irq(self, index: int) -> IrqDesc:
        """Describe irq type ``index`` as DEVICE_GET_IRQ_INFO reports it.

        INTx is maskable and automasked (as vfio-pci reports it); MSI-X is
        maskable (per-vector SET_IRQS masks, see module docstring); MSI is
        absent (no MSI capability); ERR and REQ are one eventfd each.

        Raises:
            LocalProtocolError: EINVAL for an unknown index.
        """
        if index == PciIrq.INTX:
            return IrqDesc(count=1 if self.interrupt_pin else 0, maskable=True, automasked=True)
        if index == PciIrq.MSI:
            return IrqDesc(count=0, noresize=True)
        if index == PciIrq.MSIX:
            return IrqDesc(count=self.msix.vectors if self.msix else 0, maskable=True)
        if index in (PciIrq.ERR, PciIrq.REQ):
            return IrqDesc(count=1)
        raise LocalProtocolError(f"no irq index {index}", errno.EINVAL)

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

    def irq_mask(self, index: int, start: int, count: int, masked: bool) -> None:
        """The client masked or unmasked sub-indexes ``start .. start+count-1``.

        Unmasking delivers what is pending (INTx: re-signals if still asserted).

        Raises:
            LocalProtocolError: EINVAL when ``index`` is not maskable or the
                range leaves its count.
        """
        desc = self.irq(index)
        if not desc.maskable or start < 0 or count < 0 or start + count > desc.count:
            raise LocalProtocolError(
                f"cannot mask irq {index} sub-indexes {start}+{count}", errno.EINVAL
            )
        subs = range(start, start + count)
        if masked:
            self._client_masked[index].update(subs)
            return
        self._client_masked[index].difference_update(subs)
        if index == PciIrq.INTX:
            self._intx_update(held=False)
        elif index == (mode := self.irq_mode):
            self._flush(mode, subs)

    def set_irq_count(self, index: int, count: int) -> None:
        """How many sub-indexes of ``index`` the client has enabled; 0 = disabled.

        Enabling or disabling an index drops the client's masks for it (a
        fresh enable starts unmasked, as in vfio-pci).

        Raises:
            LocalProtocolError: EINVAL for an unknown index or a count above
                what :meth:`irq` reports.
        """
        desc = self.irq(index)
        if not 0 <= count <= desc.count:
            raise LocalProtocolError(
                f"irq {index}: {count} sub-indexes, device has {desc.count}", errno.EINVAL
            )
        if (self._irq_counts[index] == 0) != (count == 0):
            self._client_masked[index].clear()
        self._irq_counts[index] = count

    def irqs_configured(self, index: int) -> None:
        """The client's eventfds changed: deliver what is pending in the current mode."""
        mode = self.irq_mode
        if mode == PciIrq.INTX:
            self._intx_update(held=False)
        else:
            self._flush(mode)

    # ------------------------------------------------------------ device side
    def signal(self, vector: int) -> None:
        """Raise interrupt ``vector`` in the current mode (see module docstring).

        In INTx mode every vector asserts the one line; in MSI mode vectors
        past the enabled count share vector 0.

        Raises:
            ValueError: ``vector`` is not below :attr:`vectors`.
        """
        if not 0 <= vector < self.vectors:
            raise ValueError(f"vector {vector} not in 0..{self.vectors - 1}")
        mode = self.irq_mode
        if mode == PciIrq.INTX:
            self.config.set_bits(STATUS, 2, PciStatus.INTERRUPT, True)
            self._intx_update(held=True)
            return
        if mode == PciIrq.MSI and vector >= self._irq_counts[PciIrq.MSI]:
            vector = 0
        if self._vector_masked(mode, vector):
            self._set_pending(mode, vector, True)
            self.irq_stats[IRQ_NAMES[mode]]["pending"] += 1
            return
        self._set_pending(mode, vector, not self._fire(mode, vector))

    def msix_eventfd(self, vector: int) -> int | None:
        """The eventfd a write of which is what :meth:`signal` would do for
        ``vector`` now, or None: not MSI-X, masked, pending, or no eventfd (then
        only :meth:`signal` raises it).  The caller counts what it signals
        (:meth:`count_signalled`)."""
        if (self.irq_mode != PciIrq.MSIX or self._irq_eventfd is None
                or not 0 <= vector < self._irq_counts[PciIrq.MSIX]
                or self._vector_masked(PciIrq.MSIX, vector)
                or (self.msix is not None and self.msix.pending(vector))):
            return None
        return self._irq_eventfd(PciIrq.MSIX, vector)

    def count_signalled(self, count: int) -> None:
        """``count`` MSI-X interrupts a native caller signalled through :meth:`msix_eventfd`."""
        self.irq_stats[IRQ_NAMES[PciIrq.MSIX]]["signalled"] += count

    def deassert_intx(self) -> None:
        """Lower the INTx line: clear Status.Interrupt."""
        self.config.set_bits(STATUS, 2, PciStatus.INTERRUPT, False)

    def request_removal(self) -> bool:
        """Ask the client to release the device (REQ irq, sub-index 0).

        Returns:
            True if an eventfd was signalled.
        """
        return self._fire(PciIrq.REQ, 0)

    def report_error(self) -> bool:
        """Report an unrecoverable device error (ERR irq, sub-index 0).

        Returns:
            True if an eventfd was signalled.
        """
        return self._fire(PciIrq.ERR, 0)

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

    def _fire(self, index: PciIrq, sub: int) -> bool:
        """Signal the client's eventfd for (index, sub); count the outcome."""
        sink = self._irq_sink
        ok = sink is not None and sink(index, sub)
        self.irq_stats[IRQ_NAMES[index]]["signalled" if ok else "dropped"] += 1
        return ok

    def _vector_masked(self, index: PciIrq, vector: int) -> bool:
        if vector in self._client_masked[index]:
            return True
        return index == PciIrq.MSIX and self.msix is not None and self.msix.masked(vector)

    def _set_pending(self, index: PciIrq, vector: int, pending: bool) -> None:
        if index == PciIrq.MSIX:
            assert self.msix is not None
            self.msix.set_pending(vector, pending)
        elif pending:
            self._msi_pending.add(vector)
        else:
            self._msi_pending.discard(vector)

    def _flush(self, index: PciIrq, vectors: Sequence[int] | None = None) -> None:
        """Deliver pending vectors of ``index`` (all, or those in ``vectors``) now unmasked."""
        if index == PciIrq.MSIX:
            if self.msix is None:
                return
            pending = self.msix.pending_vectors()
        else:
            pending = sorted(self._msi_pending)
        for vector in pending:
            if vectors is not None and vector not in vectors:
                continue
            if not self._vector_masked(index, vector) and self._fire(index, vector):
                self._set_pending(index, vector, False)

    def _intx_update(self, held: bool) -> None:
        """Signal the INTx line if asserted, enabled, in INTx mode and unmasked.

        ``held`` counts a signal() that a mask or Interrupt Disable holds back.
        """
        if self.irq_mode != PciIrq.INTX or not self.intx_asserted:
            return
        if not self.interrupt_pin:  # no INTx line (Interrupt Pin 0)
            if held:
                self.irq_stats["intx"]["dropped"] += 1
            return
        disabled = self.config.get(COMMAND, 2) & PciCommand.INTX_DISABLE
        if disabled or 0 in self._client_masked[PciIrq.INTX]:
            if held:
                self.irq_stats["intx"]["pending"] += 1
            return
        if self._fire(PciIrq.INTX, 0):
            self._client_masked[PciIrq.INTX].add(0)  # automasked until ACTION_UNMASK
