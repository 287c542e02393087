"""``appliance image build | info``: QEMU 11.1 and the test guest, built from Debian packages.

The builder is ``images/qemu-env.sh`` of the source tree, shipped in the package
as ``appliance/data/qemu-env.sh`` (in a checkout, a link to it) and found with
:mod:`importlib.resources`, so an installed wheel builds too (images/README.md).  Under the cache
directory (``--cache``, else ``$APPLIANCE_QEMU_ENV``, else
``~/.cache/appliance/qemu-env``) it sets up QEMU and the guest: bookworm's
kernel as ``guest/vmlinux`` and a busybox initramfs ``guest/initrd.img`` with
nvme-cli.  QEMU is the host's when it is 10.1 or newer and has the
``vfio-user-pci`` client (``--qemu auto``, the default), else QEMU 11.1 in a
Debian-sid chroot (bookworm's 7.2 predates the client); ``--qemu host|sid``
forces one.  The builder is idempotent: parts already
built are skipped, so a second ``build`` is a no-op (about a second) unless the
guest's ``/init`` changed in the script.  ``--force`` rebuilds everything from
fresh downloads.

``--guest debian`` also builds the Debian guest (``images/debian-guest.sh``, under
``debian/`` in the cache directory: a bookworm root file system with bash, fio,
nvme-cli and the ext4/xfs/btrfs/f2fs tools, plus ``--packages``); the busybox
guest stays the default and is always built.

Every failure is an :class:`~appliance.errors.ApplianceError` (one line
``appliance: error: image build: ...``, exit status 2).  ``info`` exits 0 when
the environment is complete, 1 when it is not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from appliance.config import Config
from appliance.errors import ApplianceError

#: The builder: the package's data file (resolved: in a checkout, images/qemu-env.sh).
BUILDER = Path(str(files("appliance").joinpath("data", "qemu-env.sh"))).resolve()
#: The Debian guest's builder (``--guest debian``), run after :data:`BUILDER`.
DEBIAN_BUILDER = BUILDER.with_name("debian-guest.sh")
GUESTS = ("busybox", "debian")
# A Debian package name (Debian Policy 5.6.1: lower case, digits, + - .; two or more).
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
# name -> path inside the cache directory of the Debian guest's parts.
DEBIAN_ARTIFACTS = {
    "deb-rootfs": "debian/rootfs.img",
    "deb-initrd": "debian/initrd.img",
}
#: The host QEMU from which ``vfio-user-pci`` (the vfio-user client) exists.
HOST_QEMU_MIN = (10, 1)

# name -> path inside the cache directory; a complete environment has them all.
ARTIFACTS = {
    "qemu": "bin/qemu-system-x86_64",
    "qemu-img": "bin/qemu-img",
    "kernel": "guest/vmlinux",
    "initramfs": "guest/initrd.img",
    "guest-boot": "bin/guest-boot",
}
# The builder's own failure line: "[qemu-env  12s] ERROR: reason".
_ERROR_LINE = re.compile(r"^\[[\w.-]+\s+\d+s\] ERROR: (.*)")
# Files whose modification time changes when the builder (re)builds a part.
_BUILT_STAMPS = ("sid/.qemu-env-ok", "guest/.guest-ok", "guest/vmlinux", "guest/busybox",
                 "guest/modules/.list", "guest/initrd.img", "debian/rootfs.img",
                 "debian/initrd.img")


def cache_dir(arg: str | None = None) -> Path:
    """The environment directory: ``arg``, ``$APPLIANCE_QEMU_ENV`` or the default."""
    from appliance.testing.qemu_environment import DEFAULT_ENV, ENV_VAR

    return Path(arg or os.environ.get(ENV_VAR) or DEFAULT_ENV).expanduser().absolute()


def builder(script: Path | None = None) -> Path:
    """The builder script (``script``, else :data:`BUILDER`).

    Raises:
        ApplianceError: not found (the package was installed without its data files).
    """
    script = script or BUILDER
    if not script.is_file():
        raise ApplianceError(f"image: {script} not found: the package was installed "
                             "without its data files (reinstall it from a wheel or "
                             "`pip install -e .`)")
    return script


@dataclass(frozen=True)
class Artifact:
    name: str
    path: Path
    present: bool
    detail: str


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _sid_qemu_version(root: Path) -> str:
    """``qemu-system-x86``'s Debian version in the chroot, from dpkg's status file."""
    status = _read(root / "sid" / "var" / "lib" / "dpkg" / "status")
    m = re.search(r"^Package: qemu-system-x86\n(?:[^\n]+\n)*?Version: (\S+)", status, re.MULTILINE)
    return m.group(1) if m else ""


def inspect(root: Path) -> tuple[list[Artifact], str | None]:
    """What is built under ``root``.

    Returns:
        The artifacts, and None when the environment is complete, else the reason it
        is not (the first missing part, or a guest too old for the test harness).
    """
    from appliance.testing.qemu_environment import REQUIRED_INIT_VERSION

    source = _read(root / "qemu-source")
    host = source[5:] if source.startswith("host ") else ""
    qemu_version = _sid_qemu_version(root)
    kernel = _read(root / "guest" / "kernel-version").split()
    init_version = _read(root / "guest" / "init-version")
    initrd = root / ARTIFACTS["initramfs"]
    details = {
        "qemu": (f"the host's {host}" if host else
                 f"qemu-system-x86 {qemu_version} in the sid chroot" if qemu_version else ""),
        "kernel": f"Linux {kernel[-1]}" if kernel else "",
        "initramfs": (f"init v{init_version}, {initrd.stat().st_size // 1024} KiB"
                      if initrd.exists() else ""),
    }
    debian_packages = _read(root / "debian" / "packages").split()
    rootfs = root / DEBIAN_ARTIFACTS["deb-rootfs"]
    if rootfs.exists():
        details["deb-rootfs"] = (f"{debian_packages[0] if debian_packages else '?'}, "
                                    f"{rootfs.stat().st_size >> 20} MiB: "
                                    f"{' '.join(debian_packages[1:])}")
    arts = [Artifact(name, root / rel, (root / rel).exists(), details.get(name, ""))
            for name, rel in ARTIFACTS.items()]
    # the Debian guest is optional: listed once its folder exists, never a problem
    debian = [Artifact(name, root / rel, (root / rel).exists(), details.get(name, ""))
              for name, rel in DEBIAN_ARTIFACTS.items()] if (root / "debian").is_dir() else []
    problem = None
    if not host and not (root / "sid" / ".qemu-env-ok").exists():
        problem = "the sid chroot (QEMU 11.1) is not built and the host's QEMU is not in use"
    elif missing := [a for a in arts if not a.present]:
        problem = f"{missing[0].path} is missing"
    elif not init_version.isdigit() or int(init_version) < REQUIRED_INIT_VERSION:
        problem = (f"the guest initramfs is stale (init v{init_version or '?'}, the harness "
                   f"needs v{REQUIRED_INIT_VERSION})")
    return arts + debian, problem


def host_qemu() -> tuple[str, bool] | None:
    """The host's ``qemu-system-x86_64`` version and whether it has ``vfio-user-pci``
    (10.1 or newer); None if there is none."""
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version (\d+)\.(\d+)(\.\d+)?", out)
    if not m:
        return None
    return m.group(0).split()[1], (int(m.group(1)), int(m.group(2))) >= HOST_QEMU_MIN


def _stamps(root: Path) -> dict[str, float]:
    out = {}
    for rel in _BUILT_STAMPS:
        try:
            out[rel] = (root / rel).stat().st_mtime
        except OSError:
            pass
    return out


QEMU_SOURCES = ("auto", "host", "sid")


def _run_builder(script: Path, env: dict[str, str], echo: Any) -> None:
    """Run one builder script, its progress lines to ``echo`` (a text stream).

    Raises:
        ApplianceError: it could not start or exited non-zero (the message is its own
            ERROR line when it printed one).
    """
    error = last = ""
    try:
        proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                text=True, errors="replace")
    except OSError as exc:
        raise ApplianceError(f"image build: cannot run {script}: {exc.strerror}") from None
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            if echo is not None:
                echo.write(line)
                echo.flush()
            if m := _ERROR_LINE.match(line):
                error = m.group(1).strip()
            last = line.strip() or last
    rc = proc.wait()
    if rc != 0:
        context = f" (last output: {last})" if last else ""
        raise ApplianceError(
            f"image build: {error or f'{script.name} exited with status {rc}{context}'}")


def packages_arg(values: list[str] | None) -> tuple[str, ...]:
    """``--packages`` (repeatable, comma- or space-separated) as package names.

    Raises:
        ApplianceError: a name that is not a Debian package name.
    """
    names = tuple(n for v in values or () for n in re.split(r"[,\s]+", v) if n)
    for n in names:
        if not _PACKAGE.fullmatch(n):
            raise ApplianceError(f"image build: --packages: {n!r} is not a Debian package name")
    return names


def build(root: Path, *, force: bool = False, boot_test: bool = False,
          echo: Any = None, qemu: str = "auto", guest: str = "busybox",
          packages: tuple[str, ...] = ()) -> bool:
    """Run the builder for ``root``; its progress lines go to ``echo`` (a text stream).

    Returns:
        True if something was (re)built, False if everything was cached.
    ``qemu``: "auto" (the host's QEMU if it has vfio-user-pci, else sid's),
    "host" or "sid". ``guest="debian"`` then builds the Debian guest too, with
    ``packages`` added to its root file system.

    Raises:
        ApplianceError: not root, no builder, no debootstrap, or the builder failed
            (the message is the builder's own ERROR line when it printed one).
    """
    if qemu not in QEMU_SOURCES:
        raise ApplianceError(f"image build: --qemu must be one of {', '.join(QEMU_SOURCES)}")
    if guest not in GUESTS:
        raise ApplianceError(f"image build: --guest must be one of {', '.join(GUESTS)}")
    if packages and guest != "debian":
        raise ApplianceError("image build: --packages goes with --guest debian")
    if os.geteuid() != 0:
        raise ApplianceError("image build: needs root (debootstrap, chroot, mknod): "
                             "run `sudo appliance image build`")
    script = builder()
    debian_script = builder(DEBIAN_BUILDER) if guest == "debian" else None
    if (force or not (root / "sid" / ".qemu-env-ok").exists() or debian_script) and \
            not shutil.which("debootstrap") and not shutil.which("apt-get"):
        raise ApplianceError("image build: debootstrap is not installed and there is no "
                             "apt-get to install it (a Debian host is needed)")
    env = dict(os.environ, QEMU_ENV=str(root), QEMU_SOURCE=qemu)
    for var in ("FORCE", "SKIP_BOOT_TEST", "EXTRA_PACKAGES"):
        env.pop(var, None)
    if force:
        env["FORCE"] = "1"
    if not boot_test:
        env["SKIP_BOOT_TEST"] = "1"
    before = _stamps(root)
    _run_builder(script, env, echo)
    _, problem = inspect(root)
    if problem:
        raise ApplianceError(f"image build: {script.name} finished but {problem}")
    if debian_script is not None:
        _run_builder(debian_script, dict(env, EXTRA_PACKAGES=" ".join(packages)), echo)
        missing = [rel for rel in DEBIAN_ARTIFACTS.values() if not (root / rel).exists()]
        if missing:
            raise ApplianceError(f"image build: {debian_script.name} finished but "
                                 f"{root / missing[0]} is missing")
    return _stamps(root) != before


def _lines(root: Path, arts: list[Artifact]) -> list[str]:
    out = [f"{'cache':<11}{root}", f"{'builder':<11}{BUILDER}"]
    for a in arts:
        what = f"  ({a.detail})" if a.detail else ""
        out.append(f"{a.name:<11}{a.path}{what}" if a.present else f"{a.name:<11}{a.path}  (missing)")
    return out


def cmd_info(cfg: Config, args: argparse.Namespace) -> int:
    root = cache_dir(args.cache)
    arts, problem = inspect(root)
    host = host_qemu()
    if args.json:
        print(json.dumps({
            "cache": str(root), "builder": str(BUILDER), "built": problem is None,
            "problem": problem,
            "artifacts": {a.name: {"path": str(a.path), "present": a.present, "detail": a.detail}
                          for a in arts},
            "host_qemu": None if host is None else {"version": host[0], "vfio_user": host[1]},
        }, indent=2))
        return 0 if problem is None else 1
    for line in _lines(root, arts):
        print(line)
    used = "the host's" if _read(root / "qemu-source").startswith("host ") else "the sid chroot's"
    if host is None:
        print(f"{'host qemu':<11}none ({used} QEMU is used)")
    else:
        verdict = "has" if host[1] else "older than 10.1: no"
        print(f"{'host qemu':<11}{host[0]} ({verdict} vfio-user-pci; {used} QEMU is used)")
    if problem is None:
        print(f"{'status':<11}built")
        return 0
    print(f"{'status':<11}not built: {problem} (run `sudo appliance image build`)")
    return 1


def cmd_build(cfg: Config, args: argparse.Namespace) -> int:
    root = cache_dir(args.cache)
    t0 = time.monotonic()
    changed = build(root, force=args.force, boot_test=args.boot_test,
                    echo=None if args.quiet else sys.stderr, qemu=args.qemu, guest=args.guest,
                    packages=packages_arg(args.packages))
    arts, _ = inspect(root)
    state = f"built in {time.monotonic() - t0:.0f} s" if changed else "up to date (cached)"
    print(f"appliance: image {state}")
    for line in _lines(root, arts):
        print(f"  {line}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``image build`` and ``image info`` on the CLI's subparsers."""
    image = sub.add_parser("image", help="build or describe QEMU 11.1 and the test guest "
                                         "(images/README.md)")
    isub = image.add_subparsers(dest="image_command", required=True)
    b = isub.add_parser("build", help="build what is missing (needs root; cached)")
    b.add_argument("--cache", metavar="DIR",
                   help="environment directory (default $APPLIANCE_QEMU_ENV or "
                        "~/.cache/appliance/qemu-env)")
    b.add_argument("--force", action="store_true",
                   help="rebuild everything, downloading the packages again")
    b.add_argument("--boot-test", action="store_true", help="boot the guest once afterwards")
    b.add_argument("--qemu", choices=QEMU_SOURCES, default="auto",
                   help="the host's QEMU (10.1+ with vfio-user-pci) or QEMU 11.1 in a sid "
                        "chroot; auto: the host's when it will do")
    b.add_argument("--guest", choices=GUESTS, default="busybox",
                   help="debian: also build the Debian guest (bash, fio, nvme-cli, mkfs/fsck "
                        "of ext4, xfs, btrfs, f2fs; images/README.md); busybox: only the "
                        "default busybox guest")
    b.add_argument("--packages", action="append", metavar="PKG[,PKG...]",
                   help="more Debian packages in the Debian guest (repeatable)")
    b.add_argument("-q", "--quiet", action="store_true", help="no builder progress on stderr")
    b.set_defaults(func=cmd_build, config=None, trace=False, verbose=False)
    i = isub.add_parser("info", help="where the kernel, initramfs and QEMU are, and whether "
                                     "they are built (exit 1 if not)")
    i.add_argument("--cache", metavar="DIR", help="environment directory (as for build)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info, config=None, trace=False, verbose=False)
