"""Controller registers and the CC/CSTS state machine (NVMe 1.4 sections 3.1, 7.6; CRTO: 2.0).

Theory of operation
-------------------
:class:`RegisterFile` holds the BAR0 registers below the doorbells.  Accesses
are DWORD or QWORD sized and naturally aligned; a QWORD access is two DWORD
accesses, low half first (Linux writes ASQ/ACQ with ``lo_hi_writeq``).  Any
other size or alignment reads as zero and is ignored on write.

Writes to CC are edge-triggered (a rewrite of the same value does nothing,
as on real controllers): the old and new values are compared and each edge
becomes a :class:`CtrlEvent`:

* CC.EN 0 -> 1: the configuration is validated (CSS, MPS, AMS, IOSQES,
  IOCQES, AQA sizes, ASQ/ACQ page alignment).  Valid: ENABLE (CSTS.RDY = 1);
  invalid: ENABLE_INVALID, which sets CSTS.CFS instead of RDY (section
  7.6.1: "the controller ... may set CSTS.CFS").
* CC.EN 1 -> 0: DISABLE, a controller reset (section 7.3.2); CFS, SHST and
  RDY clear.
* CC.SHN 00b -> 01b/10b: SHUTDOWN.  Shutdown is processed synchronously, so
  CSTS.SHST goes straight to 10b (complete); a reset is needed to leave it.

The controller itself raises FATAL (a completion could not be posted), which
sets CSTS.CFS.  :data:`TRANSITIONS` is the whole machine; a pair missing from
it raises :class:`StateError` naming the state and event.  The register file
only keeps state: the controller acts on the events :meth:`RegisterFile.write`
returns.

:class:`Features` is the other host-settable controller state: the current
value of each feature Set Features may change (section 5.21.1), back to its
default on every controller reset.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import ClassVar

from appliance.errors import ApplianceError
from appliance.protocol_common import step
from appliance.storage.spec import (
    AQA,
    CAP,
    CAP_CRMS_CRWMS,
    CAP_CSS_IOCS,
    CAP_CSS_NVM,
    CC,
    CC_CSS_IOCS,
    CC_CSS_NVM,
    CQES,
    CRTO,
    NSID_ALL,
    PAGE_SIZE,
    SHST_COMPLETE,
    SHST_NORMAL,
    SQES,
    VERSION_2_0,
    CommandError,
    FeatureId,
    Reg,
    Status,
)


class CtrlState(enum.Enum):
    DISABLED = "disabled"
    READY = "ready"
    SHUTDOWN = "shutdown"
    FAILED = "failed"


class CtrlEvent(enum.Enum):
    ENABLE = "enable"
    ENABLE_INVALID = "enable-invalid"
    DISABLE = "disable"
    SHUTDOWN = "shutdown"
    FATAL = "fatal"


S, E = CtrlState, CtrlEvent
TRANSITIONS: dict[CtrlState, dict[CtrlEvent, CtrlState]] = {
    S.DISABLED: {E.ENABLE: S.READY, E.ENABLE_INVALID: S.FAILED, E.DISABLE: S.DISABLED,
                 E.SHUTDOWN: S.SHUTDOWN},
    S.READY: {E.DISABLE: S.DISABLED, E.SHUTDOWN: S.SHUTDOWN, E.FATAL: S.FAILED},
    S.SHUTDOWN: {E.ENABLE: S.READY, E.ENABLE_INVALID: S.FAILED, E.DISABLE: S.DISABLED,
                 E.SHUTDOWN: S.SHUTDOWN, E.FATAL: S.FAILED},
    S.FAILED: {E.DISABLE: S.DISABLED, E.SHUTDOWN: S.FAILED, E.FATAL: S.FAILED},
}
# CSTS.RDY after an event; events not listed leave it as it is.
READY_AFTER = {E.ENABLE: True, E.ENABLE_INVALID: False, E.DISABLE: False}
del S, E


class StateError(ApplianceError):
    """An event has no transition from the current state."""


def diagram() -> str:
    """The state machine as Graphviz DOT, generated from :data:`TRANSITIONS`."""
    lines = ["digraph nvme_cc {"]
    for state, edges in TRANSITIONS.items():
        for event, target in edges.items():
            lines.append(f'  {state.value} -> {target.value} [label="{event.value}"];')
    return "\n".join(lines + ["}"])


def dwords(offset: int, data: bytes) -> list[tuple[int, int]]:
    """(offset, value) DWORDs of an aligned 4- or 8-byte access; [] otherwise."""
    if len(data) not in (4, 8) or offset % len(data):
        return []
    value = int.from_bytes(data, "little")
    return [(offset + i, (value >> (8 * i)) & 0xFFFFFFFF) for i in range(0, len(data), 4)]


class RegisterFile:
    """CAP, VS, INTMS/INTMC, CC, CSTS, AQA, ASQ, ACQ, CRTO and the controller state."""

    def __init__(self, *, mqes: int, timeout: int = 20) -> None:
        """``mqes``: CAP.MQES (0-based queue size); ``timeout``: CAP.TO in 500 ms units.

        Raises:
            WireError: a value does not fit its CAP field.
        """
        # CAP.CRMS = 01b (NVMe 2.0 requires CRWMS): CSTS.RDY means ready with media,
        # which is all this controller has; CRTO.CRWMT says the same as CAP.TO.
        # No CRIMS, so CC.CRIME stays reserved and CRTO.CRIMT 0.
        self.cap = CAP.encode(mqes=mqes, cqr=1, ams=0, to=timeout, dstrd=0, nssrs=0,
                              css=CAP_CSS_NVM | CAP_CSS_IOCS, bps=0, mpsmin=0, mpsmax=0,
                              crms=CAP_CRMS_CRWMS)
        self.crto = CRTO.encode(crwmt=timeout, crimt=0)
        self.power_on()

    def power_on(self) -> None:
        """Every register to its reset value; the state to DISABLED."""
        self.cc = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.intms = 0
        self.state = CtrlState.DISABLED
        self.ready = False
        self.invalid_reason = ""

    # ------------------------------------------------------------ derived values
    @property
    def csts(self) -> int:
        shst = SHST_COMPLETE if self.state is CtrlState.SHUTDOWN else SHST_NORMAL
        return int(self.ready) | int(self.state is CtrlState.FAILED) << 1 | shst << 2

    @property
    def mqes(self) -> int:
        return CAP.get(self.cap, "mqes")

    @property
    def admin_sq_size(self) -> int:
        return AQA.get(self.aqa, "asqs") + 1

    @property
    def admin_cq_size(self) -> int:
        return AQA.get(self.aqa, "acqs") + 1

    def cc_field(self, name: str) -> int:
        return CC.get(self.cc, name)

    # ------------------------------------------------------------ the machine
    def fire(self, event: CtrlEvent) -> CtrlState:
        """Take the transition for ``event``.

        Returns:
            The new state.

        Raises:
            StateError: the table has no transition for (state, event).
        """
        target = step(TRANSITIONS, self.state, event, StateError, where="NVMe controller")
        self.state = target
        self.ready = READY_AFTER.get(event, self.ready)
        return target

    def enable_problem(self) -> str:
        """Why the current CC/AQA/ASQ/ACQ cannot be enabled ('' if they can)."""
        cap = CAP.decode(self.cap)
        cc = CC.decode(self.cc)
        checks = (
            (cc["css"] in (CC_CSS_NVM, CC_CSS_IOCS), f"CC.CSS {cc['css']} not NVM or IOCS"),
            (cap["mpsmin"] <= cc["mps"] <= cap["mpsmax"], f"CC.MPS {cc['mps']} unsupported"),
            (cc["ams"] == 0, f"CC.AMS {cc['ams']} unsupported"),
            (cc["iosqes"] == SQES, f"CC.IOSQES {cc['iosqes']} != {SQES}"),
            (cc["iocqes"] == CQES, f"CC.IOCQES {cc['iocqes']} != {CQES}"),
            (self.admin_sq_size >= 2, "AQA.ASQS below 2 entries"),
            (self.admin_cq_size >= 2, "AQA.ACQS below 2 entries"),
            (self.asq % PAGE_SIZE == 0, f"ASQ {self.asq:#x} not page aligned"),
            (self.acq % PAGE_SIZE == 0, f"ACQ {self.acq:#x} not page aligned"),
        )
        return next((why for ok, why in checks if not ok), "")

    # ------------------------------------------------------------ access
    def read(self, offset: int, count: int) -> bytes:
        """Read an aligned DWORD or QWORD; anything else reads as zeros."""
        parts = dwords(offset, bytes(count))
        if not parts:
            return bytes(count)
        return b"".join(self._read32(off).to_bytes(4, "little") for off, _ in parts)

    def write(self, offset: int, data: bytes) -> list[CtrlEvent]:
        """Write an aligned DWORD or QWORD; anything else is ignored.

        Returns:
            The state-machine events the write caused, already applied, in order.
        """
        events: list[CtrlEvent] = []
        for off, value in dwords(offset, data):
            events += self._write32(off, value)
        return events

    def _read32(self, off: int) -> int:
        qwords: dict[int, int] = {Reg.CAP: self.cap, Reg.ASQ: self.asq, Reg.ACQ: self.acq}
        base = off & ~7
        if base in qwords:
            return (qwords[base] >> (32 if off & 4 else 0)) & 0xFFFFFFFF
        registers: dict[int, int] = {
            Reg.VS: VERSION_2_0,
            Reg.CRTO: self.crto,
            Reg.INTMS: self.intms,
            Reg.INTMC: self.intms,
            Reg.CC: self.cc,
            Reg.CSTS: self.csts,
            Reg.AQA: self.aqa,
        }
        return registers.get(off, 0)  # NSSR (CAP.NSSRS = 0), CMB, PMR, reserved: 0

    def _write32(self, off: int, value: int) -> list[CtrlEvent]:
        if off == Reg.CC:
            return self._write_cc(value & CC.defined_mask)
        if off == Reg.INTMS:
            self.intms |= value
        elif off == Reg.INTMC:
            self.intms &= ~value
        elif off == Reg.AQA:
            self.aqa = value & AQA.defined_mask
        elif (off & ~7) in (Reg.ASQ, Reg.ACQ):
            name = "asq" if off & ~7 == Reg.ASQ else "acq"
            shift = 32 if off & 4 else 0
            old = getattr(self, name)
            setattr(self, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))
        # CAP, VS, CSTS (NSSRO never set), NSSR, CRTO and reserved space: read-only.
        return []

    def _write_cc(self, new: int) -> list[CtrlEvent]:
        old, self.cc = self.cc, new
        events = []
        was_en, is_en = CC.get(old, "en"), CC.get(new, "en")
        if was_en and not is_en:
            events.append(CtrlEvent.DISABLE)
        elif is_en and not was_en:
            self.invalid_reason = self.enable_problem()
            events.append(CtrlEvent.ENABLE_INVALID if self.invalid_reason else CtrlEvent.ENABLE)
        if CC.get(new, "shn") and not CC.get(old, "shn"):
            events.append(CtrlEvent.SHUTDOWN)
        for event in events:
            self.fire(event)
        return events


def _field_valid(ok: bool, why: str) -> None:
    """An NVMe command's field check (not a peer protocol's ``require``).

    Raises:
        CommandError: Invalid Field in Command when ``ok`` is false.
    """
    if not ok:
        raise CommandError(Status.INVALID_FIELD, why)


class Features:
    """Current values of the supported features (5.21.1), back to defaults on reset."""

    SUPPORTED: ClassVar[frozenset[int]] = frozenset(FeatureId)
    # CDW11 bits a Set Features must leave clear, per feature.
    RESERVED: ClassVar[dict[int, int]] = {
        FeatureId.ARBITRATION: 0x000000F8,
        FeatureId.POWER_MANAGEMENT: 0xFFFFFFE0,  # and WH (7:5): no workload hints
        FeatureId.TEMPERATURE_THRESHOLD: 0xFFC00000,
        FeatureId.ERROR_RECOVERY: 0xFFFF0000,  # and DULBE (16): NSFEAT bit 2 clear
        FeatureId.VOLATILE_WRITE_CACHE: 0xFFFFFFFE,
        FeatureId.NUMBER_OF_QUEUES: 0,
        FeatureId.INTERRUPT_COALESCING: 0xFFFF0000,
        FeatureId.INTERRUPT_VECTOR_CONFIG: 0xFFFE0000,
        FeatureId.WRITE_ATOMICITY: 0xFFFFFFFE,  # DN (0)
        FeatureId.ASYNC_EVENT_CONFIG: 0xFFFFFE00,  # SMART warnings 7:0, NS attribute 8
        FeatureId.TIMESTAMP: 0,
        FeatureId.IOCS_PROFILE: 0xFFFFFE00,  # IOCSCI (8:0)
    }

    def __init__(self, io_queues: int, vectors: int, over_temp: int,
                 clock: Callable[[], float] | None) -> None:
        self.io_queues, self.vectors, self.over_temp, self.clock = (
            io_queues, vectors, over_temp, clock)
        self.reset()

    def reset(self) -> None:
        self.values: dict[int, int] = {fid: 0 for fid in FeatureId}
        self.values[FeatureId.VOLATILE_WRITE_CACHE] = 1  # VWC present, enabled at reset
        self.thresholds = {0: self.over_temp, 1: 0}  # composite sensor: THSEL -> Kelvin
        self.tler: dict[int, int] = {}
        self.no_coalescing: set[int] = set()
        self.timestamp_base: tuple[int, float] | None = None

    @property
    def write_cache(self) -> bool:
        return bool(self.values[FeatureId.VOLATILE_WRITE_CACHE])

    @property
    def async_config(self) -> int:
        return self.values[FeatureId.ASYNC_EVENT_CONFIG]

    def _temperature(self, value: int, setting: bool) -> int:
        sensor, thsel = (value >> 16) & 0xF, (value >> 20) & 0x3
        # Only the composite temperature exists; Fh selects all sensors on Set.
        _field_valid(sensor == 0 or (setting and sensor == 0xF), why=f"TMPSEL {sensor}")
        _field_valid(thsel <= 1, why=f"THSEL {thsel}")
        return thsel

    def _vector(self, value: int) -> int:
        vector = value & 0xFFFF
        _field_valid(vector < self.vectors, why=f"interrupt vector {vector}")
        return vector

    def set(self, fid: int, value: int, nsid: int) -> int:
        """Set Features for ``fid``; returns DWORD 0 (raises CommandError)."""
        _field_valid(not value & self.RESERVED[fid], why=f"feature {fid:#x}: {value:#x}")
        if fid == FeatureId.POWER_MANAGEMENT:
            _field_valid(value == 0, why=f"power state {value & 0x1F} > NPSS 0")
        elif fid == FeatureId.NUMBER_OF_QUEUES:
            _field_valid(0xFFFF not in (value & 0xFFFF, value >> 16), why="65536 queues requested")
            return self.get(fid, 0, nsid)
        elif fid == FeatureId.TEMPERATURE_THRESHOLD:
            self.thresholds[self._temperature(value, True)] = value & 0xFFFF
        elif fid == FeatureId.IOCS_PROFILE and value:
            # index 0, the one combination Identify CNS 1Ch lists, is the only one
            raise CommandError(Status.IOCS_COMBINATION_REJECTED, f"combination index {value}")
        elif fid == FeatureId.ERROR_RECOVERY:
            if nsid == NSID_ALL:
                self.tler.clear()
            self.tler[nsid] = value & 0xFFFF
        elif fid == FeatureId.INTERRUPT_VECTOR_CONFIG:
            vector = self._vector(value)
            (self.no_coalescing.add if value >> 16 & 1 else self.no_coalescing.discard)(vector)
        self.values[fid] = value
        return 0

    def get(self, fid: int, cdw11: int, nsid: int) -> int:
        """Get Features (current value) for ``fid``; returns DWORD 0."""
        if fid == FeatureId.NUMBER_OF_QUEUES:  # NSQA, NCQA: 0-based, always all
            return (self.io_queues - 1) << 16 | (self.io_queues - 1)
        if fid == FeatureId.TEMPERATURE_THRESHOLD:
            return self.thresholds[self._temperature(cdw11, False)]
        if fid == FeatureId.ERROR_RECOVERY:
            return self.tler.get(nsid, self.tler.get(NSID_ALL, 0))
        if fid == FeatureId.INTERRUPT_VECTOR_CONFIG:
            vector = self._vector(cdw11)
            return vector | int(vector in self.no_coalescing) << 16
        return self.values[fid]

    def set_timestamp(self, data: bytes) -> int:
        millis = int.from_bytes(data[:6], "little")
        self.timestamp_base = (millis, self.clock() if self.clock else 0.0)
        return 0

    def timestamp(self) -> bytes:
        """The 8-byte Timestamp data (5.21.1.14): ms, Synch, Origin (0 reset, 1 host).

        Without a clock the value does not advance: Synch (bit 0) says so.
        """
        synch = int(self.clock is None)
        if self.timestamp_base is None:
            return bytes([0] * 6 + [synch, 0])
        millis, then = self.timestamp_base
        if self.clock is not None:
            millis += int((self.clock() - then) * 1000)
        return (millis & (1 << 48) - 1).to_bytes(6, "little") + bytes([1 << 1 | synch, 0])
