"""net.tap against the real host kernel: ping the responder through a TAP interface.

``appliance run`` opens /dev/net/tun and creates interface ``aptapNNNN`` (a
random name); the host gives it 10.0.2.1/24 (the project's own test network,
only on that interface) and pings the responder at 10.0.2.2 with ``ping -I``:
echo requests enter the switch through the TAP port and the responder's
replies leave through it.  The interface disappears when the appliance closes
the fd.  Needs root (CAP_NET_ADMIN), /dev/net/tun, ``ip`` and ``ping``: skipped
without them unless APPLIANCE_REQUIRE_INTEGRATION=1 (then it fails).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from appliance.runtime.control import ControlClient
from appliance.testing.process import ApplianceProcess, make_config

pytestmark = pytest.mark.integration

IP, PING = shutil.which("ip"), shutil.which("ping")


@pytest.fixture(autouse=True)
def _need_tap() -> None:
    missing = [what for what, ok in [("/dev/net/tun", os.path.exists("/dev/net/tun")),
                                     ("root", os.geteuid() == 0), ("ip", IP), ("ping", PING)]
               if not ok]
    if missing:
        if os.environ.get("APPLIANCE_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"TAP test needs {', '.join(missing)} (APPLIANCE_REQUIRE_INTEGRATION=1)")
        pytest.skip(f"TAP test needs {', '.join(missing)}")


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    assert IP is not None
    return subprocess.run([IP, *args], check=False, capture_output=True, text=True, timeout=10)


def link_exists(name: str) -> bool:
    return ip("link", "show", "dev", name).returncode == 0


def ping_5(ifname: str) -> None:
    assert PING is not None
    ping = subprocess.run([PING, "-c", "5", "-W", "2", "-I", ifname, "10.0.2.2"],
                          check=False, capture_output=True, text=True, timeout=40)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", ping.stdout)
    assert m and (m.group(1), m.group(2)) == ("5", "5"), ping.stdout + ping.stderr


def test_ping_responder_through_tap(tmp_path: Path) -> None:
    ifname = f"aptap{secrets.token_hex(4)}"
    cfg = make_config(tmp_path, net={"ports": [], "tap": {"name": ifname}})
    app = ApplianceProcess(cfg, tmp_path / "app")
    try:
        app.start()
        assert link_exists(ifname), app.log_text()
        assert ip("addr", "add", "10.0.2.1/24", "dev", ifname).returncode == 0
        up = ip("link", "set", ifname, "up")
        assert up.returncode == 0, up.stderr
        ping_5(ifname)
        with ControlClient(app.config.control.socket) as ctl:
            net = ctl("status")["net"]
        tap, resp = net["tap"], net["responder"]
        print(tap, resp)
        assert tap["interface"] == ifname and resp["icmp_replies"] == 5, net
        assert tap["rx_packets"] >= 6 and tap["tx_packets"] >= 6, tap  # ARP + 5 echoes each way
        assert tap["tx_dropped"] == 0 and tap["rx_dropped"] == 0, tap
    finally:
        app.stop()
        if link_exists(ifname):  # should be gone with the fd; never leave it behind
            ip("link", "delete", ifname)
            pytest.fail(f"{ifname} outlived the appliance")


def test_tap_moves_to_a_standby_process_with_a_handoff(tmp_path: Path) -> None:
    """A holds the interface; B (`run --standby`) does not open it (a second TUNSETIFF
    would fail with EBUSY) until `appliance handoff` brings A's fd.  The interface, its
    address and the counters live on in B; A exits."""
    ifname = f"aptap{secrets.token_hex(4)}"
    net = {"ports": [], "tap": {"name": ifname}}
    a = ApplianceProcess(make_config(tmp_path / "a", net=net), tmp_path / "a")
    b = ApplianceProcess(make_config(tmp_path / "b", net=net), tmp_path / "b", extra_args=("--standby",))
    try:
        a.start()
        b.start()
        assert any("standing by for TAP interface" in line for line in b.stdout_lines), b.stdout_lines
        assert ip("addr", "add", "10.0.2.1/24", "dev", ifname).returncode == 0
        assert ip("link", "set", ifname, "up").returncode == 0
        ping_5(ifname)
        done = subprocess.run([sys.executable, "-m", "appliance", "handoff",
                               "--from", a.config.control.socket,
                               "--to", b.config.control.socket],
                              check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr + a.log_text() + b.log_text()
        assert a.proc is not None and a.proc.wait(timeout=30) == 0, a.log_text()
        assert link_exists(ifname)  # B holds the only fd now
        ping_5(ifname)
        with ControlClient(b.config.control.socket) as ctl:
            net_status = ctl("status")["net"]
        assert net_status["responder"]["icmp_replies"] == 10, net_status  # A's 5 carried over
        assert net_status["tap"]["interface"] == ifname, net_status
        assert net_status["tap"]["rx_packets"] >= 11, net_status
    finally:
        a.stop()
        b.stop()
        if link_exists(ifname):
            ip("link", "delete", ifname)
            pytest.fail(f"{ifname} outlived both appliances")


def test_tap_open_failure_is_one_line_naming_the_key(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, net={"ports": [], "tap": {"name": "lo"}})  # not a TAP: EINVAL
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "appliance", "run", "-c", str(path)],
                         check=False, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2, run
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("appliance: error: net.tap.name: cannot create TAP interface 'lo':")
    assert "appliance: ready" not in run.stdout
