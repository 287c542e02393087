"""The guest harness without QEMU: the Debian guest's files and QEMU command line, and
the plugin's console tail in a failed test's report."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.testing import plugin
from appliance.testing.debian import (
    DEBIAN_MEM_MB,
    REQUIRED_DEBIAN_INIT_VERSION,
    debian_guest,
    locate_debian,
)
from appliance.testing.qemu_environment import QemuEnv, QemuUnavailable


def env_at(root: Path) -> QemuEnv:
    return QemuEnv(root=root, qemu=root / "bin" / "qemu-system-x86_64",
                   qemu_img=root / "bin" / "qemu-img", vmlinux=root / "guest" / "vmlinux",
                   initrd=root / "guest" / "initrd.img")


def built(root: Path, version: int = REQUIRED_DEBIAN_INIT_VERSION) -> QemuEnv:
    (root / "debian").mkdir(parents=True)
    for name in ("rootfs.img", "initrd.img"):
        (root / "debian" / name).write_bytes(b"x")
    (root / "debian" / "init-version").write_text(f"{version}\n")
    return env_at(root)


def test_a_missing_debian_guest_is_unavailable_and_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(QemuUnavailable, match=r"rootfs.img is missing .*--guest debian"):
        locate_debian(env_at(tmp_path))


def test_a_stale_debian_guest_is_unavailable(tmp_path: Path) -> None:
    env = built(tmp_path, version=REQUIRED_DEBIAN_INIT_VERSION - 1)
    with pytest.raises(QemuUnavailable, match="stale image"):
        locate_debian(env)


def test_the_debian_guest_boots_its_initrd_with_its_root_disk_first(tmp_path: Path) -> None:
    env = built(tmp_path)
    image = locate_debian(env)
    g = debian_guest(env, image, tmp_path, args=["-device", "nvme,serial=x"], append="quiet2")
    try:
        argv = g.argv
        assert argv[argv.index("-initrd") + 1] == str(tmp_path / "debian" / "initrd.img")
        assert argv[argv.index("-kernel") + 1] == str(tmp_path / "guest" / "vmlinux")
        assert argv[argv.index("-m") + 1] == f"{DEBIAN_MEM_MB}M"
        assert argv[argv.index("-append") + 1].endswith("qe.shell quiet2")
        drive = argv.index("-drive")
        assert argv[drive + 1] == (f"file={tmp_path}/debian/rootfs.img,format=raw,if=none,"
                                   "id=debian-root,snapshot=on")
        assert argv[drive + 2:drive + 4] == ["-device", "virtio-blk-pci,drive=debian-root"]
        assert argv[-2:] == ["-device", "nvme,serial=x"]  # the devices under test after it
    finally:
        g.kill()  # never started: removes its socket directory


def report(failed: bool, guest: Any) -> Any:
    item = SimpleNamespace(stash=pytest.Stash())
    if guest is not None:
        item.stash[plugin.GUEST_KEY] = guest
    rep = SimpleNamespace(when="call", failed=failed, sections=[])
    hook: Any = plugin.pytest_runtest_makereport(item, None)  # type: ignore[arg-type]
    next(hook)
    with pytest.raises(StopIteration) as done:
        hook.send(rep)
    assert done.value.value is rep and item.rep_call is rep
    return rep


def test_a_failed_test_reports_the_guest_console_tail(tmp_path: Path) -> None:
    asked = []

    def tail(n: int) -> str:
        asked.append(n)
        return "GUEST-SHELL\nlast line"

    guest = SimpleNamespace(proc=object(), log_path=tmp_path / "guest.log", tail=tail)
    rep = report(True, guest)
    assert rep.sections == [(f"guest console (last 60 lines of {tmp_path}/guest.log)",
                             "GUEST-SHELL\nlast line")]
    assert asked == [plugin.REPORT_TAIL_LINES]


@pytest.mark.parametrize(("failed", "guest"), [
    (False, SimpleNamespace(proc=object())),  # passed
    (True, None),  # no guest
    (True, SimpleNamespace(proc=None)),  # a guest that never started
])
def test_no_console_section_otherwise(failed: bool, guest: Any) -> None:
    assert report(failed, guest).sections == []
