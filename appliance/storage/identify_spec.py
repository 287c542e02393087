"""NVMe Identify data structures (layer "wire"): Identify Controller, the I/O
Command Set Independent and NVM Identify Namespace, the Namespace
Identification Descriptors (NVMe Base Specification 1.4, section 5.15.2), and
the capability bits of Identify Controller this controller sets.

Sizes are asserted at import time.  No I/O; beside :mod:`appliance.storage.spec`
no imports from the rest of :mod:`appliance.storage`.
"""

from __future__ import annotations

from typing import Annotated

from appliance.storage.spec import IDENTIFY_SIZE
from appliance.wire import U8, U16, U32, U64, BitFields, Struct


class IdentifyController(Struct, size=IDENTIFY_SIZE):
    """Identify Controller data structure (figure 247)."""

    vid: U16 = 0
    ssvid: U16 = 0
    sn: Annotated[bytes, "20s"] = b""
    mn: Annotated[bytes, "40s"] = b""
    fr: Annotated[bytes, "8s"] = b""
    rab: U8 = 0
    ieee: Annotated[bytes, "3s"] = b""
    cmic: U8 = 0
    mdts: U8 = 0
    cntlid: U16 = 0
    ver: U32 = 0
    rtd3r: U32 = 0
    rtd3e: U32 = 0
    oaes: U32 = 0
    ctratt: U32 = 0
    rrls: U16 = 0
    rsvd102: Annotated[bytes, "9s"] = b""
    cntrltype: U8 = 0
    fguid: Annotated[bytes, "16s"] = b""
    crdt: Annotated[bytes, "6s"] = b""
    rsvd134: Annotated[bytes, "106s"] = b""
    nvmemi: Annotated[bytes, "16s"] = b""
    oacs: U16 = 0
    acl: U8 = 0
    aerl: U8 = 0
    frmw: U8 = 0
    lpa: U8 = 0
    elpe: U8 = 0
    npss: U8 = 0
    avscc: U8 = 0
    apsta: U8 = 0
    wctemp: U16 = 0
    cctemp: U16 = 0
    mtfa: U16 = 0
    hmpre: U32 = 0
    hmmin: U32 = 0
    tnvmcap: Annotated[bytes, "16s"] = b""
    unvmcap: Annotated[bytes, "16s"] = b""
    rpmbs: U32 = 0
    edstt: U16 = 0
    dsto: U8 = 0
    fwug: U8 = 0
    kas: U16 = 0
    hctma: U16 = 0
    mntmt: U16 = 0
    mxtmt: U16 = 0
    sanicap: U32 = 0
    hmminds: U32 = 0
    hmmaxd: U16 = 0
    nsetidmax: U16 = 0
    endgidmax: U16 = 0
    anatt: U8 = 0
    anacap: U8 = 0
    anagrpmax: U32 = 0
    nanagrpid: U32 = 0
    pels: U32 = 0
    rsvd356: Annotated[bytes, "156s"] = b""
    sqes: U8 = 0
    cqes: U8 = 0
    maxcmd: U16 = 0
    nn: U32 = 0
    oncs: U16 = 0
    fuses: U16 = 0
    fna: U8 = 0
    vwc: U8 = 0
    awun: U16 = 0
    awupf: U16 = 0
    nvscc: U8 = 0
    nwpc: U8 = 0
    acwu: U16 = 0
    ocfs: U16 = 0
    sgls: U32 = 0
    mnan: U32 = 0
    rsvd544: Annotated[bytes, "224s"] = b""
    subnqn: Annotated[bytes, "256s"] = b""
    rsvd1024: Annotated[bytes, "768s"] = b""
    nvmof: Annotated[bytes, "256s"] = b""
    psd0: Annotated[bytes, "32s"] = b""
    psd1_31: Annotated[bytes, "992s"] = b""
    vendor: Annotated[bytes, "1024s"] = b""


class IdentifyNsIndependent(Struct, size=IDENTIFY_SIZE):
    """I/O Command Set Independent Identify Namespace (CNS 08h, NVMe 2.0)."""

    nsfeat: U8 = 0
    nmic: U8 = 0
    rescap: U8 = 0
    fpi: U8 = 0
    anagrpid: U32 = 0
    nsattr: U8 = 0
    rsvd9: U8 = 0
    nvmsetid: U16 = 0
    endgid: U16 = 0
    nstat: U8 = 0  # bit 0: the namespace is ready
    rsvd15: Annotated[bytes, "4081s"] = b""


NSTAT_READY = 0x01


class PowerState(Struct, size=32):
    """Power State Descriptor (figure 248)."""

    mp: U16 = 0
    rsvd2: U8 = 0
    flags: U8 = 0
    enlat: U32 = 0
    exlat: U32 = 0
    rrt: U8 = 0
    rrl: U8 = 0
    rwt: U8 = 0
    rwl: U8 = 0
    idlp: U16 = 0
    ips: U8 = 0
    rsvd19: U8 = 0
    actp: U16 = 0
    apw_aps: U8 = 0
    rsvd23: Annotated[bytes, "9s"] = b""


class IdentifyNamespace(Struct, size=IDENTIFY_SIZE):
    """Identify Namespace data structure, NVM command set (figure 245)."""

    nsze: U64 = 0
    ncap: U64 = 0
    nuse: U64 = 0
    nsfeat: U8 = 0
    nlbaf: U8 = 0
    flbas: U8 = 0
    mc: U8 = 0
    dpc: U8 = 0
    dps: U8 = 0
    nmic: U8 = 0
    rescap: U8 = 0
    fpi: U8 = 0
    dlfeat: U8 = 0
    nawun: U16 = 0
    nawupf: U16 = 0
    nacwu: U16 = 0
    nabsn: U16 = 0
    nabo: U16 = 0
    nabspf: U16 = 0
    noiob: U16 = 0
    nvmcap: Annotated[bytes, "16s"] = b""
    npwg: U16 = 0
    npwa: U16 = 0
    npdg: U16 = 0
    npda: U16 = 0
    nows: U16 = 0
    mssrl: U16 = 0
    mcl: U32 = 0
    msrc: U8 = 0
    rsvd81: U8 = 0
    nulbaf: U8 = 0
    rsvd83: Annotated[bytes, "9s"] = b""
    anagrpid: U32 = 0
    rsvd96: Annotated[bytes, "3s"] = b""
    nsattr: U8 = 0
    nvmsetid: U16 = 0
    endgid: U16 = 0
    nguid: Annotated[bytes, "16s"] = b""
    eui64: Annotated[bytes, "8s"] = b""
    lbaf0: U32 = 0
    lbaf1_15: Annotated[bytes, "60s"] = b""
    rsvd192: Annotated[bytes, "192s"] = b""
    vendor: Annotated[bytes, "3712s"] = b""


LBAF = BitFields(32, reserved=0x3F << 26, ms=(0, 16), lbads=(16, 8), rp=(24, 2))
NSATTR_WRITE_PROTECTED = 0x01
DLFEAT_READS_ZERO = 0x01  # bits 2:0 = 001b: deallocated blocks read as zeroes
DLFEAT_WZ_DEALLOCATE = 0x08  # Write Zeroes supports the Deallocate bit


class NsIdDescriptor(Struct, size=4):
    """Namespace Identification Descriptor header (figure 249); NID follows."""

    nidt: U8 = 0
    nidl: U8 = 0
    rsvd: U16 = 0


NIDT_UUID = 0x03
NIDT_CSI = 0x04

# Identify Controller capability bits this controller uses.
OACS_FORMAT = 1 << 1
OACS_FIRMWARE = 1 << 2  # Firmware Commit and Firmware Image Download
OACS_DBBUF = 1 << 8
ONCS_COMPARE = 1 << 0
ONCS_WRITE_UNCORRECTABLE = 1 << 1
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
ONCS_TIMESTAMP = 1 << 6
ONCS_VERIFY = 1 << 7
ONCS_COPY = 1 << 8
OCFS_FORMAT0 = 1 << 0  # Copy descriptor format 0
# SGLS (figure 247): bits 1:0 = 01b SGLs without alignment rules, Bit Bucket descriptors.
SGLS_SUPPORTED = 0x1
SGLS_BIT_BUCKET = 1 << 16
OAES_NS_ATTRIBUTE = 1 << 8
LPA_EFFECTS_LOG = 1 << 1
LPA_EXTENDED_DATA = 1 << 2
# Commands Supported and Effects entry (figure 210): CSUPP, LBCC, NCC, CCC, CSE.
EFFECT_CSUPP = 1 << 0
EFFECT_LBCC = 1 << 1
EFFECT_NCC = 1 << 2
EFFECT_CCC = 1 << 4
EFFECT_CSE_NS = 1 << 16  # only one command per namespace at a time (Format NVM)
VWC_PRESENT_FLUSH_ALL = 0x07  # present, bits 2:1 = 11b: Flush accepts NSID FFFFFFFFh
