"""The Debian test guest: bookworm with bash, fio, nvme-cli and real file systems.

``images/debian-guest.sh`` (``appliance image build --guest debian``) builds, under
the QEMU environment's ``debian/`` folder, an ext4 image of a Debian root file
system and an initramfs that loads the modules (virtio, nvme, ext4, xfs, btrfs,
f2fs), mounts that image (a virtio-blk disk, ``/dev/vda``) and switch_roots to
``/sbin/appliance-init``.  The kernel is the busybox guest's.  QEMU opens the image
with ``snapshot=on``: every boot starts from the same bytes, writes go to a
temporary overlay, and parallel guests share the file.

The guest speaks the busybox guest's console protocol (``qe.shell``: a shell on
ttyS0 with echo off and empty prompts), so :meth:`Guest.run` works unchanged; the
appliance's NVMe disk is ``/dev/nvme0n1`` when it is the only NVMe controller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.testing.qemu import Guest
from appliance.testing.qemu_environment import QemuEnv, QemuUnavailable, _unavailable

#: ``debian/init-version`` must be at least this (DEBIAN_INIT_VERSION in images/debian-guest.sh).
REQUIRED_DEBIAN_INIT_VERSION = 3  # 2: no job notifications in the shell; 3: crc32 (f2fs)
#: Guest RAM of a Debian guest in MiB (fio, mkfs.btrfs and the page cache want more
#: than the busybox guest's 512).
DEBIAN_MEM_MB = 1024


@dataclass(frozen=True)
class DebianImage:
    """A built Debian guest (paths on the host)."""

    root: Path  #: the environment's debian/ folder
    rootfs: Path  #: debian/rootfs.img, the ext4 root file system
    initrd: Path  #: debian/initrd.img

    def drive_args(self) -> list[str]:
        """The QEMU options that attach the root file system as ``/dev/vda``
        (read-only for QEMU: ``snapshot=on`` keeps the guest's writes in a temporary
        overlay)."""
        return ["-drive", f"file={self.rootfs},format=raw,if=none,id=debian-root,snapshot=on",
                "-device", "virtio-blk-pci,drive=debian-root"]


def locate_debian(env: QemuEnv) -> DebianImage:
    """The Debian guest built in ``env``.

    Returns:
        Its paths.
    Raises:
        QemuUnavailable: not built, or built by an older builder (stale init).
    """
    root = env.root / "debian"
    image = DebianImage(root=root, rootfs=root / "rootfs.img", initrd=root / "initrd.img")
    for p in (image.rootfs, image.initrd):
        if not p.exists():
            raise QemuUnavailable(f"{p} is missing (run `sudo appliance image build --guest debian`)")
    try:
        version = int((root / "init-version").read_text().strip())
    except (OSError, ValueError):
        version = 0
    if version < REQUIRED_DEBIAN_INIT_VERSION:
        raise QemuUnavailable(f"Debian guest init version {version} < "
                              f"{REQUIRED_DEBIAN_INIT_VERSION} in {root} (stale image)")
    return image


def debian_image(env: QemuEnv) -> DebianImage:
    """:func:`locate_debian` for tests.

    Raises:
        pytest's Skipped, or Failed when ``APPLIANCE_REQUIRE_INTEGRATION=1``, if the
        Debian guest is not built.
    """
    try:
        return locate_debian(env)
    except QemuUnavailable as exc:
        _unavailable(str(exc))
        raise


def debian_guest(env: QemuEnv, image: DebianImage, workdir: Path, *, args: Sequence[str] = (),
                 append: str = "", smp: int = 1, name: str = "debian") -> Guest:
    """A :class:`Guest` (not started) booting the Debian guest with ``args`` (the
    devices under test) after its root disk, and ``qe.shell`` on the kernel command
    line, so :meth:`Guest.run` works once it is started."""
    return Guest(env, workdir, args=[*image.drive_args(), *args],
                 append=f"qe.shell {append}".strip(), smp=smp, mem_mb=DEBIAN_MEM_MB,
                 name=name, initrd=image.initrd)
