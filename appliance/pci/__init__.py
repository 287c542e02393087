"""PCI device model (layer "device"): config space, capabilities, BARs, MSI-X, interrupts.

:class:`PciDevice` implements the vfio-user server's
:class:`~appliance.vfio_user.backend.VfioUserDevice`; the NVMe controller
subclasses it.
"""

from __future__ import annotations

from appliance.pci.config import ConfigSpace, PciCommand, PciStatus
from appliance.pci.device import Bar, PciDevice
from appliance.pci.msix import MsixLayout, MsixTable

__all__ = [
    "Bar",
    "ConfigSpace",
    "MsixLayout",
    "MsixTable",
    "PciCommand",
    "PciDevice",
    "PciStatus",
]
