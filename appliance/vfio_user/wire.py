"""vfio-user wire declarations (qemu/qemu docs/interop/vfio-user.rst).

Every structure is declared once with the size the spec gives; offsets in the
comments are those of the spec's tables, counted from the end of the 16-byte
header.  All fields are in host byte order, which for this project is x86-64
little-endian ("In this revision, all data is in the endianness of the host").
"""

from __future__ import annotations

import enum
from typing import Annotated

from appliance.wire import U16, U32, U64, Struct

HEADER_SIZE = 16
VERSION_MAJOR = 0
VERSION_MINOR = 0  # QEMU 11.1 proposes 0.0.

# Defaults the spec gives when a capability is absent ("Version" section).
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096


class Command(enum.IntEnum):
    """Message command ids ("Commands" table)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


SERVER_TO_CLIENT = frozenset({Command.DMA_READ, Command.DMA_WRITE})


class MsgFlag(enum.IntFlag):
    """Header flags: bits 0-3 type, bit 4 No_reply, bit 5 Error."""

    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


MSG_TYPE_MASK = 0xF
MSG_TYPE_COMMAND = 0x0
MSG_TYPE_REPLY = 0x1
# int() first: ~ on an IntFlag complements within its members only.
MSG_FLAGS_RESERVED = ~(MSG_TYPE_MASK | int(MsgFlag.NO_REPLY) | int(MsgFlag.ERROR)) & 0xFFFFFFFF


class Header(Struct, size=HEADER_SIZE):
    msg_id: U16 = 0
    command: U16 = 0
    size: U32 = HEADER_SIZE  # whole message, header included
    flags: U32 = 0
    error: U32 = 0  # errno in an error reply; reserved in a command


class VersionHead(Struct, size=4):
    major: U16 = VERSION_MAJOR
    minor: U16 = VERSION_MINOR


class DmaMapFlag(enum.IntFlag):
    READ = 0x1
    WRITE = 0x2


DMA_MAP_FLAGS_RESERVED = ~int(DmaMapFlag.READ | DmaMapFlag.WRITE) & 0xFFFFFFFF


class DmaMap(Struct, size=32):
    argsz: U32 = 32
    flags: U32 = 0
    offset: U64 = 0  # file offset for the fd, 0 when not mappable
    address: U64 = 0
    size: U64 = 0


class DmaUnmapFlag(enum.IntFlag):
    """VFIO_DMA_UNMAP_FLAG_* from <linux/vfio.h> that a client may set."""

    GET_DIRTY_BITMAP = 0x1
    ALL = 0x2


class DmaUnmap(Struct, size=24):
    argsz: U32 = 24
    flags: U32 = 0
    address: U64 = 0
    size: U64 = 0


class DeviceFlag(enum.IntFlag):
    RESET = 0x1
    PCI = 0x2


class DeviceInfo(Struct, size=16):
    argsz: U32 = 16
    flags: U32 = 0
    num_regions: U32 = 0
    num_irqs: U32 = 0


class RegionFlag(enum.IntFlag):
    READ = 0x1
    WRITE = 0x2
    MMAP = 0x4
    CAPS = 0x8


class RegionInfo(Struct, size=32):
    argsz: U32 = 32
    flags: U32 = 0
    index: U32 = 0
    cap_offset: U32 = 0
    size: U64 = 0
    offset: U64 = 0


class CapHeader(Struct, size=8):
    id: U16 = 0
    version: U16 = 0
    next: U32 = 0


CAP_SPARSE_MMAP = 1  # VFIO_REGION_INFO_CAP_SPARSE_MMAP
CAP_TYPE = 2  # VFIO_REGION_INFO_CAP_TYPE


class SparseMmapHead(Struct, size=8):
    nr_areas: U32 = 0
    reserved: U32 = 0


class SparseMmapArea(Struct, size=16):
    offset: U64 = 0
    size: U64 = 0


class RegionIoFds(Struct, size=16):
    argsz: U32 = 16
    flags: U32 = 0
    index: U32 = 0
    count: U32 = 0


class IoFdType(enum.IntEnum):
    IOEVENTFD = 0
    IOREGIONFD = 1


class SubRegionIoFd(Struct, size=40):
    offset: U64 = 0
    size: U64 = 0
    fd_index: U32 = 0
    type: U32 = 0
    flags: U32 = 0
    padding: U32 = 0
    datamatch: U64 = 0


class IrqInfoFlag(enum.IntFlag):
    EVENTFD = 0x1
    MASKABLE = 0x2
    AUTOMASKED = 0x4
    NORESIZE = 0x8


class IrqInfo(Struct, size=16):
    argsz: U32 = 16
    flags: U32 = 0
    index: U32 = 0
    count: U32 = 0


class IrqSetFlag(enum.IntFlag):
    DATA_NONE = 0x1
    DATA_BOOL = 0x2
    DATA_EVENTFD = 0x4
    ACTION_MASK = 0x8
    ACTION_UNMASK = 0x10
    ACTION_TRIGGER = 0x20


IRQ_SET_DATA_MASK = IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
IRQ_SET_ACTION_MASK = IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER
IRQ_SET_FLAGS_RESERVED = ~int(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK) & 0xFFFFFFFF


class IrqSet(Struct, size=20):
    argsz: U32 = 20
    flags: U32 = 0
    index: U32 = 0
    start: U32 = 0
    count: U32 = 0


class RegionAccess(Struct, size=16):
    """REGION_READ / REGION_WRITE head; data follows for writes and read replies."""

    offset: U64 = 0
    region: U32 = 0
    count: U32 = 0


class DmaAccess(Struct, size=16):
    """DMA_READ / DMA_WRITE head as the spec gives it (count is 8 bytes)."""

    address: U64 = 0
    count: U64 = 0


class QemuDmaAccess(Struct, size=12):
    """DMA_READ / DMA_WRITE head as QEMU 11 lays it out (u32 count, data at 12)."""

    address: U64 = 0
    count: U32 = 0


class WriteMultiHead(Struct, size=8):
    wr_cnt: U64 = 0


class WriteMultiEntry(Struct, size=24):
    """One coalesced write: at most 8 bytes of data, padded to 8."""

    offset: U64 = 0
    region: U32 = 0
    count: U32 = 0
    data: Annotated[bytes, "8s"] = b""


class DeviceFeatureHead(Struct, size=8):
    argsz: U32 = 8
    flags: U32 = 0


FEATURE_INDEX_MASK = 0xFFFF
FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18


# Device feature indexes and their data (<linux/vfio.h> VFIO_DEVICE_FEATURE_*; the
# vfio-user spec's "Device Features" table).  Declared once here for the server's
# migration handler (appliance.vfio_user.migration) and the client orchestrator.
class Feature(enum.IntEnum):
    """VFIO_DEVICE_FEATURE_* indexes vfio-user supports, and this appliance's own."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    # Appliance-specific (0x8000 and up: outside the kernel's range): migration
    # options of the next saving/resuming session (MigOptions).
    APPLIANCE_MIG_OPTIONS = 0x8001
    APPLIANCE_MIG_CHANNEL = 0x8002  # the migration data channel (docs/migration.md)


DATA_FD_NONE = 0xFFFFFFFF  # data_fd is unused in vfio-user; -1 as the kernel reports it


class MigrationInfo(Struct, size=8):
    """VFIO_DEVICE_FEATURE_MIGRATION reply data."""

    flags: U64 = 0


class MigStateData(Struct, size=8):
    """VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE data (SET request, GET/SET reply)."""

    device_state: U32 = 0
    data_fd: U32 = DATA_FD_NONE


class DmaLoggingControl(Struct, size=16):
    """DMA_LOGGING_START data; ``num_ranges`` DmaLoggingRange entries follow."""

    page_size: U64 = 4096
    num_ranges: U32 = 0
    reserved: U32 = 0


class DmaLoggingRange(Struct, size=16):
    iova: U64 = 0
    length: U64 = 0


class DmaLoggingReport(Struct, size=24):
    """DMA_LOGGING_REPORT data; the reply appends the bitmap (u64 words)."""

    iova: U64 = 0
    length: U64 = 0
    page_size: U64 = 4096


class MigOption(enum.IntFlag):
    """APPLIANCE_MIG_OPTIONS bits."""

    # Both appliances use the same images: the stream carries device state
    # only (no NAMESPACE_BLOCKS); the HEADER says so and the destination,
    # set the same way, refuses a stream that disagrees.
    SHARED_STORAGE = 0x1


MIG_OPTIONS_RESERVED = 0xFFFFFFFF & ~int(MigOption.SHARED_STORAGE)


class MigOptions(Struct, size=8):
    """APPLIANCE_MIG_OPTIONS data (SET request, GET/SET reply)."""

    options: U32 = 0
    reserved: U32 = 0


class ChannelMode(enum.IntEnum):
    """APPLIANCE_MIG_CHANNEL ``mode``: how the next session's data channel is made."""

    OFF = 0
    FD = 1  # the SET carries one connected stream socket (SCM_RIGHTS)
    LISTEN = 2  # a destination listens on a per-session Unix socket (path in the reply)


CHANNEL_OFFERED = (1 << ChannelMode.FD) | (1 << ChannelMode.LISTEN)  # GET ``offered`` bits


class MigChannel(Struct, size=16):
    """APPLIANCE_MIG_CHANNEL data (SET request, GET/SET reply; a LISTEN reply
    appends the socket path, UTF-8)."""

    offered: U32 = 0  # GET/SET reply: 1 << mode for each mode offered; 0 in a SET
    mode: U32 = 0  # ChannelMode
    timeout_ms: U32 = 0  # no progress for this long fails the channel (1..600000)
    reserved: U32 = 0


class MigDataHead(Struct, size=8):
    argsz: U32 = 8
    size: U32 = 0


# VFIO PCI region and irq indexes (<linux/vfio.h>).
class PciRegion(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS = 9


class PciIrq(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5
