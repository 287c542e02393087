"""Copy, Verify, Write Uncorrectable, the Commands Supported and Effects log and
the command-set Identify structures, through the one driver."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import make_controller, status

from appliance.client.nvme import NvmeDriver
from appliance.storage import identity
from appliance.storage.controller_state import (
    CtrlStateHead,
    FirmwareState,
    UncorrectableRange,
    apply_controller,
    decode_controller,
    encode_controller,
)
from appliance.storage.identify_spec import IdentifyController, IdentifyNamespace
from appliance.storage.spec import AdminOpcode, Cns, Command, IoOpcode, LogPage, Status
from appliance.testing.nvme import controller_driver

pytestmark = pytest.mark.usefixtures("nvme_fastpath")  # both I/O queue paths

ST = Status
IO = IoOpcode


@pytest.fixture
def drv(tmp_path: Path) -> Iterator[NvmeDriver]:
    ctrl = make_controller(tmp_path, size=4 << 20)
    d = controller_driver(ctrl)
    d.setup(io_queues=1)
    yield d
    ctrl.close()


def ok(done: object) -> None:
    assert status(done) == (ST.SUCCESS, False)  # type: ignore[arg-type]


def test_identify_reports_what_works(drv: NvmeDriver) -> None:
    ident = drv.identity
    assert ident is not None
    assert ident.oncs & 0x1CF == 0x1CF  # compare, write uncor, dsm, wz, timestamp, verify, copy
    assert ident.ocfs == 1 and ident.sgls == 0x10001 and ident.lpa & 0x2
    ns = IdentifyNamespace.unpack(drv.identify(Cns.NAMESPACE, 1)[1])
    assert (ns.mssrl, ns.mcl, ns.msrc) == (identity.MSSRL, identity.MCL, identity.MSRC)
    done, data = drv.identify(Cns.CSI_NAMESPACE, 1)
    ok(done)
    assert data == bytes(4096)
    done, _ = drv.identify(Cns.CSI_NAMESPACE, 7)
    assert status(done) == (ST.INVALID_NAMESPACE, True)
    done, _ = drv.identify(Cns.CSI_CONTROLLER, cdw11=1 << 24)  # key value: not here
    assert status(done) == (ST.INVALID_FIELD, True)
    done, _ = drv.identify(Cns.CSI_NAMESPACE, 1, cdw11=2 << 24)  # not a zoned namespace
    assert status(done) == (ST.INVALID_FIELD, True)
    done, data = drv.identify(Cns.COMMAND_SET_LIST)
    ok(done)
    assert struct.unpack_from("<QQ", data) == (0b101, 0)  # NVM and Zoned Namespace
    assert IdentifyController.unpack(drv.identify(Cns.CONTROLLER)[1]).ver == 0x20000


def test_effects_log_lists_the_commands_that_run(drv: NvmeDriver) -> None:
    done, page = drv.log_page(LogPage.COMMANDS_EFFECTS, 4096)
    ok(done)
    admin = struct.unpack_from("<256I", page)
    io = struct.unpack_from("<256I", page, 1024)
    for op in (IO.FLUSH, IO.READ, IO.COMPARE, IO.VERIFY):
        assert io[op] == 1
    for op in (IO.WRITE, IO.WRITE_UNCORRECTABLE, IO.WRITE_ZEROES, IO.DATASET_MANAGEMENT, IO.COPY):
        assert io[op] == 0b11  # supported, changes logical block content
    assert admin[AdminOpcode.IDENTIFY] == 1 and admin[AdminOpcode.FORMAT_NVM] == 0x10007
    assert admin[AdminOpcode.FIRMWARE_COMMIT] == 0x11  # capabilities change (at the reset)
    assert admin[AdminOpcode.FIRMWARE_DOWNLOAD] == 1
    assert admin[0x14] == 0 and io[0x0D] == 0  # device self-test, reservation register: no
    # every supported opcode runs: unsupported ones are Invalid Opcode
    assert status(drv.admin_command(0x14)) == (ST.INVALID_OPCODE, True)


def test_write_uncorrectable_until_written(drv: NvmeDriver) -> None:
    ok(drv.io(IO.WRITE, slba=0, nlb=64, data=os.urandom(64 * 512))[0])
    ok(drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 10, 4))  # 10..13
    for lba, nlb in ((10, 1), (13, 1), (8, 4), (0, 64)):
        done, _ = drv.io(IO.READ, slba=lba, nlb=nlb)
        assert status(done) == (ST.UNRECOVERED_READ_ERROR, True), (lba, nlb)
    for lba in (9, 14):
        ok(drv.io(IO.READ, slba=lba, nlb=1)[0])
    assert status(drv.blocks_command(IO.VERIFY, 1, 0, 64)) == (ST.UNRECOVERED_READ_ERROR, True)
    assert status(drv.io(IO.COMPARE, slba=12, nlb=1)[0]) == (ST.UNRECOVERED_READ_ERROR, True)
    assert status(drv.copy(1, 100, [(11, 1)])) == (ST.UNRECOVERED_READ_ERROR, True)
    assert drv.bus.ctrl.counters["media_errors"] == 7
    ok(drv.io(IO.WRITE, slba=10, nlb=1, data=bytes(512))[0])  # a write heals its block
    ok(drv.io(IO.READ, slba=10, nlb=1)[0])
    ok(drv.blocks_command(IO.WRITE_ZEROES, 1, 11, 1))  # so does Write Zeroes
    ok(drv.copy(1, 12, [(0, 1)]))  # and a Copy destination
    assert status(drv.io(IO.READ, slba=13, nlb=1)[0]) == (ST.UNRECOVERED_READ_ERROR, True)
    drv.admin_command(AdminOpcode.FORMAT_NVM, nsid=1)  # and Format NVM, all of them
    ok(drv.blocks_command(IO.VERIFY, 1, 0, 64))


def test_write_uncorrectable_fields(drv: NvmeDriver) -> None:
    ctrl = drv.bus.ctrl
    done = drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, ctrl.namespaces[1].nlbas - 1, 2)
    assert status(done) == (ST.LBA_OUT_OF_RANGE, True)
    done = drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 0, 1, cdw12=1 << 16)
    assert status(done) == (ST.INVALID_FIELD, True)
    ok(drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 0, 4096))  # not bound by MDTS
    assert ctrl.uncorrectable[1].ranges == [(0, 4096)]
    for i in range(1023):  # the range budget: 1024 disjoint ranges
        ok(drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 5000 + 2 * i, 1))
    done = drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 4500, 1)
    assert status(done) == (ST.INVALID_FIELD, True)
    ok(drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 5001, 1))  # merging needs none
    assert len(ctrl.uncorrectable[1].ranges) == 1023


def test_verify(drv: NvmeDriver) -> None:
    ok(drv.blocks_command(IO.VERIFY, 1, 0, 8192))  # 4 MiB: no MDTS limit, no data moved
    assert status(drv.blocks_command(IO.VERIFY, 1, 8190, 4)) == (ST.LBA_OUT_OF_RANGE, True)
    assert status(drv.blocks_command(IO.VERIFY, 1, 0, 1, cdw12=1 << 20)) == (ST.INVALID_FIELD,
                                                                               True)
    assert status(drv.blocks_command(IO.VERIFY, 9, 0, 1)) == (ST.INVALID_NAMESPACE, True)


@pytest.mark.parametrize("sgl", [False, True])
def test_copy(drv: NvmeDriver, sgl: bool) -> None:
    a, b = os.urandom(4 * 512), os.urandom(2 * 512)
    ok(drv.io(IO.WRITE, slba=100, nlb=4, data=a)[0])
    ok(drv.io(IO.WRITE, slba=200, nlb=2, data=b)[0])
    ok(drv.copy(1, 1000, [(200, 2), (100, 4)], sgl=sgl, cdw12=1 << 30))  # FUA
    assert drv.io(IO.READ, slba=1000, nlb=6)[1] == b + a


def test_copy_limits_and_fields(drv: NvmeDriver) -> None:
    nlbas = drv.bus.ctrl.namespaces[1].nlbas
    csle = (ST.COMMAND_SIZE_LIMIT_EXCEEDED, True)
    assert status(drv.copy(1, 0, [(0, identity.MSSRL + 1)])) == csle
    assert status(drv.copy(1, 0, [(i * 256, 256) for i in range(5)])) == csle  # past MCL
    assert status(drv.copy(1, 0, [(i, 1) for i in range(identity.MSRC + 2)])) == csle
    ok(drv.copy(1, 4000, [(i, 1) for i in range(identity.MSRC + 1)]))
    assert status(drv.copy(1, nlbas - 1, [(0, 2)])) == (ST.LBA_OUT_OF_RANGE, True)
    assert status(drv.copy(1, 0, [(nlbas - 1, 2)])) == (ST.LBA_OUT_OF_RANGE, True)
    assert status(drv.copy(1, 0, [(0, 1)], cdw12=1 << 8)) == (ST.INVALID_FIELD, True)  # format 1
    assert status(drv.copy(1, 0, [(0, 1)], cdw12=1 << 24)) == (ST.INVALID_FIELD, True)  # STCW
    assert status(drv.copy(3, 0, [(0, 1)])) == (ST.INVALID_NAMESPACE, True)


def test_copy_to_a_read_only_namespace(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path, read_only=True)
    d = controller_driver(ctrl)
    d.setup(io_queues=1)
    assert status(d.copy(1, 10, [(0, 1)])) == (ST.NS_WRITE_PROTECTED, True)
    assert status(d.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 0, 1)) == (ST.NS_WRITE_PROTECTED,
                                                                           True)
    ctrl.close()


def test_uncorrectable_ranges_travel_with_the_controller_state(drv: NvmeDriver,
                                                               tmp_path: Path) -> None:
    ok(drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 5, 3))
    ok(drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 50, 1))
    (tmp_path / "dst").mkdir()
    dst = make_controller(tmp_path / "dst", size=4 << 20)
    blob = encode_controller(drv.bus.ctrl)
    apply_controller(dst, decode_controller(dst, blob))
    assert dst.uncorrectable[1].ranges == [(5, 8), (50, 51)]
    assert encode_controller(dst) == blob
    head = CtrlStateHead.unpack(blob)
    entry = len(blob) - 48 - FirmwareState.SIZE  # the two entries, then the firmware slots
    first = UncorrectableRange.unpack(blob, entry)
    for bad in (
        blob[:entry] + first.replace(nsid=2).pack() + blob[entry + 24:],  # no namespace 2
        blob[:entry] + first.replace(nlb=0).pack() + blob[entry + 24:],
        blob[:entry] + first.replace(slba=8192).pack() + blob[entry + 24:],  # past the end
        blob[:entry] + first.replace(slba=50).pack() + blob[entry + 24:],  # overlaps the next
        blob[:entry] + first.replace(reserved=1).pack() + blob[entry + 24:],
        head.replace(n_uncorrectable=3).pack() + blob[CtrlStateHead.SIZE:],  # short
    ):
        with pytest.raises(Exception, match="NVMe state"):
            decode_controller(dst, bad)
    dst.close()


def test_fault_rules_target_copy_and_verify(tmp_path: Path) -> None:
    from appliance.control.faults import FaultSet

    ctrl = make_controller(tmp_path, size=4 << 20)
    faults = ctrl.faults = FaultSet(clock=lambda: 0.0, seed=1)
    d = controller_driver(ctrl).ready()
    faults.add({"action": "status", "opcode": IO.COPY, "status": "write_fault", "dnr": True,
                "count": 1})
    faults.add({"action": "status", "opcode": IO.VERIFY, "lba": 40,
                "status": "unrecovered_read_error"})
    assert status(d.copy(1, 100, [(0, 1)])) == (ST.WRITE_FAULT, True)
    assert status(d.blocks_command(IO.VERIFY, 1, 32, 16)) == (ST.UNRECOVERED_READ_ERROR, False)
    ok(d.blocks_command(IO.VERIFY, 1, 41, 4))  # outside the rule's LBA
    ok(d.io(IO.READ, slba=40, nlb=1)[0])  # another opcode
    assert faults.counters["nvme.status"] == 2
    faults.add({"action": "hang", "count": 1, "opcode": IO.COPY})
    cid = d.submit(1, Command(opcode=IO.COPY, nsid=1))
    done = d.admin_command(AdminOpcode.ABORT, cdw10=cid << 16 | 1)  # a held Copy aborts
    assert done.dw0 & 1 == 0 and status(d.reap(1)[0]) == (ST.ABORT_REQUESTED, False)
    ctrl.close()


def test_cc_css_selects_the_io_command_sets_as_linux_does(tmp_path: Path) -> None:
    """CAP.CSS bit 6 set: Linux enables with CC.CSS = 110b and then requires a CSI
    descriptor in every namespace's identification descriptor list."""
    from appliance.client.nvme import CC_ENABLE
    from appliance.storage.spec import CAP, CC, Reg

    ctrl = make_controller(tmp_path)
    d = controller_driver(ctrl)
    assert CAP.get(d.read_reg(Reg.CAP, 8), "css") == 0x41
    d.enable(cc=CC.set(CC_ENABLE, "css", 0b110))
    assert CC.get(d.read_reg(Reg.CC), "css") == 0b110
    done, data = d.identify(Cns.NS_ID_DESCRIPTORS, 1)
    ok(done)
    assert data[:4] == b"\x03\x10\0\0" and data[20:25] == b"\x04\x01\0\0\0"
    ctrl.close()


def test_writes_that_split_uncorrectable_ranges_keep_the_bound(drv: NvmeDriver,
                                                                tmp_path: Path) -> None:
    """A write into the middle of a marked range splits it in two: at the range
    budget the shorter piece is forgotten (it reads again), so the state stays
    within MAX_RANGES and still moves to another controller."""
    ctrl = drv.bus.ctrl
    ok(drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 0, 4096))
    for i in range(1023):  # the budget: 1024 ranges
        ok(drv.blocks_command(IO.WRITE_UNCORRECTABLE, 1, 5000 + 2 * i, 1))
    for lba in (100, 200):  # each would split (0, 4096)
        ok(drv.io(IO.WRITE, slba=lba, nlb=1, data=bytes(512))[0])
        ok(drv.io(IO.READ, slba=lba, nlb=1)[0])
    assert len(ctrl.uncorrectable[1].ranges) == 1024
    assert status(drv.io(IO.READ, slba=4000, nlb=1)[0]) == (ST.UNRECOVERED_READ_ERROR, True)
    ok(drv.blocks_command(IO.WRITE_ZEROES, 1, 1000, 1))  # Write Zeroes splits too
    assert len(ctrl.uncorrectable[1].ranges) == 1024
    (tmp_path / "dst").mkdir()
    dst = make_controller(tmp_path / "dst", size=4 << 20)
    apply_controller(dst, decode_controller(dst, encode_controller(ctrl)))
    assert dst.uncorrectable[1].ranges == ctrl.uncorrectable[1].ranges
    dst.close()
