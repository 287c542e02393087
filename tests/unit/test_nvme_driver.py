"""The NVMe host driver against an in-process controller, and end-to-end flows.

:func:`appliance.testing.nvme.controller_driver` puts the one driver,
:class:`~appliance.client.nvme.NvmeDriver`, on a bus that calls the controller's
region entry points exactly as the vfio-user server does.  Other ``test_nvme_*``
modules import :func:`make_controller` and :func:`status` from here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client.nvme import Completion
from appliance.config import NamespaceConfig
from appliance.storage import NvmeController
from appliance.storage.spec import CC, AdminOpcode, Command, FeatureId, IoOpcode, Reg, Status
from appliance.testing.nvme import controller_driver

pytestmark = pytest.mark.usefixtures("nvme_fastpath")  # both I/O queue paths

UNMAPPED = 0x4000_0000  # above the in-process driver's guest memory
CC_ENABLE = CC.encode(en=1, iosqes=6, iocqes=4)


def status(entry: Completion) -> tuple[int, bool]:
    """(SCT << 8 | SC, DNR) of a completion."""
    return entry.status, entry.dnr


def make_controller(tmp_path: Path, *, read_only: bool = False, block_size: int = 512,
                    size: int = 1 << 20, namespaces: int = 1, **kw: object) -> NvmeController:
    cfgs = [NamespaceConfig(image=str(tmp_path / f"ns{i}.img"), size=size, block_size=block_size,
                            read_only=read_only, grow=False) for i in range(1, namespaces + 1)]
    return NvmeController(cfgs, **kw)  # type: ignore[arg-type]


@pytest.fixture
def ctrl(tmp_path: Path) -> Iterator[NvmeController]:
    c = make_controller(tmp_path, io_queues=4, queue_entries=256)
    yield c
    c.close()


# ---------------------------------------------------------------- end-to-end flows
def test_bring_up_like_linux(ctrl: NvmeController) -> None:
    d = controller_driver(ctrl)
    cap = d.read_reg(Reg.CAP, 8)
    assert cap & 0xFFFF == 255 and cap >> 16 & 1 == 1  # MQES, CQR
    assert (cap >> 24) & 0xFF == 20 and (cap >> 37) & 0xFF == 0x41  # TO, CSS NVM + IOCS
    assert d.read_reg(Reg.CAP + 4) == cap >> 32  # lo_hi_readq
    assert d.read_reg(Reg.VS) == 0x00020000
    d.enable()
    assert d.csts == 1
    done, data = d.identify(1)
    assert status(done) == (Status.SUCCESS, False)
    assert data[0:2] == b"\xa9\xa9" and data[4:24].rstrip() == b"APPLIANCE0001"
    assert data[512:514] == b"\x66\x44" and data[77] == 7  # SQES/CQES, MDTS
    assert struct.unpack_from("<H", data, 256)[0] & 0x100  # OACS: doorbell buffer config
    done, data = d.identify(2)
    assert struct.unpack_from("<2I", data) == (1, 0)
    done, data = d.identify(0, nsid=1)
    assert struct.unpack_from("<Q", data)[0] == 2048 and data[130] == 9  # NSZE, LBADS
    done, data = d.identify(3, nsid=1)
    assert data[0:2] == b"\x03\x10" and data[20:22] == b"\x04\x01" and data[25:27] == b"\0\0"
    done, data = d.identify(6, cdw11=0)
    assert status(done) == (Status.SUCCESS, False) and data == bytes(4096)
    done = d.admin_command(AdminOpcode.SET_FEATURES, cdw10=FeatureId.NUMBER_OF_QUEUES, cdw11=0x00070007)
    assert done.dw0 == 0x00030003  # 4 I/O queues allocated, whatever was asked
    for qid in range(1, 5):
        d.create_queue_pair(qid)
    assert len(ctrl.sqs) == 5


def test_constructor_checks(tmp_path: Path) -> None:
    for kw in ({"io_queues": 0}, {"io_queues": 256}, {"queue_entries": 1},
               {"serial": ""}, {"serial": "x" * 21}, {"model": "caf\u00e9"}):
        with pytest.raises(ValueError):
            make_controller(tmp_path, **kw)
    with pytest.raises(ValueError):
        make_controller(tmp_path, block_size=1024)
    ok = make_controller(tmp_path, namespaces=2)
    assert ok.vectors == 5 and ok.region(0).size == 0x4000
    ok.close()


def test_bugs_fail_the_command_not_the_process(
        ctrl: NvmeController, monkeypatch: pytest.MonkeyPatch) -> None:
    d = controller_driver(ctrl).ready()

    def boom(*_: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(ctrl.namespaces[1], "flush", boom)
    done = d.command(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert status(done) == (Status.INTERNAL_ERROR, True) and d.csts == 1
    monkeypatch.setattr(ctrl.sqs[1], "fetch", boom)
    d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert d.csts & 0b10  # a bug outside a command: CFS, still no exception


def test_poll_and_detach(ctrl: NvmeController) -> None:
    assert ctrl.poll() is False  # no client
    d = controller_driver(ctrl).ready()
    assert ctrl.poll() is False
    d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1), ring=False)
    assert ctrl.poll() is False  # no doorbell, no shadow: the entry is not the host's yet
    d.ring(1)
    assert len(d.reap(1)) == 1
    ctrl.detach()
    assert d.csts == 0 and ctrl.sqs == {} and ctrl.counters["commands"]["io.flush"] == 1


def test_command_leaves_other_completions_for_reap(ctrl: NvmeController) -> None:
    d = controller_driver(ctrl).ready()
    first = d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1), ring=False)
    done = d.command(1, Command(opcode=IoOpcode.FLUSH, nsid=1))  # its doorbell rings both
    assert done.cid != first and status(done) == (Status.SUCCESS, False)
    assert [c.cid for c in d.reap(1)] == [first]
    assert d.reap(1) == [] and not d.queues[1].outstanding


def test_a_chosen_cid_and_a_forced_entry(ctrl: NvmeController) -> None:
    d = controller_driver(ctrl).ready(io_queues=0)
    d.create_queue_pair(1, depth=2)  # one entry may be outstanding
    assert d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1), cid=0xBEEF) == 0xBEEF
    with pytest.raises(RuntimeError, match="queue 1 full"):
        d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    # The controller fetched the first entry (its completion is not reaped): the slot is free.
    assert d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1), cid=8, force=True) == 8
    assert [c.cid for c in d.reap(1)] == [0xBEEF]  # the CQ held one; the head doorbell frees it
    assert [c.cid for c in d.reap(1)] == [8]
    assert ctrl.counters["commands"]["io.flush"] == 2


def test_the_driver_refuses_what_the_bus_cannot_do(ctrl: NvmeController) -> None:
    with pytest.raises(ValueError, match="no mmap area"):
        controller_driver(ctrl, doorbells="mmap")  # the controller has no doorbell page
    with pytest.raises(ValueError, match="doorbells 'ioeventfd'"):
        controller_driver(ctrl, doorbells="ioeventfd")
    d = controller_driver(ctrl)
    with pytest.raises(TypeError, match="not on a vfio-user socket"):
        d.c.close()
