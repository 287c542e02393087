"""The two data paths, for tests that run on both (``fastpath`` fixture parameters).

A missing native build is a test failure, never a skip: the suite proves the
extension the appliance runs, so it must be there.
"""

from __future__ import annotations

import pytest

from appliance import fastpath
from appliance.net.native import NativeVring

PATHS = ["python", "native"]


def require_native() -> NativeVring:
    """The built extension, or a failed test saying how to build it."""
    native = fastpath.module()
    if native is None:
        pytest.fail(f"appliance._fastpath is not built ({fastpath.IMPORT_ERROR}): build it with "
                    "`pip install -e .` (or `python setup.py build_ext --inplace`), which needs a "
                    "C compiler and the Python headers", pytrace=False)
    return native


def walker(path: str) -> NativeVring | None:
    """What a ring runs for ``path`` ("python": None)."""
    return require_native() if path == "native" else None
