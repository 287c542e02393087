"""Namespace Management and Attachment of the running appliance over a real
vfio-user socket: a namespace created, attached, written, detached and
deleted; hostile fields; the image rule (test_nsmgmt_migration.py: the
inventory migrates and hands off)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.storage.nsmgmt import CNS_ALLOCATED_NAMESPACE, OACS_NS_MANAGEMENT
from appliance.storage.spec import Cns, IoOpcode, Status
from appliance.testing.process import ApplianceProcess, make_config

ST = Status


@pytest.fixture(scope="module")
def managed_appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    tmp: Path = tmp_path_factory.mktemp("nsmgmt")
    cfg = make_config(tmp, storage={"capacity": "32M", "max_namespaces": 3,
                                    "namespace_images": "remove", "namespaces": [
                                        {"image": str(tmp / "data" / "disk0.img"), "size": "8M"}]})
    with ApplianceProcess(cfg, tmp / "proc") as proc:
        yield proc
        assert proc.alive, proc.log_text()
        assert "Traceback" not in proc.log_text()


@pytest.fixture
def driver(managed_appliance: ApplianceProcess) -> Iterator[NvmeDriver]:
    with VfioUserClient.connect(managed_appliance.config.storage.socket) as c:
        d = NvmeDriver(c)
        d.setup(io_queues=1, depth=16)
        yield d
        assert d.allocated_namespaces() == [1], "a test left a namespace behind"
        d.close()


def result(done: object) -> tuple[int, bool]:
    return done.status, done.dnr  # type: ignore[attr-defined]


def created_images(proc: ApplianceProcess) -> list[str]:
    return sorted(n for n in os.listdir(proc.config.data_dir) if n.startswith("nvme-ns"))


def test_create_attach_use_detach_delete(driver: NvmeDriver,
                                         managed_appliance: ApplianceProcess) -> None:
    idc = driver.identify_controller()
    assert idc.oacs & OACS_NS_MANAGEMENT and idc.nn == 3
    assert int.from_bytes(idc.unvmcap, "little") == 24 << 20
    done = driver.create_namespace(8192)  # 4 MiB
    assert result(done) == (ST.SUCCESS, False) and done.dw0 == 2
    assert len(created_images(managed_appliance)) == 1
    assert result(driver.attach_namespace(2)) == (ST.SUCCESS, False)
    assert driver.active_namespaces() == [1, 2]
    assert driver.identify_namespace(2).nsze == 8192
    driver.write(2, 8191, b"\x5a" * 512)
    assert driver.read(2, 8191, 1) == b"\x5a" * 512
    assert result(driver.attach_namespace(2, detach=True)) == (ST.SUCCESS, False)
    assert driver.identify(Cns.NAMESPACE, 2)[1] == bytes(4096)
    assert result(driver.io(IoOpcode.READ, 0, 1, nsid=2)[0]) == (ST.INVALID_NAMESPACE, True)
    assert result(driver.delete_namespace(2)) == (ST.SUCCESS, False)
    assert created_images(managed_appliance) == []  # namespace_images: remove


@pytest.mark.parametrize(("call", "want"), [
    (lambda d: d.create_namespace(0), ST.INVALID_FIELD),
    (lambda d: d.create_namespace(16, ncap=8), ST.INVALID_FIELD),
    (lambda d: d.create_namespace(16, flbas=0x1F), ST.INVALID_FORMAT),
    (lambda d: d.create_namespace(16, nmic=1), ST.INVALID_FIELD),
    (lambda d: d.create_namespace((1 << 64) - 1), ST.NS_INSUFFICIENT_CAPACITY),
    (lambda d: d.create_namespace(16, cdw10=0xFFFFFFFF), ST.INVALID_FIELD),
    (lambda d: d.delete_namespace(7), ST.INVALID_NAMESPACE),
    (lambda d: d.attach_namespace(1), ST.NS_ALREADY_ATTACHED),
    (lambda d: d.attach_namespace(1, controllers=(0xFFFF,)), ST.CONTROLLER_LIST_INVALID),
    (lambda d: d.attach_namespace(1, count=0), ST.CONTROLLER_LIST_INVALID),
    (lambda d: d.attach_namespace(1, count=0xFFFF), ST.CONTROLLER_LIST_INVALID),
    (lambda d: d.attach_namespace(0xFFFFFFFF, detach=True), ST.INVALID_FIELD),
    (lambda d: d.attach_namespace(1, cdw10=0xF), ST.INVALID_FIELD),
    (lambda d: d.identify(CNS_ALLOCATED_NAMESPACE, 0xFFFFFFFE)[0], ST.INVALID_NAMESPACE),
], ids=["nsze0", "thin", "flbas", "shared", "huge", "cdw10", "delete-unknown",
        "attach-twice", "foreign-controller", "empty-list", "long-list", "detach-all",
        "attach-sel", "identify-11h"])
def test_hostile_fields(driver: NvmeDriver, managed_appliance: ApplianceProcess,
                        call: object, want: Status) -> None:
    assert result(call(driver)) == (want, True)  # type: ignore[operator]
    assert driver.active_namespaces() == [1] and created_images(managed_appliance) == []
