"""Unit-test hygiene shared by every file here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastpath_support import require_native

from appliance.storage.controller import NvmeController
from appliance.testing import nvme


@pytest.fixture(autouse=True)
def _close_controller_buses() -> Iterator[None]:
    """Close the in-process NVMe drivers' guest memory after each test (its memfds
    would otherwise stay open for the rest of the session)."""
    yield
    nvme.close_all()


@pytest.fixture(params=["python", "native"])
def nvme_fastpath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on both NVMe I/O queue paths: every controller it builds gets
    the native fast path ("native") or none ("python")."""
    if request.param == "native":
        monkeypatch.setattr(NvmeController, "native", require_native())
    return str(request.param)
