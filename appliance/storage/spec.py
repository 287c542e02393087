"""NVMe wire definitions (layer "wire"): registers, commands, completions, data structures.

Theory of operation
-------------------
Everything the NVMe Base Specification 1.4 puts on the wire is declared here
once, as data: controller register offsets and their bit fields
(:class:`~appliance.wire.BitFields`, section 3.1), the 64-byte submission and
16-byte completion queue entries (sections 4.2, 4.6), the 4096-byte Identify
data structures (section 5.15), the log pages (section 5.14.1) and the
status codes (section 4.6.1.2).  Sizes are asserted at import time.

A status is one integer ``(SCT << 8) | SC``; shifted left by one it is the
completion's Status Field without the phase tag and DNR bit.  Command
handlers refuse a command by raising :class:`CommandError`.

No I/O and no imports from the rest of :mod:`appliance.storage`.
"""

from __future__ import annotations

import enum

from appliance.errors import ApplianceError
from appliance.wire import BitFields, Struct

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


DOORBELL_BASE = 0x1000  # section 3.1.24: SQyTDBL at 1000h + (2y * (4 << CAP.DSTRD))

CAP = BitFields(
    64,
    reserved=(0x1F << 19) | (0x3 << 46) | (0x3F << 58),
    mqes=(0, 16), cqr=(16, 1), ams=(17, 2), to=(24, 8), dstrd=(32, 4), nssrs=(36, 1),
    css=(37, 8), bps=(45, 1), mpsmin=(48, 4), mpsmax=(52, 4), pmrs=(56, 1), cmbs=(57, 1),
)
CC = BitFields(
    32,
    reserved=(0x7 << 1) | (0xFF << 24),
    en=(0, 1), css=(4, 3), mps=(7, 4), ams=(11, 3), shn=(14, 2), iosqes=(16, 4), iocqes=(20, 4),
)
CSTS = BitFields(32, reserved=~0x3F & 0xFFFFFFFF,
                 rdy=(0, 1), cfs=(1, 1), shst=(2, 2), nssro=(4, 1), pp=(5, 1))
AQA = BitFields(32, reserved=(0xF << 12) | (0xF << 28), asqs=(0, 12), acqs=(16, 12))

CAP_CSS_NVM = 0x01  # CAP.CSS bit 37: the NVM command set
SHN_NONE, SHN_NORMAL, SHN_ABRUPT = 0, 1, 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2
VERSION_1_4 = 0x00010400


# ---------------------------------------------------------------- queue entries
class Command(Struct, size=SQE_SIZE):
    """Submission queue entry, common layout (section 4.2, figure 105)."""

    FIELDS = (
        ("opcode", "B", 0),
        ("flags", "B", 0),  # bits 1:0 FUSE, 5:2 reserved, 7:6 PSDT
        ("cid", "H", 0),
        ("nsid", "I", 0),
        ("cdw2", "I", 0),
        ("cdw3", "I", 0),
        ("mptr", "Q", 0),
        ("prp1", "Q", 0),
        ("prp2", "Q", 0),
        ("cdw10", "I", 0),
        ("cdw11", "I", 0),
        ("cdw12", "I", 0),
        ("cdw13", "I", 0),
        ("cdw14", "I", 0),
        ("cdw15", "I", 0),
    )


class Completion(Struct, size=CQE_SIZE):
    """Completion queue entry (section 4.6, figure 120)."""

    FIELDS = (
        ("dw0", "I", 0),
        ("dw1", "I", 0),
        ("sq_head", "H", 0),
        ("sq_id", "H", 0),
        ("cid", "H", 0),
        ("status", "H", 0),  # bit 0 phase tag, 8:1 SC, 11:9 SCT, 13:12 CRD, 14 M, 15 DNR
    )


STATUS_DNR = 1 << 15


class DsmRange(Struct, size=16):
    """Dataset Management range (NVM command set 1.4 section 6.7, figure 364)."""

    FIELDS = (("attributes", "I", 0), ("nlb", "I", 0), ("slba", "Q", 0))


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
    DOORBELL_BUFFER_CONFIG = 0x7C
    FORMAT_NVM = 0x80


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


class Cns(enum.IntEnum):
    """Identify Controller or Namespace Structure (section 5.15.1, figure 244)."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02
    NS_ID_DESCRIPTORS = 0x03
    CSI_CONTROLLER = 0x06  # NVMe 2.0; Linux asks for it whenever VS >= 1.1


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
    ASYNC_EVENT_CONFIG = 0x0B
    TIMESTAMP = 0x0E


class LogPage(enum.IntEnum):
    """Log Page Identifiers (section 5.14.1, figure 191)."""

    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NS = 0x04


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
    INVALID_PRP_OFFSET = 0x013
    NS_WRITE_PROTECTED = 0x020
    LBA_OUT_OF_RANGE = 0x080
    # command specific (SCT 1)
    COMPLETION_QUEUE_INVALID = 0x100
    INVALID_QUEUE_IDENTIFIER = 0x101
    INVALID_QUEUE_SIZE = 0x102
    AER_LIMIT_EXCEEDED = 0x105
    INVALID_INTERRUPT_VECTOR = 0x108
    INVALID_LOG_PAGE = 0x109
    INVALID_FORMAT = 0x10A
    INVALID_QUEUE_DELETION = 0x10C
    FEATURE_NOT_SAVEABLE = 0x10D
    FEATURE_NOT_NS_SPECIFIC = 0x10F
    WRITE_TO_READ_ONLY_RANGE = 0x182
    # media and data integrity errors (SCT 2)
    WRITE_FAULT = 0x280
    UNRECOVERED_READ_ERROR = 0x281
    COMPARE_FAILURE = 0x285


class CommandError(ApplianceError):
    """A command is refused with an NVMe status; ``dnr``: Do Not Retry.

    Attributes:
        status: a :class:`Status` value.
        dnr: the host should not retry the command as is.
    """

    def __init__(self, status: Status, message: str = "", dnr: bool = True) -> None:
        super().__init__(message or status.name)
        self.status = status
        self.dnr = dnr


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


# ---------------------------------------------------------------- identify (section 5.15.2)
class IdentifyController(Struct, size=IDENTIFY_SIZE):
    """Identify Controller data structure (figure 247)."""

    FIELDS = (
        ("vid", "H", 0), ("ssvid", "H", 0), ("sn", "20s", b""), ("mn", "40s", b""),
        ("fr", "8s", b""), ("rab", "B", 0), ("ieee", "3s", b""), ("cmic", "B", 0),
        ("mdts", "B", 0), ("cntlid", "H", 0), ("ver", "I", 0), ("rtd3r", "I", 0),
        ("rtd3e", "I", 0), ("oaes", "I", 0), ("ctratt", "I", 0), ("rrls", "H", 0),
        ("rsvd102", "9s", b""), ("cntrltype", "B", 0), ("fguid", "16s", b""),
        ("crdt", "6s", b""), ("rsvd134", "106s", b""), ("nvmemi", "16s", b""),
        ("oacs", "H", 0), ("acl", "B", 0), ("aerl", "B", 0), ("frmw", "B", 0),
        ("lpa", "B", 0), ("elpe", "B", 0), ("npss", "B", 0), ("avscc", "B", 0),
        ("apsta", "B", 0), ("wctemp", "H", 0), ("cctemp", "H", 0), ("mtfa", "H", 0),
        ("hmpre", "I", 0), ("hmmin", "I", 0), ("tnvmcap", "16s", b""), ("unvmcap", "16s", b""),
        ("rpmbs", "I", 0), ("edstt", "H", 0), ("dsto", "B", 0), ("fwug", "B", 0),
        ("kas", "H", 0), ("hctma", "H", 0), ("mntmt", "H", 0), ("mxtmt", "H", 0),
        ("sanicap", "I", 0), ("hmminds", "I", 0), ("hmmaxd", "H", 0), ("nsetidmax", "H", 0),
        ("endgidmax", "H", 0), ("anatt", "B", 0), ("anacap", "B", 0), ("anagrpmax", "I", 0),
        ("nanagrpid", "I", 0), ("pels", "I", 0), ("rsvd356", "156s", b""),
        ("sqes", "B", 0), ("cqes", "B", 0), ("maxcmd", "H", 0), ("nn", "I", 0),
        ("oncs", "H", 0), ("fuses", "H", 0), ("fna", "B", 0), ("vwc", "B", 0),
        ("awun", "H", 0), ("awupf", "H", 0), ("nvscc", "B", 0), ("nwpc", "B", 0),
        ("acwu", "H", 0), ("rsvd534", "2s", b""), ("sgls", "I", 0), ("mnan", "I", 0),
        ("rsvd544", "224s", b""), ("subnqn", "256s", b""), ("rsvd1024", "768s", b""),
        ("nvmof", "256s", b""), ("psd0", "32s", b""), ("psd1_31", "992s", b""),
        ("vendor", "1024s", b""),
    )


class PowerState(Struct, size=32):
    """Power State Descriptor (figure 248)."""

    FIELDS = (
        ("mp", "H", 0), ("rsvd2", "B", 0), ("flags", "B", 0), ("enlat", "I", 0),
        ("exlat", "I", 0), ("rrt", "B", 0), ("rrl", "B", 0), ("rwt", "B", 0), ("rwl", "B", 0),
        ("idlp", "H", 0), ("ips", "B", 0), ("rsvd19", "B", 0), ("actp", "H", 0),
        ("apw_aps", "B", 0), ("rsvd23", "9s", b""),
    )


class IdentifyNamespace(Struct, size=IDENTIFY_SIZE):
    """Identify Namespace data structure, NVM command set (figure 245)."""

    FIELDS = (
        ("nsze", "Q", 0), ("ncap", "Q", 0), ("nuse", "Q", 0), ("nsfeat", "B", 0),
        ("nlbaf", "B", 0), ("flbas", "B", 0), ("mc", "B", 0), ("dpc", "B", 0), ("dps", "B", 0),
        ("nmic", "B", 0), ("rescap", "B", 0), ("fpi", "B", 0), ("dlfeat", "B", 0),
        ("nawun", "H", 0), ("nawupf", "H", 0), ("nacwu", "H", 0), ("nabsn", "H", 0),
        ("nabo", "H", 0), ("nabspf", "H", 0), ("noiob", "H", 0), ("nvmcap", "16s", b""),
        ("npwg", "H", 0), ("npwa", "H", 0), ("npdg", "H", 0), ("npda", "H", 0), ("nows", "H", 0),
        ("rsvd74", "18s", b""), ("anagrpid", "I", 0), ("rsvd96", "3s", b""), ("nsattr", "B", 0),
        ("nvmsetid", "H", 0), ("endgid", "H", 0), ("nguid", "16s", b""), ("eui64", "8s", b""),
        ("lbaf0", "I", 0), ("lbaf1_15", "60s", b""), ("rsvd192", "192s", b""),
        ("vendor", "3712s", b""),
    )


LBAF = BitFields(32, reserved=0x3F << 26, ms=(0, 16), lbads=(16, 8), rp=(24, 2))
NSATTR_WRITE_PROTECTED = 0x01
DLFEAT_READS_ZERO = 0x01  # bits 2:0 = 001b: deallocated blocks read as zeroes
DLFEAT_WZ_DEALLOCATE = 0x08  # Write Zeroes supports the Deallocate bit


class NsIdDescriptor(Struct, size=4):
    """Namespace Identification Descriptor header (figure 249); NID follows."""

    FIELDS = (("nidt", "B", 0), ("nidl", "B", 0), ("rsvd", "H", 0))


NIDT_UUID = 0x03

# Identify Controller capability bits this controller uses.
OACS_FORMAT = 1 << 1
OACS_DBBUF = 1 << 8
ONCS_COMPARE = 1 << 0
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
ONCS_TIMESTAMP = 1 << 6
OAES_NS_ATTRIBUTE = 1 << 8
LPA_EXTENDED_DATA = 1 << 2
VWC_PRESENT_FLUSH_ALL = 0x07  # present, bits 2:1 = 11b: Flush accepts NSID FFFFFFFFh


# ---------------------------------------------------------------- log pages (section 5.14.1)
class ErrorLogEntry(Struct, size=64):
    """Error Information log entry (figure 194)."""

    FIELDS = (
        ("error_count", "Q", 0), ("sqid", "H", 0), ("cid", "H", 0), ("status", "H", 0),
        ("location", "H", 0xFFFF), ("lba", "Q", 0), ("nsid", "I", 0), ("vs", "B", 0),
        ("trtype", "B", 0), ("rsvd30", "2s", b""), ("csi", "Q", 0), ("trtype_spec", "H", 0),
        ("rsvd42", "22s", b""),
    )


class SmartLog(Struct, size=512):
    """SMART / Health Information log (figure 196); 128-bit counters as bytes."""

    FIELDS = (
        ("critical_warning", "B", 0), ("temperature", "H", 0), ("avail_spare", "B", 0),
        ("spare_thresh", "B", 0), ("percent_used", "B", 0), ("endurance_crit", "B", 0),
        ("rsvd7", "25s", b""), ("data_units_read", "16s", b""),
        ("data_units_written", "16s", b""), ("host_reads", "16s", b""),
        ("host_writes", "16s", b""), ("ctrl_busy_time", "16s", b""),
        ("power_cycles", "16s", b""), ("power_on_hours", "16s", b""),
        ("unsafe_shutdowns", "16s", b""), ("media_errors", "16s", b""),
        ("error_log_entries", "16s", b""), ("warning_temp_time", "I", 0),
        ("critical_temp_time", "I", 0), ("temp_sensors", "16s", b""),
        ("tmt1_count", "I", 0), ("tmt2_count", "I", 0), ("tmt1_time", "I", 0),
        ("tmt2_time", "I", 0), ("rsvd232", "280s", b""),
    )


class FirmwareSlotLog(Struct, size=512):
    """Firmware Slot Information log (figure 197)."""

    FIELDS = (("afi", "B", 0), ("rsvd1", "7s", b""), ("frs1", "8s", b""),
              ("frs2_7", "48s", b""), ("rsvd64", "448s", b""))


def u128(value: int) -> bytes:
    """A 128-bit little-endian counter field (saturating)."""
    return min(value, (1 << 128) - 1).to_bytes(16, "little")


CHANGED_NS_MAX = 1024  # figure 199: more than 1024 changes report FFFFFFFFh alone
