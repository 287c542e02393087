"""The harness itself: boot the bare guest, list PCI, run shell commands."""

from __future__ import annotations

import pytest
from guests import GuestFactory, parse_pci

pytestmark = pytest.mark.integration

# q35 with -nic none -vga none: host bridge, LPC (ISA) bridge, AHCI, SMBus.
Q35_HOST_BRIDGE = "0000:00:00.0"
Q35_AHCI = "0000:00:1f.2"
PCI_CAP_MSI, PCI_CAP_SATA = 0x05, 0x12


def test_boot_without_devices_lists_pci(guest_factory: GuestFactory) -> None:
    g = guest_factory()
    up = g.wait_for(r"GUEST-UP uptime=(\S+)", timeout=90)
    assert float(up[1]) > 0
    g.wait_for(r"GUEST-MODULES-LOADED")
    begin = g.mark()
    g.wait_for(r"GUEST-PCI-END")
    lines = g.lines()
    assert not [x for x in lines if "GUEST-INSMOD-FAIL" in x]
    pci = parse_pci(lines[begin:])
    host = pci[Q35_HOST_BRIDGE]
    assert (host.vendor, host.device, host.cls) == (0x8086, 0x29C0, 0x060000)
    ahci = pci[Q35_AHCI]
    assert ahci.caps == (PCI_CAP_MSI, PCI_CAP_SATA)
    assert ahci.bars[5][1:] == (0x1000, "mem")
    assert len(pci) == 4, pci
    g.wait_for(r"GUEST-POWEROFF")
    assert g.wait_exit(timeout=30) == 0


def test_shell_runs_commands_on_two_cpus(guest_factory: GuestFactory) -> None:
    g = guest_factory(append="qe.shell", smp=2)
    assert g.run("echo hi") == ("hi", 0)
    assert g.run("cat /proc/cpuinfo | grep -c processor") == ("2", 0)
    assert g.run("printf 'a\\nb\\n'; false") == ("a\nb", 1)
    assert g.run("printf no-newline") == ("no-newline", 0)
    assert g.qmp("query-status")["status"] == "running"
    assert len(g.qmp("query-cpus-fast")) == 2
    g.send("exit\n")
    g.wait_for(r"GUEST-SHELL-EXIT")
    g.wait_for(r"GUEST-POWEROFF")
    assert g.wait_exit(timeout=30) == 0
