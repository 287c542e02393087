"""NVMe storage (layer "device"): a vfio-user PCI NVMe controller over raw image files.

:class:`NvmeController` is the PCI function; :class:`Namespace` one image.
Wire definitions are in :mod:`appliance.storage.spec`.
"""

from __future__ import annotations

from appliance.storage.controller import NvmeController
from appliance.storage.identity import DEVICE_ID, VENDOR_ID
from appliance.storage.namespace import Namespace

__all__ = ["DEVICE_ID", "VENDOR_ID", "Namespace", "NvmeController"]
