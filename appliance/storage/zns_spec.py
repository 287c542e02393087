"""Zoned Namespace command set wire definitions (layer "wire"; NVMe Zoned
Namespace Command Set Specification 1.1): the command fields of Zone
Management Send / Receive, the zone report, and the command set's Identify
data structures.  Opcodes and statuses are in :mod:`appliance.storage.spec`
with the rest.

No I/O and no imports from the rest of :mod:`appliance.storage`.
"""

from __future__ import annotations

import enum
from typing import Annotated

from appliance.storage.spec import IDENTIFY_SIZE
from appliance.wire import U8, U16, U32, U64, Struct

# Zone Management Send, CDW13 (figure 40): ZSA 7:0, Select All bit 8, ZSASO bit 9
ZMS_SELECT_ALL = 1 << 8
ZMS_RESERVED = 0xFFFFFE00  # bit 9 (ZSASO: no ZRWA here) and 31:10
# Zone Management Receive, CDW13 (figure 43): ZRA 7:0, ZRASF 15:8, Partial Report bit 16
ZMR_PARTIAL = 1 << 16
ZMR_RESERVED = 0xFFFE0000
ZONE_TYPE_SEQ_WRITE = 0x2  # Sequential Write Required: the only zone type here
ZASL = 0  # Zone Append Size Limit: 0 = MDTS


class ZoneSendAction(enum.IntEnum):
    """Zone Management Send's ZSA (figure 41)."""

    CLOSE = 0x01
    FINISH = 0x02
    OPEN = 0x03
    RESET = 0x04
    OFFLINE = 0x05
    SET_DESCRIPTOR_EXTENSION = 0x10  # no zone descriptor extensions here (ZDES = 0)


class ZoneReceiveAction(enum.IntEnum):
    """Zone Management Receive's ZRA (figure 43)."""

    REPORT = 0x00
    EXTENDED_REPORT = 0x01  # needs zone descriptor extensions: refused


class ZoneReportFilter(enum.IntEnum):
    """Zone Management Receive's ZRASF for a report (figure 44)."""

    ALL = 0x00
    EMPTY = 0x01
    IMPLICITLY_OPENED = 0x02
    EXPLICITLY_OPENED = 0x03
    CLOSED = 0x04
    FULL = 0x05
    READ_ONLY = 0x06
    OFFLINE = 0x07


class ZoneReportHeader(Struct, size=64):
    """Report Zones data structure header (figure 45)."""

    nr_zones: U64 = 0
    reserved: Annotated[bytes, "56s"] = b""


class ZoneDescriptor(Struct, size=64):
    """Zone Descriptor (figure 46): ZT 3:0 of byte 0, ZS 7:4 of byte 1."""

    zt: U8 = ZONE_TYPE_SEQ_WRITE
    zs: U8 = 0
    za: U8 = 0
    zai: U8 = 0
    reserved4: U32 = 0
    zcap: U64 = 0
    zslba: U64 = 0
    wp: U64 = 0
    reserved32: Annotated[bytes, "32s"] = b""


class IdentifyNamespaceZoned(Struct, size=IDENTIFY_SIZE):
    """I/O Command Set specific Identify Namespace, Zoned Namespace command set
    (CNS 05h, CSI 02h; figure 51).  MAR and MOR are 0-based, FFFFFFFFh: no limit."""

    zoc: U16 = 0  # no variable zone capacity, no zone active excursions
    ozcs: U16 = 0  # RAZB 0: reads may not cross zone boundaries
    mar: U32 = 0xFFFFFFFF
    mor: U32 = 0xFFFFFFFF
    rrl: U32 = 0
    frl: U32 = 0
    reserved20: Annotated[bytes, "2796s"] = b""
    lbafe0_zsze: U64 = 0  # zone size in blocks, for LBA format 0
    lbafe0_zdes: U8 = 0  # zone descriptor extension size: none
    lbafe0_reserved: Annotated[bytes, "7s"] = b""
    lbafe1_63: Annotated[bytes, "1008s"] = b""
    vendor: Annotated[bytes, "256s"] = b""


class IdentifyControllerZoned(Struct, size=IDENTIFY_SIZE):
    """I/O Command Set specific Identify Controller, Zoned Namespace command set
    (CNS 06h, CSI 02h; figure 50)."""

    zasl: U8 = ZASL
    reserved1: Annotated[bytes, "4095s"] = b""
