"""Guest fault control (OCP Error Injection) and edit-command faults against the
running appliance: the NVMe driver over the vfio-user socket, ``fault.*`` over
the control socket."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.runtime.control import ControlClient
from appliance.storage import spec
from appliance.storage.error_injection import DATA_SIZE, FEATURE_ID
from appliance.testing.process import ApplianceProcess, make_config

NAND_CORRUPTION = 0x07


def set_erri(d: NvmeDriver, data: bytes) -> spec.Completion:
    prp1, prp2, pages = d.buffer(max(len(data), 1))
    d.scatter(pages, data)
    return d.admin_command(spec.AdminOpcode.SET_FEATURES, cdw10=FEATURE_ID,
                           cdw11=len(data) // 32, prp1=prp1, prp2=prp2)


def get_erri(d: NvmeDriver) -> tuple[spec.Completion, bytes]:
    prp1, prp2, pages = d.buffer(DATA_SIZE)
    done = d.admin_command(spec.AdminOpcode.GET_FEATURES, cdw10=FEATURE_ID, prp1=prp1, prp2=prp2)
    return done, d.gather(pages, DATA_SIZE)


@pytest.fixture(scope="module", params=[False, True], ids=["off", "on"])
def appliance(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    tmp: Path = tmp_path_factory.mktemp("appl")
    cfg = make_config(tmp, storage={"guest_faults": request.param})
    with ApplianceProcess(cfg, tmp / "proc") as proc:
        yield proc
        assert proc.alive, proc.log_text()


@pytest.fixture
def driver(appliance: ApplianceProcess) -> Iterator[tuple[NvmeDriver, ControlClient]]:
    with VfioUserClient.connect(appliance.config.storage.socket) as c, \
            ControlClient(appliance.config.control.socket, timeout=5.0) as ctl:
        d = NvmeDriver(c)
        d.setup(io_queues=1, depth=16)
        yield d, ctl
        ctl("fault.clear")
        d.close()


def test_guest_arms_a_fault_the_control_socket_lists(
        driver: tuple[NvmeDriver, ControlClient], appliance: ApplianceProcess) -> None:
    d, ctl = driver
    one = struct.pack("<BBHH", 0x3, 0, NAND_CORRUPTION, 0).ljust(32, b"\0")
    done = set_erri(d, one)
    if not appliance.config.storage.guest_faults:  # off: refused, nothing armed
        assert (done.status, done.dnr) == (spec.Status.INVALID_FIELD, True)
        assert ctl("fault.list")["rules"] == []
        return
    assert done.status == spec.Status.SUCCESS
    (rule,) = ctl("fault.list")["rules"]
    assert (rule["origin"], rule["ocp_type"], rule["status"], rule["count"]) == (
        "guest", NAND_CORRUPTION, "0x281", 1)
    failed, _ = d.io(spec.IoOpcode.READ, 0, 1)
    assert (failed.status, failed.dnr) == (0x281, True)
    assert d.io(spec.IoOpcode.READ, 0, 1)[0].status == spec.Status.SUCCESS
    done, data = get_erri(d)
    assert done.dw0 == 1 and data[:4] == struct.pack("<BBH", 0x2, 0, NAND_CORRUPTION)
    assert ctl("fault.list")["rules"][0]["hits"] == 1


def test_an_edit_rule_changes_what_the_controller_does(
        driver: tuple[NvmeDriver, ControlClient]) -> None:
    d, ctl = driver
    d.write(1, 9, b"9" * 512)
    ctl("fault.add", action="edit", opcode=spec.IoOpcode.READ, edit="cdw10=9", count=1)
    done, data = d.io(spec.IoOpcode.READ, 0, 1)
    assert done.status == spec.Status.SUCCESS and data == b"9" * 512
    ctl("fault.add", action="edit", edit={"nsid": 5}, count=1)
    done, _ = d.io(spec.IoOpcode.READ, 0, 1)
    assert (done.status, done.dnr) == (spec.Status.INVALID_NAMESPACE, True)
    assert ctl("fault.list")["fired"]["nvme.edit"] == 2
