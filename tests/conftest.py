"""Top-level test configuration: nothing heavy here (unit tests import fast).

Everything under tests/integration/ is marked ``integration`` automatically, so
``pytest -m "not integration"`` runs the fast tiers only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)
