"""NVMe wire declarations: sizes, field offsets from the spec, status encoding."""

from __future__ import annotations

import pytest

from appliance.pci.capabilities import field_offset
from appliance.storage.identify_spec import (
    IdentifyController,
    IdentifyNamespace,
    IdentifyNsIndependent,
    PowerState,
)
from appliance.storage.log_spec import ErrorLogEntry, FirmwareSlotLog, SmartLog
from appliance.storage.spec import (
    AQA,
    CAP,
    CC,
    CRTO,
    CSTS,
    Command,
    Completion,
    Status,
    status_field,
)
from appliance.wire import Struct, WireError


@pytest.mark.parametrize("cls, name, offset", [
    (Command, "nsid", 4), (Command, "mptr", 16), (Command, "prp1", 24), (Command, "cdw10", 40),
    (Completion, "sq_head", 8), (Completion, "status", 14),
    (IdentifyController, "mdts", 77), (IdentifyController, "oaes", 92),
    (IdentifyController, "cntrltype", 111), (IdentifyController, "oacs", 256),
    (IdentifyController, "elpe", 262), (IdentifyController, "wctemp", 266),
    (IdentifyController, "kas", 320), (IdentifyController, "sqes", 512),
    (IdentifyController, "nn", 516), (IdentifyController, "oncs", 520),
    (IdentifyController, "vwc", 525), (IdentifyController, "sgls", 536),
    (IdentifyController, "subnqn", 768), (IdentifyController, "psd0", 2048),
    (IdentifyNamespace, "nsfeat", 24), (IdentifyNamespace, "dlfeat", 33),
    (IdentifyNamespace, "nvmcap", 48), (IdentifyNamespace, "nsattr", 99),
    (IdentifyNamespace, "nguid", 104), (IdentifyNamespace, "lbaf0", 128),
    (SmartLog, "temperature", 1), (SmartLog, "data_units_read", 32),
    (SmartLog, "temp_sensors", 200), (ErrorLogEntry, "lba", 16), (ErrorLogEntry, "csi", 32),
    (FirmwareSlotLog, "frs1", 8), (FirmwareSlotLog, "frs2_7", 16), (PowerState, "actp", 20),
    (IdentifyController, "frmw", 260), (IdentifyController, "fwug", 319),
    (IdentifyNsIndependent, "anagrpid", 4), (IdentifyNsIndependent, "nsattr", 8),
    (IdentifyNsIndependent, "endgid", 12), (IdentifyNsIndependent, "nstat", 14),
])
def test_field_offsets(cls: type[Struct], name: str, offset: int) -> None:
    assert field_offset(cls, name) == offset


def test_nvme_2_0_register_fields() -> None:
    assert CAP.encode(crms=1) == 1 << 59 and CAP.encode(nsss=1) == 1 << 58
    assert CAP.reserved_mask >> 61 == 0x7
    assert CRTO.encode(crwmt=20, crimt=3) == 3 << 16 | 20


def test_round_trip() -> None:
    cmd = Command(opcode=2, cid=0xBEEF, nsid=1, prp1=0x1000, cdw12=7)
    raw = cmd.pack()
    assert len(raw) == 64 and Command.unpack(raw) == cmd
    assert raw[:4] == b"\x02\x00\xef\xbe"
    with pytest.raises(WireError):
        Completion.unpack(bytes(15))


def test_status_field() -> None:
    assert status_field(Status.SUCCESS, False, 1) == 1
    assert status_field(Status.INVALID_QUEUE_IDENTIFIER, True, 0) == 0x8000 | 1 << 9 | 1 << 1
    assert status_field(Status.COMPARE_FAILURE, False, 1) == 2 << 9 | 0x85 << 1 | 1


def test_register_bitfields_cover_their_containers() -> None:
    for fields, width in ((CAP, 64), (CC, 32), (CSTS, 32), (AQA, 32)):
        assert fields.defined_mask | fields.reserved_mask == (1 << width) - 1
    assert CC.encode(en=1, iosqes=6, iocqes=4) == 0x00460001
