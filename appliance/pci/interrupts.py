"""Interrupts of a PCI Express endpoint: the mode the client picks, masks,
pending vectors and the INTx line (device layer).

:class:`PciInterrupts` is a part of :class:`~appliance.pci.device.PciDevice`
(its base class), kept apart because it is a concern of its own; the device's
constructor sets up the state declared here.

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
from collections.abc import Sequence

from appliance.errors import LocalProtocolError
from appliance.pci.config import COMMAND, STATUS, ConfigSpace, PciCommand, PciStatus
from appliance.pci.msix import MsixTable
from appliance.vfio_user.backend import IrqDesc, IrqEventfd, IrqSink
from appliance.vfio_user.wire import PciIrq

IRQ_NAMES = {
    PciIrq.INTX: "intx",
    PciIrq.MSI: "msi",
    PciIrq.MSIX: "msix",
    PciIrq.ERR: "err",
    PciIrq.REQ: "req",
}


class PciInterrupts:
    """The interrupt methods of :class:`~appliance.pci.device.PciDevice`."""

    # Set by PciDevice.__init__.
    config: ConfigSpace
    interrupt_pin: int
    msix: MsixTable | None
    _irq_sink: IrqSink | None
    _irq_eventfd: IrqEventfd | None
    _irq_counts: list[int]
    _client_masked: list[set[int]]
    _msi_pending: set[int]
    irq_stats: dict[str, dict[str, int]]

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
