from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile import HostileTarget

from appliance.client.vfio_user import VfioUserClient
from appliance.testing.process import ApplianceProcess, make_config


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    tmp: Path = tmp_path_factory.mktemp("appl")
    with ApplianceProcess(make_config(tmp), tmp / "proc") as proc:
        yield proc
        assert proc.alive, proc.log_text()


@pytest.fixture
def sock_path(appliance: ApplianceProcess) -> str:
    return appliance.config.storage.socket


@pytest.fixture
def client(sock_path: str) -> Iterator[VfioUserClient]:
    with VfioUserClient.connect(sock_path) as c:
        yield c


@pytest.fixture
def target(tmp_path: Path) -> Iterator[HostileTarget]:
    """A real appliance with a baseline, for hostile-peer cases (see hostile.py)."""
    with HostileTarget(tmp_path) as t:
        yield t
