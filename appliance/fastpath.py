"""Which data path runs: the native fast path or the pure-Python one.

The C extension ``appliance._fastpath`` (built from native/fastpath/ by
``pip install -e .``, see setup.py) does a split virtqueue's per-chain work and
an NVMe I/O queue's reads and writes in batches; the Python code it mirrors stays the reference and the fallback.  It
runs when all of these hold:

* the extension imported (:func:`available`; a failed or skipped build leaves
  it out),
* the environment does not say ``APPLIANCE_FASTPATH=0``,
* the configuration does not say ``fastpath: false``.

:func:`walker` gives the runtime what to hand the ports (the module, or None),
:func:`nvme` what to hand the NVMe controller;
:func:`describe` is the line ``appliance run`` prints.  What the native code
handles is in docs/architecture.md ("Fast path").
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.net.native import NativeVring
    from appliance.storage.native_io import NativeNvme

ENV = "APPLIANCE_FASTPATH"

try:
    from appliance import _fastpath
except ImportError as exc:  # not built (no compiler, or a failed build)
    _native: NativeVring | None = None
    _fastpath_nvme: NativeNvme | None = None
    IMPORT_ERROR = str(exc)
else:
    _native = _fastpath
    _fastpath_nvme = _fastpath
    IMPORT_ERROR = ""


def available() -> bool:
    """Whether the extension is built and imports."""
    return _native is not None


def module() -> NativeVring | None:
    """The extension whatever the switches say (tests compare both paths), or None."""
    return _native


def switched_off(cfg: Config | None = None) -> str:
    """Why the fast path is off although built ("" when nothing switches it off)."""
    if os.environ.get(ENV, "").strip() == "0":
        return f"{ENV}=0"
    if cfg is not None and not cfg.fastpath:
        return "fastpath: false in the configuration"
    return ""


def enabled(cfg: Config | None = None) -> bool:
    """Whether the native fast path runs (built, and neither the environment nor ``cfg``
    switches it off)."""
    return _native is not None and not switched_off(cfg)


def walker(cfg: Config | None = None) -> NativeVring | None:
    """What the ports' rings run natively: the extension when :func:`enabled`, else None."""
    return _native if enabled(cfg) else None


def nvme(cfg: Config | None = None) -> NativeNvme | None:
    """What the NVMe I/O queues run natively: the extension when :func:`enabled`, else None."""
    return _fastpath_nvme if enabled(cfg) else None


def describe(cfg: Config | None = None) -> str:
    """One line: the data path in use and, for the Python one, why."""
    if enabled(cfg):
        return ("native fast path (appliance._fastpath: ring walks and transmit drains, NVMe "
                "I/O queue reads and writes, in mmap'd guest memory; fd and message regions "
                "stay Python)")
    why = switched_off(cfg) if _native is not None else f"appliance._fastpath not built: {IMPORT_ERROR}"
    return f"pure Python ({why})"
