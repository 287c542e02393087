"""PCI capability structures and the builders that place them in config space.

Each capability is declared once as a :class:`~appliance.wire.Struct` whose
size is checked against the spec, and its packed registers as
:class:`~appliance.wire.BitFields`.  A builder packs the power-on value,
appends it to the capability list with
:meth:`~appliance.pci.config.ConfigSpace.add_capability` and declares the
writable / RW1C bits; everything not declared is read-only.

Offsets of registers inside a capability (``PM_PMCSR``, ``PCIE_DEVCTL``...)
are the spec's numbers and are asserted against the struct declarations at
import time.
"""

from __future__ import annotations

import enum
import struct

from appliance.pci.config import ConfigSpace
from appliance.pci.msix import MsixLayout
from appliance.wire import U8, U16, U32, BitFields, Struct


class CapId(enum.IntEnum):
    """Capability ids (PCI Code and ID Assignment spec, section 2)."""

    POWER_MANAGEMENT = 0x01
    MSI = 0x05
    PCI_EXPRESS = 0x10
    MSIX = 0x11


def field_offset(cls: type[Struct], name: str) -> int:
    """Byte offset of field ``name`` inside the packed struct ``cls``."""
    fmt = cls.BYTE_ORDER
    for field, code, _ in cls.FIELDS:
        if field == name:
            return struct.calcsize(fmt)
        fmt += code
    raise KeyError(name)


# ---------------------------------------------------------------- Power Management
class PmCap(Struct, size=8):
    """Power Management capability (PCI Bus PM Interface 1.2 section 3.2)."""

    cap_id: U8 = CapId.POWER_MANAGEMENT
    next: U8 = 0
    pmc: U16 = 0
    pmcsr: U16 = 0
    bridge_ext: U8 = 0
    data: U8 = 0


PM_PMC = 0x02
PM_PMCSR = 0x04

# PM 1.2 section 3.2.3 (PMC) and 3.2.4 (PMCSR).
PMC = BitFields(
    16, reserved=0x0010, version=(0, 3), pme_clock=(3, 1), dsi=(5, 1), aux_current=(6, 3),
    d1_support=(9, 1), d2_support=(10, 1), pme_support=(11, 5),
)
PMCSR = BitFields(
    16, reserved=0x00F4, power_state=(0, 2), no_soft_reset=(3, 1), pme_enable=(8, 1),
    data_select=(9, 4), data_scale=(13, 2), pme_status=(15, 1),
)
PM_VERSION = 3  # PM 1.2


class PowerState(enum.IntEnum):
    D0 = 0
    D1 = 1
    D2 = 2
    D3HOT = 3


SUPPORTED_POWER_STATES = frozenset({PowerState.D0, PowerState.D3HOT})


def add_power_management(config: ConfigSpace) -> int:
    """Append a PM capability: version 3, D0 and D3hot only, No_Soft_Reset set.

    PowerState is writable.  No PME support, so PME_En and PME_Status are
    read-only zero (PM 1.2 section 3.2.4 permits hardwiring them).  Writes of
    the unsupported D1/D2 are discarded by the device (same section).

    Returns:
        The capability's offset.
    """
    cap = PmCap(pmc=PMC.encode(version=PM_VERSION), pmcsr=PMCSR.encode(no_soft_reset=1))
    offset = config.add_capability(cap.pack())
    config.set_masks(offset + PM_PMCSR, 2, wmask=PMCSR.encode(power_state=0b11))
    return offset


# ---------------------------------------------------------------- MSI-X
class MsixCap(Struct, size=12):
    """MSI-X capability (PCI 3.0 section 6.8.2)."""

    cap_id: U8 = CapId.MSIX
    next: U8 = 0
    control: U16 = 0
    table: U32 = 0  # Table Offset (QWORD aligned) | Table BIR
    pba: U32 = 0  # PBA Offset (QWORD aligned) | PBA BIR


MSIX_CONTROL = 0x02
MSIX_TABLE = 0x04
MSIX_PBA = 0x08

# PCI 3.0 section 6.8.2.3 (Message Control) and 6.8.2.4/6.8.2.5 (offset/BIR).
MSIX_CONTROL_BITS = BitFields(
    16, reserved=0x3800, table_size=(0, 11), function_mask=(14, 1), enable=(15, 1)
)
MSIX_FUNCTION_MASK = MSIX_CONTROL_BITS.encode(function_mask=1)
MSIX_ENABLE = MSIX_CONTROL_BITS.encode(enable=1)
MSIX_OFFSET_BIR = BitFields(32, bir=(0, 3), qword_offset=(3, 29))


def add_msix(config: ConfigSpace, layout: MsixLayout) -> int:
    """Append an MSI-X capability describing ``layout``.

    Table Size is N-1; Function Mask and MSI-X Enable are the only writable
    bits; both start clear (PCI 3.0 section 6.8.2.3).

    Returns:
        The capability's offset.
    """
    cap = MsixCap(
        control=MSIX_CONTROL_BITS.encode(table_size=layout.vectors - 1),
        table=MSIX_OFFSET_BIR.encode(bir=layout.table_bar, qword_offset=layout.table_offset >> 3),
        pba=MSIX_OFFSET_BIR.encode(bir=layout.pba_bar, qword_offset=layout.pba_offset >> 3),
    )
    offset = config.add_capability(cap.pack())
    config.set_masks(offset + MSIX_CONTROL, 2, wmask=MSIX_FUNCTION_MASK | MSIX_ENABLE)
    return offset


# ---------------------------------------------------------------- PCI Express
class PcieCap(Struct, size=0x3C):
    """PCI Express capability, version 2 layout (PCIe base 4.0 section 7.5.3)."""

    cap_id: U8 = CapId.PCI_EXPRESS
    next: U8 = 0
    pcie_caps: U16 = 0
    dev_caps: U32 = 0
    dev_control: U16 = 0
    dev_status: U16 = 0
    link_caps: U32 = 0
    link_control: U16 = 0
    link_status: U16 = 0
    slot_caps: U32 = 0
    slot_control: U16 = 0
    slot_status: U16 = 0
    root_control: U16 = 0
    root_caps: U16 = 0
    root_status: U32 = 0
    dev_caps2: U32 = 0
    dev_control2: U16 = 0
    dev_status2: U16 = 0
    link_caps2: U32 = 0
    link_control2: U16 = 0
    link_status2: U16 = 0
    slot_caps2: U32 = 0
    slot_control2: U16 = 0
    slot_status2: U16 = 0


PCIE_CAPS = 0x02
PCIE_DEVCAP = 0x04
PCIE_DEVCTL = 0x08
PCIE_DEVSTA = 0x0A
PCIE_LNKCAP = 0x0C
PCIE_LNKCTL = 0x10
PCIE_LNKSTA = 0x12
PCIE_DEVCAP2 = 0x24

# PCIe base 4.0 sections 7.5.3.2 .. 7.5.3.8.
PCIE_CAPS_BITS = BitFields(
    16, reserved=0xC000, version=(0, 4), port_type=(4, 4), slot=(8, 1), irq_message=(9, 5)
)
DEVCAP = BitFields(
    32, reserved=0xE0037000, mps=(0, 3), phantom=(3, 2), ext_tag=(5, 1), l0s_latency=(6, 3),
    l1_latency=(9, 3), rber=(15, 1), slot_power_value=(18, 8), slot_power_scale=(26, 2),
    flr=(28, 1),
)
DEVCTL = BitFields(
    16, cere=(0, 1), nfere=(1, 1), fere=(2, 1), urre=(3, 1), relaxed_ordering=(4, 1),
    mps=(5, 3), ext_tag=(8, 1), phantom=(9, 1), aux_pm=(10, 1), no_snoop=(11, 1),
    mrrs=(12, 3), flr=(15, 1),
)
DEVSTA = BitFields(
    16, reserved=0xFFC0, ced=(0, 1), nfed=(1, 1), fed=(2, 1), urd=(3, 1), aux_power=(4, 1),
    transactions_pending=(5, 1),
)
LNKCAP = BitFields(
    32, reserved=0x00800000, max_speed=(0, 4), max_width=(4, 6), aspm=(10, 2),
    l0s_exit=(12, 3), l1_exit=(15, 3), clock_pm=(18, 1), surprise_down=(19, 1),
    dll_active_reporting=(20, 1), bw_notification=(21, 1), aspm_compliance=(22, 1),
    port=(24, 8),
)
LNKSTA = BitFields(
    16, reserved=0x0400, link_speed=(0, 4), link_width=(4, 6), training=(11, 1),
    slot_clock=(12, 1),
    dll_active=(13, 1), bw_management=(14, 1), autonomous_bw=(15, 1),
)

PCIE_CAP_VERSION = 2
PORT_TYPE_ENDPOINT = 0x0
LINK_SPEED_2_5GT = 1
DEVCTL_FLR = DEVCTL.encode(flr=1)
# RW in the spec and meaningful without optional features: error reporting
# enables, Relaxed Ordering, Max_Payload_Size, No Snoop, Max_Read_Request_Size,
# and Initiate FLR (reads 0; the device acts on it).  Extended Tag, Phantom
# Functions and Aux Power PM are hardwired 0 as we support none of them.
DEVCTL_WRITABLE = DEVCTL.encode(
    cere=1, nfere=1, fere=1, urre=1, relaxed_ordering=1, mps=0b111, no_snoop=1,
    mrrs=0b111, flr=1,
)
DEVCTL_DEFAULT = DEVCTL.encode(relaxed_ordering=1, no_snoop=1, mrrs=0b010)  # spec defaults
DEVSTA_W1C = DEVSTA.encode(ced=1, nfed=1, fed=1, urd=1)
LNKCTL_WRITABLE = 0x00C3  # ASPM Control, Common Clock Configuration, Extended Synch


def add_pci_express(config: ConfigSpace) -> int:
    """Append a PCI Express capability (version 2) for an Endpoint.

    Device Capabilities: Max_Payload_Size Supported 128 bytes, Role-Based
    Error Reporting and Function Level Reset.  Link: x1 at 2.5 GT/s, trained.
    Slot, root and the "2" registers are zero (nothing optional supported).

    Returns:
        The capability's offset.
    """
    cap = PcieCap(
        pcie_caps=PCIE_CAPS_BITS.encode(version=PCIE_CAP_VERSION, port_type=PORT_TYPE_ENDPOINT),
        dev_caps=DEVCAP.encode(mps=0, rber=1, flr=1),
        dev_control=DEVCTL_DEFAULT,
        link_caps=LNKCAP.encode(max_speed=LINK_SPEED_2_5GT, max_width=1),
        link_status=LNKSTA.encode(link_speed=LINK_SPEED_2_5GT, link_width=1),
    )
    offset = config.add_capability(cap.pack())
    config.set_masks(offset + PCIE_DEVCTL, 2, wmask=DEVCTL_WRITABLE)
    config.set_masks(offset + PCIE_DEVSTA, 2, w1cmask=DEVSTA_W1C)
    config.set_masks(offset + PCIE_LNKCTL, 2, wmask=LNKCTL_WRITABLE)
    return offset


# The spec's register offsets must match the declarations above.
for _cls, _name, _spec in (
    (PmCap, "pmc", PM_PMC),
    (PmCap, "pmcsr", PM_PMCSR),
    (MsixCap, "control", MSIX_CONTROL),
    (MsixCap, "table", MSIX_TABLE),
    (MsixCap, "pba", MSIX_PBA),
    (PcieCap, "pcie_caps", PCIE_CAPS),
    (PcieCap, "dev_caps", PCIE_DEVCAP),
    (PcieCap, "dev_control", PCIE_DEVCTL),
    (PcieCap, "dev_status", PCIE_DEVSTA),
    (PcieCap, "link_caps", PCIE_LNKCAP),
    (PcieCap, "link_control", PCIE_LNKCTL),
    (PcieCap, "link_status", PCIE_LNKSTA),
    (PcieCap, "dev_caps2", PCIE_DEVCAP2),
):
    if (_at := field_offset(_cls, _name)) != _spec:
        raise TypeError(f"{_cls.__name__}.{_name} at {_at:#x}, spec says {_spec:#x}")
