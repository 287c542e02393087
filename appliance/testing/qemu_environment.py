"""The provisioned QEMU environment: where ``scripts/provision`` put QEMU and the
test guest, and whether it is usable (product code: the pytest plugin, ``appliance
boot`` and ``appliance image`` use it; :mod:`appliance.testing.qemu` boots guests in it).

``images/qemu-env.sh`` builds it: a Debian-sid chroot with QEMU 11.1 (it has the
``vfio-user-pci`` client), or the host's QEMU, and the busybox guest's kernel and
initrd. :func:`locate_env` finds it under ``$APPLIANCE_QEMU_ENV`` or
``~/.cache/appliance/qemu-env`` and raises :class:`QemuUnavailable` when it is
missing or stale; :func:`qemu_env` turns that into a skip (or a failure when
``APPLIANCE_REQUIRE_INTEGRATION=1``) for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: ``guest/init-version`` must be at least this (INIT_VERSION in images/qemu-env.sh).
REQUIRED_INIT_VERSION = 3  # 3: nvme-cli in the guest

ENV_VAR = "APPLIANCE_QEMU_ENV"
REQUIRE_VAR = "APPLIANCE_REQUIRE_INTEGRATION"
DEFAULT_ENV = Path("~/.cache/appliance/qemu-env")


@dataclass(frozen=True)
class QemuEnv:
    """A provisioned QEMU environment (paths on the host)."""

    root: Path
    qemu: Path  #: bin/qemu-system-x86_64 (runs sid's QEMU in the chroot)
    qemu_img: Path  #: bin/qemu-img
    vmlinux: Path  #: guest/vmlinux
    initrd: Path  #: guest/initrd.img


class QemuUnavailable(RuntimeError):
    """The provisioned QEMU environment is missing or unusable (the message says why)."""


def _unavailable(reason: str) -> None:
    """Fail when integration tests are required, else skip. Never returns."""
    import pytest  # only the test entry point needs it

    if os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(
            f"QEMU integration environment unavailable: {reason}. "
            f"Run `sudo scripts/provision` (or `sudo scripts/test`) to install it.",
            pytrace=False,
        )
    pytest.skip(f"QEMU environment unavailable ({reason}); run `sudo scripts/provision`")


def locate_env() -> QemuEnv:
    """Locate the environment: ``$APPLIANCE_QEMU_ENV`` or ``~/.cache/appliance/qemu-env``.

    Returns:
        The paths of the environment.
    Raises:
        QemuUnavailable: the environment is missing, stale or unusable (QEMU runs
            via unshare: root only).
    """
    root = Path(os.environ.get(ENV_VAR) or DEFAULT_ENV).expanduser()
    env = QemuEnv(
        root=root,
        qemu=root / "bin" / "qemu-system-x86_64",
        qemu_img=root / "bin" / "qemu-img",
        vmlinux=root / "guest" / "vmlinux",
        initrd=root / "guest" / "initrd.img",
    )
    try:
        host_qemu = (root / "qemu-source").read_text().startswith("host ")
    except OSError:
        host_qemu = False  # an environment made before qemu-source existed: sid's
    for p in (env.qemu, env.vmlinux, env.initrd) + (() if host_qemu else (root / "sid" / ".qemu-env-ok",)):
        if not p.exists():
            raise QemuUnavailable(f"{p} is missing")
    try:
        version = int((root / "guest" / "init-version").read_text().strip())
    except (OSError, ValueError):
        version = 0
    if version < REQUIRED_INIT_VERSION:
        raise QemuUnavailable(
            f"guest init version {version} < {REQUIRED_INIT_VERSION} in {root} (stale initrd)"
        )
    if not host_qemu and os.geteuid() != 0:
        raise QemuUnavailable("QEMU runs in a private mount namespace, which needs root")
    return env


def qemu_env() -> QemuEnv:
    """:func:`locate_env` for tests.

    Raises:
        pytest's Skipped, or Failed when ``APPLIANCE_REQUIRE_INTEGRATION=1``, if the
        environment is unavailable.
    """
    try:
        return locate_env()
    except QemuUnavailable as exc:
        _unavailable(str(exc))
        raise
