"""Fixtures for QEMU integration tests (harness in guests.py, next to this file).

``qemu_env`` locates the provisioned environment (skip, or fail when
APPLIANCE_REQUIRE_INTEGRATION=1). ``guest_factory`` starts guests whose console logs
land in the test's tmp_path and kills them all at teardown.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guests import Guest, GuestFactory, QemuEnv
from guests import qemu_env as _locate_qemu_env

from appliance.testing.plugin import GUEST_KEY


@pytest.fixture(scope="session")
def qemu_env() -> QemuEnv:
    """The provisioned QEMU environment."""
    return _locate_qemu_env()


@pytest.fixture
def guest_factory(
    qemu_env: QemuEnv, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[GuestFactory]:
    """``guest_factory(**Guest kwargs) -> Guest``: a started guest, killed at teardown.

    Logs are ``tmp_path/guestN.log``; on failure their paths are printed, and the
    report has the last started guest's console tail (the plugin's section).
    """
    guests: list[Guest] = []

    def make(**kwargs: Any) -> Guest:
        kwargs.setdefault("name", f"guest{len(guests)}")
        g = Guest(qemu_env, tmp_path, **kwargs)
        guests.append(g)
        request.node.stash[GUEST_KEY] = g
        return g.start()

    yield make
    for g in guests:
        g.kill()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for g in guests:
            print(f"console log: {g.log_path}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


@pytest.fixture
def appliance_factory(tmp_path: Path) -> Iterator[Any]:
    """``appliance_factory(**config overrides) -> ApplianceProcess``, started; stopped at teardown."""
    from appliance.testing.process import ApplianceProcess, make_config

    procs: list[ApplianceProcess] = []

    def make(name: str = "appliance", **overrides: Any) -> ApplianceProcess:
        root = tmp_path / name
        proc = ApplianceProcess(make_config(root, **overrides), root, trace=True)
        procs.append(proc)
        return proc.start()

    yield make
    for proc in procs:
        proc.stop()
