"""Acceptance: a Linux guest (QEMU 11.1 vfio-user-pci, the busybox guest with nvme-cli)
uses a 4 KiB + 8-byte-metadata namespace with PI type 1 through its block-integrity
path: the integrity profile, 64 MiB O_DIRECT out and back, an injected guard error
that fails exactly one read, and ``nvme format --lbaf``.

One guest boot for every check (each TCG boot costs CI time).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import pytest

pytestmark = pytest.mark.integration

if not any(ep.value == "appliance.testing.plugin"
           for ep in entry_points(group="pytest11")):  # pragma: no cover
    from appliance.testing.plugin import (  # noqa: F401
        appliance,
        appliance_ctl,
        appliance_guest,
    )

NS, SYS = "/dev/nvme0n1", "/sys/block/nvme0n1"
READ_ONE = f"dd if={NS} of=/dev/null bs=4096 skip={{lba}} count=1 iflag=direct 2>&1"


@pytest.mark.appliance_config(storage={"namespaces": [
    {"image": "{data_dir}/pi.img", "size": "80M", "block_size": 4096, "metadata": 8,
     "pi": 1}]})
def test_pi_type1_namespace_through_the_kernel(appliance_guest: Any,
                                               appliance_ctl: Any) -> None:
    def run(cmd: str, timeout: float = 300) -> str:
        out, rc = appliance_guest.run(cmd, timeout=timeout)
        assert rc == 0, f"{cmd}: {out}"
        return out

    assert run(f"cat {SYS}/integrity/format").strip() == "T10-DIF-TYPE1-CRC"
    assert run(f"cat {SYS}/queue/logical_block_size").strip() == "4096"

    # 64 MiB O_DIRECT out and back (an 8 MiB pattern eight times), verified.
    run("dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null")
    want = run("md5sum < /tmp/p").split()[0]
    run(f"for i in 0 1 2 3 4 5 6 7; do dd if=/tmp/p of={NS} bs=1M seek=$((i * 8)) "
        "oflag=direct 2>/dev/null || exit 1; done")
    sums = run(f"for i in 0 1 2 3 4 5 6 7; do dd if={NS} bs=1M skip=$((i * 8)) count=8 "
               "iflag=direct 2>/dev/null | md5sum; done").split()
    assert sums[0::2] == [want] * 8, sums
    counters = appliance_ctl("status")["nvme"]["counters"]
    assert counters["bytes_written"] >= 64 << 20

    # An injected guard error on block 100 fails exactly that read.
    appliance_ctl("fault.add", action="corrupt_guard", opcode=2, lba=100)
    out, rc = appliance_guest.run(READ_ONE.format(lba=100))
    assert rc != 0, out
    assert "1+0 records in" in run(READ_ONE.format(lba=99))
    assert "1+0 records in" in run(READ_ONE.format(lba=101))
    appliance_ctl("fault.clear")
    assert "1+0 records in" in run(READ_ONE.format(lba=100))
    assert appliance_ctl("status")["nvme"]["counters"]["media_errors"] >= 1

    # nvme format to LBA format 1 (512 + 8) with PI type 1: the kernel rescans.
    run(f"nvme format {NS} --lbaf=1 --pi=1 --force", timeout=120)
    run(f"for i in $(seq 50); do [ $(cat {SYS}/queue/logical_block_size) = 512 ] && break; "
        f"sleep 0.2; done; [ $(cat {SYS}/queue/logical_block_size) = 512 ]")
    assert run(f"cat {SYS}/integrity/format").strip() == "T10-DIF-TYPE1-CRC"
    run(f"dd if=/tmp/p of={NS} bs=1M count=1 oflag=direct 2>&1")
    got = run(f"dd if={NS} bs=1M count=1 iflag=direct 2>/dev/null | md5sum").split()[0]
    assert got == run("dd if=/tmp/p bs=1M count=1 2>/dev/null | md5sum").split()[0]
