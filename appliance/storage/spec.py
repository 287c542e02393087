"""NVMe wire definitions (layer "wire"): registers, commands, completions, data structures.

Theory of operation
-------------------
Everything the NVMe Base Specification 1.4 puts on the wire is declared
once, as data: here the controller register offsets and their bit fields
(:class:`~appliance.wire.BitFields`, section 3.1), the 64-byte submission and
16-byte completion queue entries (sections 4.2, 4.6), the opcodes and the
status codes (section 4.6.1.2); the 4096-byte Identify data structures
(section 5.15) in :mod:`appliance.storage.identify_spec`, the log pages
(section 5.14.1) in :mod:`appliance.storage.log_spec`.  Sizes are asserted at
import time.

A status is one integer ``(SCT << 8) | SC``; shifted left by one it is the
completion's Status Field without the phase tag and DNR bit.  Command
handlers refuse a command by raising :class:`CommandError`.

No I/O and no imports from the rest of :mod:`appliance.storage`.
"""

from __future__ import annotations

import enum
from typing import Annotated

from appliance.errors import ApplianceError
from appliance.wire import U8, U16, U32, U64, BitFields, Struct

PAGE_SHIFT = 12  # CAP.MPSMIN = CAP.MPSMAX = 0: 4 KiB memory pages only
PAGE_SIZE = 1 << PAGE_SHIFT
SQE_SIZE = 64
CQE_SIZE = 16
SQES = 6  # log2(64): the only I/O SQ entry size (Identify SQES = 0x66)
CQES = 4  # log2(16): the only I/O CQ entry size (Identify CQES = 0x44)
NSID_ALL = 0xFFFFFFFF
IDENTIFY_SIZE = 4096


# ---------------------------------------------------------------- registers (section 3.1)
class Reg(enum.IntEnum):
    """Controller register offsets in BAR0."""

    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30
    CRTO = 0x68  # NVMe 2.0: Controller Ready Timeouts


DOORBELL_BASE = 0x1000  # section 3.1.24: SQyTDBL at 1000h + (2y * (4 << CAP.DSTRD))

CAP = BitFields(
    64,
    reserved=(0x1F << 19) | (0x3 << 46) | (0x7 << 61),
    mqes=(0, 16), cqr=(16, 1), ams=(17, 2), to=(24, 8), dstrd=(32, 4), nssrs=(36, 1),
    css=(37, 8), bps=(45, 1), mpsmin=(48, 4), mpsmax=(52, 4), pmrs=(56, 1), cmbs=(57, 1),
    nsss=(58, 1), crms=(59, 2),
)
#: Controller Ready Timeouts (NVMe 2.0): both in 500 ms units
CRTO = BitFields(32, crwmt=(0, 16), crimt=(16, 16))
CAP_CRMS_CRWMS = 0x1  # CAP.CRMS bit 59: Controller Ready With Media (CRTO.CRWMT valid)
CC = BitFields(
    32,
    reserved=(0x7 << 1) | (0xFF << 24),
    en=(0, 1), css=(4, 3), mps=(7, 4), ams=(11, 3), shn=(14, 2), iosqes=(16, 4), iocqes=(20, 4),
)
CSTS = BitFields(32, reserved=~0x3F & 0xFFFFFFFF,
                 rdy=(0, 1), cfs=(1, 1), shst=(2, 2), nssro=(4, 1), pp=(5, 1))
AQA = BitFields(32, reserved=(0xF << 12) | (0xF << 28), asqs=(0, 12), acqs=(16, 12))

CAP_CSS_NVM = 0x01  # CAP.CSS bit 37: the NVM command set
CAP_CSS_IOCS = 0x40  # CAP.CSS bit 43: I/O command sets chosen by CSI (Identify CNS 1Ch)
CC_CSS_NVM, CC_CSS_IOCS = 0b000, 0b110  # CC.CSS: the NVM command set / all CAP.CSS lists
SHN_NONE, SHN_NORMAL, SHN_ABRUPT = 0, 1, 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2
VERSION_1_4 = 0x00010400
VERSION_2_0 = 0x00020000


# ---------------------------------------------------------------- queue entries
class Command(Struct, size=SQE_SIZE):
    """Submission queue entry, common layout (section 4.2, figure 105)."""

    opcode: U8 = 0
    flags: U8 = 0  # bits 1:0 FUSE, 5:2 reserved, 7:6 PSDT
    cid: U16 = 0
    nsid: U32 = 0
    cdw2: U32 = 0
    cdw3: U32 = 0
    mptr: U64 = 0
    prp1: U64 = 0
    prp2: U64 = 0
    cdw10: U32 = 0
    cdw11: U32 = 0
    cdw12: U32 = 0
    cdw13: U32 = 0
    cdw14: U32 = 0
    cdw15: U32 = 0


class Completion(Struct, size=CQE_SIZE):
    """Completion queue entry (section 4.6, figure 120)."""

    dw0: U32 = 0
    dw1: U32 = 0
    sq_head: U16 = 0
    sq_id: U16 = 0
    cid: U16 = 0
    status: U16 = 0  # bit 0 phase tag, 8:1 SC, 11:9 SCT, 13:12 CRD, 14 M, 15 DNR


STATUS_DNR = 1 << 15


class SglDescriptor(Struct, size=16):
    """SGL descriptor (section 4.4, figure 112): SGL identifier = type << 4 | subtype."""

    address: U64 = 0
    length: U32 = 0
    reserved: Annotated[bytes, "3s"] = b""
    sgl_id: U8 = 0


class SglType(enum.IntEnum):
    """SGL Descriptor Type (section 4.4, figure 114)."""

    DATA_BLOCK = 0x0
    BIT_BUCKET = 0x1
    SEGMENT = 0x2
    LAST_SEGMENT = 0x3
    KEYED_DATA_BLOCK = 0x4
    TRANSPORT_DATA_BLOCK = 0x5


class Psdt(enum.IntEnum):
    """PRP or SGL for Data Transfer: command DWORD 0 bits 15:14 (flags bits 7:6)."""

    PRP = 0
    SGL_MPTR_BUFFER = 1  # SGLs; MPTR: one contiguous metadata buffer
    SGL_MPTR_SGL = 2  # SGLs; MPTR: the address of a metadata SGL segment


class SourceRange(Struct, size=32):
    """Copy Source Range Entry, descriptor format 0 (NVM command set 2.0 figure 33)."""

    reserved0: U64 = 0
    slba: U64 = 0
    nlb: U16 = 0  # 0-based
    reserved18: Annotated[bytes, "6s"] = b""
    eilbrt: U32 = 0
    elbat: U16 = 0
    elbatm: U16 = 0


class DsmRange(Struct, size=16):
    """Dataset Management range (NVM command set 1.4 section 6.7, figure 364)."""

    attributes: U32 = 0
    nlb: U32 = 0
    slba: U64 = 0


# ---------------------------------------------------------------- opcodes
class AdminOpcode(enum.IntEnum):
    DELETE_SQ = 0x00
    CREATE_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_CQ = 0x04
    CREATE_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    NAMESPACE_MANAGEMENT = 0x0D
    FIRMWARE_COMMIT = 0x10
    FIRMWARE_DOWNLOAD = 0x11
    NAMESPACE_ATTACHMENT = 0x15
    DOORBELL_BUFFER_CONFIG = 0x7C
    FORMAT_NVM = 0x80


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    COMPARE = 0x05
    WRITE_UNCORRECTABLE = 0x04
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09
    VERIFY = 0x0C
    COPY = 0x19
    ZONE_MGMT_SEND = 0x79  # Zoned Namespace command set (CSI 02h)
    ZONE_MGMT_RECV = 0x7A
    ZONE_APPEND = 0x7D


class Cns(enum.IntEnum):
    """Identify Controller or Namespace Structure (section 5.15.1, figure 244)."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02
    NS_ID_DESCRIPTORS = 0x03
    CSI_NAMESPACE = 0x05  # NVMe 2.0: I/O command set specific Identify Namespace
    CSI_CONTROLLER = 0x06  # NVMe 2.0; Linux asks for it whenever VS >= 1.1
    CSI_ACTIVE_NS_LIST = 0x07  # NVMe 2.0: active NSIDs of one I/O command set
    NS_CS_INDEPENDENT = 0x08  # NVMe 2.0: I/O Command Set Independent Identify Namespace
    CSI_ALLOCATED_NS_LIST = 0x1A  # NVMe 2.0: allocated NSIDs of one I/O command set
    CSI_ALLOCATED_NAMESPACE = 0x1B  # NVMe 2.0: CNS 05h of an allocated NSID
    COMMAND_SET_LIST = 0x1C  # NVMe 2.0: Identify I/O Command Set data structure


CSI_NVM = 0x00  # Command Set Identifier of the NVM command set
CSI_ZNS = 0x02  # ... of the Zoned Namespace command set


class FeatureId(enum.IntEnum):
    """Feature Identifiers (section 5.21.1, figure 271)."""

    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    WRITE_ATOMICITY = 0x0A  # Write Atomicity Normal: DN; AWUN is 0, so it changes nothing
    ASYNC_EVENT_CONFIG = 0x0B
    TIMESTAMP = 0x0E
    IOCS_PROFILE = 0x19  # NVMe 2.0: I/O Command Set Profile (CNS 1Ch's combination index)


class LogPage(enum.IntEnum):
    """Log Page Identifiers (section 5.14.1, figure 191)."""

    SUPPORTED_LOGS = 0x00  # NVMe 2.0
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NS = 0x04
    COMMANDS_EFFECTS = 0x05


class EventType(enum.IntEnum):
    """Asynchronous Event Type (section 5.2.1, figure 145)."""

    ERROR = 0
    SMART = 1
    NOTICE = 2


class EventInfo(enum.IntEnum):
    """Asynchronous Event Information values this controller raises (figures 146, 148)."""

    INVALID_DOORBELL_REGISTER = 0x00  # type ERROR
    INVALID_DOORBELL_VALUE = 0x01  # type ERROR
    NS_ATTRIBUTE_CHANGED = 0x00  # type NOTICE


# ---------------------------------------------------------------- status codes
class Status(enum.IntEnum):
    """(SCT << 8) | SC, section 4.6.1.2, figures 126-130."""

    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    DATA_TRANSFER_ERROR = 0x004
    INTERNAL_ERROR = 0x006
    ABORT_REQUESTED = 0x007
    INVALID_NAMESPACE = 0x00B
    COMMAND_SEQUENCE_ERROR = 0x00C
    INVALID_SGL_SEGMENT_DESCRIPTOR = 0x00D
    INVALID_SGL_DESCRIPTOR_COUNT = 0x00E
    DATA_SGL_LENGTH_INVALID = 0x00F
    SGL_DESCRIPTOR_TYPE_INVALID = 0x011
    INVALID_PRP_OFFSET = 0x013
    SGL_OFFSET_INVALID = 0x016
    NS_WRITE_PROTECTED = 0x020
    LBA_OUT_OF_RANGE = 0x080
    # command specific (SCT 1)
    COMPLETION_QUEUE_INVALID = 0x100
    INVALID_QUEUE_IDENTIFIER = 0x101
    INVALID_QUEUE_SIZE = 0x102
    AER_LIMIT_EXCEEDED = 0x105
    INVALID_FIRMWARE_SLOT = 0x106
    INVALID_FIRMWARE_IMAGE = 0x107
    INVALID_INTERRUPT_VECTOR = 0x108
    INVALID_LOG_PAGE = 0x109
    INVALID_FORMAT = 0x10A
    INVALID_QUEUE_DELETION = 0x10C
    FEATURE_NOT_SAVEABLE = 0x10D
    FEATURE_NOT_NS_SPECIFIC = 0x10F
    FIRMWARE_NEEDS_CONTROLLER_RESET = 0x111  # commit done; active from the next reset
    OVERLAPPING_RANGE = 0x114
    IOCS_COMBINATION_REJECTED = 0x12B  # I/O Command Set Profile past CNS 1Ch's list
    NS_INSUFFICIENT_CAPACITY = 0x115  # Namespace Management / Attachment (figure 130)
    NS_ID_UNAVAILABLE = 0x116
    NS_ALREADY_ATTACHED = 0x118
    NS_NOT_ATTACHED = 0x11A
    CONTROLLER_LIST_INVALID = 0x11C
    INVALID_PROTECTION_INFORMATION = 0x181  # NVM command set: PRINFO/ILBRT refused
    WRITE_TO_READ_ONLY_RANGE = 0x182
    COMMAND_SIZE_LIMIT_EXCEEDED = 0x183  # Copy past MSSRL / MCL / MSRC (NVM 2.0)
    ZONE_BOUNDARY_ERROR = 0x1B8  # Zoned Namespace command set 1.1, figure 26
    ZONE_IS_FULL = 0x1B9
    ZONE_IS_READ_ONLY = 0x1BA
    ZONE_IS_OFFLINE = 0x1BB
    ZONE_INVALID_WRITE = 0x1BC
    TOO_MANY_ACTIVE_ZONES = 0x1BD
    TOO_MANY_OPEN_ZONES = 0x1BE
    INVALID_ZONE_STATE_TRANSITION = 0x1BF
    # media and data integrity errors (SCT 2)
    WRITE_FAULT = 0x280
    UNRECOVERED_READ_ERROR = 0x281
    GUARD_CHECK_ERROR = 0x282  # end-to-end protection (NVM command set 5.2)
    APPLICATION_TAG_CHECK_ERROR = 0x283
    REFERENCE_TAG_CHECK_ERROR = 0x284
    COMPARE_FAILURE = 0x285


class CommandError(ApplianceError):
    """A command is refused with an NVMe status; ``dnr``: Do Not Retry.

    Attributes:
        status: a :class:`Status` value.
        dnr: the host should not retry the command as is.
        lba: the first LBA that saw the error, for the Error Information log
            (None: the command's SLBA).
    """

    def __init__(self, status: Status, message: str = "", dnr: bool = True,
                 lba: int | None = None) -> None:
        super().__init__(message or status.name)
        self.status = status
        self.dnr = dnr
        self.lba = lba


def ascii_field(value: str, width: int, what: str) -> bytes:
    """An ASCII string field (SN, MN, FR): left justified, space padded (section 1.5).

    Raises:
        ValueError: empty, too long or not printable ASCII.
    """
    data = value.encode("ascii", "replace")
    if not value.isascii() or not data or len(data) > width or not all(
            0x20 <= b < 0x7F for b in data):
        raise ValueError(f"{what} {value!r}: 1 to {width} printable ASCII characters")
    return data.ljust(width, b" ")


def status_field(status: int, dnr: bool, phase: int) -> int:
    """The 16-bit completion Status Field with the phase tag."""
    return (status << 1) | (STATUS_DNR if dnr else 0) | phase
