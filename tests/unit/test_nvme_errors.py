"""Bad commands and the status each must complete with; the controller keeps working."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from test_nvme_driver import UNMAPPED, make_controller, status

from appliance.client.nvme import NvmeDriver
from appliance.storage.spec import AdminOpcode, Command, FeatureId, IoOpcode, Status
from appliance.testing.nvme import controller_driver

pytestmark = pytest.mark.usefixtures("nvme_fastpath")  # both I/O queue paths

A, IO, ST = AdminOpcode, IoOpcode, Status
Case = Callable[[NvmeDriver], object]


def admin(opcode: int, **fields: int) -> Case:
    return lambda d: d.admin_command(opcode, **fields)


def io(opcode: int, **fields: int) -> Case:
    return lambda d: d.command(1, Command(opcode=opcode, **fields))


def read(slba: int = 0, nlb: int = 1, nsid: int = 1, **fields: int) -> Case:
    return lambda d: d.io(IO.READ, slba, nlb, nsid=nsid, **fields)[0]  # type: ignore[arg-type]


def dsm_past_end(d: NvmeDriver) -> object:
    ranges = d.alloc(4096)
    d.put(ranges, struct.pack("<IIQ", 0, 8, 2044))
    return d.command(1, Command(opcode=IO.DATASET_MANAGEMENT, nsid=1, prp1=ranges, cdw11=4))


def with_prps(prp1: Callable[[NvmeDriver], int], prp2: Callable[[NvmeDriver], int] = lambda d: 0,
              nlb: int = 1, opcode: int = IO.READ) -> Case:
    return lambda d: d.command(1, Command(opcode=opcode, nsid=1, prp1=prp1(d), prp2=prp2(d),
                                      cdw12=nlb - 1))


def too_many_aers(d: NvmeDriver) -> object:
    for _ in range(4):
        d.submit(0, Command(opcode=A.ASYNC_EVENT_REQUEST))
    return d.admin_command(A.ASYNC_EVENT_REQUEST)


def prp_list_with_offset_entry(d: NvmeDriver) -> object:
    lst, page = d.alloc(4096), d.alloc(4096)
    d.put(lst, struct.pack("<2Q", page, page + 8))
    return with_prps(lambda _: page, lambda _: lst, nlb=24)(d)


def unmapped_prp_list(d: NvmeDriver) -> object:
    return with_prps(lambda d: d.alloc(4096), lambda _: UNMAPPED, nlb=24)(d)


def create_cq(qid: int = 2, qsize: int = 15, flags: int = 3, vector: int = 2) -> Case:
    return lambda d: d.admin_command(A.CREATE_CQ, prp1=d.alloc(4096), cdw10=qsize << 16 | qid,
                             cdw11=vector << 16 | flags)


def create_sq(qid: int = 2, qsize: int = 15, cqid: int = 1, flags: int = 1) -> Case:
    return lambda d: d.admin_command(A.CREATE_SQ, prp1=d.alloc(4096), cdw10=qsize << 16 | qid,
                             cdw11=cqid << 16 | flags)


CASES: dict[str, tuple[Case, Status, bool]] = {
    "admin invalid opcode": (admin(0xC5), ST.INVALID_OPCODE, True),
    "io invalid opcode": (io(0x7E, nsid=1), ST.INVALID_OPCODE, True),
    "fused command": (io(IO.FLUSH, nsid=1, flags=1), ST.INVALID_FIELD, True),
    "metadata sgl requested": (read(flags=0x80), ST.INVALID_FIELD, True),
    "psdt reserved": (read(flags=0xC0), ST.INVALID_FIELD, True),
    "fused": (read(flags=0x01), ST.INVALID_FIELD, True),
    "admin flags": (admin(A.IDENTIFY, cdw10=1, flags=0x40), ST.INVALID_FIELD, True),
    "lba out of range": (read(slba=2047, nlb=2), ST.LBA_OUT_OF_RANGE, True),
    "lba overflow": (read(slba=(1 << 64) - 1, nlb=2), ST.LBA_OUT_OF_RANGE, True),
    "nsid 0": (read(nsid=0), ST.INVALID_NAMESPACE, True),
    "nsid inactive": (read(nsid=7), ST.INVALID_NAMESPACE, True),
    "nsid broadcast read": (read(nsid=0xFFFFFFFF), ST.INVALID_NAMESPACE, True),
    "reserved rw bits": (read(cdw12=1 << 20), ST.INVALID_FIELD, True),
    "transfer past mdts": (read(nlb=1025), ST.INVALID_FIELD, True),
    "prp1 not dword aligned": (with_prps(lambda d: d.alloc(4096) + 2), ST.INVALID_PRP_OFFSET,
                               True),
    "prp2 with offset": (with_prps(lambda d: d.alloc(4096), lambda d: d.alloc(4096) + 512,
                                   nlb=16), ST.INVALID_PRP_OFFSET, True),
    "prp list entry with offset": (prp_list_with_offset_entry, ST.INVALID_PRP_OFFSET, True),
    "prp list not qword aligned": (with_prps(lambda d: d.alloc(4096),
                                             lambda d: d.alloc(4096) + 4, nlb=24),
                                   ST.INVALID_PRP_OFFSET, True),
    "unmapped prp": (with_prps(lambda _: UNMAPPED), ST.DATA_TRANSFER_ERROR, False),
    "unmapped prp list": (unmapped_prp_list, ST.DATA_TRANSFER_ERROR, False),
    "unmapped write source": (with_prps(lambda _: UNMAPPED, opcode=IO.WRITE),
                              ST.DATA_TRANSFER_ERROR, False),
    "identify unknown cns": (admin(A.IDENTIFY, cdw10=0x42), ST.INVALID_FIELD, True),
    "identify reserved bits": (admin(A.IDENTIFY, cdw10=0x101), ST.INVALID_FIELD, True),
    "identify ns 0": (admin(A.IDENTIFY, cdw10=0, nsid=0), ST.INVALID_NAMESPACE, True),
    "identify ns broadcast": (admin(A.IDENTIFY, cdw10=0, nsid=0xFFFFFFFF),
                              ST.INVALID_NAMESPACE, True),
    "identify descriptors inactive": (admin(A.IDENTIFY, cdw10=3, nsid=9),
                                      ST.INVALID_NAMESPACE, True),
    "identify csi other": (admin(A.IDENTIFY, cdw10=6, cdw11=1 << 24), ST.INVALID_FIELD, True),
    "create cq qid 0": (create_cq(qid=0), ST.INVALID_QUEUE_IDENTIFIER, True),
    "create cq qid past allocation": (create_cq(qid=5), ST.INVALID_QUEUE_IDENTIFIER, True),
    "create cq existing": (create_cq(qid=1), ST.INVALID_QUEUE_IDENTIFIER, True),
    "create cq size 1": (create_cq(qsize=0), ST.INVALID_QUEUE_SIZE, True),
    "create cq past mqes": (create_cq(qsize=256), ST.INVALID_QUEUE_SIZE, True),
    "create cq not contiguous": (create_cq(flags=2), ST.INVALID_FIELD, True),
    "create cq bad vector": (create_cq(vector=5), ST.INVALID_INTERRUPT_VECTOR, True),
    "create cq reserved bits": (create_cq(flags=7), ST.INVALID_FIELD, True),
    "create cq unaligned base": (lambda d: d.admin_command(A.CREATE_CQ, prp1=d.alloc(4096) + 64,
                                                   cdw10=15 << 16 | 2, cdw11=3),
                                 ST.INVALID_PRP_OFFSET, True),
    "create sq no such cq": (create_sq(cqid=3), ST.COMPLETION_QUEUE_INVALID, True),
    "create sq on admin cq": (create_sq(cqid=0), ST.COMPLETION_QUEUE_INVALID, True),
    "create sq existing": (create_sq(qid=1), ST.INVALID_QUEUE_IDENTIFIER, True),
    "create sq size past mqes": (create_sq(qsize=0xFFFF), ST.INVALID_QUEUE_SIZE, True),
    "delete sq 0": (admin(A.DELETE_SQ, cdw10=0), ST.INVALID_QUEUE_IDENTIFIER, True),
    "delete sq missing": (admin(A.DELETE_SQ, cdw10=3), ST.INVALID_QUEUE_IDENTIFIER, True),
    "delete cq 0": (admin(A.DELETE_CQ, cdw10=0), ST.INVALID_QUEUE_IDENTIFIER, True),
    "delete cq in use": (admin(A.DELETE_CQ, cdw10=1), ST.INVALID_QUEUE_DELETION, True),
    "read-only write": (lambda d: d.io(IO.WRITE, 0, 1, nsid=2)[0], ST.NS_WRITE_PROTECTED, True),
    "read-only write zeroes": (io(IO.WRITE_ZEROES, nsid=2), ST.NS_WRITE_PROTECTED, True),
    "read-only deallocate": (lambda d: d.command(1, Command(opcode=IO.DATASET_MANAGEMENT, nsid=2,
                                                        prp1=d.alloc(4096), cdw11=4)),
                             ST.NS_WRITE_PROTECTED, True),
    "read-only format": (admin(A.FORMAT_NVM, nsid=2), ST.NS_WRITE_PROTECTED, True),
    "dsm range out of range": (dsm_past_end, ST.LBA_OUT_OF_RANGE, True),
    "dsm reserved": (io(IO.DATASET_MANAGEMENT, nsid=1, cdw11=8), ST.INVALID_FIELD, True),
    "write zeroes reserved": (io(IO.WRITE_ZEROES, nsid=1, cdw12=1 << 16), ST.INVALID_FIELD,
                              True),
    "flush inactive ns": (io(IO.FLUSH, nsid=5), ST.INVALID_NAMESPACE, True),
    "compare mismatch": (lambda d: d.io(IO.COMPARE, 0, 1, data=b"x" * 512)[0],
                         ST.COMPARE_FAILURE, True),
    "log page unknown": (admin(A.GET_LOG_PAGE, cdw10=0x7F), ST.INVALID_LOG_PAGE, True),
    "log page unaligned offset": (admin(A.GET_LOG_PAGE, cdw10=2, cdw12=2), ST.INVALID_FIELD,
                                  True),
    "log page offset past end": (admin(A.GET_LOG_PAGE, cdw10=2, cdw12=1024),
                                 ST.INVALID_FIELD, True),
    "log page lsp": (admin(A.GET_LOG_PAGE, cdw10=0x102), ST.INVALID_FIELD, True),
    "smart per namespace": (admin(A.GET_LOG_PAGE, cdw10=2, nsid=1), ST.INVALID_FIELD, True),
    "log page past mdts": (admin(A.GET_LOG_PAGE, cdw10=0xFFFF0001, cdw11=0xFFFF),
                           ST.INVALID_FIELD, True),
    "feature unknown": (admin(A.SET_FEATURES, cdw10=0x0C), ST.INVALID_FIELD, True),
    "feature save": (admin(A.SET_FEATURES, cdw10=1 << 31 | 6, cdw11=1),
                     ST.FEATURE_NOT_SAVEABLE, True),
    "feature get sel": (admin(A.GET_FEATURES, cdw10=1 << 8 | 6), ST.INVALID_FIELD, True),
    "feature not ns specific": (admin(A.SET_FEATURES, cdw10=6, nsid=1),
                                ST.FEATURE_NOT_NS_SPECIFIC, True),
    "feature reserved bits": (admin(A.SET_FEATURES, cdw10=6, cdw11=2), ST.INVALID_FIELD, True),
    "power state past npss": (admin(A.SET_FEATURES, cdw10=2, cdw11=1), ST.INVALID_FIELD, True),
    "temperature sensor": (admin(A.SET_FEATURES, cdw10=4, cdw11=3 << 16), ST.INVALID_FIELD,
                           True),
    "error recovery dulbe": (admin(A.SET_FEATURES, cdw10=5, cdw11=1 << 16, nsid=1),
                             ST.INVALID_FIELD, True),
    "error recovery ns 0": (admin(A.GET_FEATURES, cdw10=5, nsid=0), ST.INVALID_NAMESPACE,
                            True),
    "vector config bad vector": (admin(A.SET_FEATURES, cdw10=9, cdw11=9), ST.INVALID_FIELD,
                                 True),
    "async config reserved": (admin(A.SET_FEATURES, cdw10=0xB, cdw11=1 << 9),
                              ST.INVALID_FIELD, True),
    "queue count after queues": (admin(A.SET_FEATURES, cdw10=FeatureId.NUMBER_OF_QUEUES),
                                 ST.COMMAND_SEQUENCE_ERROR, True),
    "too many aers": (too_many_aers, ST.AER_LIMIT_EXCEEDED, True),
    "format lbaf past nlbaf": (admin(A.FORMAT_NVM, nsid=1, cdw10=8), ST.INVALID_FORMAT, True),
    "format with pi": (admin(A.FORMAT_NVM, nsid=1, cdw10=1 << 5), ST.INVALID_FORMAT, True),
    "format crypto erase": (admin(A.FORMAT_NVM, nsid=1, cdw10=2 << 9), ST.INVALID_FIELD,
                            True),
    "dbbuf unaligned": (lambda d: d.admin_command(A.DOORBELL_BUFFER_CONFIG, prp1=d.alloc(4096) + 8,
                                          prp2=d.alloc(4096)), ST.INVALID_FIELD, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_command(name: str, tmp_path: Path) -> None:
    case, expected, dnr = CASES[name]
    ctrl = make_controller(tmp_path, io_queues=4, queue_entries=256, namespaces=2)
    ctrl.namespaces[2].read_only = True
    d = controller_driver(ctrl).ready()
    done = case(d)
    assert status(done) == (expected, dnr), name  # type: ignore[arg-type]
    assert d.csts == 1  # ready, no fatal status
    data = b"\x5a" * 512
    assert status(d.io(IoOpcode.WRITE, 5, 1, data=data)[0]) == (Status.SUCCESS, False)
    ok, back = d.io(IoOpcode.READ, 5, 1)
    assert status(ok) == (Status.SUCCESS, False) and back == data
    assert ctrl.counters["errors"] >= 1
    ctrl.close()


def test_invalid_doorbells_raise_error_events(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path)
    d = controller_driver(ctrl).ready()
    cid = d.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
    d.write_reg(0x1000 + 8 * 3, 1)  # SQ 3 does not exist
    (done,) = d.reap(0)
    assert done.cid == cid and done.dw0 == 0x010000  # Error, invalid register, log 01h
    d.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
    d.write_reg(0x1000 + 8, 999)  # past the end of SQ 1
    assert d.reap(0) == []  # the Error log page was not read: masked
    prp1, _, _ = d.buffer(4096)
    d.admin_command(AdminOpcode.GET_LOG_PAGE, cdw10=255 << 16 | 1, prp1=prp1)
    assert d.reap(0) == []  # the read covered the pending event
    d.write_reg(0x1000 + 8 + 4, 999)  # CQ 1 head past the tail
    assert [c.dw0 for c in d.reap(0)] == [0x010100]
    assert ctrl.counters["invalid_doorbells"] == 3
    assert status(d.io(IoOpcode.READ, 0, 1)[0]) == (Status.SUCCESS, False)
    ctrl.close()


def test_odd_register_accesses_never_crash(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path)
    d = controller_driver(ctrl)
    for offset, size in ((0x1, 1), (0x2, 2), (0x14, 2), (0x16, 4), (0x18, 8), (0xFFC, 4),
                         (0xFFC, 8), (0x1002, 2), (0x1FFC, 4), (0x3FF8, 8), (0x2FFC, 4)):
        d.bus.ctrl.region_read(0, offset, size)
        d.bus.ctrl.region_write(0, offset, b"\xff" * size)
    assert d.read_reg(0x14) == 0 and d.csts == 0
    d.ready()
    for offset in (0x1000 + 8 * 200, 0x1FFC):  # doorbells of queues that cannot exist
        d.write_reg(offset, 1)
    assert d.csts == 1 and status(d.io(IoOpcode.READ, 0, 1)[0])[0] == 0
    ctrl.close()
