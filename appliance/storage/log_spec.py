"""NVMe log pages (layer "wire"): the Error Information entry, SMART / Health
Information and Firmware Slot Information logs (NVMe Base Specification 1.4,
section 5.14.1), and the limits of the Changed Namespace List.

Sizes are asserted at import time.  No I/O and no imports from the rest of
:mod:`appliance.storage`.
"""

from __future__ import annotations

from typing import Annotated

from appliance.wire import U8, U16, U32, U64, Struct


class ErrorLogEntry(Struct, size=64):
    """Error Information log entry (figure 194)."""

    error_count: U64 = 0
    sqid: U16 = 0
    cid: U16 = 0
    status: U16 = 0
    location: U16 = 0xFFFF
    lba: U64 = 0
    nsid: U32 = 0
    vs: U8 = 0
    trtype: U8 = 0
    rsvd30: Annotated[bytes, "2s"] = b""
    csi: U64 = 0
    trtype_spec: U16 = 0
    rsvd42: Annotated[bytes, "22s"] = b""


class SmartLog(Struct, size=512):
    """SMART / Health Information log (figure 196); 128-bit counters as bytes."""

    critical_warning: U8 = 0
    temperature: U16 = 0
    avail_spare: U8 = 0
    spare_thresh: U8 = 0
    percent_used: U8 = 0
    endurance_crit: U8 = 0
    rsvd7: Annotated[bytes, "25s"] = b""
    data_units_read: Annotated[bytes, "16s"] = b""
    data_units_written: Annotated[bytes, "16s"] = b""
    host_reads: Annotated[bytes, "16s"] = b""
    host_writes: Annotated[bytes, "16s"] = b""
    ctrl_busy_time: Annotated[bytes, "16s"] = b""
    power_cycles: Annotated[bytes, "16s"] = b""
    power_on_hours: Annotated[bytes, "16s"] = b""
    unsafe_shutdowns: Annotated[bytes, "16s"] = b""
    media_errors: Annotated[bytes, "16s"] = b""
    error_log_entries: Annotated[bytes, "16s"] = b""
    warning_temp_time: U32 = 0
    critical_temp_time: U32 = 0
    temp_sensors: Annotated[bytes, "16s"] = b""
    tmt1_count: U32 = 0
    tmt2_count: U32 = 0
    tmt1_time: U32 = 0
    tmt2_time: U32 = 0
    rsvd232: Annotated[bytes, "280s"] = b""


class FirmwareSlotLog(Struct, size=512):
    """Firmware Slot Information log (figure 197)."""

    afi: U8 = 0
    rsvd1: Annotated[bytes, "7s"] = b""
    frs1: Annotated[bytes, "8s"] = b""
    frs2_7: Annotated[bytes, "48s"] = b""
    rsvd64: Annotated[bytes, "448s"] = b""


def u128(value: int) -> bytes:
    """A 128-bit little-endian counter field (saturating)."""
    return min(value, (1 << 128) - 1).to_bytes(16, "little")


CHANGED_NS_MAX = 1024  # figure 199: more than 1024 changes report FFFFFFFFh alone
