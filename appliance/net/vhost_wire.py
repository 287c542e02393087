"""vhost-user and virtio-net wire declarations (wire layer).

Theory of operation
-------------------
Everything here is data: the vhost-user message header and each payload
(qemu/qemu docs/interop/vhost-user.rst, "Message Specification"), the request
numbers, the flag and feature bit sets, and the virtio split-ring and
virtio-net layouts (virtio 1.2 §2.7 and §5.1.6).  Each struct is declared once
with the size the specification gives; the class fails at import time if the
declared fields do not add up to it.

Byte order: vhost-user numbers are in the machine's native byte order (the
spec's note under "Message Specification"); virtio 1.x ring and header fields
are little-endian.  This module does no I/O and imports nothing of ours above
:mod:`appliance.wire`.
"""

from __future__ import annotations

import enum
import struct
import sys

from appliance import wire
from appliance.wire import U8, U16, U32, BitFields, Struct

# ---------------------------------------------------------------- vhost-user header
HEADER_SIZE = 12
VERSION = 0x1
# Reply flags: version 1 | reply bit.  DPDK's virtio-user insists on exactly 0x5.
REPLY_FLAGS = 0x5
# Payloads are small; the largest we accept is SET_MEM_TABLE with 8 regions (264 bytes).
# Anything above this cannot be a request we serve and makes the stream unframeable.
MAX_PAYLOAD = 4096
# At most this many fds travel with one message (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS = 8
MAX_MEM_REGIONS = 8


class NativeStruct(Struct):
    """vhost-user structs: "All numbers are in the machine native byte order"."""

    BYTE_ORDER = "="


class LEStruct(Struct):
    """virtio 1.x structures in client memory are little-endian."""

    BYTE_ORDER = "<"


class Header(NativeStruct, size=HEADER_SIZE):
    request: U32 = 0
    flags: U32 = VERSION
    size: U32 = 0


# flags: bits 0-1 version, bit 2 reply, bit 3 need_reply; the rest reserved.
HEADER_FLAGS = BitFields(32, reserved=0xFFFFFFF0, version=(0, 2), reply=(2, 1), need_reply=(3, 1))
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3


class Request(enum.IntEnum):
    """Front-end message types (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# ---------------------------------------------------------------- payloads
class U64(NativeStruct, size=8):
    value: wire.U64 = 0


class VringState(NativeStruct, size=8):
    """struct vhost_vring_state: ring index and a number (size, base, enable)."""

    index: U32 = 0
    num: U32 = 0


class VringAddr(NativeStruct, size=40):
    """struct vhost_vring_addr: ring areas as front-end virtual addresses."""

    index: U32 = 0
    flags: U32 = 0
    desc_user_addr: wire.U64 = 0
    used_user_addr: wire.U64 = 0
    avail_user_addr: wire.U64 = 0
    log_guest_addr: wire.U64 = 0


class VringAddrFlag(enum.IntFlag):
    LOG = 1 << 0  # VHOST_VRING_F_LOG: log used-ring writes


VRING_ADDR_RESERVED = 0xFFFFFFFF & ~int(VringAddrFlag.LOG)  # int: IntFlag's ~ stays inside its members

# u64 payload of SET_VRING_KICK/CALL/ERR: bits 0-7 ring index, bit 8 "no fd".
VRING_FILE = BitFields(64, reserved=((1 << 64) - 1) & ~0x1FF, index=(0, 8), nofd=(8, 1))
VRING_NOFD = 1 << 8


class MemoryHeader(NativeStruct, size=8):
    """Memory regions description: region count and padding, then the regions."""

    nregions: U32 = 0
    padding: U32 = 0


class MemoryRegion(NativeStruct, size=32):
    guest_phys_addr: wire.U64 = 0
    memory_size: wire.U64 = 0
    userspace_addr: wire.U64 = 0
    mmap_offset: wire.U64 = 0


class SingleMemoryRegion(NativeStruct, size=40):
    """ADD_MEM_REG / REM_MEM_REG payload: 64-bit padding then one region."""

    padding: wire.U64 = 0
    guest_phys_addr: wire.U64 = 0
    memory_size: wire.U64 = 0
    userspace_addr: wire.U64 = 0
    mmap_offset: wire.U64 = 0


class LogDescription(NativeStruct, size=16):
    """SET_LOG_BASE payload with LOG_SHMFD: size and offset of the log in the fd."""

    mmap_size: wire.U64 = 0
    mmap_offset: wire.U64 = 0


# ---------------------------------------------------------------- feature bits
class Feature(enum.IntFlag):
    """Virtio device feature bits as vhost-user carries them (GET/SET_FEATURES)."""

    NET_CSUM = 1 << 0
    NET_GUEST_CSUM = 1 << 1
    NET_CTRL_GUEST_OFFLOADS = 1 << 2
    NET_MTU = 1 << 3
    NET_MAC = 1 << 5
    NET_GUEST_TSO4 = 1 << 7
    NET_GUEST_TSO6 = 1 << 8
    NET_GUEST_ECN = 1 << 9
    NET_GUEST_UFO = 1 << 10
    NET_HOST_TSO4 = 1 << 11
    NET_HOST_TSO6 = 1 << 12
    NET_HOST_ECN = 1 << 13
    NET_HOST_UFO = 1 << 14
    NET_MRG_RXBUF = 1 << 15
    NET_STATUS = 1 << 16
    NET_CTRL_VQ = 1 << 17
    NET_CTRL_RX = 1 << 18
    NET_CTRL_VLAN = 1 << 19
    NET_GUEST_ANNOUNCE = 1 << 21
    NET_MQ = 1 << 22
    NET_CTRL_MAC_ADDR = 1 << 23
    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* (vhost-user.rst "Protocol features")."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


class DeviceStatus(enum.IntFlag):
    """Virtio device status byte (virtio 1.2 §2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


# ---------------------------------------------------------------- split virtqueue (virtio 1.2 §2.7)
MAX_QUEUE_SIZE = 32768


class Descriptor(LEStruct, size=16):
    """struct virtq_desc."""

    addr: wire.U64 = 0
    len: U32 = 0
    flags: U16 = 0
    next: U16 = 0


class DescFlag(enum.IntFlag):
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


class UsedElem(LEStruct, size=8):
    """struct virtq_used_elem: head id and bytes written."""

    id: U32 = 0
    len: U32 = 0


VRING_AVAIL_F_NO_INTERRUPT = 1  # avail.flags: driver does not want interrupts
VRING_USED_F_NO_NOTIFY = 1  # used.flags: device does not want kicks

# Descriptor decoding on the hot path (same layout as Descriptor; native format so
# each field is one copy).  Ring indices and entries are *not* accessed with
# struct: see appliance.net.virtqueue on why pack_into must not touch them.
DESC_CODEC = struct.Struct("@QIHH")
NATIVE_IS_LITTLE_ENDIAN = sys.byteorder == "little"
assert DESC_CODEC.size == Descriptor.SIZE


def desc_table_size(num: int) -> int:
    return Descriptor.SIZE * num


def avail_ring_size(num: int) -> int:
    """flags, idx, ring[num], used_event."""
    return 4 + 2 * num + 2


def used_ring_size(num: int) -> int:
    """flags, idx, ring[num] of used elems, avail_event."""
    return 4 + UsedElem.SIZE * num + 2


# Alignment of the three areas (virtio 1.2 §2.7 table "Virtqueue Part Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


# ---------------------------------------------------------------- virtio-net (virtio 1.2 §5.1.6)
class NetHdr(LEStruct, size=12):
    """struct virtio_net_hdr_v1 (VERSION_1 or MRG_RXBUF)."""

    flags: U8 = 0
    gso_type: U8 = 0
    hdr_len: U16 = 0
    gso_size: U16 = 0
    csum_start: U16 = 0
    csum_offset: U16 = 0
    num_buffers: U16 = 0


NET_HDR_LEGACY_SIZE = 10  # without num_buffers: legacy device without MRG_RXBUF


class NetHdrFlag(enum.IntFlag):
    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


NET_HDR_GSO_NONE = 0
NET_HDR_CODEC = struct.Struct("<BBHHHHH")  # built here, copied into buffers whole
assert NET_HDR_CODEC.size == NetHdr.SIZE
