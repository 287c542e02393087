"""NBD wire structures and constants (NetworkBlockDevice/nbd ``doc/proto.md``).

Every NBD field is in network byte order.  The values are the spec's; the
structures are declared once, as data (:class:`appliance.wire.Struct`).
"""

from __future__ import annotations

import enum
import errno

from appliance.wire import U16, U32, U64, Struct

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    """Option haggling requests."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8


class Rep(enum.IntEnum):
    """Option reply types (errors have bit 31 set)."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4


REP_ERROR_BIT = 1 << 31
REP_ERRORS = {
    REP_ERROR_BIT | 1: "unsupported option",
    REP_ERROR_BIT | 2: "forbidden by the server's policy",
    REP_ERROR_BIT | 3: "invalid option",
    REP_ERROR_BIT | 4: "not supported on this platform",
    REP_ERROR_BIT | 5: "TLS required",
    REP_ERROR_BIT | 6: "unknown export",
    REP_ERROR_BIT | 7: "server shutting down",
    REP_ERROR_BIT | 8: "block size required",
    REP_ERROR_BIT | 9: "request too big",
    REP_ERROR_BIT | 10: "extended headers required",
}


class Info(enum.IntEnum):
    """NBD_REP_INFO types."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


# Transmission flags (NBD_INFO_EXPORT).
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6


class Cmd(enum.IntEnum):
    """Transmission request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    WRITE_ZEROES = 6


# Command flags.
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1


class ReplyType(enum.IntEnum):
    """Structured reply chunk types (errors have bit 15 set)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


REPLY_ERROR_BIT = 1 << 15
REPLY_FLAG_DONE = 1 << 0

# The error values the spec defines; any other is read as EINVAL (the spec
# asks clients to treat an unexpected value so).
ERRORS = frozenset({errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
                    errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN})

MAX_STRING = 4096  # export names and error messages (spec: "MUST be no longer")
DEFAULT_MAX_PAYLOAD = 32 << 20  # the spec's default maximum block size without INFO_BLOCK_SIZE
MAX_MIN_BLOCK = 64 << 10  # a minimum block size above this is invalid


class NbdStruct(Struct):
    """Base of the NBD structures: network byte order."""

    BYTE_ORDER = ">"


class Greeting(NbdStruct, size=18):
    """S: the newstyle greeting."""

    nbdmagic: U64 = 0
    ihaveopt: U64 = 0
    flags: U16 = 0


class OptionRequest(NbdStruct, size=16):
    """C: an option header (its data follows)."""

    magic: U64 = IHAVEOPT
    option: U32 = 0
    length: U32 = 0


class OptionReply(NbdStruct, size=20):
    """S: an option reply header (its data follows)."""

    magic: U64 = 0
    option: U32 = 0
    reply: U32 = 0
    length: U32 = 0


class InfoExport(NbdStruct, size=12):
    """NBD_INFO_EXPORT: size and transmission flags."""

    info: U16 = 0
    size: U64 = 0
    flags: U16 = 0


class InfoBlockSize(NbdStruct, size=14):
    """NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum block size."""

    info: U16 = 0
    minimum: U32 = 0
    preferred: U32 = 0
    maximum: U32 = 0


class Request(NbdStruct, size=28):
    """C: a transmission request (a write's data follows)."""

    magic: U32 = REQUEST_MAGIC
    flags: U16 = 0
    type: U16 = 0
    cookie: U64 = 0
    offset: U64 = 0
    length: U32 = 0


class SimpleReply(NbdStruct, size=16):
    """S: a simple reply (a read's data follows)."""

    magic: U32 = 0
    error: U32 = 0
    cookie: U64 = 0


class ChunkHeader(NbdStruct, size=20):
    """S: a structured reply chunk header (its payload follows)."""

    magic: U32 = 0
    flags: U16 = 0
    type: U16 = 0
    cookie: U64 = 0
    length: U32 = 0


class ErrorChunk(NbdStruct, size=6):
    """The start of an error chunk's payload (the message follows)."""

    error: U32 = 0
    message_length: U16 = 0
