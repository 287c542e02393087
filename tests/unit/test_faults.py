"""Fault rules against the in-test NVMe driver (device layer, no sockets, fake clock)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nvme_admin import log_page
from test_nvme_driver import make_controller, status

from appliance.client.nvme import NvmeDriver
from appliance.control.fault_rules import (
    Direction,
    FaultError,
    FaultRule,
    FaultTarget,
    NetAction,
    NvmeAction,
)
from appliance.control.faults import FaultSet
from appliance.storage.request import RequestState
from appliance.storage.spec import AdminOpcode, Command, IoOpcode, Status
from appliance.testing.nvme import controller_driver
from appliance.vfio_user.wire import PciIrq


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[NvmeDriver, FaultSet, Clock]]:
    ctrl = make_controller(tmp_path, io_queues=2, queue_entries=64)
    clock = Clock()
    faults = FaultSet(clock=clock, seed=1)
    ctrl.faults = faults
    yield controller_driver(ctrl).ready(), faults, clock
    ctrl.close()


def read_cmd(d: NvmeDriver, slba: int, nlb: int = 1) -> Command:
    prp1, prp2, _ = d.buffer(nlb * 512)
    return Command(opcode=IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2, cdw10=slba, cdw12=nlb - 1)


@pytest.mark.parametrize("args, why", [
    ({"action": "explode"}, "action"),
    ({"action": "status", "probability": 2}, "probability"),
    ({"action": "status", "lba": "9-3"}, "lba"),
    ({"action": "status", "status": "0"}, "status"),
    ({"action": "delay"}, "delay"),
    ({"action": "drop", "direction": "sideways"}, "direction"),
    ({"action": "status", "colour": "red"}, "colour"),
    ({"target": "disk", "action": "status"}, "target"),
])
def test_bad_rules_are_refused_with_the_field_named(args: dict[str, object], why: str) -> None:
    with pytest.raises(FaultError, match=why):
        FaultRule.build(1, args)


def test_rules_hold_enums_and_show_the_same_strings() -> None:
    nvme = FaultRule.build(1, {"action": "delay", "delay": 1})
    net = FaultRule.build(2, {"action": "delay", "delay": 1, "direction": "both"})
    assert (nvme.target, nvme.action) == (FaultTarget.NVME, NvmeAction.DELAY)
    assert type(nvme.action) is NvmeAction and type(net.action) is NetAction
    assert net.direction is Direction.BOTH
    shown = json.loads(json.dumps(net.describe()))
    assert (shown["target"], shown["action"], shown["direction"]) == ("net", "delay", "both")
    assert json.dumps(nvme.describe()) == json.dumps(
        {"id": 1, "target": "nvme", "action": "delay", "count": 0, "probability": 1.0,
         "hits": 0, "seen": 0, "delay": 1.0})


@pytest.mark.parametrize("target, action, direction", [
    ("disk", "status", "rx"),
    (FaultTarget.NVME, NetAction.DROP, "rx"),  # a net action on an NVMe rule
    (FaultTarget.NET, "hang", "rx"),
    (FaultTarget.NET, NetAction.DROP, "sideways"),
])
def test_rule_construction_checks_its_enums(target: Any, action: Any, direction: Any) -> None:
    with pytest.raises(FaultError):
        FaultRule(1, target, action, direction=direction)


def test_status_fault_fails_only_the_matching_lba(rig: tuple[NvmeDriver, FaultSet, Clock]) -> None:
    d, faults, _ = rig
    faults.add({"action": "status", "lba": 8, "status": "unrecovered_read_error"})
    done, _ = d.io(IoOpcode.READ, slba=8, nlb=1)
    assert status(done) == (0x281, False)
    assert status(d.io(IoOpcode.READ, slba=7, nlb=1)[0]) == (Status.SUCCESS, False)
    assert status(d.io(IoOpcode.READ, slba=9, nlb=1)[0]) == (Status.SUCCESS, False)
    assert status(d.io(IoOpcode.READ, slba=0, nlb=16)[0])[0] == 0x281  # the range covers 8
    assert faults.counters["nvme.status"] == 2
    assert faults.rules[0].hits == 2 and d.bus.ctrl.counters["errors"] == 2
    # The Error Information entries name the LBA that failed (the rule's, inside the
    # command's range); SMART counts the media errors.
    errors = log_page(d, 1, 128)
    for at in (0, 64):
        count, sqid, _, sf, _, lba = struct.unpack_from("<QHHHHQ", errors, at)
        assert (sqid, (sf >> 1) & 0x7FF, lba) == (1, 0x281, 8), (at, count)
    smart = log_page(d, 2, 512)
    assert int.from_bytes(smart[160:176], "little") == 2  # media and data integrity errors


def test_count_limits_firings_and_admin_is_not_matched_by_default(
        rig: tuple[NvmeDriver, FaultSet, Clock]) -> None:
    d, faults, _ = rig
    faults.add({"action": "status", "count": 1, "status": "namespace_not_ready"})
    d.identify(1)  # admin commands pass unqualified rules
    assert status(d.io(IoOpcode.READ, 0, 1)[0]) == (0x82, False)
    assert status(d.io(IoOpcode.READ, 0, 1)[0]) == (Status.SUCCESS, False)
    assert faults.clear() == 1 and faults.rules == []


def test_probability_is_reproducible_with_a_seed(tmp_path: Path) -> None:
    def pattern(seed: int) -> list[bool]:
        fs = FaultSet(clock=Clock(), seed=seed)
        rule = fs.add({"action": "drop", "probability": 0.3, "port": "net0"})
        out = [not fs.frame("net0", "rx", b"x" * 60, lambda f: None) for _ in range(200)]
        assert rule.hits == sum(out) and rule.seen == 200
        return out

    a, b = pattern(7), pattern(7)
    assert a == b and 30 < sum(a) < 90


def test_delayed_completion_waits_for_the_clock(rig: tuple[NvmeDriver, FaultSet, Clock]) -> None:
    d, faults, clock = rig
    faults.add({"action": "delay", "delay": 2.0, "count": 1})
    payload = b"\x5a" * 512
    prp1, prp2, pages = d.buffer(512)
    d.scatter(pages, payload)
    cid = d.submit(1, Command(opcode=IoOpcode.WRITE, nsid=1, prp1=prp1, prp2=prp2, cdw10=3))
    assert d.reap(1) == [] and faults.waiting
    with open(d.bus.ctrl.namespaces[1].image, "rb") as f:  # the data is written already
        f.seek(3 * 512)
        assert f.read(512) == payload
    assert not d.bus.ctrl.poll()
    clock.now += 2.0
    assert d.bus.ctrl.poll()
    done = d.reap(1)
    assert [c.cid for c in done] == [cid] and status(done[0]) == (Status.SUCCESS, False)
    assert not faults.waiting


def test_hung_command_is_aborted_by_abort(rig: tuple[NvmeDriver, FaultSet, Clock]) -> None:
    d, faults, _ = rig
    faults.add({"action": "hang", "count": 1})
    cid = d.submit(1, read_cmd(d, 0))
    assert d.reap(1) == [] and len(faults.hung) == 1
    done = d.admin_command(AdminOpcode.ABORT, cdw10=cid << 16 | 1)
    assert status(done) == (Status.SUCCESS, False) and done.dw0 & 1 == 0
    aborted = d.reap(1)
    assert [c.cid for c in aborted] == [cid]
    assert status(aborted[0]) == (Status.ABORT_REQUESTED, False)
    assert faults.hung == []
    # an abort of something not outstanding: "not aborted"
    assert d.admin_command(AdminOpcode.ABORT, cdw10=0x7777 << 16 | 1).dw0 & 1 == 1


def test_delayed_request_is_aborted_and_the_queue_goes_on(
        rig: tuple[NvmeDriver, FaultSet, Clock]) -> None:
    """A request a delay fault holds is found by Abort: it completes once, with
    Command Abort Requested, and the delayed completion never follows."""
    d, faults, clock = rig
    faults.add({"action": "delay", "delay": 2.0, "count": 1})
    cid = d.submit(1, read_cmd(d, 0))
    assert d.reap(1) == [] and len(faults.deferred) == 1
    held = d.bus.ctrl.held_request(1, cid)
    assert held is not None and held.state is RequestState.HELD
    done = d.admin_command(AdminOpcode.ABORT, cdw10=cid << 16 | 1)
    assert status(done) == (Status.SUCCESS, False) and done.dw0 & 1 == 0
    aborted = d.reap(1)
    assert [c.cid for c in aborted] == [cid]
    assert status(aborted[0]) == (Status.ABORT_REQUESTED, False)
    assert held.state is RequestState.COMPLETED and faults.deferred == []
    assert d.bus.ctrl.counters["aborted"] == 1
    clock.now += 5.0
    d.bus.ctrl.poll()
    assert d.reap(1) == []  # no second completion for the aborted command
    assert status(d.io(IoOpcode.READ, 1, 1)[0]) == (Status.SUCCESS, False)  # the queue goes on


def test_reset_drops_held_requests_without_completions(
        rig: tuple[NvmeDriver, FaultSet, Clock]) -> None:
    d, faults, _ = rig
    faults.add({"action": "hang", "count": 1})
    cid = d.submit(1, read_cmd(d, 0))
    held = d.bus.ctrl.held_request(1, cid)
    assert held is not None
    d.write_reg(0x14, 0)  # CC.EN = 0
    assert held.state is RequestState.DROPPED and d.bus.ctrl.held == {}


def test_controller_reset_clears_hung_and_deferred(rig: tuple[NvmeDriver, FaultSet, Clock]) -> None:
    d, faults, clock = rig
    faults.add({"action": "hang", "count": 1})
    faults.add({"action": "delay", "delay": 1.0, "count": 1})
    d.submit(1, read_cmd(d, 0))
    d.submit(1, read_cmd(d, 1))
    assert len(faults.hung) == 1 and len(faults.deferred) == 1
    d.write_reg(0x14, 0)  # CC.EN = 0: controller reset
    d.ready()
    clock.now += 5
    d.bus.ctrl.poll()
    assert faults.hung == [] and faults.deferred == []
    assert status(d.io(IoOpcode.READ, 0, 1)[0]) == (Status.SUCCESS, False)


def test_fatal_sets_cfs_and_a_reset_recovers(rig: tuple[NvmeDriver, FaultSet, Clock]) -> None:
    d, faults, _ = rig
    faults.add({"action": "fatal", "count": 1})
    d.submit(1, read_cmd(d, 0))
    assert d.reap(1) == []
    assert d.csts & 0x2  # CSTS.CFS
    d.write_reg(0x14, 0)
    d.ready()
    assert not d.csts & 0x2
    assert status(d.io(IoOpcode.READ, 0, 1)[0]) == (Status.SUCCESS, False)


def test_dropped_interrupt_still_posts_the_completion(rig: tuple[NvmeDriver, FaultSet, Clock]) -> None:
    d, faults, _ = rig
    faults.add({"action": "drop_irq", "count": 1})
    d.bus.interrupts.take()
    cid = d.submit(1, read_cmd(d, 0))
    assert (PciIrq.MSIX, 1) not in d.bus.interrupts.take()
    assert [c.cid for c in d.reap(1)] == [cid]
    d.io(IoOpcode.READ, 0, 1)
    assert (PciIrq.MSIX, 1) in d.bus.interrupts.take()


def test_net_corrupt_duplicate_reorder_delay() -> None:
    clock = Clock()
    fs = FaultSet(clock=clock, seed=3)
    sent: list[bytes] = []
    frame = bytes(range(64))
    rule = fs.add({"action": "corrupt", "port": "net0", "count": 1})
    out = fs.frame("net0", "rx", frame, sent.append)
    assert len(out) == 1 and out[0] != frame and out[0][:14] == frame[:14]
    assert sum(a != b for a, b in zip(out[0], frame, strict=True)) == 1
    fs.clear(rule.id)
    fs.add({"action": "duplicate", "port": "net0", "count": 1})
    assert fs.frame("net0", "rx", frame, sent.append) == [frame, frame]
    fs.clear()
    fs.add({"action": "reorder", "port": "net0", "count": 1})
    assert fs.frame("net0", "rx", b"first", sent.append) == []
    assert fs.frame("net0", "rx", b"second", sent.append) == [b"second", b"first"]
    fs.clear()
    fs.add({"action": "delay", "port": "net0", "delay": 0.5, "direction": "tx", "count": 1})
    assert fs.frame("net0", "rx", b"rx-frame", sent.append) == [b"rx-frame"]
    assert fs.frame("net0", "tx", b"late", sent.append) == []
    assert fs.due_frames() == []
    clock.now += 0.5
    assert fs.due_frames() == [(sent.append, b"late")]
    assert fs.stats()["fired"] == {"net.corrupt": 1, "net.duplicate": 1, "net.reorder": 1,
                                   "net.delay": 1}


def test_state_moves_to_another_fault_set(rig: tuple[NvmeDriver, FaultSet, Clock]) -> None:
    """What a live handoff carries (through JSON): rules with their counts, counters,
    the RNG where it stood, dropped-irq marks and hung commands, re-attached to the
    destination's queues (here: the same controller's)."""
    import json

    d, faults, clock = rig
    faults.add({"action": "status", "lba": [8, 9], "count": 2, "status": "write_fault",
                "dnr": True})
    faults.add({"action": "drop", "probability": 0.5, "port": "net0", "seed": 3})
    faults.add({"action": "hang", "count": 1})
    assert status(d.io(IoOpcode.READ, slba=8, nlb=1)[0]) == (0x280, True)
    cid = d.submit(1, read_cmd(d, 0))  # hung
    for _ in range(5):
        faults.frame("net0", "rx", b"x" * 60, lambda f: None)
    state = json.loads(json.dumps(faults.export_state()))
    other = FaultSet(clock=clock, seed=99)
    other.import_state(state)  # a check changes nothing
    assert other.rules == [] and other.hung == []
    other.import_state(state, d.bus.ctrl)
    assert [r.describe() for r in other.rules] == [r.describe() for r in faults.rules]
    assert other.counters == faults.counters and [h.cid for h in other.hung] == [cid]
    drops = [not faults.frame("net0", "rx", b"x" * 60, lambda f: None) for _ in range(50)]
    assert [not other.frame("net0", "rx", b"x" * 60, lambda f: None) for _ in range(50)] == drops
    assert other.add({"action": "fatal", "qid": 7}).id == 4  # ids go on (qid 7: never matches)
    d.bus.ctrl.faults = other
    assert status(d.io(IoOpcode.READ, slba=9, nlb=1)[0]) == (0x280, True)  # second and last
    assert status(d.io(IoOpcode.READ, slba=9, nlb=1)[0]) == (Status.SUCCESS, False)
    assert d.admin_command(AdminOpcode.ABORT, cdw10=cid << 16 | 1).dw0 & 1 == 0  # the hung one
    assert [c.cid for c in d.reap(1)] == [cid]


@pytest.mark.parametrize("damage", [
    lambda s: s.update(rules=[{"id": 1, "action": "explode"}]),
    lambda s: s["rules"][0].update(lba=[9, 3]),
    lambda s: s.update(rng=[3, [1, 2], None]),
    lambda s: s.update(hung=[[7, 1]]),
    lambda s: s.update(counters=[1]),
    lambda s: s.pop("next_id"),
    lambda s: s.update(rules=s["rules"] * 257),  # more than MAX_RULES armed
    lambda s: s.update(rules=s["rules"] * 2),  # one id twice
    lambda s: s.update(next_id=1),  # the next rule added would reuse id 1
    lambda s: s.update(hung=[[1, 5], [1, 5]]),  # one command held twice
])
def test_a_bad_fault_state_is_refused_and_changes_nothing(rig: tuple[NvmeDriver, FaultSet, Clock],
                                                          damage: Any) -> None:
    d, faults, clock = rig
    faults.add({"action": "status", "lba": 8})
    state = faults.export_state()
    damage(state)
    other = FaultSet(clock=clock)
    other.add({"action": "fatal"})
    before = [r.describe() for r in other.rules]
    with pytest.raises(FaultError):
        other.import_state(state, d.bus.ctrl)
    assert [r.describe() for r in other.rules] == before


def test_rules_are_capped_and_a_refused_rule_changes_nothing() -> None:
    from appliance.control.faults import MAX_RULES

    faults = FaultSet(clock=lambda: 0.0, seed=1)
    state = faults.rng.getstate()
    with pytest.raises(FaultError, match="count"):
        faults.add({"action": "status", "seed": 99, "count": "²"})
    assert faults.rng.getstate() == state and faults.rules == []
    for _ in range(MAX_RULES):
        faults.add({"action": "status", "lba": 8})
    with pytest.raises(FaultError, match="at most"):
        faults.add({"action": "status", "lba": 8})
    assert len(faults.rules) == MAX_RULES
    faults.clear()
    assert faults.add({"action": "status"}).id == MAX_RULES + 1
