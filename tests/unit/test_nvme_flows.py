"""End-to-end flows through NvmeController with the in-test driver."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import CC_ENABLE, UNMAPPED, make_controller, status

from appliance.client.nvme import NvmeDriver, NvmeError, QueuePair
from appliance.pci.capabilities import DEVCTL_FLR, PCIE_DEVCTL
from appliance.storage import NvmeController
from appliance.storage.spec import CC, AdminOpcode, Command, FeatureId, IoOpcode, Reg, Status
from appliance.testing.nvme import controller_driver
from appliance.vfio_user.wire import PciIrq, PciRegion

pytestmark = pytest.mark.usefixtures("nvme_fastpath")  # both I/O queue paths


@pytest.fixture
def drv(tmp_path: Path) -> Iterator[NvmeDriver]:
    ctrl = make_controller(tmp_path, io_queues=4, queue_entries=256)
    yield controller_driver(ctrl).ready()
    ctrl.close()


@pytest.fixture
def ctrl(tmp_path: Path) -> Iterator[NvmeController]:
    c = make_controller(tmp_path, io_queues=4, queue_entries=256)
    yield c
    c.close()


def test_write_read_through_prp_lists_lands_in_image(drv: NvmeDriver, tmp_path: Path) -> None:
    payload = os.urandom(64 * 1024)
    done, _ = drv.io(IoOpcode.WRITE, slba=8, nlb=128, data=payload, scatter=True)
    assert status(done) == (Status.SUCCESS, False)
    with open(tmp_path / "ns1.img", "rb") as f:
        f.seek(8 * 512)
        assert f.read(len(payload)) == payload
    done, back = drv.io(IoOpcode.READ, slba=8, nlb=128)
    assert status(done) == (Status.SUCCESS, False) and back == payload
    assert drv.bus.ctrl.counters["bytes_written"] == len(payload)
    assert drv.bus.ctrl.counters["commands"]["io.read"] == 1
    assert (PciIrq.MSIX, 1) in drv.bus.interrupts.take()


def test_mdts_transfer_through_an_offset_prp_list(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path, size=4 << 20)
    d = controller_driver(ctrl).ready()
    payload = os.urandom(512 * 1024)  # MDTS: 128 pages, first page offset 512
    prp1, prp2, pages = d.buffer(len(payload) + 4096, scatter=True)
    prp1 += 512
    d.scatter(pages, bytes(512) + payload)
    cmd = Command(opcode=IoOpcode.WRITE, nsid=1, prp1=prp1, prp2=prp2, cdw12=1023)
    assert status(d.command(1, cmd)) == (Status.SUCCESS, False)
    with open(tmp_path / "ns1.img", "rb") as f:
        assert f.read(len(payload)) == payload
    # One block more than MDTS: refused before any PRP is read.
    done, _ = d.io(IoOpcode.READ, slba=0, nlb=1025)
    assert status(done) == (Status.INVALID_FIELD, True)
    ctrl.close()


def test_flush_fua_write_zeroes_dsm_compare(drv: NvmeDriver, tmp_path: Path) -> None:
    blob = b"\xab" * 4096
    assert status(drv.io(IoOpcode.WRITE, 0, 8, data=blob, cdw12=1 << 30)[0])[0] == 0
    assert status(drv.command(1, Command(opcode=IoOpcode.FLUSH, nsid=1)))[0] == 0
    assert status(drv.command(1, Command(opcode=IoOpcode.FLUSH, nsid=0xFFFFFFFF)))[0] == 0
    assert status(drv.io(IoOpcode.COMPARE, 0, 8, data=blob)[0])[0] == 0
    done, _ = drv.io(IoOpcode.COMPARE, 0, 8, data=b"\xac" * 4096)
    assert status(done) == (Status.COMPARE_FAILURE, True)
    wz = Command(opcode=IoOpcode.WRITE_ZEROES, nsid=1, cdw10=0, cdw12=3)
    assert status(drv.command(1, wz))[0] == 0
    assert drv.io(IoOpcode.READ, 0, 8)[1] == bytes(2048) + blob[2048:]
    ranges = drv.alloc(4096)
    drv.put(ranges, struct.pack("<IIQ", 0, 4, 4))
    dsm = Command(opcode=IoOpcode.DATASET_MANAGEMENT, nsid=1, prp1=ranges, cdw10=0, cdw11=4)
    assert status(drv.command(1, dsm))[0] == 0
    assert drv.io(IoOpcode.READ, 0, 8)[1] == bytes(4096)
    assert os.path.getsize(tmp_path / "ns1.img") == 1 << 20


def test_async_event_namespace_changed(drv: NvmeDriver) -> None:
    aec = Command(opcode=AdminOpcode.SET_FEATURES, cdw10=FeatureId.ASYNC_EVENT_CONFIG,
                  cdw11=0x100)
    assert status(drv.command(0, aec))[0] == 0
    cid = drv.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
    assert drv.reap(0) == []  # held
    drv.bus.ctrl.notify_namespace_changed(1)
    (done,) = drv.reap(0)
    assert done.cid == cid and done.dw0 == 0x040002 and status(done)[0] == 0
    assert (PciIrq.MSIX, 0) in drv.bus.interrupts.take()
    # Masked until the log is read with RAE clear.
    drv.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
    drv.bus.ctrl.notify_namespace_changed(1)
    assert drv.reap(0) == []
    prp1, prp2, pages = drv.buffer(4096)
    log = Command(opcode=AdminOpcode.GET_LOG_PAGE, nsid=0xFFFFFFFF, prp1=prp1, prp2=prp2,
                  cdw10=1023 << 16 | 0x04)
    assert status(drv.command(0, log)) == (Status.SUCCESS, False)
    assert struct.unpack_from("<2I", drv.gather(pages, 8)) == (1, 0)
    assert drv.bus.ctrl.changed_ns == []  # read with RAE clear: cleared, events unmasked
    drv.bus.ctrl.notify_namespace_changed(1)
    assert [c.dw0 for c in drv.reap(0)] == [0x040002]


def test_abort_held_aer(drv: NvmeDriver) -> None:
    cid = drv.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
    abort = drv.submit(0, Command(opcode=AdminOpcode.ABORT, cdw10=cid << 16))
    done = {c.cid: c for c in drv.reap(0)}
    assert status(done[cid]) == (Status.ABORT_REQUESTED, False)
    assert done[abort].dw0 == 0  # aborted
    assert drv.admin_command(AdminOpcode.ABORT, cdw10=0x1234 << 16).dw0 == 1  # nothing to abort


def test_shadow_doorbells_like_linux(drv: NvmeDriver) -> None:
    dbs, eis = drv.alloc(4096), drv.alloc(4096)
    done = drv.admin_command(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=dbs, prp2=eis)
    assert status(done) == (Status.SUCCESS, False)
    drv.shadow_doorbells = (dbs, eis)
    for i in range(10):
        done, _ = drv.io(IoOpcode.WRITE, slba=i, nlb=1, data=bytes([i]) * 512)
        assert status(done)[0] == 0
    assert struct.unpack("<I", drv.get(eis + 8, 4))[0] == drv.queues[1].sq_tail  # SQ1 EventIdx
    # The host updates only the shadow (it read a stale EventIdx): poll() finds it.
    prp1, _, pages = drv.buffer(512)
    old = drv.queues[1].sq_tail
    drv.submit(1, Command(opcode=IoOpcode.READ, nsid=1, prp1=prp1, cdw10=3), ring=False)
    drv.put(dbs + 8, struct.pack("<I", drv.queues[1].sq_tail))
    assert drv.reap(1) == []
    assert drv.bus.ctrl.poll() is True
    (done,) = drv.reap(1)
    assert status(done)[0] == 0 and drv.gather(pages, 1) == b"\x03"
    assert drv.bus.ctrl.poll() is False
    assert old != drv.queues[1].sq_tail


def test_shadow_picks_up_submissions_made_before_the_config(drv: NvmeDriver) -> None:
    # Linux before the 2024 fix: I/O submitted between queue creation and
    # Doorbell Buffer Config may only update the shadow buffer.
    dbs, eis = drv.alloc(4096), drv.alloc(4096)
    prp1, _, _ = drv.buffer(512)
    drv.submit(1, Command(opcode=IoOpcode.READ, nsid=1, prp1=prp1), ring=False)
    drv.put(dbs + 8, struct.pack("<I", drv.queues[1].sq_tail))
    drv.admin_command(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=dbs, prp2=eis)
    drv.shadow_doorbells = (dbs, eis)
    assert len(drv.reap(1)) == 1


def test_intx_level(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path)
    d = controller_driver(ctrl, msix=False).ready()
    ctrl.irq_mask(PciIrq.INTX, 0, 1, False)  # the client's unmask after EOI (automasked)
    assert not ctrl.intx_asserted and d.bus.interrupts.take() == []
    d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert ctrl.intx_asserted and d.bus.interrupts.take() == [(PciIrq.INTX, 0)]
    d.reap(1)
    assert not ctrl.intx_asserted
    ctrl.irq_mask(PciIrq.INTX, 0, 1, False)
    d.write_reg(Reg.INTMS, 1)
    d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert not ctrl.intx_asserted and d.bus.interrupts.take() == []
    d.write_reg(Reg.INTMC, 1)
    assert ctrl.intx_asserted and d.read_reg(Reg.INTMS) == 0
    assert d.bus.interrupts.take() == [(PciIrq.INTX, 0)]
    ctrl.close()


def test_disable_resets_queues_and_reenable_works(drv: NvmeDriver) -> None:
    drv.write_reg(Reg.CC, CC_ENABLE & ~1)
    assert drv.csts == 0 and drv.bus.ctrl.sqs == {} and drv.bus.ctrl.cqs == {}
    drv.write_reg(0x1000 + 8, 5)  # doorbells of a disabled controller: ignored
    drv.queues.clear()
    drv.ready()
    assert status(drv.io(IoOpcode.READ, 0, 1)[0])[0] == 0


def test_device_reset_returns_to_power_on(drv: NvmeDriver) -> None:
    drv.bus.ctrl.reset()  # DEVICE_RESET
    assert drv.read_reg(Reg.CC) == 0 and drv.read_reg(Reg.AQA) == 0 and drv.csts == 0
    assert drv.bus.ctrl.sqs == {}


def test_function_level_reset(drv: NvmeDriver) -> None:
    devctl = drv.bus.ctrl.pcie_offset + PCIE_DEVCTL
    drv.bus.ctrl.region_write(PciRegion.CONFIG, devctl, DEVCTL_FLR.to_bytes(2, "little"))
    assert drv.read_reg(Reg.CC) == 0 and drv.csts == 0 and drv.bus.ctrl.cqs == {}
    assert not drv.bus.ctrl.bus_master


def test_shutdown_reports_complete(drv: NvmeDriver) -> None:
    drv.write_reg(Reg.CC, CC_ENABLE | CC.encode(shn=1))
    assert drv.csts == 0b1001  # RDY, SHST = 10b
    drv.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert drv.reap(1) == []  # no processing after shutdown
    drv.write_reg(Reg.CC, 0)
    assert drv.csts == 0


def test_unmapped_cq_is_fatal_until_reset(drv: NvmeDriver) -> None:
    drv.admin_command(AdminOpcode.CREATE_CQ, prp1=UNMAPPED, cdw10=15 << 16 | 2, cdw11=2 << 16 | 3)
    sq = drv.alloc(16 * 64)
    drv.admin_command(AdminOpcode.CREATE_SQ, prp1=sq, cdw10=15 << 16 | 2, cdw11=2 << 16 | 1)
    drv.queues[2] = QueuePair(2, 16, sq, UNMAPPED, 2, None)  # the driver tracks SQ 2
    drv.submit(2, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert drv.csts & 0b10  # CFS
    assert drv.bus.ctrl.counters["fatal"] == 1
    drv.write_reg(Reg.CC, 0)
    assert drv.csts == 0
    drv.queues.clear()
    drv.ready()
    assert status(drv.io(IoOpcode.READ, 0, 1)[0])[0] == 0


def test_invalid_enable_sets_cfs_not_rdy(ctrl: NvmeController) -> None:
    d = controller_driver(ctrl)
    with pytest.raises(NvmeError, match="controller fatal status"):
        d.enable(cc=CC.encode(en=1, iosqes=0, iocqes=4))
    assert d.csts == 0b10
    d.write_reg(Reg.CC, 0)
    assert d.csts == 0
    d.enable()
    assert d.csts == 1


def test_cq_full_backpressure(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path)
    d = controller_driver(ctrl).ready(io_queues=0)
    d.create_queue_pair(1, depth=4)  # CQ holds 3
    for _ in range(3):
        d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert ctrl.sqs[1].head == 3
    d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1), force=True)  # CQ full: stays in the SQ
    assert ctrl.sqs[1].head == 3
    assert len(d.reap(1)) == 3  # the head doorbell lets it run
    assert len(d.reap(1)) == 1
    ctrl.close()
