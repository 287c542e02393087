"""Acceptance: `appliance handoff` under a running QEMU 11.1 guest.

The guest (Linux 6.1) uses instance A's NVMe disk (vfio-user-pci) and, in the
full case, its net port (vhost-user).  In the guest a loop writes 64 KiB of
random data to a slot of the disk with O_DIRECT, reads it back and compares,
logging each result; a ping to the responder runs alongside.  `appliance
handoff` moves everything to instance B; A exits; the loop and the pings go
on.  At the end every slot of the image holds what the guest last wrote there
(the image is shared: B serves the same file).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from guests import Guest, GuestFactory

from appliance.testing.qemu import qemu_args

pytestmark = pytest.mark.integration

RESPONDER = "10.0.2.2"
SLOT = 64 << 10
SLOTS = 64
WAIT_DEV = "for i in $(seq 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done; [ -b /dev/nvme0n1 ]"
IO_LOOP = (
    "i=0; while [ ! -e /tmp/stop ]; do s=$((i % " + str(SLOTS) + ")); "
    "dd if=/dev/urandom of=/tmp/b bs=64k count=1 2>/dev/null; "
    "dd if=/tmp/b of=/dev/nvme0n1 bs=64k seek=$s count=1 oflag=direct conv=notrunc 2>/tmp/e "
    "|| echo \"WERR $i $s $(tail -n 1 /tmp/e)\"; "
    "dd if=/dev/nvme0n1 of=/tmp/r bs=64k skip=$s count=1 iflag=direct 2>/tmp/e "
    "|| echo \"RERR $i $s $(tail -n 1 /tmp/e)\"; "
    "a=$(md5sum < /tmp/b); b=$(md5sum < /tmp/r); "
    "if [ \"$a\" = \"$b\" ]; then echo \"ok $i $s ${a%% *}\"; else echo \"BAD $i $s\"; fi; "
    "i=$((i+1)); done > /tmp/io.log 2>&1; echo done >> /tmp/io.log"
)

# Should the guest's shell end, it says why on the console before the guest powers off
# (a later Guest.run fails quoting the console): its exit status (0 after an end of
# input, 129 after a hangup), the loop's last lines and the kernel's.  The hangup trap
# only names the signal: the shell still ends on it.  Subshells do not inherit traps.
SHELL_END_REPORT = ("trap 'echo \"GUEST-SHELL-ENDS rc=$?\"; tail -n 5 /tmp/io.log; "
                    "dmesg | tail -n 30' EXIT; trap 'echo GUEST-SHELL-HUP; exit 129' HUP")


def oks(g: Guest) -> int:
    out, rc = g.run("grep -c ^ok /tmp/io.log")
    assert rc in (0, 1), out
    return int(out.strip().splitlines()[-1])


def wait_oks(g: Guest, count: int) -> None:
    # (a subshell: its exit ends the wait, not the guest's shell)
    _, rc = g.run(f"(while [ $(grep -c ^ok /tmp/io.log) -lt {count} ]; do "
                  "grep -q -e ^BAD -e ERR /tmp/io.log && exit 1; usleep 100000; done)", timeout=240)
    out, _ = g.run("grep -e ^BAD -e ERR /tmp/io.log | head -5; dmesg | grep -i -e nvme -e 'i/o error' "
                   "| tail -5")
    assert rc == 0, out


def start_pair(appliance_factory: Any, tmp_path: Path, net: bool) -> tuple[Any, Any]:
    image = str(tmp_path / "disk0.img")
    apps = []
    for name in ("a", "b"):
        ports = [{"socket": str(tmp_path / f"{name}-n0.sock"), "mac": "52:54:00:12:34:56"}] if net else []
        apps.append(appliance_factory(name, storage={"namespaces": [{"image": image, "size": "64M"}]},
                                      net={"ports": ports}))
    return apps[0], apps[1]


def handoff(src: Any, dst: Any) -> str:
    done = subprocess.run([sys.executable, "-m", "appliance", "handoff",
                           "--from", src.config.control.socket,
                           "--to", dst.config.control.socket],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr + src.log_text()[-3000:]
    assert src.proc.wait(timeout=30) == 0, src.log_text()[-3000:]  # A exits after B confirmed
    return done.stdout


def check_image(g: Guest, image: Path) -> int:
    """Every slot's last logged md5 equals the image's bytes there; returns the slots checked."""
    out, rc = g.run("grep ^ok /tmp/io.log | tail -n 200")
    assert rc == 0, out
    last: dict[int, str] = {}
    for m in re.finditer(r"^ok (\d+) (\d+) ([0-9a-f]{32})$", out, re.MULTILINE):
        last[int(m.group(2))] = m.group(3)
    data = image.read_bytes()
    for slot, md5 in last.items():
        assert hashlib.md5(data[slot * SLOT:(slot + 1) * SLOT]).hexdigest() == md5, slot
    return len(last)


@pytest.mark.parametrize("net", [False, True], ids=["nvme", "nvme+net"])
def test_handoff_under_a_running_guest(guest_factory: GuestFactory, appliance_factory: Any,
                                       tmp_path: Path, net: bool) -> None:
    a, b = start_pair(appliance_factory, tmp_path, net)
    args = qemu_args(a.config, net=net)
    g = guest_factory(args=args[args.index("-device"):], append="qe.shell", smp=2)
    _, rc = g.run(WAIT_DEV, timeout=120)
    assert rc == 0, g.tail()
    _, rc = g.run(SHELL_END_REPORT)
    assert rc == 0, g.tail()
    if net:
        out, rc = g.run(f"ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && "
                        f"ping -c 3 -W 2 {RESPONDER} >/dev/null && echo configured", timeout=120)
        assert rc == 0 and out.endswith("configured"), out
        g.run(f"(ping -i 0.05 -W 2 {RESPONDER} > /tmp/ping.log 2>&1 &) ; echo started")
    # Started as the ping is, from a subshell that exits at once: the loop is then no
    # child of the interactive shell.  When a child of busybox ash exits while the
    # shell waits for its next command line, the SIGCHLD can end that read as if the
    # input had ended: the shell exits (status 0) and the guest powers off.
    out, rc = g.run(f"( ({IO_LOOP}) & ) ; echo started")
    assert rc == 0, out
    wait_oks(g, 20)
    before = oks(g)

    summary = handoff(a, b)
    print(summary.strip())

    # The loop goes on, every read-back equal, no I/O error; and it wrote every slot
    # (check_image checks them all), however few rounds it had done by the handoff.
    wait_oks(g, max(before + 40, SLOTS))
    g.run("touch /tmp/stop; while ! grep -q ^done /tmp/io.log; do usleep 100000; done", timeout=120)
    out, _ = g.run("grep -c -e ^BAD -e ERR /tmp/io.log; dmesg | grep -c -i -e 'nvme.*timeout' "
                   "-e 'i/o error'")
    assert out.split() == ["0", "0"], out
    assert check_image(g, tmp_path / "disk0.img") == SLOTS
    if net:
        out, rc = g.run("kill -INT $(pidof ping); while pidof ping >/dev/null; do usleep 10000; done; "
                        "tail -3 /tmp/ping.log")
        m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
        assert m, out
        sent, got = int(m.group(1)), int(m.group(2))
        assert sent >= 40 and got >= sent - 3, out  # at most the few in flight around the pause
        out, rc = g.run(f"ping -c 10 -i 0.05 -W 2 {RESPONDER}", timeout=60)
        assert rc == 0 and "10 packets received" in out, out  # served by B alone
    assert "Traceback" not in a.log_text() + b.log_text()
    assert "handed off" in a.log_text() or "handed off" in summary
