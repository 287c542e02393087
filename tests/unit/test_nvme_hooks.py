"""The controller's hooks for migration: Namespace.on_change and pause()/resume()."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import make_controller, status

from appliance.storage import NvmeController
from appliance.storage.spec import AdminOpcode, Command, IoOpcode, Status
from appliance.testing.nvme import controller_driver

pytestmark = pytest.mark.usefixtures("nvme_fastpath")  # both I/O queue paths


@pytest.fixture
def ctrl(tmp_path: Path) -> Iterator[NvmeController]:
    c = make_controller(tmp_path, io_queues=2, queue_entries=64)
    yield c
    c.close()


def test_on_change_reports_every_data_change(ctrl: NvmeController) -> None:
    d = controller_driver(ctrl).ready()
    changes: list[tuple[int, int]] = []
    ctrl.namespaces[1].on_change = lambda offset, length: changes.append((offset, length))
    d.io(IoOpcode.READ, slba=4, nlb=8)
    assert changes == []  # reads change nothing
    d.io(IoOpcode.WRITE, slba=4, nlb=8, data=b"\x5a" * 4096)
    d.command(1, Command(opcode=IoOpcode.WRITE_ZEROES, nsid=1, cdw10=100, cdw12=15))
    d.command(1, Command(opcode=IoOpcode.WRITE_ZEROES, nsid=1, cdw10=200, cdw12=(1 << 25) | 1))
    ranges = d.alloc(4096)
    d.put(ranges, struct.pack("<IIQ", 0, 16, 300) + struct.pack("<IIQ", 0, 8, 1000))
    dsm = Command(opcode=IoOpcode.DATASET_MANAGEMENT, nsid=1, prp1=ranges, cdw10=1, cdw11=4)
    assert status(d.command(1, dsm)) == (Status.SUCCESS, False)
    assert status(d.admin_command(AdminOpcode.FORMAT_NVM, nsid=1)) == (Status.SUCCESS, False)
    assert changes == [(4 * 512, 4096), (100 * 512, 16 * 512), (200 * 512, 2 * 512),
                       (300 * 512, 16 * 512), (1000 * 512, 8 * 512), (0, 1 << 20)]


def test_on_change_is_called_when_a_write_fails(ctrl: NvmeController) -> None:
    d = controller_driver(ctrl).ready()
    changes: list[tuple[int, int]] = []
    ctrl.namespaces[1].on_change = lambda offset, length: changes.append((offset, length))

    ns = ctrl.namespaces[1]
    read_only = os.open(ns.image_path(), os.O_RDONLY)  # every write to the image fails (EBADF)
    os.dup2(read_only, ns.fd, inheritable=False)
    os.close(read_only)
    done, _ = d.io(IoOpcode.WRITE, slba=8, nlb=1, data=b"x" * 512)
    assert status(done) == (Status.WRITE_FAULT, False)
    assert changes == [(8 * 512, 512)]  # part of it may have landed: re-send it


def test_pause_latches_doorbells_and_resume_runs_them(ctrl: NvmeController) -> None:
    d = controller_driver(ctrl).ready()
    buffers = [d.alloc(4096) for _ in range(3)]
    ctrl.pause()
    snapshot = bytes(d.mem)
    cids = [d.submit(1, Command(opcode=IoOpcode.READ, nsid=1, prp1=buf, cdw12=7))
            for buf in buffers]
    sq_entries = bytes(d.mem)
    assert d.reap(1) == [] and ctrl.sqs[1].tail == 3 and ctrl.sqs[1].head == 0
    assert ctrl.poll() is False and d.bus.interrupts.take() == []
    assert bytes(d.mem) == sq_entries != snapshot  # the controller wrote nothing
    assert ctrl.resume() is True
    assert [c.cid for c in d.reap(1)] == cids
    assert d.bus.interrupts.take()


def test_pause_holds_events_and_register_writes_still_act(ctrl: NvmeController) -> None:
    d = controller_driver(ctrl).ready()
    cid = d.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
    d.admin_command(AdminOpcode.SET_FEATURES, cdw10=0x0B, cdw11=0x100)  # NS attribute notices
    ctrl.pause()
    ctrl.notify_namespace_changed(1)
    assert d.reap(0) == []
    d.write_reg(0x0C, 1)  # INTMS: a register write acts while paused
    assert ctrl.regs.intms == 1
    ctrl.resume()
    assert [c.cid for c in d.reap(0)] == [cid]
