"""PCI config space: header, masks, BAR sizing, capability list, PM and PCIe registers."""

from __future__ import annotations

import errno
import struct

import pytest

from appliance.errors import LocalProtocolError
from appliance.pci import Bar, MsixLayout, PciDevice
from appliance.pci.capabilities import (
    PCIE_DEVCTL,
    PCIE_DEVSTA,
    PM_PMCSR,
    CapId,
    add_msix,
    add_pci_express,
    add_power_management,
)
from appliance.pci.config import (
    STATUS,
    ConfigSpace,
    PciStatus,
    type0_config,
)
from appliance.vfio_user.wire import PciRegion

CFG = PciRegion.CONFIG
IDS = {
    "vendor_id": 0x1B36, "device_id": 0x0010, "subsystem_vendor_id": 0x1AF4,
    "subsystem_id": 0x1100, "revision": 0x02, "class_code": 0x010802,
}


class Device(PciDevice):
    def __init__(self, bars: list[Bar] | None = None) -> None:
        self.resets = 0
        super().__init__(
            **IDS,
            bars=bars if bars is not None else [Bar(0, 0x4000, is_64bit=True)],
            msix=MsixLayout(vectors=4),
        )

    def reset_device(self) -> None:
        self.resets += 1


def cfg_read(dev: PciDevice, offset: int, width: int) -> int:
    return int.from_bytes(dev.region_read(CFG, offset, width), "little")


def cfg_write(dev: PciDevice, offset: int, width: int, value: int) -> None:
    dev.region_write(CFG, offset, value.to_bytes(width, "little"))


def bare_config() -> ConfigSpace:
    config = type0_config(**IDS, interrupt_pin=1)
    config.add_bar(0, 0x4000, True, False)
    add_power_management(config)
    add_msix(config, MsixLayout(vectors=4))
    add_pci_express(config)
    config.freeze()
    return config


# ---------------------------------------------------------------- header
def test_header_fields() -> None:
    dev = Device()
    vendor, device, command, status, rev_class = struct.unpack_from(
        "<HHHHI", dev.region_read(CFG, 0, 12)
    )
    assert (vendor, device, command) == (0x1B36, 0x0010, 0)
    assert status == PciStatus.CAP_LIST
    assert rev_class == 0x01080202  # class code << 8 | revision
    assert cfg_read(dev, 0x0E, 1) == 0  # header type 0, single function
    assert cfg_read(dev, 0x2C, 4) == 0x1100_1AF4
    assert cfg_read(dev, 0x3D, 1) == 1  # INTA
    assert dev.region_read(CFG, 0x100, 4) == bytes(4)  # null extended capability header


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8, 64, 256, 4096])
def test_any_size_read(size: int) -> None:
    dev = Device()
    assert dev.region_read(CFG, 0, size) == bytes(dev.config.data[:size])
    assert len(dev.region_read(CFG, 4096 - size, size)) == size


@pytest.mark.parametrize(("offset", "count"), [(4096, 1), (4095, 2), (-1, 1), (0, 0), (0, 4097)])
def test_out_of_range_is_einval(offset: int, count: int) -> None:
    dev = Device()
    with pytest.raises(LocalProtocolError) as info:
        dev.region_read(CFG, offset, count)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(LocalProtocolError) as info:
        dev.region_write(CFG, offset, b"\xff" * count)
    assert info.value.errno == errno.EINVAL


def test_read_only_bytes_are_not_writable() -> None:
    config = bare_config()
    before = bytes(config.data)
    config.write(0, b"\xff" * 4096)
    for i in range(4096):
        if not config.wmask[i] and not config.w1cmask[i]:
            assert config.data[i] == before[i], f"read-only byte {i:#x} changed"
    # Spot checks of registers a client must never change.
    for offset, width in [(0x00, 4), (0x08, 4), (0x0D, 1), (0x0E, 1), (0x2C, 4), (0x30, 4),
                          (0x34, 1), (0x3D, 1)]:
        assert config.get(offset, width) == int.from_bytes(before[offset:offset + width], "little")
    assert config.get(STATUS, 2) & PciStatus.CAP_LIST


def test_command_writable_bits() -> None:
    dev = Device()
    cfg_write(dev, 0x04, 2, 0xFFFF)
    # IO, MEM, BUS_MASTER, PARITY, SERR, INTX_DISABLE (PCI 3.0 section 6.2.2)
    assert cfg_read(dev, 0x04, 2) == 0x0547
    cfg_write(dev, 0x04, 2, 0)
    assert cfg_read(dev, 0x04, 2) == 0


def test_cache_line_and_interrupt_line_writable_latency_timer_not() -> None:
    dev = Device()
    cfg_write(dev, 0x0C, 2, 0xFFFF)
    cfg_write(dev, 0x3C, 1, 0x0B)
    assert cfg_read(dev, 0x0C, 1) == 0xFF
    assert cfg_read(dev, 0x0D, 1) == 0  # Latency Timer: hardwired 0 on PCIe
    assert cfg_read(dev, 0x3C, 1) == 0x0B


def test_status_error_bits_are_rw1c() -> None:
    dev = Device()
    errors = PciStatus.DETECTED_PARITY_ERROR | PciStatus.RECEIVED_MASTER_ABORT
    dev.config.set_bits(STATUS, 2, errors | PciStatus.INTERRUPT, True)
    cfg_write(dev, 0x06, 2, 0)  # writing 0 changes nothing
    assert cfg_read(dev, 0x06, 2) & errors == errors
    cfg_write(dev, 0x06, 2, PciStatus.RECEIVED_MASTER_ABORT)
    status = cfg_read(dev, 0x06, 2)
    assert status & errors == PciStatus.DETECTED_PARITY_ERROR
    cfg_write(dev, 0x06, 2, 0xFFFF)
    status = cfg_read(dev, 0x06, 2)
    # CAP_LIST and Interrupt Status are read-only; every error bit is now clear.
    assert status == PciStatus.CAP_LIST | PciStatus.INTERRUPT


# ---------------------------------------------------------------- BARs
def size_bar(dev: PciDevice, offset: int) -> int:
    cfg_write(dev, offset, 4, 0xFFFFFFFF)
    return cfg_read(dev, offset, 4)


def test_bar_sizing_32bit() -> None:
    dev = Device([Bar(0, 0x4000, is_64bit=True), Bar(2, 0x1000, prefetchable=True),
                  Bar(3, 16)])
    assert size_bar(dev, 0x18) == 0xFFFFF000 | 0x8  # 4 KiB, 32-bit, prefetchable
    assert size_bar(dev, 0x1C) == 0xFFFFFFF0  # 16 bytes, 32-bit
    cfg_write(dev, 0x18, 4, 0xFEB00000)
    assert cfg_read(dev, 0x18, 4) == 0xFEB00008
    assert size_bar(dev, 0x20) == 0  # BAR4 absent: read-only zero


def test_bar_sizing_64bit() -> None:
    dev = Device()
    assert cfg_read(dev, 0x10, 4) == 0x4  # memory, 64-bit, not prefetchable
    assert size_bar(dev, 0x10) == 0xFFFFC004
    assert size_bar(dev, 0x14) == 0xFFFFFFFF
    cfg_write(dev, 0x10, 8, 0x0000_0001_FEB0_0000)
    assert cfg_read(dev, 0x10, 8) == 0x0000_0001_FEB0_0004


def test_bar_sizing_64bit_above_4g() -> None:
    dev = Device([Bar(0, 0x4000, is_64bit=True), Bar(2, 1 << 33, is_64bit=True,
                                                     prefetchable=True)])
    assert size_bar(dev, 0x18) == 0x0000000C  # no address bits below 8 GiB
    assert size_bar(dev, 0x1C) == 0xFFFFFFFE


def test_rom_bar_absent_and_read_only() -> None:
    dev = Device()
    assert size_bar(dev, 0x30) == 0


@pytest.mark.parametrize("bars", [
    [Bar(0, 0x4000, is_64bit=True), Bar(1, 0x1000)],  # BAR1 is BAR0's upper half
    [Bar(0, 0x4000, is_64bit=True), Bar(5, 0x1000, is_64bit=True)],  # no slot 6
    [Bar(0, 0x4000, is_64bit=True), Bar(2, 0x1800)],  # not a power of two
    [Bar(0, 0x4000, is_64bit=True), Bar(2, 8)],  # below 16
    [Bar(0, 0x4000, is_64bit=True), Bar(2, 1 << 32)],  # too big for 32 bits
])
def test_bad_bars_rejected(bars: list[Bar]) -> None:
    with pytest.raises(ValueError):
        Device(bars)


# ---------------------------------------------------------------- capabilities
def walk(dev: PciDevice) -> list[tuple[int, int]]:
    """Walk the list the way a driver does, from the Capabilities Pointer."""
    assert cfg_read(dev, 0x06, 2) & PciStatus.CAP_LIST
    found: list[tuple[int, int]] = []
    offset = cfg_read(dev, 0x34, 1)
    while offset:
        assert 0x40 <= offset <= 0xFC and offset % 4 == 0
        assert len(found) < 48
        found.append((cfg_read(dev, offset, 1), offset))
        offset = cfg_read(dev, offset + 1, 1)
    return found


def test_capability_chain() -> None:
    dev = Device()
    chain = walk(dev)
    assert [cid for cid, _ in chain] == [CapId.POWER_MANAGEMENT, CapId.MSIX, CapId.PCI_EXPRESS]
    assert chain == list(dev.config.capabilities())
    assert dev.config.find_capability(CapId.MSI) is None
    assert [off for _, off in chain] == [dev.pm_offset, dev.msix_offset, dev.pcie_offset]


def test_capability_registers() -> None:
    dev = Device()
    pm, msix, pcie = dev.pm_offset, dev.msix_offset, dev.pcie_offset
    assert msix is not None
    assert cfg_read(dev, pm + 2, 2) & 0x7 == 3  # PM version 3
    assert cfg_read(dev, pm + 4, 2) == 0x0008  # D0, No_Soft_Reset
    assert cfg_read(dev, msix + 2, 2) == 3  # table size N-1, disabled, unmasked
    assert cfg_read(dev, msix + 4, 4) == 0x2000  # BIR 0, offset 0x2000
    assert cfg_read(dev, msix + 8, 4) == 0x3000
    assert cfg_read(dev, pcie + 2, 2) == 0x0002  # version 2, Endpoint
    devcap = cfg_read(dev, pcie + 4, 4)
    assert devcap & 0x7 == 0 and devcap & (1 << 28) and devcap & (1 << 15)  # MPS 128, FLR, RBER
    assert cfg_read(dev, pcie + 0x0C, 4) & 0x3FF == 0x11  # x1, 2.5 GT/s
    assert cfg_read(dev, pcie + 0x12, 2) & 0x3FF == 0x11
    assert dev.region_read(CFG, pcie + 0x24, 4) == bytes(4)  # Device Capabilities 2


def test_msix_control_writable_bits_only() -> None:
    dev = Device()
    assert dev.msix_offset is not None
    cfg_write(dev, dev.msix_offset + 2, 2, 0xFFFF)
    assert cfg_read(dev, dev.msix_offset + 2, 2) == 0xC003
    cfg_write(dev, dev.msix_offset + 4, 8, 0)
    assert cfg_read(dev, dev.msix_offset + 4, 4) == 0x2000


def test_power_state_d0_d3hot_only() -> None:
    dev = Device()
    pmcsr = dev.pm_offset + PM_PMCSR
    cfg_write(dev, pmcsr, 2, 3)
    assert dev.power_state == 3 and cfg_read(dev, pmcsr, 2) == 0x000B
    cfg_write(dev, pmcsr, 2, 1)  # D1 unsupported: write discarded (PM 1.2 section 3.2.4)
    assert dev.power_state == 3
    cfg_write(dev, pmcsr, 2, 0xFFFC)  # D0; PME bits read-only zero
    assert cfg_read(dev, pmcsr, 2) == 0x0008


def test_device_control_and_status() -> None:
    dev = Device()
    devctl = dev.pcie_offset + PCIE_DEVCTL
    assert cfg_read(dev, devctl, 2) == 0x2810  # RO enable, No Snoop, MRRS 512
    cfg_write(dev, devctl, 2, 0x7FFF)
    assert cfg_read(dev, devctl, 2) == 0x78FF  # ext tag, phantom, aux PM hardwired 0
    devsta = dev.pcie_offset + PCIE_DEVSTA
    dev.config.put(devsta, 2, 0x000F)
    cfg_write(dev, devsta, 2, 0x0005)
    assert cfg_read(dev, devsta, 2) == 0x000A


def test_flr_resets_function() -> None:
    dev = Device()
    cfg_write(dev, 0x04, 2, 0x0006)
    cfg_write(dev, 0x10, 4, 0xFEB00000)
    devctl = dev.pcie_offset + PCIE_DEVCTL
    cfg_write(dev, devctl, 2, 0x8000 | 0x2810)
    assert dev.resets == 1
    assert cfg_read(dev, devctl, 2) == 0x2810  # Initiate FLR reads 0
    assert dev.region_read(CFG, 0, 4096) == bare_config().read(0, 4096)


def test_config_reset_restores_power_on_image() -> None:
    config = bare_config()
    image = config.read(0, 4096)
    config.write(0x04, b"\x07\x04")
    config.write(0x10, b"\x00\x00\xb0\xfe")
    config.reset()
    assert config.read(0, 4096) == image


def test_capability_overflow_rejected() -> None:
    config = type0_config(**IDS, interrupt_pin=0)
    with pytest.raises(ValueError):
        config.add_capability(bytes([0x09]) + bytes(200))


def test_capability_loop_detected() -> None:
    config = bare_config()
    first = config.data[0x34]
    config.data[first + 1] = first
    with pytest.raises(ValueError):
        list(config.capabilities())


@pytest.mark.parametrize("override", [
    {"vendor_id": 0x10000}, {"revision": 256}, {"class_code": 1 << 24}, {"interrupt_pin": 5},
])
def test_bad_ids_rejected(override: dict[str, int]) -> None:
    args: dict[str, int] = {**IDS, "interrupt_pin": 1, **override}
    with pytest.raises(ValueError):
        type0_config(**args)
