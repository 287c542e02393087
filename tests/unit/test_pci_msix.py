"""MSI-X: table and PBA in BAR0, delivery through client eventfds, both mask sources."""

from __future__ import annotations

import errno
import struct

import pytest

from appliance.errors import LocalProtocolError
from appliance.memory import ClientMemory
from appliance.pci import Bar, MsixLayout, MsixTable, PciDevice
from appliance.vfio_user.wire import PciIrq, PciRegion

MSIX = PciIrq.MSIX
TABLE, PBA = 0x2000, 0x3000


class FakeSink:
    """Records (index, sub-index) calls; True only for the eventfds in ``fds``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fds: set[tuple[int, int]] = set()

    def __call__(self, index: int, sub: int) -> bool:
        self.calls.append((index, sub))
        return (index, sub) in self.fds


def make(vectors: int = 8) -> tuple[PciDevice, FakeSink, bytearray]:
    regs = bytearray(0x4000)

    def write(offset: int, data: bytes) -> None:
        regs[offset:offset + len(data)] = data

    bar0 = Bar(0, 0x4000, read=lambda o, n: bytes(regs[o:o + n]), write=write, is_64bit=True)
    dev = PciDevice(vendor_id=0x1B36, device_id=0x0010, subsystem_vendor_id=0x1AF4,
                    subsystem_id=0x1100, revision=2, class_code=0x010802, bars=[bar0],
                    msix=MsixLayout(vectors=vectors))
    sink = FakeSink()
    dev.attach(ClientMemory(), sink)
    return dev, sink, regs


def enable_msix(dev: PciDevice, sink: FakeSink, vectors: range) -> None:
    """What the protocol layer does for SET_IRQS(MSIX, eventfds for ``vectors``)."""
    sink.fds |= {(MSIX, v) for v in vectors}
    dev.set_irq_count(MSIX, vectors.stop)
    dev.irqs_configured(MSIX)


def pba(dev: PciDevice) -> int:
    return int.from_bytes(dev.region_read(PciRegion.BAR0, PBA, 8), "little")


def write_entry(dev: PciDevice, vector: int, masked: bool) -> None:
    entry = struct.pack("<IIII", 0xFEE00000, 0, 0x40 + vector, int(masked))
    dev.region_write(PciRegion.BAR0, TABLE + 16 * vector, entry)


def set_control(dev: PciDevice, value: int) -> None:
    assert dev.msix_offset is not None
    dev.region_write(PciRegion.CONFIG, dev.msix_offset + 2, value.to_bytes(2, "little"))


# ---------------------------------------------------------------- layout and table
@pytest.mark.parametrize("kwargs", [
    {"vectors": 0}, {"vectors": 2049}, {"vectors": 4, "table_offset": 0x2004},
    {"vectors": 4, "pba_bar": 6}, {"vectors": 256, "pba_offset": 0x2800},
])
def test_bad_layout(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        MsixLayout(**kwargs)


def test_layout_must_fit_bar_and_avoid_mmap() -> None:
    ids = {"vendor_id": 1, "device_id": 2, "subsystem_vendor_id": 3, "subsystem_id": 4,
           "revision": 0, "class_code": 0}
    with pytest.raises(ValueError):
        PciDevice(**ids, bars=[Bar(0, 0x2000)], msix=MsixLayout(vectors=4))
    with pytest.raises(ValueError):
        PciDevice(**ids, bars=[Bar(0, 0x4000, mmap_areas=((0x2000, 0x1000),), mmap_fd=5)],
                  msix=MsixLayout(vectors=4))
    with pytest.raises(ValueError):
        PciDevice(**ids, bars=[Bar(0, 0x4000)], msix=MsixLayout(vectors=4, table_bar=2))


def test_power_on_table_and_pba() -> None:
    dev, _, _ = make(vectors=8)
    table = dev.region_read(PciRegion.BAR0, TABLE, 8 * 16)
    for v in range(8):
        assert struct.unpack_from("<IIII", table, 16 * v) == (0, 0, 0, 1)  # masked
    assert pba(dev) == 0
    assert dev.irq(MSIX).count == 8 and dev.irq(MSIX).maskable


def test_table_write_and_reserved_bits() -> None:
    dev, _, _ = make()
    dev.region_write(PciRegion.BAR0, TABLE + 16, struct.pack("<IIII", 0xFEE01000, 1, 0x55,
                                                             0xFFFFFFFE))
    assert dev.msix is not None
    entry = dev.msix.entry(1)
    assert (entry.address_lo, entry.address_hi, entry.data, entry.control) == (
        0xFEE01000, 1, 0x55, 0)


def test_pba_is_read_only() -> None:
    dev, _, regs = make()
    dev.region_write(PciRegion.BAR0, PBA, b"\xff" * 8)
    assert pba(dev) == 0
    assert regs[PBA:PBA + 8] == bytes(8)  # nor did it reach the BAR callbacks


def test_access_straddling_table_is_split() -> None:
    dev, _, regs = make(vectors=8)
    regs[TABLE - 4:TABLE] = b"abcd"
    data = dev.region_read(PciRegion.BAR0, TABLE - 4, 8)
    assert data == b"abcd" + bytes(4)
    end = TABLE + 8 * 16
    dev.region_write(PciRegion.BAR0, end - 4, b"\x01\x02\x03\x04wxyz")
    assert regs[end:end + 4] == b"wxyz"
    assert regs[end - 4:end] == bytes(4)  # the table part did not reach the callbacks


def test_table_bounds() -> None:
    table = MsixTable(MsixLayout(vectors=2))
    with pytest.raises(LocalProtocolError) as info:
        table.read_table(16, 17)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(LocalProtocolError):
        table.read_pba(8, 1)


# ---------------------------------------------------------------- delivery
def test_signal_fires_client_eventfd() -> None:
    dev, sink, _ = make()
    enable_msix(dev, sink, range(8))
    assert dev.irq_mode == MSIX
    dev.signal(3)
    assert sink.calls == [(MSIX, 3)]
    assert dev.irq_stats["msix"] == {"signalled": 1, "pending": 0, "dropped": 0}
    assert pba(dev) == 0


def test_power_on_table_mask_ignored_until_client_writes_table() -> None:
    # QEMU emulates the table: our entries stay at power-on (masked), yet vectors fire.
    dev, sink, _ = make()
    enable_msix(dev, sink, range(8))
    set_control(dev, 0x8000 | 0x4000)  # Message Control writes do not arm the table masks
    dev.signal(0)
    assert sink.calls == [(MSIX, 0)]


def test_client_masked_vector_pends_then_fires_on_unmask() -> None:
    dev, sink, _ = make()
    enable_msix(dev, sink, range(8))
    dev.irq_mask(MSIX, 2, 1, True)
    dev.signal(2)
    dev.signal(2)
    assert sink.calls == []
    assert pba(dev) == 1 << 2
    assert dev.irq_stats["msix"]["pending"] == 2
    dev.signal(5)  # other vectors unaffected
    assert sink.calls == [(MSIX, 5)]
    dev.irq_mask(MSIX, 0, 8, False)
    assert sink.calls == [(MSIX, 5), (MSIX, 2)]  # one message for the pending bit
    assert pba(dev) == 0


def test_table_mask_applies_after_client_writes_table() -> None:
    dev, sink, _ = make()
    enable_msix(dev, sink, range(8))
    write_entry(dev, 1, masked=True)
    dev.signal(1)
    assert sink.calls == [] and pba(dev) == 1 << 1
    dev.signal(0)  # entry 0 is still at power-on: masked, and masks now apply
    assert sink.calls == [] and pba(dev) == 0b11
    write_entry(dev, 1, masked=False)
    assert sink.calls == [(MSIX, 1)] and pba(dev) == 0b01
    write_entry(dev, 0, masked=False)
    assert sink.calls == [(MSIX, 1), (MSIX, 0)] and pba(dev) == 0


def test_function_mask_applies_after_client_writes_table() -> None:
    dev, sink, _ = make()
    enable_msix(dev, sink, range(8))
    write_entry(dev, 4, masked=False)
    set_control(dev, 0x8000 | 0x4000)  # enable + function mask
    dev.signal(4)
    assert sink.calls == [] and pba(dev) == 1 << 4
    set_control(dev, 0x8000)
    assert sink.calls == [(MSIX, 4)] and pba(dev) == 0


def test_both_masks_must_be_clear() -> None:
    dev, sink, _ = make()
    enable_msix(dev, sink, range(8))
    write_entry(dev, 6, masked=True)
    dev.irq_mask(MSIX, 6, 1, True)
    dev.signal(6)
    dev.irq_mask(MSIX, 6, 1, False)
    assert sink.calls == []  # table still masks it
    write_entry(dev, 6, masked=False)
    assert sink.calls == [(MSIX, 6)]


def test_missing_eventfd_is_dropped_then_retried() -> None:
    dev, sink, _ = make()
    dev.set_irq_count(MSIX, 8)  # enabled, but vector 7 has no eventfd yet
    dev.irqs_configured(MSIX)
    dev.signal(7)
    assert dev.irq_stats["msix"]["dropped"] == 1
    assert pba(dev) == 1 << 7
    sink.fds.add((MSIX, 7))
    dev.irqs_configured(MSIX)
    assert sink.calls == [(MSIX, 7), (MSIX, 7)]
    assert dev.irq_stats["msix"]["signalled"] == 1 and pba(dev) == 0


def test_mode_priority_and_disable() -> None:
    dev, sink, _ = make()
    sink.fds.add((PciIrq.INTX, 0))
    dev.set_irq_count(PciIrq.INTX, 1)
    dev.irqs_configured(PciIrq.INTX)
    enable_msix(dev, sink, range(8))
    assert dev.irq_mode == MSIX
    dev.irq_mask(MSIX, 0, 1, True)
    dev.set_irq_count(MSIX, 0)  # client disabled MSI-X: masks go with it
    dev.irqs_configured(MSIX)
    assert dev.irq_mode == PciIrq.INTX
    enable_msix(dev, sink, range(8))
    dev.signal(0)
    assert sink.calls == [(MSIX, 0)]


def test_irq_count_and_vector_checks() -> None:
    dev, _, _ = make(vectors=8)
    with pytest.raises(LocalProtocolError) as info:
        dev.set_irq_count(MSIX, 9)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(LocalProtocolError):
        dev.irq_mask(MSIX, 7, 2, True)
    with pytest.raises(ValueError):
        dev.signal(8)


def test_reset_clears_table_and_pba() -> None:
    dev, sink, _ = make()
    enable_msix(dev, sink, range(8))
    write_entry(dev, 3, masked=True)
    dev.signal(3)
    assert pba(dev)
    dev.reset()
    assert pba(dev) == 0
    assert dev.msix is not None and not dev.msix.table_in_use
    assert struct.unpack("<IIII", dev.region_read(PciRegion.BAR0, TABLE + 48, 16)) == (0, 0, 0, 1)
    dev.signal(3)  # table masks are disarmed again; the eventfds are still the client's
    assert sink.calls == [(MSIX, 3)]
