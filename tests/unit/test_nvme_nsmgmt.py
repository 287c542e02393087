"""Namespace Management and Attachment through the one driver on an in-process
controller: create/attach/detach/delete, capacity accounting, the allocated and
active lists, the Namespace Attribute Changed event, every refusal, the image
rule, the config keys and an inventory change during a saving session."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.config import Config, ConfigError
from appliance.errors import LocalProtocolError
from appliance.storage import NvmeController
from appliance.storage.identify_spec import IdentifyNamespace
from appliance.storage.migration import NvmeMigratable
from appliance.storage.nsmgmt import (
    CNS_ALLOCATED_NAMESPACE,
    CNS_CONTROLLER_LIST,
    CNS_NS_CONTROLLER_LIST,
    OACS_NS_MANAGEMENT,
    NamespaceManagement,
)
from appliance.storage.spec import AdminOpcode, Cns, Command, FeatureId, IoOpcode, LogPage, Status
from appliance.testing.nvme import controller_driver
from tests.unit.test_nvme_driver import make_controller, status

ST = Status
MIB = 1 << 20


def managed(tmp_path: Path, remove: bool = False, capacity: int = 8 * MIB,
            max_namespaces: int = 4) -> NvmeController:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    return make_controller(tmp_path, management=NamespaceManagement(
        capacity=capacity, max_namespaces=max_namespaces, image_dir=str(images),
        remove_images=remove))


@pytest.fixture
def drv(tmp_path: Path) -> Iterator[NvmeDriver]:
    ctrl = managed(tmp_path)
    d = controller_driver(ctrl)
    d.setup(io_queues=1)
    yield d
    d.close()
    ctrl.close()


def images(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "images"))


def enable_ns_events(drv: NvmeDriver) -> int:
    aec = Command(opcode=AdminOpcode.SET_FEATURES, cdw10=FeatureId.ASYNC_EVENT_CONFIG,
                  cdw11=0x100)
    assert status(drv.command(0, aec))[0] == 0
    return drv.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))


def changed_list(drv: NvmeDriver) -> list[int]:
    done, raw = drv.log_page(LogPage.CHANGED_NS, 4096)
    assert status(done)[0] == 0
    return [n for n in struct.unpack("<1024I", raw) if n]


def test_identify_controller_offers_management(drv: NvmeDriver) -> None:
    idc = drv.identify_controller()
    assert idc.oacs & OACS_NS_MANAGEMENT and idc.nn == 4
    assert int.from_bytes(idc.tnvmcap, "little") == 8 * MIB
    assert int.from_bytes(idc.unvmcap, "little") == 7 * MIB  # the 1 MiB configured one
    assert drv.allocated_namespaces() == [1] == drv.active_namespaces()
    assert drv.controller_list(CNS_CONTROLLER_LIST) == [1]
    assert drv.controller_list(CNS_CONTROLLER_LIST, cntid=2) == []
    assert drv.controller_list(CNS_NS_CONTROLLER_LIST, 1) == [1]
    common = IdentifyNamespace.unpack(drv.identify(Cns.NAMESPACE, 0xFFFFFFFF)[1])
    assert common.nsze == 0 and common.lbaf0 >> 16 & 0xFF == 9  # 512-byte blocks
    effects = struct.unpack("<1024I", drv.log_page(LogPage.COMMANDS_EFFECTS, 4096)[1])
    assert effects[AdminOpcode.NAMESPACE_MANAGEMENT] == 1 | 1 << 3  # CSUPP, NIC


def test_create_attach_detach_delete(drv: NvmeDriver, tmp_path: Path) -> None:
    aer = enable_ns_events(drv)
    done = drv.create_namespace(2048)  # 1 MiB
    assert status(done) == (ST.SUCCESS, False) and done.dw0 == 2
    (image,) = images(tmp_path)
    assert image.startswith("nvme-ns2-") and os.path.getsize(tmp_path / "images" / image) == MIB
    assert drv.allocated_namespaces() == [1, 2] and drv.active_namespaces() == [1]
    assert drv.reap(0) == []  # created is not attached: no event
    assert drv.identify(Cns.NAMESPACE, 2)[1] == bytes(4096)  # inactive: zeroes
    assert IdentifyNamespace.unpack(drv.identify(CNS_ALLOCATED_NAMESPACE, 2)[1]).nsze == 2048
    assert drv.controller_list(CNS_NS_CONTROLLER_LIST, 2) == []
    assert int.from_bytes(drv.identify_controller().unvmcap, "little") == 6 * MIB
    assert status(drv.io(IoOpcode.READ, 0, 1, nsid=2)[0]) == (ST.INVALID_NAMESPACE, True)

    assert status(drv.attach_namespace(2)) == (ST.SUCCESS, False)
    (event,) = drv.reap(0)
    assert event.cid == aer and event.dw0 == 0x040002
    assert changed_list(drv) == [2]
    assert drv.active_namespaces() == [1, 2]
    assert drv.controller_list(CNS_NS_CONTROLLER_LIST, 2) == [1]
    drv.identify_namespace(2)
    drv.write(2, 5, b"\xab" * 512)
    assert drv.read(2, 5, 1) == b"\xab" * 512

    drv.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
    assert status(drv.attach_namespace(2, detach=True)) == (ST.SUCCESS, False)
    assert [e.dw0 for e in drv.reap(0)] == [0x040002] and changed_list(drv) == [2]
    assert drv.active_namespaces() == [1]
    assert status(drv.io(IoOpcode.READ, 5, 1, nsid=2)[0]) == (ST.INVALID_NAMESPACE, True)

    assert status(drv.delete_namespace(2)) == (ST.SUCCESS, False)
    assert drv.allocated_namespaces() == [1] and images(tmp_path) == [image]  # kept
    assert int.from_bytes(drv.identify_controller().unvmcap, "little") == 7 * MIB


def test_delete_attached_reports_and_removes_our_image(tmp_path: Path) -> None:
    ctrl = managed(tmp_path, remove=True)
    drv = controller_driver(ctrl)
    try:
        drv.setup(io_queues=1)
        nsid = drv.create_namespace(2048).dw0
        assert status(drv.attach_namespace(nsid))[0] == 0
        changed_list(drv)
        assert status(drv.delete_namespace(nsid))[0] == 0
        assert changed_list(drv) == [nsid] and images(tmp_path) == []
        # a configured namespace's image is never removed
        assert status(drv.delete_namespace(1))[0] == 0
        assert drv.allocated_namespaces() == [] and (tmp_path / "ns1.img").exists()
        assert ctrl.ns_mgmt.deleted == {1} and not ctrl.ns_mgmt.owned
    finally:
        drv.close()
        ctrl.close()


@pytest.mark.parametrize("remove", [True, False])
def test_delete_removes_the_side_file_with_the_image(tmp_path: Path, remove: bool) -> None:
    """A created namespace formatted with metadata has a side file beside its
    image: a delete that removes the image removes it too (else a host could
    fill image_dir with them), one that keeps the image keeps it."""
    ctrl = managed(tmp_path, remove=remove)
    drv = controller_driver(ctrl)
    try:
        drv.setup(io_queues=1)
        nsid = drv.create_namespace(2048).dw0
        assert status(drv.attach_namespace(nsid))[0] == 0
        fmt = Command(opcode=AdminOpcode.FORMAT_NVM, nsid=nsid, cdw10=1)  # 512 + 8 bytes
        assert status(drv.command(0, fmt))[0] == 0
        image = os.path.basename(ctrl.ns_mgmt.created[nsid])
        assert images(tmp_path) == [image, f"{image}.md"]
        assert status(drv.delete_namespace(nsid))[0] == 0
        assert images(tmp_path) == ([] if remove else [image, f"{image}.md"])
    finally:
        drv.close()
        ctrl.close()


def test_capacity_and_count_limits(drv: NvmeDriver) -> None:
    assert status(drv.create_namespace(7 * 2048 + 1)) == (ST.NS_INSUFFICIENT_CAPACITY, True)
    for nsid in (2, 3, 4):
        assert drv.create_namespace(8).dw0 == nsid
    assert status(drv.create_namespace(8)) == (ST.NS_ID_UNAVAILABLE, True)
    assert status(drv.delete_namespace(3))[0] == 0
    assert drv.create_namespace(8).dw0 == 3  # the lowest free NSID again
    assert status(drv.delete_namespace(0xFFFFFFFF))[0] == 0
    assert drv.allocated_namespaces() == []
    assert int.from_bytes(drv.identify_controller().unvmcap, "little") == 8 * MIB


@pytest.mark.parametrize(("fields", "want"), [
    ({"nsze": 0}, ST.INVALID_FIELD),
    ({"nsze": 16, "ncap": 8}, ST.INVALID_FIELD),  # thin provisioning
    ({"nsze": 16, "ncap": 32}, ST.INVALID_FIELD),
    ({"nsze": 16, "flbas": 1}, ST.INVALID_FORMAT),
    ({"nsze": 16, "flbas": 0x10}, ST.INVALID_FORMAT),  # extended metadata
    ({"nsze": 16, "dps": 1}, ST.INVALID_FORMAT),
    ({"nsze": 16, "nmic": 1}, ST.INVALID_FIELD),  # shared: one controller only
    ({"nsze": 16, "csi": 2}, ST.INVALID_FIELD),
    ({"nsze": 1 << 63}, ST.NS_INSUFFICIENT_CAPACITY),
    ({"nsze": 16, "cdw10": 2}, ST.INVALID_FIELD),  # SEL
    ({"nsze": 16, "cdw10": 0x100}, ST.INVALID_FIELD),  # reserved
])
def test_create_refusals(drv: NvmeDriver, tmp_path: Path, fields: dict[str, int],
                         want: Status) -> None:
    assert status(drv.create_namespace(**fields)) == (want, True)
    assert drv.allocated_namespaces() == [1] and images(tmp_path) == []


def test_attach_delete_refusals(drv: NvmeDriver) -> None:
    nsid = drv.create_namespace(16).dw0
    assert status(drv.attach_namespace(nsid, detach=True)) == (ST.NS_NOT_ATTACHED, True)
    assert status(drv.attach_namespace(1)) == (ST.NS_ALREADY_ATTACHED, True)
    assert status(drv.attach_namespace(nsid, controllers=(2,))) == (
        ST.CONTROLLER_LIST_INVALID, True)
    assert status(drv.attach_namespace(nsid, controllers=(1, 1))) == (
        ST.CONTROLLER_LIST_INVALID, True)
    assert status(drv.attach_namespace(nsid, controllers=())) == (
        ST.CONTROLLER_LIST_INVALID, True)
    assert status(drv.attach_namespace(nsid, count=0xFFFF)) == (
        ST.CONTROLLER_LIST_INVALID, True)
    assert status(drv.attach_namespace(0)) == (ST.INVALID_FIELD, True)
    assert status(drv.attach_namespace(0xFFFFFFFF)) == (ST.INVALID_FIELD, True)
    assert status(drv.attach_namespace(3)) == (ST.INVALID_NAMESPACE, True)
    assert status(drv.attach_namespace(nsid, cdw10=2)) == (ST.INVALID_FIELD, True)
    assert status(drv.delete_namespace(3)) == (ST.INVALID_NAMESPACE, True)
    assert status(drv.delete_namespace(0)) == (ST.INVALID_NAMESPACE, True)
    assert status(drv.identify(CNS_ALLOCATED_NAMESPACE, 9)[0]) == (ST.INVALID_NAMESPACE, True)
    assert status(drv.identify(CNS_NS_CONTROLLER_LIST, 3)[0]) == (ST.INVALID_NAMESPACE, True)
    assert drv.controller_list(CNS_NS_CONTROLLER_LIST, nsid) == []


def test_an_unreachable_data_buffer_changes_nothing(drv: NvmeDriver, tmp_path: Path) -> None:
    far = 0x7000_0000_0000  # outside guest memory
    done = drv.admin_command(AdminOpcode.NAMESPACE_MANAGEMENT, prp1=far, cdw10=0)
    assert status(done) == (ST.DATA_TRANSFER_ERROR, False) and images(tmp_path) == []
    done = drv.admin_command(AdminOpcode.NAMESPACE_ATTACHMENT, nsid=1, prp1=far, cdw10=1)
    assert status(done) == (ST.DATA_TRANSFER_ERROR, False)
    assert drv.allocated_namespaces() == [1] == drv.active_namespaces()


def test_without_management(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path)
    drv = controller_driver(ctrl)
    try:
        drv.setup(io_queues=1)
        idc = drv.identify_controller()
        assert not idc.oacs & OACS_NS_MANAGEMENT and idc.nn == 1 and idc.tnvmcap == bytes(16)
        assert status(drv.create_namespace(16)) == (ST.INVALID_OPCODE, True)
        assert status(drv.attach_namespace(1, detach=True)) == (ST.INVALID_OPCODE, True)
        assert status(drv.identify(0x10)[0]) == (ST.INVALID_FIELD, True)
        assert status(drv.identify(Cns.NAMESPACE, 0xFFFFFFFF)[0]) == (ST.INVALID_NAMESPACE, True)
        effects = struct.unpack("<1024I", drv.log_page(LogPage.COMMANDS_EFFECTS, 4096)[1])
        assert effects[AdminOpcode.NAMESPACE_MANAGEMENT] == 0
    finally:
        drv.close()
        ctrl.close()


def test_an_inventory_change_during_a_saving_session_is_ebusy(drv: NvmeDriver) -> None:
    ctrl = drv.bus.ctrl  # type: ignore[attr-defined]
    migratable = NvmeMigratable(ctrl)
    nsid = drv.create_namespace(16).dw0
    migratable.start_tracking()  # a created namespace migrates now
    assert status(drv.attach_namespace(1, detach=True))[0] == 0  # attachment is state
    migratable.save_state()
    assert status(drv.delete_namespace(nsid))[0] == 0
    with pytest.raises(LocalProtocolError, match="created or deleted during") as err:
        migratable.save_state()
    assert err.value.errno == errno.EBUSY
    with pytest.raises(LocalProtocolError, match="created or deleted during"):
        migratable.precopy_records(1 << 20)
    migratable.start_tracking()  # a new session starts from the new inventory
    migratable.save_state()
    assert status(drv.attach_namespace(1))[0] == 0


def test_config_keys() -> None:
    base = {"image": "/tmp/a.img", "size": "1M"}
    cfg = Config.from_dict({"storage": {"namespaces": [base], "capacity": "8M",
                                        "max_namespaces": 4, "namespace_images": "remove"}})
    assert (cfg.storage.capacity, cfg.storage.max_namespaces,
            cfg.storage.namespace_images) == (8 * MIB, 4, "remove")
    assert Config.from_dict(cfg.to_dict()) == cfg
    plain = Config.from_dict({"storage": {"namespaces": [base]}})
    assert plain.storage.capacity is None and Config.from_dict(plain.to_dict()) == plain
    for storage, message in [
        ({"capacity": "512K"}, "storage.capacity: must be at least"),
        ({"capacity": "8M", "max_namespaces": 0}, "storage.max_namespaces: must be an integer"),
        ({"namespace_images": "trash"}, "storage.namespace_images: must be one of keep, remove"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Config.from_dict({"storage": {"namespaces": [base], **storage}})
    with pytest.raises(ConfigError, match="storage.max_namespaces: must be at least the 2"):
        Config.from_dict({"storage": {"namespaces": [base, {**base, "image": "/tmp/b.img"}],
                                      "capacity": "8M", "max_namespaces": 1}})


def test_resize_stays_within_the_capacity(drv: NvmeDriver) -> None:
    from appliance.control.commands import Target, dispatch
    from appliance.control.protocol import ControlError, Request

    ctrl = drv.bus.ctrl  # type: ignore[attr-defined]
    target = Target(controller=ctrl)
    with pytest.raises(ControlError, match="do not fit in the 7340032 unallocated"):
        dispatch(target, Request(1, "namespace.resize", {"size": "9M"}))
    assert dispatch(target, Request(2, "namespace.resize", {"size": "8M"}))["size"] == 8 * MIB
    assert int.from_bytes(drv.identify_controller().unvmcap, "little") == 0
    assert status(drv.create_namespace(8)) == (ST.NS_INSUFFICIENT_CAPACITY, True)


def test_the_fingerprint_names_the_management_settings(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    plain = make_controller(tmp_path / "plain")
    ctrl = managed(tmp_path)
    try:
        assert b"nsmgmt" not in NvmeMigratable.fingerprint_extra(plain)
        assert b"nsmgmt:8388608:4" in NvmeMigratable.fingerprint_extra(ctrl)
    finally:
        plain.close()
        ctrl.close()
