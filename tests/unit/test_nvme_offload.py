"""Blocking namespace I/O runs off the loop (the controller's offload), and one
busy queue yields to the others (the per-pass budget).

:class:`HeldOffload` plays the runtime's worker pool deterministically: it
keeps each submitted work until the test runs it.  The real pool
(appliance.runtime.offload) is tested at the end.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_nvme_driver import make_controller, status

from appliance.client.nvme import NvmeDriver
from appliance.memory import DirtyLog
from appliance.pci.config import COMMAND, PciCommand
from appliance.runtime.loop import EventLoop
from appliance.runtime.offload import Offload
from appliance.storage.namespace import Namespace
from appliance.storage.processing_pass import SQ_BUDGET
from appliance.storage.request import RequestState
from appliance.storage.spec import AdminOpcode, Command, IoOpcode, Status
from appliance.testing.nvme import controller_driver
from appliance.vfio_user.wire import PciRegion


class HeldOffload:
    """Submitted works wait until :meth:`run_all` (or a drain) runs them."""

    def __init__(self) -> None:
        self.works: list[tuple[Callable[[], object], Callable[[BaseException | None], None]]] = []
        self.drains = 0

    def submit(self, work: Callable[[], object],
               done: Callable[[BaseException | None], None]) -> None:
        self.works.append((work, done))

    def run_all(self) -> int:
        n = 0
        while self.works:
            work, done = self.works.pop(0)
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - handed on, as the pool does
                done(exc)
            else:
                done(None)
            n += 1
        return n

    def drain(self) -> None:
        self.drains += 1
        self.run_all()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[NvmeDriver, HeldOffload]]:
    ctrl = make_controller(tmp_path, io_queues=2, queue_entries=256)
    offload = HeldOffload()
    ctrl.offload = offload
    yield controller_driver(ctrl).ready(), offload
    ctrl.close()


def flush_cmd() -> Command:
    return Command(opcode=IoOpcode.FLUSH, nsid=1)


def test_flush_runs_off_the_loop_and_the_queue_goes_on(rig: tuple[NvmeDriver, HeldOffload]) -> None:
    d, offload = rig
    cid = d.submit(1, flush_cmd())
    assert d.reap(1) == [] and len(offload.works) == 1  # the fdatasync waits for a worker
    [req] = d.bus.ctrl.waiting
    assert req.cid == cid and req.state is RequestState.WAITING and req.io_busy
    done, _ = d.io(IoOpcode.READ, slba=0, nlb=1)  # meanwhile: served at once
    assert status(done) == (Status.SUCCESS, False)
    d.bus.interrupts.take()
    assert offload.run_all() == 1
    finished = d.reap(1)
    assert [c.cid for c in finished] == [cid] and status(finished[0]) == (Status.SUCCESS, False)
    assert d.bus.interrupts.take()  # its interrupt, raised when the work came back


def test_a_read_the_page_cache_lacks_is_offloaded_and_lands(
        rig: tuple[NvmeDriver, HeldOffload], monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop tries the page cache only (RWF_NOWAIT); what would wait for the
    disk is read again by a worker, into the same guest buffers."""
    d, offload = rig
    data = os.urandom(64 << 10)
    assert status(d.io(IoOpcode.WRITE, slba=64, nlb=128, data=data)[0]) == (Status.SUCCESS, False)
    tries: list[bool] = []
    real = Namespace.read_into

    def uncached(self: Namespace, views: list[memoryview], slba: int, *,
                 nowait: bool = False) -> bool:
        tries.append(nowait)
        return False if nowait else real(self, views, slba)

    monkeypatch.setattr(Namespace, "read_into", uncached)
    prp1, prp2, pages = d.buffer(len(data))
    cid = d.submit(1, Command(opcode=IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2, cdw10=64,
                              cdw12=127))
    assert d.reap(1) == [] and tries == [True] and len(offload.works) == 1
    offload.run_all()
    assert tries == [True, False]
    finished = d.reap(1)
    assert [c.cid for c in finished] == [cid] and status(finished[0]) == (Status.SUCCESS, False)
    assert d.gather(pages, len(data)) == data
    assert d.bus.ctrl.counters["bytes_read"] >= len(data)


def test_read_into_nowait_reads_what_the_page_cache_holds(tmp_path: Path) -> None:
    ns = Namespace(1, str(tmp_path / "c.img"), 1 << 20)
    try:
        os.pwrite(ns.fd, b"cached", 512)
        buf = bytearray(512)
        with memoryview(buf) as view:
            assert ns.read_into([view], 1, nowait=True)  # just written: in the page cache
        assert buf[:6] == b"cached"
    finally:
        ns.close()


def test_a_cached_read_stays_on_the_loop(rig: tuple[NvmeDriver, HeldOffload]) -> None:
    d, offload = rig
    data = os.urandom(8192)
    d.io(IoOpcode.WRITE, slba=8, nlb=16, data=data)
    done, got = d.io(IoOpcode.READ, slba=8, nlb=16)
    assert status(done) == (Status.SUCCESS, False) and got == data and offload.works == []


def test_abort_does_not_abort_a_command_whose_io_runs(rig: tuple[NvmeDriver, HeldOffload]) -> None:
    """A worker may still be writing its guest buffers: "not aborted" (DW0 bit 0
    set), and the command completes when its I/O does, once."""
    d, offload = rig
    cid = d.submit(1, flush_cmd())
    done = d.admin_command(AdminOpcode.ABORT, cdw10=cid << 16 | 1)
    assert done.dw0 & 1 == 1 and d.reap(1) == []
    offload.run_all()
    finished = d.reap(1)
    assert [c.cid for c in finished] == [cid] and status(finished[0]) == (Status.SUCCESS, False)


def test_bus_master_off_holds_an_offloaded_completion(rig: tuple[NvmeDriver, HeldOffload]) -> None:
    """The I/O finished while the device may not DMA: its completion waits."""
    d, offload = rig
    cid = d.submit(1, flush_cmd())
    d.bus.ctrl.region_write(PciRegion.CONFIG, COMMAND, int(PciCommand.MEMORY).to_bytes(2, "little"))
    offload.run_all()
    assert d.reap(1) == []
    d.bus.ctrl.region_write(PciRegion.CONFIG, COMMAND,
                        int(PciCommand.MEMORY | PciCommand.BUS_MASTER).to_bytes(2, "little"))
    d.bus.ctrl.poll()
    assert [c.cid for c in d.reap(1)] == [cid]


def test_delete_sq_lets_the_queue_io_finish_first(rig: tuple[NvmeDriver, HeldOffload]) -> None:
    d, offload = rig
    cid = d.submit(1, flush_cmd())
    done = d.admin_command(AdminOpcode.DELETE_SQ, cdw10=1)
    assert status(done) == (Status.SUCCESS, False) and offload.works == []
    assert [c.cid for c in d.reap(1)] == [cid]  # completed before its SQ went


def test_a_reset_waits_for_the_work_and_drops_the_command(rig: tuple[NvmeDriver, HeldOffload]) -> None:
    d, offload = rig
    cid = d.submit(1, flush_cmd())
    [req] = d.bus.ctrl.waiting
    assert req.cid == cid
    d.write_reg(0x14, 0)  # CC.EN = 0
    assert offload.drains >= 1 and offload.works == []  # nothing runs past the reset
    assert req.state is RequestState.DROPPED


def test_a_failed_sync_is_a_write_fault(rig: tuple[NvmeDriver, HeldOffload],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    d, offload = rig

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    cid = d.submit(1, flush_cmd())
    offload.run_all()
    finished = d.reap(1)
    assert [c.cid for c in finished] == [cid]
    assert status(finished[0]) == (Status.WRITE_FAULT, False)


def test_pause_finishes_what_runs_off_the_loop_first(rig: tuple[NvmeDriver, HeldOffload]) -> None:
    d, offload = rig
    cid = d.submit(1, flush_cmd())
    d.bus.ctrl.pause()
    assert offload.works == []
    assert [c.cid for c in d.reap(1)] == [cid]  # completed before the device stopped
    d.bus.ctrl.resume()


def test_one_busy_queue_yields_after_its_budget(rig: tuple[NvmeDriver, HeldOffload]) -> None:
    """SQ 2 gets 200 commands in one doorbell: a pass runs SQ_BUDGET of them (and
    SQ 1's one command); the next turns of the loop (the idle poll) do the rest."""
    d, _ = rig
    d.create_queue_pair(2, depth=256)
    prp1, prp2, _ = d.buffer(512)
    n = 200
    for _ in range(n):
        d.submit(2, Command(opcode=IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2), ring=False)
    d.submit(1, Command(opcode=IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2), ring=False)
    d.ring(2)
    assert d.bus.ctrl.counters["commands"]["io.read"] == SQ_BUDGET
    d.ring(1)  # another queue's doorbell: served in the very next pass
    assert len(d.reap(1)) == 1
    passes = 0
    while d.bus.ctrl.poll():
        passes += 1
    assert d.bus.ctrl.counters["commands"]["io.read"] == n + 1 and passes >= 1
    assert len(d.reap(2)) == n


# ---------------------------------------------------------------- the real pool
def test_the_pool_reports_back_through_the_loop() -> None:
    loop = EventLoop()
    pool = Offload(loop)
    gate, results = threading.Event(), []
    try:
        pool.submit(gate.wait, results.append)
        pool.submit(lambda: 1 // 0, results.append)
        for _ in range(50):  # the loop keeps turning while a work blocks
            loop.run_once(0.001)
            if results:
                break
        assert len(results) == 1 and isinstance(results[0], ZeroDivisionError)
        gate.set()
        pool.drain()
        assert results[1:] == [None]
    finally:
        gate.set()
        pool.close()
        loop.close()


def test_pages_an_offloaded_read_wrote_are_dirty_when_it_completes(
        rig: tuple[NvmeDriver, HeldOffload], monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration's dirty log read (and cleared) while the worker still writes
    the guest pages must see them again: they are marked once more at completion."""
    d, offload = rig
    real = Namespace.read_into

    def uncached(self: Namespace, views: list[memoryview], slba: int, *,
                 nowait: bool = False) -> bool:
        return False if nowait else real(self, views, slba)

    monkeypatch.setattr(Namespace, "read_into", uncached)
    d.bus.memory.dirty_log = DirtyLog()
    prp1, prp2, pages = d.buffer(8192)
    d.submit(1, Command(opcode=IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2, cdw10=0, cdw12=15))
    d.bus.memory.dirty_log.take(0, 1 << 64 - 1)  # a DMA_LOGGING_REPORT before the data landed
    offload.run_all()
    dirty = d.bus.memory.dirty_log.take(0, 1 << 64 - 1)
    assert {page // 4096 for page in pages} <= set(dirty)
