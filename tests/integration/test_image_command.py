"""``appliance image info | build`` on the provisioned machine (scripts/provision built it).

Nothing is rebuilt here: ``build`` must find everything cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from guests import QemuEnv

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


def test_a_host_qemu_with_vfio_user_is_used_without_a_chroot(qemu_env: QemuEnv,
                                                              tmp_path: Path) -> None:
    """On a machine whose QEMU is 10.1+ with vfio-user-pci, `image build` uses it and
    makes no sid chroot.  The "host's" QEMU here is the provisioned 11.1, first in
    PATH; the kernel .debs are copied in (no downloads); the guest boots with it."""
    host_bin = tmp_path / "hostbin"
    host_bin.mkdir()
    for tool in ("qemu-system-x86_64", "qemu-img"):
        (host_bin / tool).symlink_to(qemu_env.root / "bin" / tool)
    cache = tmp_path / "env"
    shutil.copytree(qemu_env.root / "guest" / "debs", cache / "guest" / "debs")
    env = dict(os.environ, PATH=f"{host_bin}:{os.environ['PATH']}")
    res = subprocess.run([sys.executable, "-m", "appliance", "image", "build", "--cache", str(cache),
                          "--boot-test"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"(the host's {host_bin}/qemu-system-x86_64)" in res.stdout, res.stdout
    assert "boot test ok" in res.stderr and not (cache / "sid").exists(), res.stderr
    info = subprocess.run([sys.executable, "-m", "appliance", "image", "info", "--cache", str(cache)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert info.returncode == 0 and "the host's QEMU is used" in info.stdout, info.stdout
    forced = subprocess.run([sys.executable, "-m", "appliance", "image", "build", "--cache",
                             str(tmp_path / "none"), "--qemu", "host", "-q"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert forced.returncode == 2, forced.stdout + forced.stderr  # bookworm's 7.2 will not do
    assert forced.stderr.startswith("appliance: error: image build: QEMU_SOURCE=host: no "), \
        forced.stderr
