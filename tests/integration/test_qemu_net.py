"""Issue 4: a Linux guest (QEMU 11.1, virtio-net-pci over vhost-user) on the appliance's network."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
from qemu import Guest, GuestFactory

from appliance.cli import qemu_args

pytestmark = pytest.mark.integration


def net_args(appliance: Any) -> list[str]:
    args = qemu_args(appliance.resolved, net=True)
    i = args.index("-chardev")  # the harness brings its own memory/NUMA options
    return args[i:]


def boot_with_net(guest_factory: GuestFactory, appliance: Any, ip: str = "10.0.2.15/24") -> Guest:
    g = guest_factory(args=net_args(appliance), append="qe.shell")
    out, rc = g.run(f"ip link set eth0 up && ip addr add {ip} dev eth0 && echo configured", timeout=120)
    assert rc == 0 and out.endswith("configured"), out
    return g


def test_guest_pings_the_responder(guest_factory: GuestFactory, appliance_factory: Any, tmp_path: Any) -> None:
    pcap = tmp_path / "net0.pcap"
    appliance = appliance_factory(net={"ports": [{"socket": str(tmp_path / "n0.sock"), "mac": "52:54:00:12:34:56",
                                                  "pcap": str(pcap)}]})
    g = boot_with_net(guest_factory, appliance)
    out, rc = g.run("ping -c 100 -i 0.02 -W 2 10.0.2.2", timeout=120)
    assert rc == 0, out
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    assert m and m.group(1) == m.group(2) == "100", out
    g.send("exit\n")
    g.wait_for(r"GUEST-POWEROFF", timeout=60)
    assert appliance.alive
    appliance.stop()  # flushes and closes the capture
    # The capture opens in tcpdump with the expected packets.
    dump = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True, check=True)
    assert len(re.findall(r"10\.0\.2\.15 > 10\.0\.2\.2: ICMP echo request", dump.stdout)) == 100
    assert len(re.findall(r"10\.0\.2\.2 > 10\.0\.2\.15: ICMP echo reply", dump.stdout)) == 100
    assert re.search(r"ARP, Reply 10\.0\.2\.2 is-at 52:54:00:00:02:02", dump.stdout), dump.stdout[:2000]
