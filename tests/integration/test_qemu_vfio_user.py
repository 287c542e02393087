"""Acceptance: QEMU 11.1's vfio-user-pci client realizes the appliance's device.

A real ``appliance run`` process, a real QEMU, the guest's own view of PCI.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from guests import GuestFactory, parse_pci

from appliance.testing.qemu import qemu_args

pytestmark = pytest.mark.integration

VENDOR, DEVICE, NVME_CLASS = 0xA9A9, 0x0001, 0x010802
CAP_PM, CAP_MSIX, CAP_PCIE = 0x01, 0x11, 0x10


def vfio_user_device_args(appliance: Any) -> list[str]:
    args = qemu_args(appliance.config, net=False)
    # The harness provides memory and NUMA options itself; keep only the device.
    i = args.index("-device")
    return args[i:i + 2]


def test_guest_lists_the_device(guest_factory: GuestFactory, appliance_factory: Any) -> None:
    appliance = appliance_factory()
    g = guest_factory(args=vfio_user_device_args(appliance))
    g.wait_for(r"GUEST-MODULES-LOADED", timeout=90)
    begin = g.mark()
    g.wait_for(r"GUEST-PCI-END")
    pci = parse_pci(g.lines()[begin:])
    ours = [f for f in pci.values() if (f.vendor, f.device) == (VENDOR, DEVICE)]
    assert len(ours) == 1, pci
    dev = ours[0]
    assert dev.cls == NVME_CLASS
    start, size, kind = dev.bars[0]
    assert start != 0 and size == 0x4000 and kind.startswith("mem64"), dev.bars
    assert dev.caps[:3] == (CAP_PM, CAP_MSIX, CAP_PCIE)
    g.wait_for(r"GUEST-POWEROFF", timeout=120)
    assert g.wait_exit(timeout=30) == 0
    # QEMU printed no vfio-user errors, and the appliance refused nothing.
    errors = [x for x in g.lines() if re.search(r"vfio|error", x, re.IGNORECASE) and "GUEST" not in x]
    assert not errors, errors
    assert appliance.alive
    log = appliance.log_path.read_text()
    assert "client connected" in log
    assert " WARNING " not in log, log
