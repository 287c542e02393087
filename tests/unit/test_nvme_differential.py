"""The NVMe I/O queue path in C against the Python reference, command for command.

Hypothesis fills an I/O submission queue with Reads and Writes (and commands the
C path hands back: Flush, other opcodes, SGLs, fused or reserved flags), valid
and hostile: PRPs misaligned, unmapped or random, PRP lists that point
anywhere, LBAs past the end, transfers past MDTS, a read-only namespace, FUA.
The same queue runs on a controller without the fast path and on one with it;
every byte of guest memory (data, CQ entries), the completions, the counters,
the Error Information log, the interrupts, the dirty log, the namespaces'
change hooks and the image bytes must be the same.

The doorbell-page poller (``nvme_poll``, storage/native_poll.py) gets the same
treatment over a sequence of steps: commands placed on two I/O queues, SQ
tails and CQ heads stored into the mmap'd doorbell page, polls, stray stores
(the admin queue's slots, a queue that does not exist, values Python
refuses), a vector masked and unmasked; a controller with the poller and one
in pure Python must leave the same memory, completions, interrupts (counted
on real eventfds), counters, error log, queues and images.
"""

from __future__ import annotations

import copy
import logging
import os
import random
from pathlib import Path
from typing import Any

import pytest
from fastpath_support import require_native
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_nvme_driver import UNMAPPED, make_controller

from appliance.client.nvme import NvmeDriver
from appliance.config import NamespaceConfig
from appliance.memory import DirtyLog
from appliance.storage import processing_pass
from appliance.storage.controller import NvmeController
from appliance.storage.native_io import native_memory, run_batch
from appliance.storage.spec import AdminOpcode, Command, FeatureId, IoOpcode
from appliance.testing.nvme import BASE, SIZE, ControllerBus, controller_driver
from appliance.vfio_user.wire import PciIrq

NS_SIZE = 256 << 10  # 512 blocks of 512 bytes per namespace
ROM = 0x2000_0000  # a DMA-message region nothing points into
PAGE = 4096

PRP_KINDS = ("good", "scattered", "prp1_misaligned", "prp1_page_offset", "prp2_offset",
             "prp1_unmapped", "prp2_unmapped", "list_unmapped_entry", "list_misaligned_entry",
             "random")

valid_st = st.fixed_dictionaries({
    "opcode": st.sampled_from([IoOpcode.READ, IoOpcode.WRITE]),
    "flags": st.just(0),
    "nsid": st.sampled_from([1, 1, 2]),
    "slba": st.integers(0, 480),
    "nlb": st.integers(0, 31),
    "cdw12_bits": st.just(0),
    "prp": st.sampled_from(["good", "scattered", "prp1_page_offset"]),
    "seed": st.integers(0, 1 << 30),
})
hostile_st = st.fixed_dictionaries({
    "opcode": st.sampled_from([IoOpcode.READ, IoOpcode.WRITE, IoOpcode.READ, IoOpcode.WRITE,
                               IoOpcode.FLUSH, IoOpcode.COMPARE, 0x7F]),
    "flags": st.sampled_from([0, 0, 0, 0, 0x40, 0x01, 0x04, 0x80]),
    "nsid": st.sampled_from([1, 1, 1, 2, 0, 3, 0xFFFFFFFF]),
    "slba": st.one_of(st.integers(0, 511), st.sampled_from([510, 511, 512, 1 << 40, (1 << 64) - 1])),
    "nlb": st.one_of(st.integers(0, 24), st.sampled_from([255, 1023, 1024, 0xFFFF])),
    "cdw12_bits": st.sampled_from([0, 0, 0, 1 << 30, 1 << 16, 1 << 26]),
    "prp": st.sampled_from(PRP_KINDS),
    "seed": st.integers(0, 1 << 30),
})
command_st = st.one_of(valid_st, hostile_st)


def _pointers(d: NvmeDriver, cmd: dict[str, Any], nbytes: int) -> tuple[int, int]:
    """PRP1 and PRP2 of the kind the example asks for (buffers filled with bytes)."""
    rng = random.Random(cmd["seed"])
    kind = cmd["prp"]
    if kind == "random":
        return rng.getrandbits(64), rng.getrandbits(64)
    size = min(max(nbytes, 1), 160 * PAGE)
    prp1, prp2, pages = d.buffer(size + PAGE, scatter=kind == "scattered")
    d.scatter(pages, rng.randbytes(len(pages) * PAGE))
    if kind == "prp1_misaligned":
        prp1 += 2
    elif kind == "prp1_page_offset":
        prp1 += 4 * rng.randrange(1, 1024)
    elif kind == "prp2_offset":
        prp2 += 8
    elif kind == "prp1_unmapped":
        prp1 = UNMAPPED
    elif kind == "prp2_unmapped":
        prp2 = UNMAPPED
    elif kind == "list_unmapped_entry" and nbytes > 2 * PAGE and len(pages) > 2:
        d.put(prp2 + 8 * rng.randrange(0, min(len(pages) - 2, 8)), UNMAPPED.to_bytes(8, "little"))
    elif kind == "list_misaligned_entry" and nbytes > 2 * PAGE and len(pages) > 2:
        at = prp2 + 8 * rng.randrange(0, min(len(pages) - 2, 8))
        d.put(at, (int.from_bytes(d.get(at, 8), "little") + 512).to_bytes(8, "little"))
    return prp1, prp2


def _run(tmp: Path, native: bool, commands: list[dict[str, Any]],
         write_cache: bool) -> dict[str, Any]:
    tmp.mkdir()
    image = random.Random(7).randbytes(NS_SIZE)
    cfgs = []
    for nsid in (1, 2):  # NSID 2 read-only: its writes are refused
        (tmp / f"ns{nsid}.img").write_bytes(image)
        cfgs.append(NamespaceConfig(image=str(tmp / f"ns{nsid}.img"), size=NS_SIZE,
                                    block_size=512, read_only=nsid == 2, grow=False))
    ctrl = NvmeController(cfgs, io_queues=1, queue_entries=64)
    try:
        if native:
            ctrl.native = require_native()
        changes: list[tuple[int, int, int]] = []
        for nsid, ns in ctrl.namespaces.items():
            ns.on_change = lambda offset, length, nsid=nsid: changes.append((nsid, offset, length))
        d = controller_driver(ctrl)
        d.setup(io_queues=1, depth=64)
        assert ctrl.memory is not None
        ctrl.memory.dirty_log = DirtyLog()
        ctrl.features.values[FeatureId.VOLATILE_WRITE_CACHE] = int(write_cache)
        for cmd in commands:
            nlb = cmd["nlb"] + 1
            prp1, prp2 = _pointers(d, cmd, nlb * 512)
            d.submit(1, Command(opcode=cmd["opcode"], flags=cmd["flags"], nsid=cmd["nsid"],
                                prp1=prp1, prp2=prp2, cdw10=cmd["slba"] & 0xFFFFFFFF,
                                cdw11=cmd["slba"] >> 32, cdw12=cmd["nlb"] | cmd["cdw12_bits"]),
                     ring=False)
        d.ring(1)
        done = d.reap(1)
        images = {nsid: Path(ns.image).read_bytes() for nsid, ns in ctrl.namespaces.items()}
        return {
            "completions": [(c.cid, c.status, c.dnr, c.dw0) for c in done],
            "memory": d.get(BASE, SIZE),
            "counters": copy.deepcopy(ctrl.counters),  # (key order aside)
            "error_log": ctrl.error_log.page(),
            "dirty": sorted(ctrl.memory.dirty_log.pages),
            "changes": changes,
            "images": images,
            "queues": [(q.qid, q.head, q.tail) for q in ctrl.sqs.values()]
                      + [(q.qid, q.head, q.tail, q.phase) for q in ctrl.cqs.values()],
            "csts": ctrl.regs.read(0x1C, 4),
        }
    finally:
        ctrl.close()


@settings(max_examples=int(os.environ.get("APPLIANCE_DIFF_EXAMPLES", "80")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(commands=st.lists(command_st, min_size=1, max_size=40), write_cache=st.booleans())
def test_both_paths_leave_the_same_traces(tmp_path: Path, commands: list[dict[str, Any]],
                                          write_cache: bool) -> None:
    run = os.urandom(6).hex()
    python = _run(tmp_path / f"{run}-python", False, commands, write_cache)
    native = _run(tmp_path / f"{run}-native", True, commands, write_cache)
    for key in python:
        assert python[key] == native[key], key


def test_the_c_path_runs_reads_and_writes(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid Reads and Writes run natively (not handed back), the rest in Python."""
    ran: list[tuple[int, bool]] = []

    def counted(*args: Any) -> tuple[int, bool]:
        outcome = run_batch(*args)
        ran.append(outcome)
        return outcome

    monkeypatch.setattr(processing_pass, "run_batch", counted)
    good = {"flags": 0, "nsid": 1, "slba": 8, "nlb": 15, "cdw12_bits": 0, "prp": "good",
            "seed": 1}
    commands = [dict(good, opcode=IoOpcode.WRITE), dict(good, opcode=IoOpcode.READ),
                dict(good, opcode=IoOpcode.FLUSH), dict(good, opcode=IoOpcode.READ, prp="scattered")]
    python = _run(tmp_path / "python", False, commands, True)
    assert not ran
    native = _run(tmp_path / "native", True, commands, True)
    assert python == native
    assert sum(n for n, _ in ran) == 3 and any(back for _, back in ran)  # the Flush: Python


def test_native_is_the_controllers_only_when_handed_over() -> None:
    assert NvmeController.native is None


def test_tracing_keeps_the_io_queues_in_python(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Debug logging (``ctl trace on``) on: every command runs where it is logged."""
    ran: list[tuple[int, bool]] = []
    monkeypatch.setattr(processing_pass, "run_batch", lambda *args: ran.append((0, True)) or (0, True))
    logger = logging.getLogger("appliance.storage")
    monkeypatch.setattr(logger, "level", logging.DEBUG)
    logger.manager._clear_cache()  # type: ignore[attr-defined]
    try:
        good = {"opcode": IoOpcode.WRITE, "flags": 0, "nsid": 1, "slba": 8, "nlb": 7,
                "cdw12_bits": 0, "prp": "good", "seed": 1}
        outcome = _run(tmp_path / "native", True, [good], True)
    finally:
        monkeypatch.undo()
        logger.manager._clear_cache()  # type: ignore[attr-defined]
    assert outcome["completions"][0][1:3] == (0, False) and ran == []


def test_an_armed_fault_rule_keeps_the_io_queues_in_python(tmp_path: Path) -> None:
    class Faults:
        def __init__(self) -> None:
            self.rules: list[object] = []

    ctrl = make_controller(tmp_path, io_queues=1)
    try:
        ctrl.native = require_native()
        controller_driver(ctrl).setup(io_queues=1)
        faults = Faults()
        ctrl.faults = faults  # type: ignore[assignment]
        sq = ctrl.sqs[1]
        assert native_memory(ctrl, sq) is not None  # no rule: C runs it
        assert native_memory(ctrl, ctrl.sqs[0]) is None  # never the admin queue
        faults.rules.append(object())
        assert native_memory(ctrl, sq) is None
    finally:
        ctrl.close()


# ---------------------------------------------------------------- the doorbell-page poller
# Reads and Writes of a few blocks in the same 40: the order across queues shows
overlapping_st = valid_st.map(lambda cmd: dict(cmd, slba=cmd["slba"] % 40, nlb=cmd["nlb"] % 8))
step_st = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from([1, 2]), st.one_of(command_st, overlapping_st)),
    st.tuples(st.just("ring"), st.sampled_from([1, 2])),
    st.tuples(st.just("reap"), st.sampled_from([1, 2])),
    st.tuples(st.just("poll")),
    st.tuples(st.just("stray"), st.sampled_from([0, 1, 2, 3, 5, 6, 7, 40]),
              st.sampled_from([0, 1, 7, 63, 64, 1000])),
    st.tuples(st.just("mask"), st.sampled_from([1, 2]), st.booleans()),
)


def _shadow_doorbells(d: NvmeDriver) -> None:
    """Doorbell Buffer Config, as Linux does it: the I/O queues' doorbells go to
    the shadow buffer, and ring only when the controller's EventIdx asks."""
    dbs, eis = d.alloc(4096), d.alloc(4096)
    assert d.admin_command(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=dbs, prp2=eis).status == 0
    d.shadow_doorbells = (dbs, eis)


def _polled(tmp: Path, native: bool, steps: list[tuple[Any, ...]], tracked: bool,
            write_cache: bool, shadow: bool = False) -> dict[str, Any]:
    """The steps on a controller with mmap'd doorbells (and with ``native`` the
    fast path, so the C poller), every interrupt counted on an eventfd;
    ``shadow``: with shadow doorbells."""
    tmp.mkdir()
    image = random.Random(7).randbytes(NS_SIZE)
    cfgs = []
    for nsid in (1, 2):
        (tmp / f"ns{nsid}.img").write_bytes(image)
        cfgs.append(NamespaceConfig(image=str(tmp / f"ns{nsid}.img"), size=NS_SIZE,
                                    block_size=512, read_only=nsid == 2, grow=False))
    ctrl = NvmeController(cfgs, io_queues=2, queue_entries=64, doorbells="mmap")
    try:
        if native:
            ctrl.native = require_native()
        changes: list[tuple[int, int, int]] = []
        d = controller_driver(ctrl, doorbells="mmap", eventfds=True)
        d.setup(io_queues=2, depth=16)
        if shadow:
            _shadow_doorbells(d)
        bus = d.bus
        assert isinstance(bus, ControllerBus) and ctrl.memory is not None
        bus.auto_poll = False  # the steps say when the controller looks
        ctrl.memory.map(ROM, 0x10000)  # a region without an fd (QEMU's ROMs): C never uses it
        ctrl.features.values[FeatureId.VOLATILE_WRITE_CACHE] = int(write_cache)
        for nsid, ns in ctrl.namespaces.items():  # (the runtime's are always installed)
            ns.on_change = lambda off, n, nsid=nsid: changes.append((nsid, off, n))
        if tracked:  # a dirty log of guest memory: the poller leaves it to Python
            ctrl.memory.dirty_log = DirtyLog()
        bus.interrupts.signalled()  # (the bring-up's)
        page = d.doorbell_words
        assert page is not None
        reaped: list[tuple[int, int, int, bool, int]] = []
        for step in steps:
            kind = step[0]
            if kind == "submit":
                qid, cmd = step[1], step[2]
                if len(d.queues[qid].outstanding) >= d.queues[qid].depth - 1:
                    continue
                nlb = cmd["nlb"] + 1
                prp1, prp2 = _pointers(d, cmd, nlb * 512)
                d.submit(qid, Command(opcode=cmd["opcode"], flags=cmd["flags"], nsid=cmd["nsid"],
                                      prp1=prp1, prp2=prp2, cdw10=cmd["slba"] & 0xFFFFFFFF,
                                      cdw11=cmd["slba"] >> 32,
                                      cdw12=cmd["nlb"] | cmd["cdw12_bits"]), ring=False)
            elif kind == "ring":
                d.ring(step[1])
            elif kind == "reap":
                reaped += [(step[1], c.cid, c.status, c.dnr, c.dw0) for c in d.reap(step[1])]
            elif kind == "poll":
                ctrl.poll()
            elif kind == "stray":
                page[step[1]] = step[2]
            else:
                ctrl.irq_mask(PciIrq.MSIX, step[1], 1, step[2])
        for qid in (1, 2):
            ctrl.irq_mask(PciIrq.MSIX, qid, 1, False)
        for _ in range(4):
            ctrl.poll()
        for qid in (1, 2):
            reaped += [(qid, c.cid, c.status, c.dnr, c.dw0) for c in d.reap(qid)]
        ctrl.poll()
        images = {nsid: Path(ns.image).read_bytes() for nsid, ns in ctrl.namespaces.items()}
        return {
            "completions": reaped,
            "memory": d.get(BASE, SIZE),
            "interrupts": bus.interrupts.signalled(),
            "irq_stats": copy.deepcopy(ctrl.irq_stats),
            "counters": copy.deepcopy(ctrl.counters),
            "error_log": ctrl.error_log.page(),
            "dirty": sorted(ctrl.memory.dirty_log.pages) if ctrl.memory.dirty_log else [],
            "changes": changes,
            "images": images,
            "queues": [(q.qid, q.head, q.tail) for q in ctrl.sqs.values()]
                      + [(q.qid, q.head, q.tail, q.phase) for q in ctrl.cqs.values()],
            "csts": ctrl.regs.read(0x1C, 4),
            "event_idx": d.get(d.shadow_doorbells[1], 64) if d.shadow_doorbells else b"",
        }
    finally:
        ctrl.close()


@settings(max_examples=int(os.environ.get("APPLIANCE_DIFF_EXAMPLES", "80")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(step_st, min_size=1, max_size=60), tracked=st.booleans(),
       write_cache=st.booleans(), shadow=st.booleans())
def test_the_doorbell_poller_leaves_the_same_traces(tmp_path: Path, steps: list[tuple[Any, ...]],
                                                   tracked: bool, write_cache: bool,
                                                   shadow: bool) -> None:
    run = os.urandom(6).hex()
    python = _polled(tmp_path / f"{run}-python", False, steps, tracked, write_cache, shadow)
    native = _polled(tmp_path / f"{run}-native", True, steps, tracked, write_cache, shadow)
    for key in python:
        assert python[key] == native[key], key


@pytest.mark.parametrize("shadow", [False, True])
def test_the_doorbell_poller_runs_a_qd1_io_alone(tmp_path: Path, shadow: bool) -> None:
    """Ring, poll, reap: the C call latches the tail (from the page, or from the
    shadow buffer), runs the Read, posts it and writes the eventfd; no Python
    pass runs."""
    ctrl = make_controller(tmp_path, io_queues=1, doorbells="mmap")
    try:
        ctrl.native = require_native()
        d = controller_driver(ctrl, doorbells="mmap", eventfds=True)
        assert ctrl.memory is not None
        ctrl.memory.map(ROM, 0x10000)  # (as QEMU's ROMs: the fast path runs all the same)
        d.setup(io_queues=1)
        if shadow:
            _shadow_doorbells(d)
        bus = d.bus
        assert isinstance(bus, ControllerBus)
        bus.auto_poll = False
        ctrl.poll()
        ctrl.poll()
        assert ctrl._poller is not None  # the plan
        passes: list[int] = []
        real_run = ctrl._run
        ctrl._run = lambda: passes.append(1) or real_run()  # type: ignore[method-assign]
        bus.interrupts.signalled()
        bus.interrupts.take()
        prp1, prp2, _ = d.buffer(4096)
        for lba in (0, 8, 16):
            d.submit(1, d.rw_command(IoOpcode.READ, 1, lba, 8, prp1, prp2))
            assert ctrl.poll() is True
            (done,) = d.reap(1)
            assert done.status == 0
            ctrl.poll()  # the CQ head: latched, nothing to run
            assert bus.interrupts.signalled()[1] == 1 and bus.interrupts.calls == []
        assert passes == []
        assert ctrl.counters["commands"]["io.read"] == 3 and ctrl.counters["interrupts"] >= 3
        ctrl.pause()  # a save: the poller stops, Python's queues are the whole state
        assert ctrl._poller is None and (ctrl.sqs[1].head, ctrl.sqs[1].tail) == (3, 3)
        # (a shadowed CQ head is read only when the CQ is full, by Python too)
        assert (ctrl.cqs[1].head, ctrl.cqs[1].tail) == (0 if shadow else 3, 3)
    finally:
        ctrl.close()
