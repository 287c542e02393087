"""``appliance boot --dry-run``: what it would start (no QEMU, no appliance)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli import main
from appliance.testing import qemu_environment


def test_boot_dry_run_prints_appliance_and_qemu_commands(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env = qemu_environment.QemuEnv(root=tmp_path, qemu=tmp_path / "qemu", qemu_img=tmp_path / "img",
                       vmlinux=tmp_path / "vmlinux", initrd=tmp_path / "initrd")
    monkeypatch.setattr(qemu_environment, "locate_env", lambda: env)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path}/run\ndata_dir: {tmp_path}/data\n"
                   f"net: {{ports: [{{socket: {tmp_path}/n0.sock, mac: '52:54:00:12:34:56'}}]}}\n")
    assert main(["boot", "--dry-run", "--append", "quiet", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("appliance: ") and out[0].endswith(f"run -c {cfg}")
    assert out[1].startswith(f"qemu: {tmp_path}/qemu ")
    assert "vfio-user-pci" in out[1] and "vhost-user,id=net0" in out[1]
    assert "qe.shell quiet" in out[1]


def test_boot_without_qemu_environment_is_one_error_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def missing() -> qemu_environment.QemuEnv:
        raise qemu_environment.QemuUnavailable("/nowhere/qemu is missing")

    monkeypatch.setattr(qemu_environment, "locate_env", missing)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path}/run\ndata_dir: {tmp_path}/data\n")
    assert main(["boot", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("appliance: error: boot: QEMU environment unavailable") and \
        err.count("\n") == 1


def test_boot_dry_run_of_the_debian_guest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env = qemu_environment.QemuEnv(root=tmp_path, qemu=tmp_path / "qemu", qemu_img=tmp_path / "img",
                       vmlinux=tmp_path / "vmlinux", initrd=tmp_path / "initrd")
    monkeypatch.setattr(qemu_environment, "locate_env", lambda: env)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path}/run\ndata_dir: {tmp_path}/data\n")
    assert main(["boot", "--dry-run", "--guest", "debian", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("appliance: error: boot: QEMU environment unavailable: ") and \
        "--guest debian" in err and err.count("\n") == 1
    (tmp_path / "debian").mkdir()
    for name in ("rootfs.img", "initrd.img"):
        (tmp_path / "debian" / name).write_bytes(b"x")
    (tmp_path / "debian" / "init-version").write_text("99\n")
    assert main(["boot", "--dry-run", "--guest", "debian", "-c", str(cfg)]) == 0
    qemu_line = capsys.readouterr().out.splitlines()[-1]
    assert f"-initrd {tmp_path}/debian/initrd.img" in qemu_line
    assert f"file={tmp_path}/debian/rootfs.img" in qemu_line and "vfio-user-pci" in qemu_line
