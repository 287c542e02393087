"""Unit-test hygiene shared by every file here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.testing import nvme


@pytest.fixture(autouse=True)
def _close_controller_buses() -> Iterator[None]:
    """Close the in-process NVMe drivers' guest memory after each test (its memfds
    would otherwise stay open for the rest of the session)."""
    yield
    nvme.close_all()
