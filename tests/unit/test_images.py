"""``appliance image build | info``: arguments, error lines, cached runs (with a fake builder)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.cli import images, main
from appliance.testing.qemu_environment import REQUIRED_INIT_VERSION

# A stand-in for images/qemu-env.sh: creates the artifacts under $QEMU_ENV unless they
# exist (as the real one skips finished parts), and logs how it was called.
FAKE_BUILDER = f"""#!/bin/bash
set -eu
echo "FORCE=${{FORCE:-}} SKIP_BOOT_TEST=${{SKIP_BOOT_TEST:-}}" >> "$QEMU_ENV.calls"
echo "[fake] building in $QEMU_ENV"
[ -z "${{FAIL:-}}" ] || {{ echo "[fake   0s] ERROR: $FAIL"; exit 1; }}
[ -z "${{FORCE:-}}" ] || rm -f "$QEMU_ENV/sid/.qemu-env-ok"
[ ! -e "$QEMU_ENV/sid/.qemu-env-ok" ] || exit 0
mkdir -p "$QEMU_ENV/sid/var/lib/dpkg" "$QEMU_ENV/bin" "$QEMU_ENV/guest"
printf 'Package: qemu-system-x86\\nStatus: install ok installed\\nVersion: 1:11.1.3+ds-1\\n\\n' \\
    > "$QEMU_ENV/sid/var/lib/dpkg/status"
for f in bin/qemu-system-x86_64 bin/qemu-img bin/guest-boot guest/vmlinux; do
    echo x > "$QEMU_ENV/$f"
done
head -c 4096 /dev/zero > "$QEMU_ENV/guest/initrd.img"
echo "linux-image-6.1.0-50-amd64 6.1.0-50-amd64" > "$QEMU_ENV/guest/kernel-version"
echo {REQUIRED_INIT_VERSION} > "$QEMU_ENV/guest/init-version"
touch "$QEMU_ENV/sid/.qemu-env-ok"
"""


# A stand-in for images/debian-guest.sh: makes the Debian guest's files, logs its packages.
FAKE_DEBIAN_BUILDER = """#!/bin/bash
set -eu
echo "EXTRA_PACKAGES=$EXTRA_PACKAGES" >> "$QEMU_ENV.debian-calls"
echo "[fake] Debian guest in $QEMU_ENV/debian"
mkdir -p "$QEMU_ENV/debian"
[ -n "${NO_ROOTFS:-}" ] || head -c 2097152 /dev/zero > "$QEMU_ENV/debian/rootfs.img"
echo x > "$QEMU_ENV/debian/initrd.img"
echo "bookworm bash fio $EXTRA_PACKAGES" > "$QEMU_ENV/debian/packages"
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "qemu-env.sh"
    script.write_text(FAKE_BUILDER)
    monkeypatch.setattr(images, "BUILDER", script)
    debian = tmp_path / "debian-guest.sh"
    debian.write_text(FAKE_DEBIAN_BUILDER)
    monkeypatch.setattr(images, "DEBIAN_BUILDER", debian)
    monkeypatch.delenv("NO_ROOTFS", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv("FAIL", raising=False)
    return tmp_path / "env"


def one_error_line(err: str, start: str) -> None:
    assert err.startswith(f"appliance: error: {start}"), err
    assert err.count("\n") == 1, err


def test_build_then_cached_then_info(fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "build", "--cache", str(fake)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("appliance: image built in")
    assert "[fake] building in" in out.err  # the builder's progress, on stderr
    assert f"kernel     {fake}/guest/vmlinux  (Linux 6.1.0-50-amd64)" in out.out
    assert main(["image", "build", "--cache", str(fake), "-q"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("appliance: image up to date (cached)") and out.err == ""
    assert (fake.parent / "env.calls").read_text().splitlines() == [
        "FORCE= SKIP_BOOT_TEST=1", "FORCE= SKIP_BOOT_TEST=1"]

    assert main(["image", "info", "--cache", str(fake)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"initramfs  {fake}/guest/initrd.img  (init v{REQUIRED_INIT_VERSION}, 4 KiB)" in lines
    assert lines[-1] == "status     built"
    assert main(["image", "info", "--cache", str(fake), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["built"] and info["artifacts"]["qemu"]["path"] == f"{fake}/bin/qemu-system-x86_64"
    assert info["artifacts"]["qemu"]["detail"].startswith("qemu-system-x86 1:11.1.3")


def test_force_and_boot_test_reach_the_builder(fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "build", "--cache", str(fake)]) == 0
    assert main(["image", "build", "--cache", str(fake), "--force", "--boot-test"]) == 0
    assert capsys.readouterr().out.count("appliance: image built in") == 2
    assert (fake.parent / "env.calls").read_text().splitlines()[-1] == "FORCE=1 SKIP_BOOT_TEST="


def test_cache_defaults_to_the_environment_variable(
        fake: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("APPLIANCE_QEMU_ENV", str(fake))
    assert main(["image", "build", "-q"]) == 0
    assert (fake / "guest" / "vmlinux").exists()
    assert main(["image", "info"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "status     built"


def test_info_on_an_empty_cache_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "info", "--cache", str(tmp_path / "none")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"kernel     {tmp_path}/none/guest/vmlinux  (missing)" in lines
    assert lines[-1].startswith("status     not built: the sid chroot")
    assert main(["image", "info", "--cache", str(tmp_path / "none"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["built"] is False


def test_stale_guest_is_not_built(fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "build", "-q", "--cache", str(fake)]) == 0
    (fake / "guest" / "init-version").write_text("1\n")
    assert main(["image", "info", "--cache", str(fake)]) == 1
    assert "initramfs is stale (init v1" in capsys.readouterr().out


def test_builder_error_is_one_line(fake: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FAIL", "no space left in /var/cache")
    assert main(["image", "build", "--cache", str(fake)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "appliance: error: image build: no space left in /var/cache"


def test_builder_exit_status_without_error_line(
        fake: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    images.BUILDER.write_text("#!/bin/bash\necho 'apt: ERROR: not ours'\necho 'tar: short read' >&2\nexit 3\n")
    assert main(["image", "build", "-q", "--cache", str(fake)]) == 2
    err = capsys.readouterr().err
    one_error_line(err, "image build: qemu-env.sh exited with status 3 (last output: tar: short read)")


def test_builder_that_leaves_the_environment_incomplete(
        fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images.BUILDER.write_text("#!/bin/bash\nexit 0\n")
    assert main(["image", "build", "-q", "--cache", str(fake)]) == 2
    one_error_line(capsys.readouterr().err, "image build: qemu-env.sh finished but the sid chroot")


def test_not_root(fake: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["image", "build", "--cache", str(fake)]) == 2
    one_error_line(capsys.readouterr().err, "image build: needs root")
    assert not (fake.parent / "env.calls").exists()  # the builder never ran


def test_no_debootstrap(fake: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(images.shutil, "which", lambda name: None)
    assert main(["image", "build", "--cache", str(fake)]) == 2
    one_error_line(capsys.readouterr().err, "image build: debootstrap is not installed")


def test_no_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(images, "BUILDER", tmp_path / "gone" / "qemu-env.sh")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert main(["image", "build", "--cache", str(tmp_path)]) == 2
    one_error_line(capsys.readouterr().err, f"image: {tmp_path}/gone/qemu-env.sh not found")


def test_debian_guest_with_more_packages(fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "build", "-q", "--cache", str(fake), "--guest", "debian",
                 "--packages", "strace,gdb", "--packages", "lsof"]) == 0
    assert capsys.readouterr().out.startswith("appliance: image built in")
    assert (fake.parent / "env.calls").exists()  # the busybox environment first
    assert (fake.parent / "env.debian-calls").read_text() == "EXTRA_PACKAGES=strace gdb lsof\n"
    assert main(["image", "info", "--cache", str(fake)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (f"deb-rootfs {fake}/debian/rootfs.img  (bookworm, 2 MiB: bash fio strace gdb lsof)"
            in lines), lines
    assert lines[-1] == "status     built"


def test_busybox_build_leaves_the_debian_guest_alone(fake: Path) -> None:
    assert main(["image", "build", "-q", "--cache", str(fake)]) == 0
    assert not (fake.parent / "env.debian-calls").exists()
    assert not (fake / "debian").exists()


@pytest.mark.parametrize(("argv", "error"), [
    (["--packages", "strace"], "image build: --packages goes with --guest debian"),
    (["--guest", "debian", "--packages", "Bad_Name"],
     "image build: --packages: 'Bad_Name' is not a Debian package name"),
])
def test_bad_packages_are_one_line(fake: Path, capsys: pytest.CaptureFixture[str],
                                   argv: list[str], error: str) -> None:
    assert main(["image", "build", "-q", "--cache", str(fake), *argv]) == 2
    one_error_line(capsys.readouterr().err, error)
    assert not (fake.parent / "env.calls").exists()  # refused before any builder ran


def test_debian_builder_that_leaves_no_rootfs(fake: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NO_ROOTFS", "1")
    assert main(["image", "build", "-q", "--cache", str(fake), "--guest", "debian"]) == 2
    one_error_line(capsys.readouterr().err,
                   f"image build: debian-guest.sh finished but {fake}/debian/rootfs.img is missing")


@pytest.mark.parametrize("argv", [["image"], ["image", "bake"], ["image", "build", "--bogus"],
                                  ["image", "info", "--force"], ["image", "build", "--cache"],
                                  ["image", "build", "--guest", "alpine"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: appliance") and ": error: " in err.splitlines()[-1]


def test_the_real_builder_is_found_from_the_source_tree() -> None:
    assert images.builder() == Path(__file__).resolve().parents[2] / "images" / "qemu-env.sh"
    assert images.builder(images.DEBIAN_BUILDER).name == "debian-guest.sh"
