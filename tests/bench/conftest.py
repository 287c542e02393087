"""Driver-level benchmarks (pytest-benchmark): collected only with ``-p benchmark``.

The project's pytest configuration turns pytest-benchmark off (``-p no:benchmark``
in ``addopts``: no banner, and ``pytest tests`` never runs these);
docs/benchmarks.md says how to run, save and compare them.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name.startswith("test_") and not config.pluginmanager.hasplugin(
            "benchmark"):
        return True
    return None
