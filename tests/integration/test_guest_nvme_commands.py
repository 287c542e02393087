"""Acceptance: a Linux guest (QEMU 11.1 vfio-user-pci, the busybox guest with nvme-cli)
uses the NVMe command breadth: SGL data pointers, Copy, Verify, Write Uncorrectable,
the Commands Supported and Effects log, the Identify Controller bits that announce them,
fault control from inside the guest: ``nvme ocp set-error-injection`` (sid's nvme-cli);
a second namespace, zoned: the kernel sees a host-managed disk, writes it
sequentially, nvme-cli reports zones, appends and resets; and Namespace Management:
a namespace nvme-cli creates and attaches appears without a reboot (the Namespace
Attribute Changed event), detached it goes away, then it is deleted; NVMe 2.0 and a
firmware update: ``nvme fw-download``, ``fw-commit``, the slot log, and the new
revision after the kernel's controller reset (``nvme reset``), the disk still reading.

One guest boot for every check (each TCG boot costs CI time).
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from typing import Any

import pytest

from appliance.storage.zones import ZoneState

pytestmark = pytest.mark.integration

if not any(ep.value == "appliance.testing.plugin"
           for ep in entry_points(group="pytest11")):  # pragma: no cover
    from appliance.testing.plugin import (  # noqa: F401
        appliance,
        appliance_ctl,
        appliance_guest,
    )

DEV, NS, ZNS = "/dev/nvme0", "/dev/nvme0n1", "/dev/nvme0n2"
READ_ONE = "dd if=/dev/nvme0n1 of=/dev/null bs=512 skip={lba} count=1 iflag=direct 2>&1"


@pytest.mark.appliance_config(storage={"guest_faults": True, "capacity": "64M", "max_namespaces": 4,
                                       "namespaces": [
    {"image": "{data_dir}/disk0.img", "size": "16M"},
    {"image": "{data_dir}/zoned.img", "size": "32M",  # 8 zones of 4 MiB, 3 MiB writable
     "zoned": {"zone_size": "4M", "zone_capacity": "3M", "max_open": 4, "max_active": 6}}]})
def test_nvme_cli_command_breadth_and_sgl_io(appliance_guest: Any, appliance_ctl: Any) -> None:
    def run(cmd: str, timeout: float = 120) -> str:
        out, rc = appliance_guest.run(cmd, timeout=timeout)
        assert rc == 0, f"{cmd}: {out}"
        return out

    def counters() -> dict[str, Any]:
        return dict(appliance_ctl("status")["nvme"]["counters"])

    # Identify Controller announces what works.
    out = run(f"nvme id-ctrl {DEV} | grep -E '^(oncs|ocfs|sgls|lpa|oacs|nn|ver|frmw) '")
    found = re.findall(r"^(\w+)\s*:\s*(0x[0-9a-f]+)", out, re.MULTILINE)
    fields = {k: int(v, 16) for k, v in found}
    assert fields["oncs"] == 0x1CF and fields["ocfs"] == 1, out
    assert fields["sgls"] == 0x10001 and fields["lpa"] & 0x2, out
    assert fields["oacs"] == 0x10E, out  # Format NVM, firmware, Namespace Management, DBBUF
    assert fields["ver"] == 0x20000 and fields["frmw"] == 0x5, out  # 2 slots, slot 1 read-only
    assert re.search(r"^nn\s*:\s*4$", out, re.MULTILINE), out

    # SGLs: with sgl_threshold at 1 byte, Linux describes every multi-segment I/O
    # request with an SGL; 1 MiB O_DIRECT out and back, data intact.
    run("echo 1 > /sys/module/nvme/parameters/sgl_threshold")
    before = counters()["sgl_commands"]
    run("dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null && "
        f"dd if=/tmp/pattern of={NS} bs=256k oflag=direct 2>&1 && "
        f"dd if={NS} of=/tmp/back bs=256k count=4 iflag=direct 2>&1")
    sums = run("md5sum /tmp/pattern /tmp/back | cut -d' ' -f1").split()
    assert len(sums) == 2 and sums[0] == sums[1], sums
    assert counters()["sgl_commands"] - before >= 8  # 4 writes, 4 reads of 256 KiB

    # Copy: blocks 0-3 and 8-9 to 4096.
    run(f"nvme copy {NS} --sdlba=4096 --slbs=0,8 --blocks=3,1")
    got = run(f"dd if={NS} bs=512 skip=4096 count=6 iflag=direct 2>/dev/null | md5sum")
    want = run("(dd if=/tmp/pattern bs=512 count=4; dd if=/tmp/pattern bs=512 skip=8 count=2) "
               "2>/dev/null | md5sum")
    assert got.split()[0] == want.split()[0]

    # Verify, then Write Uncorrectable: that block (only) reads with the media error
    # until Write Zeroes rewrites it.
    run(f"nvme verify {NS} --start-block=0 --block-count=2047")
    run(f"nvme write-uncor {NS} --start-block=300 --block-count=0")
    out, rc = appliance_guest.run(READ_ONE.format(lba=300))
    assert rc != 0 and re.search(r"No data available|I/O error", out), out
    assert "1+0 records in" in run(READ_ONE.format(lba=301))
    dmesg = run("dmesg | grep -i 'critical medium error\\|I/O error' | tail -3")
    assert "sector 300" in dmesg, dmesg
    _, rc = appliance_guest.run(f"nvme verify {NS} --start-block=296 --block-count=7")
    assert rc != 0
    run(f"nvme write-zeroes {NS} --start-block=300 --block-count=0")
    assert "1+0 records in" in run(READ_ONE.format(lba=300))
    after = counters()
    assert after["commands"]["io.write_uncorrectable"] == 1
    assert after["commands"]["io.copy"] == 1 and after["media_errors"] >= 2

    # The effects log: Copy and Write Uncorrectable change block content, Verify not.
    # (--csi: without it nvme-cli reads CAP by mapping BAR0, which the guest kernel's
    # strict /dev/mem rules refuse while the nvme driver owns the BAR.)
    out = run(f"nvme effects-log {DEV} --csi=0")
    for opcode, effects in ((0x19, 3), (0x04, 3), (0x0C, 1), (0x02, 1)):
        assert re.search(rf"IOCS{opcode}\b.*\b{effects:08x}\b", out), (opcode, out)

    # A fault rule on the Copy opcode fails exactly one Copy.
    appliance_ctl("fault.add", action="status", opcode=0x19, status="write_fault", count=1)
    _, rc = appliance_guest.run(f"nvme copy {NS} --sdlba=5000 --slbs=0 --blocks=0")
    assert rc != 0
    run(f"nvme copy {NS} --sdlba=5000 --slbs=0 --blocks=0")
    assert appliance_ctl("fault.list")["fired"]["nvme.status"] == 1

    # OCP Error Injection from the guest (the appliance has no UUID list: --no-uuid):
    # type 7, single instance, fails the next read; the control socket lists the rule.
    appliance_ctl("fault.clear")
    run(f"nvme ocp set-error-injection {DEV} --no-uuid --type=7")
    (rule,) = appliance_ctl("fault.list")["rules"]
    assert (rule["origin"], rule["ocp_type"], rule["status"], rule["count"]) == (
        "guest", 7, "0x281", 1), rule
    out = run(f"nvme ocp get-error-injection {DEV} --no-uuid")
    assert re.search(r"Entry: 0, Flags: 3 \(Enabled, Single instance\), Type: 7", out), out
    out, rc = appliance_guest.run(READ_ONE.format(lba=40))
    assert rc != 0, out
    assert "1+0 records in" in run(READ_ONE.format(lba=40))  # single: once
    out = run(f"nvme ocp get-error-injection {DEV} --no-uuid")
    assert re.search(r"Entry: 0, Flags: 2 \(Disabled, Single instance\), Type: 7", out), out
    assert "sector 40" in run("dmesg | grep -i 'critical medium error' | tail -1")

    zoned_checks(run, appliance_guest)
    namespace_checks(run, appliance_ctl)
    firmware_checks(run, appliance_guest, appliance_ctl)


def firmware_checks(run: Any, guest: Any, ctl: Any) -> None:
    """A firmware image through nvme-cli: downloaded in two pieces, committed to
    slot 2 with CA 011b (activation without reset is not offered, so the status
    asks for a Controller Level Reset), activated by the kernel's reset path."""
    run("printf APPL0002 > /tmp/fw.bin && head -c 8184 /dev/urandom >> /tmp/fw.bin")
    run(f"nvme fw-download {DEV} --fw=/tmp/fw.bin --xfer=4096")
    commands = ctl("status")["nvme"]["counters"]["commands"]
    assert commands["admin.firmware_download"] == 2, commands
    out, _ = guest.run(f"nvme fw-commit {DEV} --slot=2 --action=3 2>&1")
    assert re.search(r"requires controller level reset", out, re.IGNORECASE), out
    out = run(f"nvme fw-log {DEV}")
    assert re.search(r"afi\s*:\s*0x21\b", out) and "APPL0002" in out, out
    assert re.search(r"^fr\s*:\s*0\.1\s*$", run(f"nvme id-ctrl {DEV}"), re.MULTILINE)
    run(f"nvme reset {DEV}")
    out = run(f"nvme id-ctrl {DEV}")
    assert re.search(r"^fr\s*:\s*APPL0002\s*$", out, re.MULTILINE), out
    assert re.search(r"afi\s*:\s*0x2\b", run(f"nvme fw-log {DEV}"))
    assert "1+0 records in" in run(READ_ONE.format(lba=0))
    sums = run(f"dd if={NS} bs=512 count=300 iflag=direct 2>/dev/null | md5sum; "
               "head -c 153600 /tmp/pattern | md5sum").split()
    assert sums[0] == sums[2], sums  # what was written before the reset (up to block 300)


def namespace_checks(run: Any, ctl: Any) -> None:
    """Namespace Management through nvme-cli and the kernel's rescan (same boot)."""
    new = "/dev/nvme0n3"
    out = run(f"nvme create-ns {DEV} --nsze=4096 --ncap=4096 --flbas=0")
    assert re.search(r"nsid:\s*3\b", out), out  # "created nsid:3" in older nvme-cli
    assert run(f"nvme list-ns {DEV} --all").count(":0x") == 3
    run(f"[ ! -e {new} ]")
    run(f"nvme attach-ns {DEV} --namespace-id=3 --controllers=1")
    run(f"for i in $(seq 100); do [ -e {new} ] && break; sleep 0.1; done; [ -e {new} ]")
    assert run("cat /sys/block/nvme0n3/size").strip() == "4096"
    run(f"dd if=/tmp/pattern of={new} bs=64k count=2 oflag=direct 2>&1")
    sums = run(f"dd if={new} bs=64k count=2 iflag=direct 2>/dev/null | md5sum; "
               "head -c 131072 /tmp/pattern | md5sum").split()
    assert sums[0] == sums[2], sums
    run(f"nvme detach-ns {DEV} --namespace-id=3 --controllers=1")
    run(f"for i in $(seq 100); do [ -e {new} ] || break; sleep 0.1; done; [ ! -e {new} ]")
    run(f"nvme delete-ns {DEV} --namespace-id=3")
    assert run(f"nvme list-ns {DEV} --all").count(":0x") == 2
    commands = ctl("status")["nvme"]["counters"]["commands"]
    assert commands["admin.namespace_management"] == 2, commands
    assert commands["admin.namespace_attachment"] == 2, commands


def zoned_checks(run: Any, guest: Any) -> None:
    """The zoned namespace through the kernel and nvme-cli (same boot)."""
    run(f"for i in $(seq 50); do [ -e {ZNS} ] && break; sleep 0.2; done; [ -e {ZNS} ]")
    queue = "/sys/block/nvme0n2/queue"
    assert run(f"cat {queue}/zoned").strip() == "host-managed"
    assert run(f"cat {queue}/nr_zones").strip() == "8"
    assert run(f"cat {queue}/chunk_sectors").strip() == "8192"
    assert run(f"cat {queue}/max_open_zones {queue}/max_active_zones").split() == ["4", "6"]

    def zones(count: int = 2) -> list[tuple[int, str]]:
        """(write pointer, state) of the first ``count`` zones, as nvme-cli reports
        them (WP and the raw state byte in hex: ZS in bits 7:4)."""
        out = run(f"nvme zns report-zones {ZNS} -d {count}")
        found = re.findall(r"WP:\s*(\S+)\s+Cap:\s*\S+\s+State:\s*(\S+)", out)
        assert len(found) == count, out
        return [(int(wp, 0), ZoneState(int(state, 0) >> 4).name) for wp, state in found]

    assert zones() == [(0, "EMPTY"), (8192, "EMPTY")]
    # Sequential O_DIRECT writes through the kernel, at the write pointer.
    run("dd if=/dev/urandom of=/tmp/zpat bs=64k count=8 2>/dev/null")
    run(f"dd if=/tmp/zpat of={ZNS} bs=64k count=4 oflag=direct 2>&1")
    run(f"dd if=/tmp/zpat of={ZNS} bs=64k skip=4 seek=4 count=4 oflag=direct 2>&1")
    assert zones(1) == [(1024, "IMPLICITLY_OPENED")]
    out, rc = guest.run(f"dd if=/tmp/zpat of={ZNS} bs=64k count=1 oflag=direct 2>&1")
    assert rc != 0, out  # not at the write pointer: Zone Invalid Write
    sums = run(f"dd if={ZNS} bs=64k count=8 iflag=direct 2>/dev/null | md5sum; "
               "md5sum < /tmp/zpat").split()
    assert sums[0] == sums[2], sums
    # Zone Append into zone 1 lands at its write pointer.
    run("dd if=/dev/urandom of=/tmp/zapp bs=4k count=1 2>/dev/null")
    run(f"nvme zns zone-append {ZNS} --zslba=8192 --data-size=4096 --data=/tmp/zapp")
    run(f"nvme zns zone-append {ZNS} --zslba=8192 --data-size=4096 --data=/tmp/zapp")
    assert zones() == [(1024, "IMPLICITLY_OPENED"), (8192 + 16, "IMPLICITLY_OPENED")]
    got = run(f"dd if={ZNS} bs=4k skip=1025 count=1 iflag=direct 2>/dev/null | md5sum")
    assert got.split()[0] == run("md5sum < /tmp/zapp").split()[0]
    # A zone reset: empty again, reads zeroes, writable from its start.
    run(f"nvme zns reset-zone {ZNS} --start-lba=0")
    assert zones(1) == [(0, "EMPTY")]
    got = run(f"dd if={ZNS} bs=64k count=1 iflag=direct 2>/dev/null | md5sum")
    assert got.split()[0] == run("dd if=/dev/zero bs=64k count=1 2>/dev/null | md5sum").split()[0]
    run(f"dd if=/tmp/zpat of={ZNS} bs=64k count=1 oflag=direct 2>&1")
    assert zones(1) == [(128, "IMPLICITLY_OPENED")]
    out = run(f"nvme effects-log {DEV} --csi=2")
    for opcode, effects in ((0x7D, 3), (0x79, 3), (0x7A, 1)):  # Append, Send, Receive
        assert re.search(rf"IOCS{opcode}\b.*\b{effects:08x}\b", out), (opcode, out)
