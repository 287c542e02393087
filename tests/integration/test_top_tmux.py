"""``appliance top`` in tmux: a port's pps rises while DPDK testpmd transmits.

tmux runs ``appliance top`` in a detached session (send-keys to type,
capture-pane to read the screen), as a person at a terminal would see it.
testpmd (txonly) is the vhost-user front-end, with the helpers of
test_dpdk_testpmd.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_dpdk_testpmd import (
    Appliance,
    Proc,
    port_stats,
    start_appliance,
    start_testpmd,
    stop_forwarding,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TMUX = shutil.which("tmux")
NET0 = re.compile(r"^net0\s+(\w+)\s+([\d.]+) (k|M|G)?pps\s+\S+ \S+\s+([\d.]+) (k|M|G)?pps",
                  re.MULTILINE)
SCALE = {None: 1, "k": 1e3, "M": 1e6, "G": 1e9}


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[str]:
    """A tmux server of its own (socket in tmp_path): its -S argument."""
    if TMUX is None:
        if os.environ.get("APPLIANCE_REQUIRE_INTEGRATION") == "1":
            pytest.fail("tmux is not installed (APPLIANCE_REQUIRE_INTEGRATION=1)")
        pytest.skip("tmux is not installed")
    sock = str(tmp_path / "tmux.sock")
    yield sock
    subprocess.run([TMUX, "-S", sock, "kill-server"], check=False, capture_output=True)


def _screen(sock: str) -> str:
    assert TMUX is not None
    return subprocess.run([TMUX, "-S", sock, "capture-pane", "-p", "-t", "top"], check=True,
                          capture_output=True, text=True, timeout=10).stdout


def _net0_pps(screen: str) -> tuple[str, float, float] | None:
    m = NET0.search(screen)
    if m is None:
        return None
    return (m.group(1), float(m.group(2)) * SCALE[m.group(3)],
            float(m.group(4)) * SCALE[m.group(5)])


def _wait_screen(sock: str, want: str, timeout: float) -> tuple[str, tuple[str, float, float]]:
    """Poll the pane (a person glancing at it) until net0's line matches ``want``:
    "idle" (both pps 0) or "busy" (rx or tx above 1000 pps)."""
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _screen(sock)
        row = _net0_pps(screen)
        if row is not None:
            busy = max(row[1], row[2]) > 1000
            if (want == "busy") == busy and (want == "busy" or row[1] == row[2] == 0):
                return screen, row
        time.sleep(0.25)  # the screen refreshes every second; look again
    raise AssertionError(f"net0 never {want} in top:\n{screen}")


def test_top_shows_pps_rising_while_testpmd_transmits(tmp_path: Path, tmux: str) -> None:
    assert TMUX is not None
    started: list[Proc] = []
    app, (sock,) = start_appliance(tmp_path, 1)
    started.append(app)
    try:
        pmd = start_testpmd(tmp_path, sock, "txonly", "top")
        started.append(pmd)
        app.expect(r"net0: driver ok", 20)
        cmd = (f"env PYTHONPATH={REPO} {sys.executable} -m appliance top "
               f"-s {tmp_path / 'run' / 'control.sock'}")
        subprocess.run([TMUX, "-S", tmux, "new-session", "-d", "-s", "top", "-x", "132",
                        "-y", "40", cmd], check=True, timeout=10)
        screen, row = _wait_screen(tmux, "idle", 20)
        assert "NVMe" in screen and "faults" in screen, screen
        assert row[0] == "up", screen
        pmd.send("start")
        pmd.expect(r"txonly packet forwarding", 10)
        pmd.expect(r"testpmd> ", 10)
        screen, row = _wait_screen(tmux, "busy", 30)
        _, sent = port_stats(pmd)
        assert sent > 0
        stop_forwarding(pmd)
        _wait_screen(tmux, "idle", 20)  # and falls again once testpmd stops
        subprocess.run([TMUX, "-S", tmux, "send-keys", "-t", "top", "q"], check=True, timeout=10)
        deadline = time.monotonic() + 10
        while subprocess.run([TMUX, "-S", tmux, "has-session", "-t", "top"], check=False,
                             capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "top did not quit on q:\n" + _screen(tmux)
            time.sleep(0.1)
    finally:
        import signal

        for p in reversed(started):
            p.stop(signal.SIGTERM if isinstance(p, Appliance) else signal.SIGINT)
        shutil.rmtree(f"/var/run/dpdk/apl{os.getpid()}top", ignore_errors=True)
