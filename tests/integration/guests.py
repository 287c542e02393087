"""The QEMU guest harness, re-exported for the integration tests (``from guests import Guest``; not ``qemu``: that name is the qemu.qmp package).

The harness is product code now: :mod:`appliance.testing.qemu` and
:mod:`appliance.testing.qemu_environment` (the pytest plugin's
``appliance_guest`` fixture and ``appliance boot`` use it). Edit it there.
"""

from __future__ import annotations

from appliance.testing.qemu import (
    TAIL_LINES,
    Guest,
    GuestFactory,
    PciFunction,
    QMPError,
    parse_pci,
)
from appliance.testing.qemu_environment import (
    DEFAULT_ENV,
    ENV_VAR,
    REQUIRE_VAR,
    REQUIRED_INIT_VERSION,
    QemuEnv,
    QemuUnavailable,
    locate_env,
    qemu_env,
)

__all__ = [
    "DEFAULT_ENV", "ENV_VAR", "REQUIRED_INIT_VERSION", "REQUIRE_VAR", "TAIL_LINES", "Guest",
    "GuestFactory", "PciFunction", "QMPError", "QemuEnv", "QemuUnavailable", "locate_env",
    "parse_pci", "qemu_env",
]
