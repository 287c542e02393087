"""PciDevice as a VfioUserDevice: regions, irq info, bounds, INTx, ERR/REQ, reset, detach."""

from __future__ import annotations

import errno

import pytest

from appliance.errors import LocalProtocolError
from appliance.memory import ClientMemory
from appliance.pci import Bar, MsixLayout, PciDevice
from appliance.pci.config import COMMAND, STATUS, PciCommand, PciStatus
from appliance.vfio_user.backend import VfioUserDevice
from appliance.vfio_user.wire import PciIrq, PciRegion

INTX = PciIrq.INTX
CFG = PciRegion.CONFIG


class FakeSink:
    """Records (index, sub-index) calls; True only for the eventfds in ``fds``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fds: set[tuple[int, int]] = set()

    def __call__(self, index: int, sub: int) -> bool:
        self.calls.append((index, sub))
        return (index, sub) in self.fds


class Nvmeish(PciDevice):
    """A subclass the way the NVMe controller uses PciDevice."""

    def __init__(self, interrupt_pin: int = 1) -> None:
        self.regs = bytearray(0x4000)
        self.writes: list[tuple[int, bytes]] = []
        self.resets = 0
        super().__init__(
            vendor_id=0x1B36, device_id=0x0010, subsystem_vendor_id=0x1AF4, subsystem_id=0x1100,
            revision=2, class_code=0x010802, interrupt_pin=interrupt_pin,
            bars=[
                Bar(0, 0x4000, read=self.bar0_read, write=self.bar0_write, is_64bit=True,
                    mmap_areas=((0x1000, 0x1000),), mmap_fd=99, io_fd_areas=((0x1000, 8),)),
                Bar(4, 0x1000),
            ],
            msix=MsixLayout(vectors=4),
        )

    def bar0_read(self, offset: int, count: int) -> bytes:
        return bytes(self.regs[offset:offset + count])

    def bar0_write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))
        self.regs[offset:offset + len(data)] = data

    def reset_device(self) -> None:
        self.resets += 1
        self.regs[:] = bytes(len(self.regs))


def make(interrupt_pin: int = 1) -> tuple[Nvmeish, FakeSink]:
    dev = Nvmeish(interrupt_pin)
    sink = FakeSink()
    dev.attach(ClientMemory(), sink)
    return dev, sink


def enable_intx(dev: PciDevice, sink: FakeSink) -> None:
    sink.fds.add((INTX, 0))
    dev.set_irq_count(INTX, 1)
    dev.irqs_configured(INTX)


def test_is_a_vfio_user_device() -> None:
    dev: VfioUserDevice = Nvmeish()
    assert dev.region(CFG).size == 4096


# ---------------------------------------------------------------- regions and irq info
def test_region_descriptions() -> None:
    dev, _ = make()
    bar0 = dev.region(PciRegion.BAR0)
    assert (bar0.size, bar0.readable, bar0.writable) == (0x4000, True, True)
    assert bar0.mmap_areas == [(0x1000, 0x1000)] and bar0.mmap_fd == 99
    assert bar0.io_fd_areas == [(0x1000, 8)]
    assert dev.region(PciRegion.BAR1).size == 0  # upper half of the 64-bit BAR0
    assert dev.region(PciRegion.BAR4).size == 0x1000
    for absent in (PciRegion.BAR2, PciRegion.BAR3, PciRegion.BAR5, PciRegion.ROM,
                   PciRegion.VGA):
        assert dev.region(absent).size == 0
    config = dev.region(CFG)
    assert (config.size, config.readable, config.writable) == (4096, True, True)
    with pytest.raises(LocalProtocolError) as info:
        dev.region(9)
    assert info.value.errno == errno.EINVAL


def test_irq_descriptions() -> None:
    dev, _ = make()
    intx = dev.irq(INTX)
    assert (intx.count, intx.maskable, intx.automasked) == (1, True, True)
    assert dev.irq(PciIrq.MSI).count == 0
    msix = dev.irq(PciIrq.MSIX)
    assert (msix.count, msix.maskable, msix.noresize) == (4, True, False)
    for index in (PciIrq.ERR, PciIrq.REQ):
        desc = dev.irq(index)
        assert (desc.count, desc.maskable, desc.automasked) == (1, False, False)
    assert Nvmeish(interrupt_pin=0).irq(INTX).count == 0
    with pytest.raises(LocalProtocolError) as info:
        dev.irq(5)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(("index", "offset", "count"), [
    (PciRegion.BAR0, 0x4000, 1),
    (PciRegion.BAR0, 0x3FFC, 8),
    (PciRegion.BAR0, -4, 4),
    (PciRegion.BAR0, 0, 0),
    (PciRegion.BAR4, 0x1000, 4),
    (PciRegion.BAR2, 0, 4),  # absent
    (PciRegion.BAR1, 0, 4),  # upper half of a 64-bit BAR
    (PciRegion.ROM, 0, 4),
    (CFG, 4092, 8),
])
def test_region_bounds_are_einval(index: int, offset: int, count: int) -> None:
    dev, _ = make()
    with pytest.raises(LocalProtocolError) as info:
        dev.region_read(index, offset, count)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(LocalProtocolError) as info:
        dev.region_write(index, offset, b"\0" * count)
    assert info.value.errno == errno.EINVAL
    assert dev.writes == []


def test_bar_accesses_reach_callbacks() -> None:
    dev, _ = make()
    dev.region_write(PciRegion.BAR0, 0x14, b"\x01\x00\x46\x00")
    assert dev.writes == [(0x14, b"\x01\x00\x46\x00")]
    assert dev.region_read(PciRegion.BAR0, 0x14, 4) == b"\x01\x00\x46\x00"
    assert dev.region_read(PciRegion.BAR4, 0xFFC, 4) == bytes(4)  # default callbacks
    dev.region_write(PciRegion.BAR4, 0, b"x")


def test_short_callback_read_is_a_bug() -> None:
    dev = PciDevice(vendor_id=1, device_id=2, subsystem_vendor_id=3, subsystem_id=4, revision=0,
                    class_code=0, bars=[Bar(0, 0x1000, read=lambda o, n: b"")])
    with pytest.raises(RuntimeError):
        dev.region_read(PciRegion.BAR0, 0, 4)


# ---------------------------------------------------------------- INTx
def status(dev: PciDevice) -> int:
    return int.from_bytes(dev.region_read(CFG, STATUS, 2), "little")


def set_command(dev: PciDevice, value: int) -> None:
    dev.region_write(CFG, COMMAND, value.to_bytes(2, "little"))


def test_intx_signal_deassert_and_automask() -> None:
    dev, sink = make()
    enable_intx(dev, sink)
    assert dev.irq_mode == INTX
    dev.signal(2)  # every vector shares the one line
    assert status(dev) & PciStatus.INTERRUPT
    assert sink.calls == [(INTX, 0)]
    dev.signal(0)  # automasked until the client unmasks
    assert sink.calls == [(INTX, 0)]
    assert dev.irq_stats["intx"] == {"signalled": 1, "pending": 1, "dropped": 0}
    dev.irq_mask(INTX, 0, 1, False)  # EOI while still asserted: signalled again
    assert sink.calls == [(INTX, 0)] * 2
    dev.deassert_intx()
    assert not status(dev) & PciStatus.INTERRUPT and not dev.intx_asserted
    dev.irq_mask(INTX, 0, 1, False)  # EOI after deassert: nothing to signal
    assert sink.calls == [(INTX, 0)] * 2
    dev.signal(0)
    assert sink.calls == [(INTX, 0)] * 3


def test_intx_disable() -> None:
    dev, sink = make()
    enable_intx(dev, sink)
    set_command(dev, PciCommand.MEMORY | PciCommand.INTX_DISABLE)
    dev.signal(0)
    # Interrupt Status reflects the device's state even when the line is disabled
    # (PCI 3.0 section 6.2.3); the line itself stays quiet.
    assert status(dev) & PciStatus.INTERRUPT
    assert sink.calls == []
    set_command(dev, PciCommand.MEMORY)
    assert sink.calls == [(INTX, 0)]


def test_intx_client_mask() -> None:
    dev, sink = make()
    enable_intx(dev, sink)
    dev.irq_mask(INTX, 0, 1, True)
    dev.signal(0)
    assert sink.calls == []
    dev.irq_mask(INTX, 0, 1, False)
    assert sink.calls == [(INTX, 0)]


def test_intx_without_eventfd_signals_when_configured() -> None:
    dev, sink = make()
    dev.signal(0)
    assert dev.irq_stats["intx"]["dropped"] == 1
    enable_intx(dev, sink)  # level-triggered: still asserted, so it fires now
    assert sink.calls == [(INTX, 0), (INTX, 0)]


def test_no_intx_pin() -> None:
    dev, sink = make(interrupt_pin=0)
    dev.signal(0)
    assert sink.calls == [] and dev.irq_stats["intx"]["dropped"] == 1


def test_intx_mask_checks() -> None:
    dev, _ = make()
    for index, start, count in [(INTX, 0, 2), (INTX, 1, 1), (PciIrq.ERR, 0, 1),
                                (PciIrq.REQ, 0, 1), (7, 0, 1)]:
        with pytest.raises(LocalProtocolError) as info:
            dev.irq_mask(index, start, count, True)
        assert info.value.errno == errno.EINVAL


# ---------------------------------------------------------------- ERR / REQ
def test_request_removal_and_report_error() -> None:
    dev, sink = make()
    assert dev.request_removal() is False  # no eventfd yet
    sink.fds |= {(PciIrq.REQ, 0), (PciIrq.ERR, 0)}
    assert dev.request_removal() is True
    assert dev.report_error() is True
    assert sink.calls == [(PciIrq.REQ, 0), (PciIrq.REQ, 0), (PciIrq.ERR, 0)]
    assert dev.irq_stats["req"] == {"signalled": 1, "pending": 0, "dropped": 1}
    assert dev.irq_stats["err"]["signalled"] == 1


# ---------------------------------------------------------------- reset and detach
def test_reset_restores_power_on_state() -> None:
    dev, sink = make()
    power_on = dev.region_read(CFG, 0, 4096)
    enable_intx(dev, sink)
    set_command(dev, PciCommand.MEMORY | PciCommand.BUS_MASTER)
    dev.region_write(CFG, 0x10, b"\x00\x00\xb0\xfe")
    dev.region_write(CFG, 0x0C, b"\x10")
    dev.region_write(CFG, dev.pm_offset + 4, b"\x03\x00")
    dev.region_write(PciRegion.BAR0, 0x2000, b"\x00\x10\xe0\xfe")  # MSI-X table
    dev.region_write(PciRegion.BAR0, 0x14, b"\x01")
    dev.signal(0)
    assert dev.region_read(CFG, 0, 4096) != power_on
    dev.reset()
    assert dev.region_read(CFG, 0, 4096) == power_on
    assert dev.resets == 1 and dev.regs == bytearray(0x4000)
    assert dev.region_read(PciRegion.BAR0, 0x2000, 16) == b"\0" * 12 + b"\x01\0\0\0"
    assert not dev.bus_master and dev.power_state == 0 and not dev.intx_asserted


def test_detach_resets_and_forgets_client() -> None:
    dev, sink = make()
    enable_intx(dev, sink)
    set_command(dev, PciCommand.MEMORY)
    dev.detach()
    assert dev.resets == 1 and dev.memory is None
    assert dev.region_read(CFG, COMMAND, 2) == b"\0\0"
    dev.signal(0)
    assert sink.calls == []
    assert dev.irq_stats["intx"]["dropped"] == 1


def test_msix_eventfd_only_where_signal_would_write_it() -> None:
    """Native code may write a vector's eventfd itself only when signal() would:
    MSI-X on, the vector unmasked and not pending, an eventfd set."""
    dev = Nvmeish()
    sink = FakeSink()
    fds = {(PciIrq.MSIX, 1): 41}
    sink.fds.add((PciIrq.MSIX, 1))
    dev.attach(ClientMemory(), sink, lambda index, sub: fds.get((index, sub)))
    assert dev.msix_eventfd(1) is None  # INTx mode
    dev.set_irq_count(PciIrq.MSIX, 4)
    dev.irqs_configured(PciIrq.MSIX)
    assert dev.msix_eventfd(1) == 41 and dev.msix_eventfd(2) is None  # no eventfd for 2
    dev.irq_mask(PciIrq.MSIX, 1, 1, True)  # SET_IRQS mask: signal() sets the pending bit
    assert dev.msix_eventfd(1) is None
    dev.signal(1)
    dev.irq_mask(PciIrq.MSIX, 1, 1, False)  # unmasked: the pending vector is delivered
    assert dev.msix_eventfd(1) == 41
    assert sink.calls == [(PciIrq.MSIX, 1)] and dev.irq_stats["msix"]["signalled"] == 1
    dev.count_signalled(3)  # what native code wrote itself
    assert dev.irq_stats["msix"]["signalled"] == 4
    dev.detach()
    assert dev.msix_eventfd(1) is None
