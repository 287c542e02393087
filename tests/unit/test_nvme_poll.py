"""NvmeController.poll, the loop's every-turn call: a pass only when one could find work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import make_controller

from appliance.storage import NvmeController
from appliance.storage.processing_pass import SQ_BUDGET
from appliance.storage.spec import Command, IoOpcode
from appliance.testing.nvme import controller_driver

pytestmark = pytest.mark.usefixtures("nvme_fastpath")  # both I/O queue paths


@pytest.fixture
def ctrl(tmp_path: Path) -> Iterator[NvmeController]:
    c = make_controller(tmp_path, io_queues=2, queue_entries=256, doorbells="mmap")
    yield c
    c.close()


@pytest.fixture
def passes(ctrl: NvmeController, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each processing pass returned."""
    seen: list[bool] = []
    run = ctrl._run

    def counted() -> bool:
        seen.append(run())
        return seen[-1]

    monkeypatch.setattr(ctrl, "_run", counted)
    return seen


def test_a_quiet_poll_runs_no_pass(ctrl: NvmeController, passes: list[bool]) -> None:
    d = controller_driver(ctrl, doorbells="mmap", auto_poll=True).ready()
    d.command(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    passes.clear()
    assert ctrl.poll() is False and passes == []
    d.bus.auto_poll = False
    cid = d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))  # a doorbell: a pass
    assert ctrl.poll() is True and passes == [True]
    assert [c.cid for c in d.reap(1)] == [cid]
    d.close()


def test_an_sq_left_by_the_budget_runs_without_a_doorbell(ctrl: NvmeController,
                                                          passes: list[bool]) -> None:
    d = controller_driver(ctrl, doorbells="mmap").ready(io_queues=0)
    d._set_queue_count(2)
    d.create_queue_pair(2, 128)
    d.bus.auto_poll = False
    for _ in range(SQ_BUDGET + 10):
        d.submit(2, Command(opcode=IoOpcode.FLUSH, nsid=1), ring=False)
    d.ring(2)
    assert ctrl.poll() is True and ctrl.sqs[2].head == SQ_BUDGET  # one budget's worth
    passes.clear()
    assert ctrl.poll() is True and passes == [True]  # the rest, with no doorbell moved
    assert ctrl.sqs[2].head == SQ_BUDGET + 10
    assert len(d.reap(2)) == SQ_BUDGET + 10
    d.close()


@pytest.mark.parametrize("pending", ["shadow", "held", "waiting", "event", "backlog",
                                     "unsignalled"])
def test_anything_pending_is_not_quiet(ctrl: NvmeController, pending: str) -> None:
    d = controller_driver(ctrl, doorbells="mmap").ready()
    assert ctrl._quiet()
    cq = ctrl.cqs[1]
    if pending == "shadow":
        ctrl.shadow_buffers = (d.pages.alloc(), d.pages.alloc())
    elif pending == "held":
        ctrl.held[(1, 7)] = object()  # type: ignore[assignment]
    elif pending == "waiting":
        ctrl.waiting.append(object())  # type: ignore[arg-type]
    elif pending == "event":
        ctrl.events.outstanding.append(3)
        ctrl.events.pending.append((0, 0, 1))
    elif pending == "backlog":
        cq.backlog.append(object())  # type: ignore[arg-type]
    else:
        cq.unsignalled = True
    assert not ctrl._quiet()
    d.close()


def test_a_cq_head_message_runs_no_pass_an_sq_tail_does(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ctrl = make_controller(tmp_path, io_queues=1, queue_entries=64)  # doorbells as messages
    d = controller_driver(ctrl).ready()
    seen: list[bool] = []
    run = ctrl._run
    monkeypatch.setattr(ctrl, "_run", lambda: seen.append(run()) or seen[-1])
    cid = d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))  # SQ tail: a pass
    assert seen == [True]
    assert [c.cid for c in d.reap(1)] == [cid]  # the reap's CQ head write: nothing to do
    assert seen == [True] and ctrl.cqs[1].head == 1
    d.close()
    ctrl.close()
