"""Fault control from inside the guest (OCP Error Injection, Set/Get Features C0h)
and edit-command faults, through the one NVMe driver (device layer, fake clock)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_faults import Clock, read_cmd
from test_nvme_driver import make_controller, status

from appliance.client.nvme import NvmeDriver
from appliance.control.fault_rules import FaultError
from appliance.control.faults import MAX_RULES, FaultSet
from appliance.control.guest_faults import GuestFaults
from appliance.storage.error_injection import DATA_SIZE, FEATURE_ID
from appliance.storage.spec import AdminOpcode, Completion, IoOpcode, Status
from appliance.testing.nvme import controller_driver

NAND_CORRUPTION, HW_MALFUNCTION, CONTROLLER_HANG = 0x07, 0x09, 0x01


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[NvmeDriver, FaultSet]]:
    """A driver on a controller with guest faults on (the fault set's hook installed)."""
    ctrl = make_controller(tmp_path, io_queues=2, queue_entries=64)
    faults = FaultSet(clock=Clock(), seed=1)
    ctrl.faults = faults
    ctrl.guest_faults = GuestFaults(faults)
    yield controller_driver(ctrl).ready(), faults
    ctrl.close()


def entry(type_: int, flags: int = 0x3, nrtdp: int = 0, rest: bytes = b"") -> bytes:
    """One 32-byte Error Injection entry (flags: bit 0 enable, bit 1 single)."""
    return (struct.pack("<BBHH", flags, 0, type_, nrtdp) + rest).ljust(32, b"\0")


def set_erri(d: NvmeDriver, data: bytes, nume: int | None = None, **fields: int) -> Completion:
    """Set Features C0h with ``data`` in a buffer; NUME from its length unless given."""
    prp1, prp2, pages = d.buffer(max(len(data), 1))
    d.scatter(pages, data)
    cdw11 = fields.pop("cdw11", len(data) // 32 if nume is None else nume)
    return d.admin_command(AdminOpcode.SET_FEATURES, cdw10=fields.pop("cdw10", FEATURE_ID),
                           cdw11=cdw11, prp1=prp1, prp2=prp2, **fields)


def get_erri(d: NvmeDriver) -> tuple[Completion, list[tuple[int, int]]]:
    """Get Features C0h: (completion, [(flags, type)] of the NUME entries returned)."""
    prp1, prp2, pages = d.buffer(DATA_SIZE)
    done = d.admin_command(AdminOpcode.GET_FEATURES, cdw10=FEATURE_ID, prp1=prp1, prp2=prp2)
    data = d.gather(pages, DATA_SIZE)
    return done, [struct.unpack_from("<BxH", data, 32 * i) for i in range(done.dw0 & 0x7F)]


def test_off_unless_the_config_enables_it(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path)
    ctrl.faults = FaultSet(clock=Clock())
    try:
        d = controller_driver(ctrl).ready()
        assert status(set_erri(d, entry(NAND_CORRUPTION))) == (Status.INVALID_FIELD, True)
        assert status(get_erri(d)[0]) == (Status.INVALID_FIELD, True)
        assert ctrl.faults.rules == []  # type: ignore[attr-defined]
    finally:
        ctrl.close()


def test_an_injection_fails_the_next_read_and_get_shows_it(
        rig: tuple[NvmeDriver, FaultSet]) -> None:
    d, faults = rig
    assert status(set_erri(d, entry(NAND_CORRUPTION))) == (Status.SUCCESS, False)
    done, entries = get_erri(d)
    assert done.dw0 == 1 and entries == [(0x3, NAND_CORRUPTION)]  # enabled, single
    listed = faults.stats()["rules"]
    assert [(r["action"], r["status"], r["dnr"], r["origin"], r["ocp_type"], r["count"])
            for r in listed] == [("status", "0x281", True, "guest", NAND_CORRUPTION, 1)]
    d.io(IoOpcode.WRITE, 0, 1, data=b"w" * 512)  # writes pass
    assert status(d.io(IoOpcode.READ, 0, 1)[0]) == (0x281, True)
    assert status(d.io(IoOpcode.READ, 0, 1)[0]) == (Status.SUCCESS, False)  # single: once
    assert get_erri(d)[1] == [(0x2, NAND_CORRUPTION)]  # fired: enable clear
    assert faults.counters == {"nvme.status": 1}


def test_a_set_replaces_the_guests_rules_and_keeps_the_control_sockets(
        rig: tuple[NvmeDriver, FaultSet]) -> None:
    d, faults = rig
    ctl = faults.add({"action": "delay", "delay": 1.0, "qid": 2})
    assert status(set_erri(d, entry(NAND_CORRUPTION) + entry(HW_MALFUNCTION, flags=1)))[0] == 0
    assert [r.guest_type for r in faults.rules] == [None, NAND_CORRUPTION, HW_MALFUNCTION]
    assert faults.rules[2].count == 0  # not single: every match
    assert status(set_erri(d, entry(CONTROLLER_HANG) + entry(HW_MALFUNCTION, flags=0)))[0] == 0
    assert [(r.guest_type, r.action) for r in faults.rules] == [(None, "delay"),
                                                                 (CONTROLLER_HANG, "hang")]
    assert status(set_erri(d, b"", nume=0))[0] == 0  # NUME 0: the guest's rules go
    assert faults.rules == [ctl] and get_erri(d)[0].dw0 == 0


@pytest.mark.parametrize("data, fields, why", [
    (entry(NAND_CORRUPTION), {"cdw11": 1 | 0x80}, "reserved CDW11 bits"),
    (entry(NAND_CORRUPTION, flags=0x7), {}, "reserved flag bit"),
    (entry(NAND_CORRUPTION)[:1] + b"\1" + entry(NAND_CORRUPTION)[2:], {}, "reserved byte 1"),
    (entry(0x03), {}, "a type the appliance does not map"),
    (entry(0xFFFF), {}, "an unknown type"),
    (entry(NAND_CORRUPTION, nrtdp=5), {}, "NRTDP (not implemented)"),
    (entry(NAND_CORRUPTION, rest=b"\0\0\xff"), {}, "type-specific bytes"),
    (entry(HW_MALFUNCTION) + entry(0x0C), {}, "a bad second entry: the first is not armed"),
])
def test_hostile_fields_are_invalid_field_and_arm_nothing(
        rig: tuple[NvmeDriver, FaultSet], data: bytes, fields: dict[str, int], why: str) -> None:
    d, faults = rig
    assert status(set_erri(d, entry(CONTROLLER_HANG)))[0] == 0
    assert status(set_erri(d, data, **fields)) == (Status.INVALID_FIELD, True), why
    assert [r.guest_type for r in faults.rules] == [CONTROLLER_HANG], why  # unchanged


def test_save_and_namespace_are_refused_with_their_own_status(
        rig: tuple[NvmeDriver, FaultSet]) -> None:
    d, faults = rig
    done = set_erri(d, entry(NAND_CORRUPTION), cdw10=FEATURE_ID | 1 << 31)
    assert status(done) == (Status.FEATURE_NOT_SAVEABLE, True)
    done = set_erri(d, entry(NAND_CORRUPTION), nsid=1)
    assert status(done) == (Status.FEATURE_NOT_NS_SPECIFIC, True)
    assert faults.rules == []


def test_injections_must_fit_beside_the_control_sockets_rules(
        rig: tuple[NvmeDriver, FaultSet]) -> None:
    d, faults = rig
    for _ in range(MAX_RULES - 1):
        faults.add({"action": "drop", "port": "net9"})
    assert status(set_erri(d, entry(NAND_CORRUPTION) * 2)) == (Status.INVALID_FIELD, True)
    assert status(set_erri(d, entry(NAND_CORRUPTION)))[0] == 0
    assert len(faults.rules) == MAX_RULES


def test_guest_rules_move_with_a_handoff(rig: tuple[NvmeDriver, FaultSet]) -> None:
    d, faults = rig
    set_erri(d, entry(NAND_CORRUPTION))
    faults.add({"action": "edit", "edit": "nsid=7", "qid": 2})
    state = json.loads(json.dumps(faults.export_state()))
    other = FaultSet(clock=Clock())
    other.import_state(state, d.bus.ctrl)
    assert [(r.guest_type, r.edit) for r in other.rules] == [(NAND_CORRUPTION, {}),
                                                             (None, {"nsid": 7})]
    assert GuestFaults(other).injections()[0].type == NAND_CORRUPTION


# ---------------------------------------------------------------- edit-command faults
def test_edit_rewrites_the_entry_before_the_controller_runs_it(
        rig: tuple[NvmeDriver, FaultSet]) -> None:
    d, faults = rig
    d.io(IoOpcode.WRITE, 5, 1, data=b"5" * 512)
    # a read of LBA 0 reads LBA 5: the driver gets data it did not ask for
    faults.add({"action": "edit", "opcode": IoOpcode.READ, "edit": {"cdw10": 5}, "count": 1})
    done, data = d.io(IoOpcode.READ, 0, 1)
    assert status(done) == (Status.SUCCESS, False) and data == b"5" * 512
    assert d.io(IoOpcode.READ, 0, 1)[1] == b"\0" * 512  # count 1: once
    # a namespace that does not exist, an opcode that does not: the controller's own statuses
    faults.add({"action": "edit", "edit": "nsid=9", "count": 1})
    assert status(d.io(IoOpcode.READ, 0, 1)[0]) == (Status.INVALID_NAMESPACE, True)
    faults.add({"action": "edit", "edit": "opcode=0x7f", "count": 1})
    assert status(d.io(IoOpcode.READ, 0, 1)[0]) == (Status.INVALID_OPCODE, True)
    # PRP1 pointing outside the guest's memory: a data transfer error
    faults.add({"action": "edit", "edit": {"prp1": 1 << 60}, "count": 1})
    assert status(d.io(IoOpcode.READ, 0, 1)[0])[0] == Status.DATA_TRANSFER_ERROR
    assert faults.counters["nvme.edit"] == 4
    assert faults.stats()["rules"][1]["edit"] == {"nsid": "0x9"}


def test_edit_keeps_the_cid_so_the_completion_matches(rig: tuple[NvmeDriver, FaultSet]) -> None:
    d, faults = rig
    faults.add({"action": "edit", "edit": {"cdw12": 0}, "qid": 1})
    cid = d.submit(1, read_cmd(d, 0, nlb=4))
    (done,) = d.reap(1)
    assert done.cid == cid and status(done) == (Status.SUCCESS, False)


@pytest.mark.parametrize("edit", [
    None, {}, "", "cid=1", "nsid", {"opcode": 256}, {"prp1": -1}, {"cdw10": True},
    {"cdw10": 1.5}, [1, 2], "cdw99=1", {"nsid": "0x1_0000_0000"},
])
def test_bad_edits_are_refused_with_the_field_named(
        rig: tuple[NvmeDriver, FaultSet], edit: object) -> None:
    _, faults = rig
    with pytest.raises(FaultError, match="edit"):
        faults.add({"action": "edit", "edit": edit})
    assert faults.rules == []
