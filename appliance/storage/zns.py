"""Zoned Namespace command set I/O commands and Identify data (device layer;
NVMe Zoned Namespace Command Set Specification 1.1, section 3).

Theory of operation
-------------------
A zoned namespace (CSI 02h) runs the NVM command set's I/O commands, with the
zone rules :mod:`appliance.storage.zones` applies (writes at the write
pointer, reads inside one zone), plus the three commands of :data:`HANDLERS`:
Zone Management Send (an action on one zone or, with Select All, on every
zone in the states the action applies to), Zone Management Receive (a zone
report from the zone holding SLBA, filtered by state, partial or not;
extended reports need zone descriptor extensions, which these zones do not
have) and Zone Append (a write at the zone's write pointer, whose LBA the
completion's DWORDs 0 and 1 carry).  :func:`execute` picks the handler table
by the namespace's command set: a zoned opcode sent to a namespace that is not
zoned is an Invalid Opcode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.storage import io
from appliance.storage.request import Offloaded
from appliance.storage.spec import CSI_NVM, CSI_ZNS, Command, CommandError, IoOpcode, Status
from appliance.storage.transfer import scatter
from appliance.storage.zns_spec import (
    ZMR_PARTIAL,
    ZMR_RESERVED,
    ZMS_RESERVED,
    ZMS_SELECT_ALL,
    IdentifyControllerZoned,
    IdentifyNamespaceZoned,
    ZoneDescriptor,
    ZoneReceiveAction,
    ZoneReportFilter,
    ZoneReportHeader,
    ZoneSendAction,
)
from appliance.storage.zones import ZoneEvent, ZoneState, ZoneTable

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController
    from appliance.storage.namespace import Namespace

ACTIONS: dict[int, ZoneEvent] = {
    ZoneSendAction.CLOSE: ZoneEvent.CLOSE, ZoneSendAction.FINISH: ZoneEvent.FINISH,
    ZoneSendAction.OPEN: ZoneEvent.OPEN, ZoneSendAction.RESET: ZoneEvent.RESET,
    ZoneSendAction.OFFLINE: ZoneEvent.OFFLINE,
}
F = ZoneReportFilter
FILTERS: dict[int, frozenset[ZoneState] | None] = {
    F.ALL: None, F.EMPTY: frozenset({ZoneState.EMPTY}),
    F.IMPLICITLY_OPENED: frozenset({ZoneState.IMPLICITLY_OPENED}),
    F.EXPLICITLY_OPENED: frozenset({ZoneState.EXPLICITLY_OPENED}),
    F.CLOSED: frozenset({ZoneState.CLOSED}), F.FULL: frozenset({ZoneState.FULL}),
    F.READ_ONLY: frozenset({ZoneState.READ_ONLY}), F.OFFLINE: frozenset({ZoneState.OFFLINE}),
}


def _zoned(ctrl: NvmeController, cmd: Command) -> tuple[Namespace, ZoneTable]:
    ns = ctrl.namespace(cmd.nsid)
    return ns, ctrl.zones[ns.nsid]  # execute() sent only zoned namespaces here


def zone_management_send(ctrl: NvmeController, cmd: Command) -> int:
    """Zone Management Send (opcode 79h, ZNS 3.4.3): Close, Finish, Open, Reset,
    Offline; a reset zone's blocks are deallocated (they read as zeroes)."""
    ns, zones = _zoned(ctrl, cmd)
    io.require_field(not cmd.cdw12, f"reserved CDW12 {cmd.cdw12:#x}")
    io.require_field(not cmd.cdw13 & ZMS_RESERVED, f"ZSASO/reserved CDW13 bits {cmd.cdw13:#x}")
    zsa = cmd.cdw13 & 0xFF
    event = ACTIONS.get(zsa)
    if event is None:  # Set Zone Descriptor Extension among them: ZDES is 0
        raise CommandError(Status.INVALID_FIELD, f"zone send action {zsa:#x}")
    ns.check_writable()
    slba = cmd.cdw10 | cmd.cdw11 << 32
    for index in zones.manage(event, slba, bool(cmd.cdw13 & ZMS_SELECT_ALL)):
        ns.write_zeroes(zones.start(index), zones.zone_blocks, deallocate=True)
        ctrl.uncorrectable[ns.nsid].remove(zones.start(index), zones.zone_blocks)
    return 0


def zone_management_receive(ctrl: NvmeController, cmd: Command) -> int:
    """Zone Management Receive (opcode 7Ah, ZNS 3.4.2): a Report Zones data
    structure of NUMD + 1 DWORDs; with Partial Report the header counts the
    descriptors that fit, else every zone matching the filter from SLBA on."""
    _, zones = _zoned(ctrl, cmd)
    io.require_field(not cmd.cdw13 & ZMR_RESERVED, f"reserved CDW13 bits {cmd.cdw13:#x}")
    zra, zrasf = cmd.cdw13 & 0xFF, (cmd.cdw13 >> 8) & 0xFF
    io.require_field(zra == ZoneReceiveAction.REPORT,
                     f"zone receive action {zra:#x} (no zone descriptor extensions)")
    io.require_field(zrasf in FILTERS, f"zone report filter {zrasf:#x}")
    length = (cmd.cdw12 + 1) * 4
    transfer = io.data_transfer(ctrl, cmd, length, to_device=False)
    fits = max(0, length - ZoneReportHeader.SIZE) // ZoneDescriptor.SIZE
    count, shown = zones.report(cmd.cdw10 | cmd.cdw11 << 32, FILTERS[zrasf], fits,
                                bool(cmd.cdw13 & ZMR_PARTIAL))
    data = ZoneReportHeader(nr_zones=count).pack() + b"".join(
        ZoneDescriptor(zs=z.state << 4, zcap=z.capacity, zslba=z.zslba, wp=z.wp).pack()
        for z in shown)
    scatter(ctrl.mem, transfer, data[:length].ljust(length, b"\0"))
    return 0


def zone_append(ctrl: NvmeController, cmd: Command) -> int | Offloaded:
    """Zone Append (opcode 7Dh, ZNS 3.4.1): the data goes to the write pointer of
    the zone starting at ZSLBA; the completion carries that LBA (DWORDs 0-1).
    Bound by MDTS (ZASL = 0)."""
    ns, zones = _zoned(ctrl, cmd)
    io.require_field(not cmd.cdw12 & io.RW_RESERVED, f"reserved CDW12 bits {cmd.cdw12:#x}")
    zslba, nlb = cmd.cdw10 | cmd.cdw11 << 32, (cmd.cdw12 & 0xFFFF) + 1
    ns.check_writable()
    transfer = io.data_transfer(ctrl, cmd, nlb << ns.lba_shift, to_device=True)
    slba = zones.check_write(zslba, nlb, append=True)
    ns.write(ctrl.mem, transfer.segments, slba)
    io.written(ctrl, ns, slba, nlb)
    ctrl.counters["bytes_written"] += nlb << ns.lba_shift
    if cmd.cdw12 & io.RW_FUA or not ctrl.features.write_cache:
        return io.synced(ctrl, ns.flush, slba)
    return slba


HANDLERS: dict[int, io.Handler] = {
    IoOpcode.ZONE_MGMT_SEND: zone_management_send,
    IoOpcode.ZONE_MGMT_RECV: zone_management_receive,
    IoOpcode.ZONE_APPEND: zone_append,
}
#: the I/O commands of each command set, by CSI (the effects log is built from them)
COMMAND_SETS: dict[int, dict[int, io.Handler]] = {
    CSI_NVM: io.HANDLERS,
    CSI_ZNS: {**io.HANDLERS, **HANDLERS},
}


def execute(ctrl: NvmeController, cmd: Command) -> int | Offloaded:
    """Run one I/O command with the handlers of its namespace's command set.

    Returns:
        The completion's DWORDs 0 (and 1, above bit 31), or the blocking part
        to run off the loop.

    Raises:
        CommandError: the status to complete with.
        GuestMemoryError: a data buffer is not in reachable client memory.
    """
    zoned = cmd.opcode in HANDLERS and cmd.nsid in ctrl.zones
    return io.execute(ctrl, cmd, COMMAND_SETS[CSI_ZNS if zoned else CSI_NVM])


# ---------------------------------------------------------------- Identify (CSI 02h)
def identify_namespace(zones: ZoneTable) -> bytes:
    """I/O Command Set specific Identify Namespace (CNS 05h, CSI 02h)."""
    return IdentifyNamespaceZoned(
        mar=zones.max_active - 1 if zones.max_active else 0xFFFFFFFF,
        mor=zones.max_open - 1 if zones.max_open else 0xFFFFFFFF,
        lbafe0_zsze=zones.zone_blocks,
    ).pack()


def identify_controller() -> bytes:
    """I/O Command Set specific Identify Controller (CNS 06h, CSI 02h): ZASL."""
    return IdentifyControllerZoned().pack()


def refuse_unzoned(ctrl: NvmeController, nsid: int) -> ZoneTable:
    """The zone table of namespace ``nsid``.

    Raises:
        CommandError: INVALID_NAMESPACE for no such namespace, INVALID_FIELD
            for one that is not zoned (it is not of command set 02h).
    """
    ns = ctrl.namespace(nsid)
    zones = ctrl.zones.get(ns.nsid)
    if zones is None:
        raise CommandError(Status.INVALID_FIELD, f"namespace {nsid} is not zoned")
    return zones
