"""Admin commands that succeed: features, log pages, format, queue deletion, shadow wrap."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import make_controller, status

from appliance.client.nvme import NvmeDriver
from appliance.storage.spec import AdminOpcode, Command, FeatureId, IoOpcode, Status
from appliance.testing.nvme import controller_driver

A, F = AdminOpcode, FeatureId


@pytest.fixture
def drv(tmp_path: Path) -> Iterator[NvmeDriver]:
    ctrl = make_controller(tmp_path, io_queues=4, queue_entries=256)
    yield controller_driver(ctrl).ready()
    ctrl.close()


def get_feature(d: NvmeDriver, fid: int, cdw11: int = 0, nsid: int = 0) -> int:
    done = d.admin_command(A.GET_FEATURES, cdw10=fid, cdw11=cdw11, nsid=nsid)
    assert status(done) == (Status.SUCCESS, False)
    return int(done.dw0)


def set_feature(d: NvmeDriver, fid: int, cdw11: int, nsid: int = 0) -> int:
    done = d.admin_command(A.SET_FEATURES, cdw10=fid, cdw11=cdw11, nsid=nsid)
    assert status(done) == (Status.SUCCESS, False)
    return int(done.dw0)


def log_page(d: NvmeDriver, lid: int, nbytes: int, offset: int = 0, nsid: int = 0xFFFFFFFF) -> bytes:
    prp1, prp2, pages = d.buffer(nbytes)
    done = d.admin_command(A.GET_LOG_PAGE, nsid=nsid, prp1=prp1, prp2=prp2,
                   cdw10=(nbytes // 4 - 1) << 16 | lid, cdw12=offset)
    assert status(done) == (Status.SUCCESS, False)
    return d.gather(pages, nbytes)


def test_features_round_trip(tmp_path: Path) -> None:
    now = [1000.0]
    ctrl = make_controller(tmp_path, clock=lambda: now[0])
    d = controller_driver(ctrl).ready()
    assert get_feature(d, F.NUMBER_OF_QUEUES) == 0x00030003
    for fid, value in ((F.ARBITRATION, 0x01020303), (F.INTERRUPT_COALESCING, 0x0A05),
                       (F.ASYNC_EVENT_CONFIG, 0x1FF), (F.VOLATILE_WRITE_CACHE, 0)):
        set_feature(d, fid, value)
        assert get_feature(d, fid) == value
    assert get_feature(d, F.TEMPERATURE_THRESHOLD) == 343
    set_feature(d, F.TEMPERATURE_THRESHOLD, 1 << 20 | 273)
    assert get_feature(d, F.TEMPERATURE_THRESHOLD, 1 << 20) == 273
    set_feature(d, F.ERROR_RECOVERY, 30, nsid=1)
    assert get_feature(d, F.ERROR_RECOVERY, nsid=1) == 30
    set_feature(d, F.INTERRUPT_VECTOR_CONFIG, 1 << 16 | 2)
    assert get_feature(d, F.INTERRUPT_VECTOR_CONFIG, 2) == 1 << 16 | 2
    assert get_feature(d, F.INTERRUPT_VECTOR_CONFIG, 3) == 3
    assert get_feature(d, F.POWER_MANAGEMENT) == 0
    # Timestamp: the host sets milliseconds, the controller's clock advances them.
    buf = d.alloc(4096)
    d.put(buf, (123_456).to_bytes(6, "little") + bytes(2))
    assert status(d.admin_command(A.SET_FEATURES, cdw10=F.TIMESTAMP, prp1=buf))[0] == 0
    now[0] += 2.5
    out = d.alloc(4096)
    assert status(d.admin_command(A.GET_FEATURES, cdw10=F.TIMESTAMP, prp1=out))[0] == 0
    assert int.from_bytes(d.get(out, 6), "little") == 125_956 and d.get(out, 8)[6] == 2
    # Write cache off: writes are synced, still correct.
    assert status(d.io(IoOpcode.WRITE, 0, 1, data=b"w" * 512)[0])[0] == 0
    # A controller reset restores the defaults.
    d.write_reg(0x14, 0)
    d.queues.clear()
    d.ready()
    assert get_feature(d, F.VOLATILE_WRITE_CACHE) == 1
    assert get_feature(d, F.ARBITRATION) == 0
    ctrl.close()


def test_log_pages(drv: NvmeDriver) -> None:
    drv.io(IoOpcode.WRITE, 0, 8, data=os.urandom(4096))
    drv.io(IoOpcode.READ, 0, 8)
    drv.admin_command(0xC5)  # one error for the logs
    smart = log_page(drv, 2, 512)
    assert struct.unpack_from("<BH", smart) == (0, 313) and smart[3] == 100
    assert int.from_bytes(smart[32:48], "little") == 1  # data units read, rounded up
    assert int.from_bytes(smart[80:96], "little") == 1  # host write commands
    assert int.from_bytes(smart[176:192], "little") == 1  # error log entries
    errors = log_page(drv, 1, 1024)
    count, sqid, _, sf, _, lba = struct.unpack_from("<QHHHHQ", errors)
    assert (count, sqid, (sf >> 1) & 0x7FF, sf >> 15, lba) == (1, 0, Status.INVALID_OPCODE, 1, 0)
    drv.io(IoOpcode.READ, 1 << 40, 1)  # LBA out of range: the entry names it
    count, sqid, _, sf, _, lba = struct.unpack_from("<QHHHHQ", log_page(drv, 1, 64))
    assert (count, sqid, (sf >> 1) & 0x7FF, lba) == (2, 1, Status.LBA_OUT_OF_RANGE, 1 << 40)
    assert int.from_bytes(log_page(drv, 2, 512)[160:176], "little") == 0  # not a media error
    firmware = log_page(drv, 3, 512)
    assert firmware[0] == 1 and firmware[8:16] == b"0.1     "
    assert log_page(drv, 1, 64, offset=64) == errors[:64]  # offsets index into the page
    assert log_page(drv, 4, 4096) == bytes(4096)


def test_format_and_queue_deletion(drv: NvmeDriver, tmp_path: Path) -> None:
    drv.io(IoOpcode.WRITE, 0, 1, data=b"f" * 512)
    assert status(drv.admin_command(A.FORMAT_NVM, nsid=0xFFFFFFFF, cdw10=1 << 9))[0] == 0
    assert drv.io(IoOpcode.READ, 0, 1)[1] == bytes(512)
    assert (tmp_path / "ns1.img").stat().st_size == 1 << 20
    assert status(drv.admin_command(A.DELETE_SQ, cdw10=1))[0] == 0
    assert status(drv.admin_command(A.DELETE_CQ, cdw10=1))[0] == 0
    assert drv.bus.ctrl.sqs.keys() == drv.bus.ctrl.cqs.keys() == {0}
    drv.queues.pop(1)
    drv.create_queue_pair(1)
    assert status(drv.io(IoOpcode.READ, 0, 1)[0])[0] == 0


def test_shadow_doorbells_across_many_wraps(drv: NvmeDriver) -> None:
    dbs, eis = drv.alloc(4096), drv.alloc(4096)
    assert status(drv.admin_command(A.DOORBELL_BUFFER_CONFIG, prp1=dbs, prp2=eis))[0] == 0
    drv.shadow_doorbells = (dbs, eis)
    rings = drv.doorbell_writes
    for _ in range(300):  # queues of 64: several laps of SQ and CQ
        assert status(drv.command(1, Command(opcode=IoOpcode.FLUSH, nsid=1)))[0] == 0
    assert drv.bus.ctrl.counters["commands"]["io.flush"] == 300
    # Every SQ update rings (EventIdx follows the tail); CQ head updates rarely do.
    assert 300 <= drv.doorbell_writes - rings < 320
    # Batches submitted with a single ring.
    cids = [drv.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1), ring=False) for _ in range(40)]
    drv.ring(1)
    assert [c.cid for c in drv.reap(1)] == cids
    assert drv.bus.ctrl.counters["invalid_doorbells"] == 0


def test_csts_and_counters_after_everything(drv: NvmeDriver) -> None:
    assert drv.csts == 1
    counters = drv.bus.ctrl.counters
    assert counters["commands"]["admin.create_sq"] == 1
    assert counters["fatal"] == 0 and counters["errors"] == 0


def test_two_namespaces_4k(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path, namespaces=2, block_size=4096)
    d = controller_driver(ctrl).ready()
    _, data = d.identify(2)
    assert struct.unpack_from("<3I", data) == (1, 2, 0)
    assert d.identify_namespace(2).nsze == 256  # the driver learns the 4 KiB blocks
    _, data = d.identify(2, nsid=1)
    assert struct.unpack_from("<2I", data) == (2, 0)
    payload = os.urandom(8192)
    assert status(d.io(IoOpcode.WRITE, 3, 2, nsid=2, data=payload)[0])[0] == 0
    assert d.io(IoOpcode.READ, 3, 2, nsid=2)[1] == payload
    assert (tmp_path / "ns2.img").read_bytes()[3 * 4096:5 * 4096] == payload
    ctrl.close()
