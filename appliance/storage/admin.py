"""Admin commands (NVMe 1.4 section 5).

Theory of operation
-------------------
:func:`execute` dispatches on the opcode through :data:`HANDLERS`.  A handler
returns the completion's DWORD 0, or None for a command the controller holds
(Asynchronous Event Request), and refuses a command by raising
:class:`~appliance.storage.spec.CommandError`.  Feature values live in
:class:`~appliance.storage.registers.Features`; asynchronous events and the
error log in :mod:`appliance.storage.queues`.  Checks cite the section that
prescribes their status.
"""

from __future__ import annotations

import logging
import struct
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from appliance.storage import error_injection as erri
from appliance.storage import firmware, nsmgmt, zns
from appliance.storage import identity as ident
from appliance.storage.identify_spec import (
    EFFECT_CCC,
    EFFECT_CSE_NS,
    EFFECT_CSUPP,
    EFFECT_LBCC,
    EFFECT_NCC,
    LPA_EFFECTS_LOG,
    LPA_EXTENDED_DATA,
    NSTAT_READY,
    OACS_DBBUF,
    OACS_FIRMWARE,
    OACS_FORMAT,
    OAES_NS_ATTRIBUTE,
    OCFS_FORMAT0,
    ONCS_COMPARE,
    ONCS_COPY,
    ONCS_DSM,
    ONCS_TIMESTAMP,
    ONCS_VERIFY,
    ONCS_WRITE_UNCORRECTABLE,
    ONCS_WRITE_ZEROES,
    SGLS_BIT_BUCKET,
    SGLS_SUPPORTED,
    VWC_PRESENT_FLUSH_ALL,
    IdentifyController,
    IdentifyNamespace,
    IdentifyNsIndependent,
    PowerState,
)
from appliance.storage.log_spec import CHANGED_NS_MAX, FirmwareSlotLog, SmartLog, u128
from appliance.storage.queues import CompletionQueue, SubmissionQueue
from appliance.storage.spec import (
    CSI_NVM,
    CSI_ZNS,
    IDENTIFY_SIZE,
    NSID_ALL,
    PAGE_SIZE,
    VERSION_2_0,
    AdminOpcode,
    Cns,
    Command,
    CommandError,
    FeatureId,
    IoOpcode,
    LogPage,
    Status,
)
from appliance.storage.transfer import command_transfer, gather, scatter
from appliance.storage.uncorrectable import LbaRanges

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController

Handler = Callable[["NvmeController", Command], "int | None"]
ST = Status

log = logging.getLogger("appliance.storage")
LSUPP = 1  # Supported Log Pages entry: the log page is supported (no index offsets)


def _check(ok: bool, status: Status = ST.INVALID_FIELD, why: str = "") -> None:
    if not ok:
        raise CommandError(status, why)


def send(ctrl: NvmeController, cmd: Command, data: bytes) -> None:
    """Transfer ``data`` to the host buffer of ``cmd`` (PRP1/PRP2: :func:`execute`
    refused any other PSDT)."""
    scatter(ctrl.mem, command_transfer(ctrl.mem, cmd, len(data), ctrl.mdts_bytes,
                                       to_device=False), data)


def receive(ctrl: NvmeController, cmd: Command, length: int) -> bytes:
    """Transfer ``length`` bytes from the host buffer of ``cmd``."""
    return gather(ctrl.mem, command_transfer(ctrl.mem, cmd, length, ctrl.mdts_bytes,
                                             to_device=True))


# ---------------------------------------------------------------- queues (5.3-5.6)
def _new_queue_id(ctrl: NvmeController, cmd: Command, existing: Mapping[int, object]) -> int:
    qid, qsize = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
    _check(0 < qid <= ctrl.io_queues and qid not in existing, ST.INVALID_QUEUE_IDENTIFIER,
           f"queue id {qid}")
    _check(2 <= qsize <= ctrl.regs.mqes + 1, ST.INVALID_QUEUE_SIZE, f"queue size {qsize}")
    # CAP.CQR = 1: queues must be physically contiguous (PC = 1), else Invalid Field.
    _check(bool(cmd.cdw11 & 1), why="queue not physically contiguous")
    _check(cmd.prp1 % PAGE_SIZE == 0, ST.INVALID_PRP_OFFSET, f"queue base {cmd.prp1:#x}")
    return qid


def create_cq(ctrl: NvmeController, cmd: Command) -> int:
    """Create I/O Completion Queue (5.4): QID, QSIZE, PC, IEN, IV."""
    qid = _new_queue_id(ctrl, cmd, ctrl.cqs)
    _check(not cmd.cdw11 & 0xFFFC, why="reserved CDW11 bits")
    ien, vector = bool(cmd.cdw11 & 2), cmd.cdw11 >> 16
    _check(not ien or vector < ctrl.vectors, ST.INVALID_INTERRUPT_VECTOR, f"vector {vector}")
    cq = CompletionQueue(qid, cmd.prp1, (cmd.cdw10 >> 16) + 1, vector, ien)
    cq.shadow = ctrl.shadow_for(qid, is_cq=True)
    ctrl.cqs[qid] = cq
    log.info("nvme: I/O CQ %d created: %d entries, vector %d%s", qid, cq.size, vector,
             "" if ien else " (no interrupts)")
    return 0


def create_sq(ctrl: NvmeController, cmd: Command) -> int:
    """Create I/O Submission Queue (5.5): QID, QSIZE, PC, QPRIO (ignored: RR), CQID."""
    qid = _new_queue_id(ctrl, cmd, ctrl.sqs)
    _check(not cmd.cdw11 & 0xFFF8, why="reserved CDW11 bits")
    cqid = cmd.cdw11 >> 16
    cq = ctrl.cqs.get(cqid)
    _check(cqid != 0 and cq is not None, ST.COMPLETION_QUEUE_INVALID, f"CQ {cqid}")
    assert cq is not None
    sq = SubmissionQueue(qid, cmd.prp1, (cmd.cdw10 >> 16) + 1, cqid)
    sq.shadow = ctrl.shadow_for(qid, is_cq=False)
    ctrl.sqs[qid] = sq
    cq.sqids.add(qid)
    log.info("nvme: I/O SQ %d created: %d entries, CQ %d", qid, sq.size, cqid)
    return 0


def delete_sq(ctrl: NvmeController, cmd: Command) -> int:
    """Delete I/O Submission Queue (5.6): its commands whose I/O runs off the loop
    finish (and complete) first; one still waiting for DMA messages is dropped."""
    qid = cmd.cdw10 & 0xFFFF
    sq = ctrl.sqs.get(qid) if qid else None
    _check(sq is not None, ST.INVALID_QUEUE_IDENTIFIER, f"SQ {qid}")
    assert sq is not None
    ctrl.drain_queue_io()
    del ctrl.sqs[qid]
    if (cq := ctrl.cqs.get(sq.cqid)) is not None:
        cq.sqids.discard(qid)
    return 0


def delete_cq(ctrl: NvmeController, cmd: Command) -> int:
    """Delete I/O Completion Queue (5.3): refused while an SQ still uses it."""
    qid = cmd.cdw10 & 0xFFFF
    cq = ctrl.cqs.get(qid) if qid else None
    _check(cq is not None, ST.INVALID_QUEUE_IDENTIFIER, f"CQ {qid}")
    assert cq is not None
    _check(not cq.sqids, ST.INVALID_QUEUE_DELETION, f"CQ {qid} has SQs {sorted(cq.sqids)}")
    del ctrl.cqs[qid]
    return 0


# ---------------------------------------------------------------- identify (5.15)
def identify(ctrl: NvmeController, cmd: Command) -> int:
    """Identify (5.15): CNS 00h, 01h, 02h, 03h; 05h, 06h and 07h for CSI 00h (NVM)
    and 02h (Zoned Namespace), 08h, 1Ch; 10h-13h, 1Ah and 1Bh with Namespace
    Management."""
    _check(not cmd.cdw10 & 0xFF00, why="reserved CDW10 bits")
    cns, nsid = cmd.cdw10 & 0xFF, cmd.nsid
    if cns == Cns.CONTROLLER:
        data = ctrl.identify_data
    elif cns == Cns.NAMESPACE and ctrl.ns_mgmt.enabled and nsid == NSID_ALL:
        data = nsmgmt.common_namespace()
    elif cns == Cns.NAMESPACE and nsmgmt.is_inactive_valid(ctrl, nsid):
        data = b""  # an inactive NSID: zeroes (5.15.2)
    elif cns in (Cns.NAMESPACE, Cns.NS_ID_DESCRIPTORS):
        ns = ctrl.namespace(nsid)  # FFFFFFFFh without Namespace Management: invalid too
        data = identify_namespace(ns.identify()) if cns == Cns.NAMESPACE else \
            ns.descriptors(ctrl.serial, CSI_ZNS if nsid in ctrl.zones else CSI_NVM)
    elif cns in (Cns.ACTIVE_NS_LIST, Cns.CSI_ACTIVE_NS_LIST):
        _check(nsid < 0xFFFFFFFE, ST.INVALID_NAMESPACE, f"NSID {nsid:#x}")
        csi = cmd.cdw11 >> 24
        _check(cns == Cns.ACTIVE_NS_LIST or csi in zns.COMMAND_SETS, why=f"CSI {csi:#x}")
        active = [ns.nsid for ns in ctrl.active_namespaces() if ns.nsid > nsid and (
            cns == Cns.ACTIVE_NS_LIST or (CSI_ZNS if ns.nsid in ctrl.zones else CSI_NVM) == csi)]
        data = struct.pack(f"<{len(active[:IDENTIFY_SIZE // 4])}I", *active[:IDENTIFY_SIZE // 4])
    elif cns == Cns.NS_CS_INDEPENDENT and nsmgmt.is_inactive_valid(ctrl, nsid):
        data = b""  # an inactive NSID: zeroes, as for CNS 00h
    elif cns == Cns.NS_CS_INDEPENDENT:
        ns_data = IdentifyNamespace.unpack(ctrl.namespace(nsid).identify())
        data = IdentifyNsIndependent(fpi=ns_data.fpi, nsattr=ns_data.nsattr,
                                     nstat=NSTAT_READY).pack()
    elif cns in (Cns.CSI_CONTROLLER, Cns.CSI_NAMESPACE) and cmd.cdw11 >> 24 == CSI_ZNS:
        data = (zns.identify_controller() if cns == Cns.CSI_CONTROLLER
                else zns.identify_namespace(zns.refuse_unzoned(ctrl, nsid)))
    elif cns in (Cns.CSI_CONTROLLER, Cns.CSI_NAMESPACE):
        _check(cmd.cdw11 >> 24 == CSI_NVM, why=f"CSI {cmd.cdw11 >> 24}")
        if cns == Cns.CSI_NAMESPACE:
            ctrl.namespace(nsid)
        # NVM command set: no VSL/WZSL/WUSL/DMRL limits; no storage tags, PI or
        # extended LBA formats in the namespace structure.
        data = b""
    elif cns in nsmgmt.MANAGEMENT_CNS:
        data = nsmgmt.identify(ctrl, cns, nsid, cmd.cdw10 >> 16)
        if cns == nsmgmt.CNS_ALLOCATED_NAMESPACE and data:
            data = identify_namespace(data)
    elif cns in (Cns.CSI_ALLOCATED_NS_LIST, Cns.CSI_ALLOCATED_NAMESPACE):
        data = allocated_by_csi(ctrl, cns, nsid, cmd.cdw11 >> 24)
    elif cns == Cns.COMMAND_SET_LIST:
        # vector 0 (the one I/O Command Set Profile): NVM and Zoned Namespace
        data = struct.pack("<Q", 1 << CSI_NVM | 1 << CSI_ZNS)
    else:
        raise CommandError(ST.INVALID_FIELD, f"CNS {cns:#x}")
    send(ctrl, cmd, data.ljust(IDENTIFY_SIZE, b"\0"))
    return 0


def allocated_by_csi(ctrl: NvmeController, cns: int, nsid: int, csi: int) -> bytes:
    """CNS 1Ah (the allocated NSIDs of command set ``csi`` above ``nsid``) and 1Bh
    (CNS 05h of an allocated NSID: zeroes for one not allocated), with Namespace
    Management only, as CNS 10h and 11h."""
    _check(csi in zns.COMMAND_SETS, why=f"CSI {csi:#x}")

    def csi_of(n: int) -> int:
        return CSI_ZNS if n in ctrl.zones else CSI_NVM

    if cns == Cns.CSI_ALLOCATED_NS_LIST:
        raw = nsmgmt.identify(ctrl, nsmgmt.CNS_ALLOCATED_NS_LIST, nsid, 0)
        ids = [n for (n,) in struct.iter_unpack("<I", raw) if csi_of(n) == csi]
        return struct.pack(f"<{len(ids)}I", *ids)
    nsmgmt.identify(ctrl, nsmgmt.CNS_ALLOCATED_NAMESPACE, nsid, 0)  # the NSID's checks
    if nsid not in ctrl.namespaces:
        return b""
    _check(csi_of(nsid) == csi, why=f"namespace {nsid} is not of CSI {csi:#x}")
    return zns.identify_namespace(ctrl.zones[nsid]) if csi == CSI_ZNS else b""


# ---------------------------------------------------------------- log pages (5.14)
def get_log_page(ctrl: NvmeController, cmd: Command) -> int:
    """Get Log Page (5.14): Supported Log Pages, Error, SMART/Health, Firmware Slot,
    Changed Namespace List, Commands Supported and Effects (of the command set
    CDW14's CSI names)."""
    lid, lsp, rae = cmd.cdw10 & 0xFF, (cmd.cdw10 >> 8) & 0x7F, bool(cmd.cdw10 & 0x8000)
    length = (((cmd.cdw11 & 0xFFFF) << 16 | cmd.cdw10 >> 16) + 1) * 4
    offset = cmd.cdw12 | cmd.cdw13 << 32
    _check(lsp == 0 and cmd.cdw11 >> 16 == 0, why="LSP/LSI not supported")
    _check(offset % 4 == 0, why=f"log page offset {offset:#x} not DWORD aligned")
    _check(length <= ctrl.mdts_bytes, why=f"log page transfer of {length} bytes past MDTS")
    if lid == LogPage.SMART:
        # LPA bit 0 clear: no per-namespace SMART, so NSID must be 0 or FFFFFFFFh.
        _check(cmd.nsid in (0, NSID_ALL), why=f"SMART log for NSID {cmd.nsid}")
    builders: dict[int, Callable[[], bytes]] = {
        LogPage.ERROR: ctrl.error_log.page,
        LogPage.SMART: lambda: smart_log(ctrl),
        LogPage.FIRMWARE_SLOT: lambda: firmware_slot_log(ctrl),
        LogPage.CHANGED_NS: lambda: struct.pack(f"<{len(ctrl.changed_ns)}I", *ctrl.changed_ns),
        LogPage.COMMANDS_EFFECTS: lambda: commands_effects_log(csi, ctrl.ns_mgmt.enabled),
        LogPage.SUPPORTED_LOGS: lambda: struct.pack(
            "<256I", *(LSUPP if page in set(LogPage) else 0 for page in range(256))),
    }
    csi = cmd.cdw14 >> 24
    if lid == LogPage.COMMANDS_EFFECTS:
        _check(csi in zns.COMMAND_SETS, why=f"effects log of CSI {csi:#x}")
    build = builders.get(lid)
    _check(build is not None, ST.INVALID_LOG_PAGE, f"log page {lid:#x}")
    assert build is not None
    page = build().ljust(CHANGED_NS_MAX * 4 if lid == LogPage.CHANGED_NS else 0, b"\0")
    _check(offset <= len(page), why=f"offset {offset} past the {len(page)}-byte log")
    send(ctrl, cmd, page[offset:offset + length].ljust(length, b"\0"))
    if not rae:  # Retain Asynchronous Event clear: reading clears and unmasks (5.2)
        if lid == LogPage.CHANGED_NS:
            ctrl.changed_ns.clear()
        ctrl.events.log_read(lid)
    return 0


# ---------------------------------------------------------------- features (5.21)
def _feature_ns(ctrl: NvmeController, cmd: Command, fid: int, setting: bool) -> None:
    if fid == FeatureId.ERROR_RECOVERY:  # the one namespace-specific feature here
        if not (setting and cmd.nsid == NSID_ALL):
            ctrl.namespace(cmd.nsid)
    elif cmd.nsid not in (0, NSID_ALL):
        raise CommandError(ST.FEATURE_NOT_NS_SPECIFIC, f"feature {fid:#x} for NSID {cmd.nsid}")


def set_features(ctrl: NvmeController, cmd: Command) -> int:
    """Set Features (5.21); SV is refused: nothing is saveable (ONCS bit 4 clear)."""
    fid = cmd.cdw10 & 0xFF
    _check(not cmd.cdw10 & 0x7FFFFF00, why="reserved CDW10 bits")
    _check(not cmd.cdw10 >> 31, ST.FEATURE_NOT_SAVEABLE, f"feature {fid:#x} save")
    if fid == erri.FEATURE_ID:  # OCP Error Injection: the guest's fault control
        _feature_ns(ctrl, cmd, fid, setting=True)
        return erri.set_feature(ctrl, cmd, receive)
    _check(fid in ctrl.features.SUPPORTED, why=f"feature {fid:#x}")
    _feature_ns(ctrl, cmd, fid, setting=True)
    if fid == FeatureId.NUMBER_OF_QUEUES:
        # 5.21.1.7: set once per reset, before any I/O queue exists.
        _check(len(ctrl.sqs) <= 1 and len(ctrl.cqs) <= 1, ST.COMMAND_SEQUENCE_ERROR,
               "I/O queues already exist")
    if fid == FeatureId.TIMESTAMP:
        return ctrl.features.set_timestamp(receive(ctrl, cmd, 8))
    return ctrl.features.set(fid, cmd.cdw11, cmd.nsid)


def get_features(ctrl: NvmeController, cmd: Command) -> int:
    """Get Features (5.9); SEL other than 'current' is refused (ONCS bit 4 clear)."""
    fid = cmd.cdw10 & 0xFF
    _check(not cmd.cdw10 & 0xFFFFFF00, why="SEL/reserved CDW10 bits")
    if fid == erri.FEATURE_ID:  # OCP Error Injection: the guest's fault control
        _feature_ns(ctrl, cmd, fid, setting=False)
        return erri.get_feature(ctrl, cmd, send)
    _check(fid in ctrl.features.SUPPORTED, why=f"feature {fid:#x}")
    _feature_ns(ctrl, cmd, fid, setting=False)
    if fid == FeatureId.TIMESTAMP:
        send(ctrl, cmd, ctrl.features.timestamp())
        return 0
    return ctrl.features.get(fid, cmd.cdw11, cmd.nsid)


# ---------------------------------------------------------------- firmware (5.11, 5.12)
def firmware_download(ctrl: NvmeController, cmd: Command) -> int:
    """Firmware Image Download (5.12): NUMD (0-based) DWORDs at DWORD offset OFST."""
    length = (cmd.cdw10 + 1) * 4
    _check(length <= ctrl.mdts_bytes, why=f"firmware piece of {length} bytes past MDTS")
    ctrl.firmware.download(cmd.cdw11, receive(ctrl, cmd, length))
    return 0


def firmware_commit(ctrl: NvmeController, cmd: Command) -> int:
    """Firmware Commit (5.11): FS, CA; BPID and reserved bits must be clear
    (:mod:`appliance.storage.firmware` has the rules and statuses)."""
    _check(not cmd.cdw10 & 0xFFFFFFC0, why=f"CDW10 {cmd.cdw10:#x}: BPID/reserved bits")
    ctrl.firmware.commit(cmd.cdw10 & 0x7, (cmd.cdw10 >> 3) & 0x7)
    return 0


# ---------------------------------------------------------------- the rest
def abort(ctrl: NvmeController, cmd: Command) -> int:
    """Abort (5.1) of a held request (hung or delayed by a fault) or a held AER:
    it completes with Command Abort Requested.  DW0 bit 0 = 1 means not aborted
    (no such command outstanding: every other command has completed already)."""
    sqid, cid = cmd.cdw10 & 0xFFFF, cmd.cdw10 >> 16
    held = ctrl.held_request(sqid, cid)
    if held is not None:
        ctrl.complete(held, (ST.ABORT_REQUESTED, False, 0))
    elif sqid == 0 and ctrl.events.abort(cid):
        ctrl.complete_aer(cid, ST.ABORT_REQUESTED)
    else:
        return 1
    ctrl.counters["aborted"] += 1
    return 0


def async_event_request(ctrl: NvmeController, cmd: Command) -> int | None:
    """Asynchronous Event Request (5.2): held until an event; AERL + 1 at most."""
    ctrl.events.request(cmd.cid)
    return None


def doorbell_buffer_config(ctrl: NvmeController, cmd: Command) -> int:
    """Doorbell Buffer Config (5.7): both buffers memory page aligned, else Invalid Field."""
    _check(cmd.prp1 % PAGE_SIZE == 0 and cmd.prp2 % PAGE_SIZE == 0,
           why="shadow doorbell / EventIdx buffers not page aligned")
    ctrl.configure_shadow_doorbells(cmd.prp1, cmd.prp2)
    return 0


def format_nvm(ctrl: NvmeController, cmd: Command) -> int:
    """Format NVM (5.23): to any LBA format (LBAF), metadata extended (MSET 1) or
    separate, PI type 0-3 with the tuple first (PIL 1) or last; SES 0 or 1."""
    lbaf, mset, pi = cmd.cdw10 & 0xF, bool(cmd.cdw10 >> 4 & 1), (cmd.cdw10 >> 5) & 0x7
    pil, ses = bool(cmd.cdw10 >> 8 & 1), (cmd.cdw10 >> 9) & 0x7
    _check(not cmd.cdw10 & 0xFFFFF000, why="reserved CDW10 bits")
    _check(pi <= 3, ST.INVALID_FORMAT, f"PI {pi}")
    _check(ses <= 1, why=f"secure erase setting {ses}")
    targets = (ctrl.active_namespaces() if cmd.nsid == NSID_ALL
               else [ctrl.namespace(cmd.nsid)])
    for ns in targets:
        ns.check_writable()
        ns.check_format(lbaf, pi)
    for ns in targets:
        ns.reformat(lbaf, pi, pil, mset)
        ctrl.uncorrectable[ns.nsid] = LbaRanges()
        if ns.nsid in ctrl.zones:
            ctrl.zones[ns.nsid].reset_all()
    return 0


def namespace_management(ctrl: NvmeController, cmd: Command) -> int:
    """Namespace Management (5.20): create (SEL 0; DW0: the new NSID) or delete (SEL 1)."""
    sel = cmd.cdw10 & 0xF
    _check(ctrl.ns_mgmt.enabled, ST.INVALID_OPCODE, "no Namespace Management")
    _check(not cmd.cdw10 & 0xFFFFFFF0 and sel in (nsmgmt.SEL_CREATE, nsmgmt.SEL_DELETE),
           why=f"CDW10 {cmd.cdw10:#x}")
    if sel == nsmgmt.SEL_CREATE:
        return nsmgmt.create(ctrl, cmd.cdw11 >> 24, receive(ctrl, cmd, IDENTIFY_SIZE))
    nsmgmt.delete(ctrl, cmd.nsid)
    return 0


def namespace_attachment(ctrl: NvmeController, cmd: Command) -> int:
    """Namespace Attachment (5.19): attach (SEL 0) or detach (SEL 1) the
    controllers of the Controller List the command carries."""
    sel = cmd.cdw10 & 0xF
    _check(ctrl.ns_mgmt.enabled, ST.INVALID_OPCODE, "no Namespace Management")
    _check(not cmd.cdw10 & 0xFFFFFFF0 and sel in (nsmgmt.SEL_ATTACH, nsmgmt.SEL_DETACH),
           why=f"CDW10 {cmd.cdw10:#x}")
    nsmgmt.attach(ctrl, cmd.nsid, sel == nsmgmt.SEL_DETACH, receive(ctrl, cmd, IDENTIFY_SIZE))
    return 0


HANDLERS: dict[int, Handler] = {
    AdminOpcode.DELETE_SQ: delete_sq,
    AdminOpcode.CREATE_SQ: create_sq,
    AdminOpcode.GET_LOG_PAGE: get_log_page,
    AdminOpcode.DELETE_CQ: delete_cq,
    AdminOpcode.CREATE_CQ: create_cq,
    AdminOpcode.IDENTIFY: identify,
    AdminOpcode.ABORT: abort,
    AdminOpcode.SET_FEATURES: set_features,
    AdminOpcode.GET_FEATURES: get_features,
    AdminOpcode.ASYNC_EVENT_REQUEST: async_event_request,
    AdminOpcode.DOORBELL_BUFFER_CONFIG: doorbell_buffer_config,
    AdminOpcode.FORMAT_NVM: format_nvm,
    AdminOpcode.NAMESPACE_MANAGEMENT: namespace_management,
    AdminOpcode.NAMESPACE_ATTACHMENT: namespace_attachment,
    AdminOpcode.FIRMWARE_COMMIT: firmware_commit,
    AdminOpcode.FIRMWARE_DOWNLOAD: firmware_download,
}


def execute(ctrl: NvmeController, cmd: Command) -> int | None:
    """Run one admin command.

    Returns:
        The completion's DWORD 0, or None when the command is held (AER).

    Raises:
        CommandError: the status to complete with.
        GuestMemoryError: a data buffer is not in reachable client memory.
    """
    handler = HANDLERS.get(cmd.opcode)
    if handler is None:
        raise CommandError(ST.INVALID_OPCODE, f"admin opcode {cmd.opcode:#04x}")
    # Admin commands use PRPs only (PSDT 00b); fused operations are unsupported.
    _check(not cmd.flags, why=f"FUSE/PSDT/reserved flags {cmd.flags:#04x}")
    return handler(ctrl, cmd)


# ---------------------------------------------------------------- data structures
def identify_controller(ctrl: NvmeController) -> bytes:
    """The Identify Controller data structure (CNS 01h, figure 247)."""

    nqn = f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, ctrl.serial)}"
    return IdentifyController(
        vid=ident.VENDOR_ID, ssvid=ident.VENDOR_ID, sn=ctrl.sn, mn=ctrl.mn,
        fr=ctrl.firmware.running, rab=6,
        ieee=bytes(3),  # no IEEE OUI assigned
        cmic=0, mdts=ident.MDTS, cntlid=ident.CNTLID, ver=VERSION_2_0, oaes=OAES_NS_ATTRIBUTE,
        cntrltype=ident.CNTRLTYPE_IO, acl=ident.ACL, aerl=ident.AERL,
        oacs=OACS_FORMAT | OACS_FIRMWARE | OACS_DBBUF | (
            nsmgmt.OACS_NS_MANAGEMENT if ctrl.ns_mgmt.enabled else 0),
        tnvmcap=u128(ctrl.ns_mgmt.capacity), unvmcap=u128(nsmgmt.unallocated_bytes(ctrl)),
        frmw=firmware.FRMW, fwug=firmware.FWUG, lpa=LPA_EFFECTS_LOG | LPA_EXTENDED_DATA,
        elpe=ident.ELPE, npss=0, wctemp=ident.WCTEMP,
        cctemp=ident.CCTEMP, sqes=0x66, cqes=0x44, nn=nsmgmt.namespace_count(ctrl),
        oncs=(ONCS_COMPARE | ONCS_WRITE_UNCORRECTABLE | ONCS_DSM | ONCS_WRITE_ZEROES
              | ONCS_TIMESTAMP | ONCS_VERIFY | ONCS_COPY),
        vwc=VWC_PRESENT_FLUSH_ALL, ocfs=OCFS_FORMAT0, sgls=SGLS_SUPPORTED | SGLS_BIT_BUCKET,
        subnqn=nqn.encode(),
        psd0=PowerState(mp=2500).pack(),  # 25 W, the one power state
    ).pack()


def identify_namespace(data: bytes) -> bytes:
    """A namespace's Identify Namespace structure with this controller's Copy limits."""
    return IdentifyNamespace.unpack(data).replace(mssrl=ident.MSSRL, mcl=ident.MCL,
                                                  msrc=ident.MSRC).pack()


#: what each supported command changes (Commands Supported and Effects, figure 210)
EFFECTS: dict[tuple[bool, int], int] = {
    (True, AdminOpcode.FORMAT_NVM): EFFECT_LBCC | EFFECT_NCC | EFFECT_CSE_NS,
    (True, AdminOpcode.SET_FEATURES): EFFECT_CCC,  # Number of Queues, arbitration...
    (True, AdminOpcode.NAMESPACE_MANAGEMENT): nsmgmt.EFFECT_NIC,
    (True, AdminOpcode.NAMESPACE_ATTACHMENT): nsmgmt.EFFECT_NIC,
    # Commit changes what Identify Controller and the slot log say, at the next reset
    (True, AdminOpcode.FIRMWARE_COMMIT): EFFECT_CCC,
    (False, IoOpcode.WRITE): EFFECT_LBCC,
    (False, IoOpcode.WRITE_UNCORRECTABLE): EFFECT_LBCC,
    (False, IoOpcode.WRITE_ZEROES): EFFECT_LBCC,
    (False, IoOpcode.DATASET_MANAGEMENT): EFFECT_LBCC,
    (False, IoOpcode.COPY): EFFECT_LBCC,
    (False, IoOpcode.ZONE_MGMT_SEND): EFFECT_LBCC,
    (False, IoOpcode.ZONE_APPEND): EFFECT_LBCC,
}


MANAGEMENT_OPCODES = (AdminOpcode.NAMESPACE_MANAGEMENT, AdminOpcode.NAMESPACE_ATTACHMENT)


def commands_effects_log(csi: int = CSI_NVM, managed: bool = False) -> bytes:
    """Commands Supported and Effects (LID 05h, figure 209): one DWORD per admin
    opcode, then one per I/O opcode of command set ``csi``, for each command this
    controller runs (the Namespace Management ones only when ``managed``)."""
    entries = [0] * 512
    for is_admin, table in ((True, HANDLERS), (False, zns.COMMAND_SETS[csi])):
        for opcode in table:
            if is_admin and opcode in MANAGEMENT_OPCODES and not managed:
                continue
            entries[opcode + (0 if is_admin else 256)] = (
                EFFECT_CSUPP | EFFECTS.get((is_admin, opcode), 0))
    return struct.pack("<512I", *entries)


def firmware_slot_log(ctrl: NvmeController) -> bytes:
    """Firmware Slot Information (figure 197): AFI and each slot's revision."""
    revs = b"".join(rev or bytes(8) for rev in ctrl.firmware.slots)
    return FirmwareSlotLog(afi=ctrl.firmware.afi(), frs1=revs[:8], frs2_7=revs[8:]).pack()


def smart_log(ctrl: NvmeController) -> bytes:
    """SMART / Health Information (figure 196) from the controller's counters."""

    counts = ctrl.counters["commands"]
    over, under = ctrl.features.thresholds[0], ctrl.features.thresholds[1]  # by THSEL
    return SmartLog(
        critical_warning=0x02 if ident.TEMPERATURE >= over or ident.TEMPERATURE < under else 0,
        temperature=ident.TEMPERATURE, avail_spare=100, spare_thresh=10,
        data_units_read=u128(-(-ctrl.counters["bytes_read"] // 512000)),
        data_units_written=u128(-(-ctrl.counters["bytes_written"] // 512000)),
        host_reads=u128(counts.get("io.read", 0) + counts.get("io.compare", 0)),
        host_writes=u128(counts.get("io.write", 0) + counts.get("io.zone_append", 0)),
        power_cycles=u128(1),
        media_errors=u128(ctrl.counters["media_errors"]),
        error_log_entries=u128(ctrl.error_log.count),
    ).pack()
