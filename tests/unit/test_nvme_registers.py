"""Controller registers and the CC/CSTS state machine, driven directly."""

from __future__ import annotations

import pytest

from appliance.storage.registers import (
    TRANSITIONS,
    CtrlEvent,
    CtrlState,
    RegisterFile,
    StateError,
    diagram,
    dwords,
)
from appliance.storage.spec import CAP, CC, CRTO, Reg

E, S = CtrlEvent, CtrlState
GOOD_CC = CC.encode(en=1, iosqes=6, iocqes=4)


def regs_ready_to_enable() -> RegisterFile:
    r = RegisterFile(mqes=1023)
    r.write(Reg.AQA, (31 << 16 | 31).to_bytes(4, "little"))
    r.write(Reg.ASQ, (0x10000).to_bytes(8, "little"))
    r.write(Reg.ACQ, (0x20000).to_bytes(8, "little"))
    return r


def w32(r: RegisterFile, off: int, value: int) -> list[CtrlEvent]:
    return r.write(off, value.to_bytes(4, "little"))


def r32(r: RegisterFile, off: int) -> int:
    return int.from_bytes(r.read(off, 4), "little")


def test_cap_fields() -> None:
    cap = CAP.decode(RegisterFile(mqes=1023).cap)
    assert cap == {"mqes": 1023, "cqr": 1, "ams": 0, "to": 20, "dstrd": 0, "nssrs": 0,
                   "css": 0x41, "bps": 0, "mpsmin": 0, "mpsmax": 0, "pmrs": 0, "cmbs": 0,
                   "nsss": 0, "crms": 1}


def test_nvme_2_0_version_and_ready_timeouts() -> None:
    """VS 2.0; CAP.CRMS = CRWMS only, so CRTO.CRWMT says what CAP.TO says, CRIMT
    is 0 and CC.CRIME (bit 24) stays reserved: it does not read back."""
    r = RegisterFile(mqes=1023, timeout=30)
    assert r32(r, Reg.VS) == 0x00020000
    assert CRTO.decode(r32(r, Reg.CRTO)) == {"crwmt": 30, "crimt": 0}
    assert CAP.get(r.cap, "to") == 30
    w32(r, Reg.CRTO, 0xFFFFFFFF)  # read-only
    assert r32(r, Reg.CRTO) == 30
    w32(r, Reg.CC, 1 << 24)
    assert r32(r, Reg.CC) == 0


def test_enable_disable_edges() -> None:
    r = regs_ready_to_enable()
    assert w32(r, Reg.CC, GOOD_CC & ~1) == []
    assert r32(r, Reg.CC) == GOOD_CC & ~1  # Linux reads CC back before setting EN
    assert w32(r, Reg.CC, GOOD_CC) == [E.ENABLE] and r32(r, Reg.CSTS) == 1
    assert w32(r, Reg.CC, GOOD_CC) == []  # no edge
    assert w32(r, Reg.CC, 0) == [E.DISABLE] and r32(r, Reg.CSTS) == 0


@pytest.mark.parametrize("field, value", [
    ("iosqes", 7), ("iocqes", 0), ("mps", 1), ("css", 1), ("css", 7), ("ams", 1),
])
def test_invalid_cc_sets_cfs(field: str, value: int) -> None:
    r = regs_ready_to_enable()
    assert w32(r, Reg.CC, CC.set(GOOD_CC, field, value)) == [E.ENABLE_INVALID]
    assert r32(r, Reg.CSTS) == 0b10 and field.upper() in r.invalid_reason
    assert w32(r, Reg.CC, 0) == [E.DISABLE] and r32(r, Reg.CSTS) == 0


@pytest.mark.parametrize("reg, value", [
    (Reg.AQA, 0), (Reg.AQA, 31), (Reg.ASQ, 0x10800), (Reg.ACQ, 0x20004),
])
def test_invalid_admin_queue_sets_cfs(reg: Reg, value: int) -> None:
    r = regs_ready_to_enable()
    r.write(reg, value.to_bytes(8 if reg != Reg.AQA else 4, "little"))
    assert w32(r, Reg.CC, GOOD_CC) == [E.ENABLE_INVALID] and r32(r, Reg.CSTS) == 0b10


def test_shutdown_and_fatal() -> None:
    r = regs_ready_to_enable()
    w32(r, Reg.CC, GOOD_CC)
    assert w32(r, Reg.CC, GOOD_CC | CC.encode(shn=2)) == [E.SHUTDOWN]
    assert r32(r, Reg.CSTS) == 0b1001
    assert r.fire(E.FATAL) is S.FAILED and r32(r, Reg.CSTS) == 0b11
    assert w32(r, Reg.CC, 0) == [E.DISABLE] and r32(r, Reg.CSTS) == 0
    with pytest.raises(StateError, match="disabled.*fatal"):
        r.fire(E.FATAL)


def test_every_state_answers_disable_and_shutdown() -> None:
    for state, edges in TRANSITIONS.items():
        assert E.SHUTDOWN in edges, state
        if state is not S.DISABLED:
            assert edges[E.DISABLE] is S.DISABLED
    assert "ready -> failed" in diagram()


def test_qword_halves_and_odd_sizes() -> None:
    r = RegisterFile(mqes=63)
    r.write(Reg.ASQ, (0x1234_5000).to_bytes(4, "little"))
    r.write(Reg.ASQ + 4, (0x9).to_bytes(4, "little"))
    assert r.asq == 0x9_1234_5000
    assert int.from_bytes(r.read(Reg.ASQ, 8), "little") == 0x9_1234_5000
    assert r32(r, Reg.CAP + 4) == r.cap >> 32
    assert r.read(Reg.CC + 1, 2) == b"\0\0" and r.read(Reg.CAP + 4, 8) == bytes(8)
    assert r.write(Reg.CC, b"\x01\0") == [] and r.cc == 0
    assert dwords(4, bytes(8)) == [] and dwords(8, bytes(3)) == []


def test_intms_intmc_and_read_only_registers() -> None:
    r = RegisterFile(mqes=63)
    w32(r, Reg.INTMS, 0b101)
    w32(r, Reg.INTMC, 0b001)
    assert r32(r, Reg.INTMS) == r32(r, Reg.INTMC) == 0b100
    cap = r.cap
    r.write(Reg.CAP, bytes(8))
    w32(r, Reg.VS, 0)
    w32(r, Reg.CSTS, 0xFFFFFFFF)
    assert r.cap == cap and r32(r, Reg.VS) == 0x20000 and r32(r, Reg.CSTS) == 0
    w32(r, Reg.CC, 0xFFFFFFFF)  # reserved bits are not kept
    assert r32(r, Reg.CC) == CC.defined_mask
    r.power_on()
    assert r.cc == 0 and r.intms == 0 and r.state is S.DISABLED
