"""``appliance image info | build`` on the provisioned machine (scripts/provision built it).

Nothing is rebuilt here: ``build`` must find everything cached.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from qemu import QemuEnv

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def test_info_reports_the_provisioned_artifacts(qemu_env: QemuEnv) -> None:
    res = appliance("image", "info", "--json", "--cache", str(qemu_env.root))
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads(res.stdout)
    assert info["built"] and info["problem"] is None
    arts = info["artifacts"]
    assert arts["kernel"]["path"] == str(qemu_env.vmlinux)
    assert arts["initramfs"]["path"] == str(qemu_env.initrd)
    assert arts["qemu"]["path"] == str(qemu_env.qemu)
    assert all(a["present"] for a in arts.values())
    assert arts["qemu"]["detail"].startswith("qemu-system-x86 1:11.1")
    assert arts["kernel"]["detail"].startswith("Linux 6.1")
    text = appliance("image", "info", "--cache", str(qemu_env.root))
    assert text.returncode == 0 and text.stdout.splitlines()[-1] == "status     built"


def test_build_is_a_cached_no_op(qemu_env: QemuEnv) -> None:
    parts = [qemu_env.vmlinux, qemu_env.initrd, qemu_env.root / "sid" / ".qemu-env-ok",
             qemu_env.qemu, qemu_env.root / "bin" / "sid-run"]
    before = {p: p.stat().st_mtime_ns for p in parts}
    res = appliance("image", "build", "--cache", str(qemu_env.root))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("appliance: image up to date (cached)"), res.stdout
    assert f"kernel     {qemu_env.vmlinux}" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in parts} == before
