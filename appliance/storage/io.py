"""NVM command set I/O commands (NVMe NVM Command Set, base spec 1.4 section 6;
Verify and Copy from the NVM Command Set 2.0, sections 3.3.6 and 3.3.1).

Theory of operation
-------------------
:func:`execute` checks what every command shares (FUSE, PSDT, reserved flag
bits, the namespace), then dispatches on the opcode through
:data:`HANDLERS`.  A handler parses its command DWORDs, refuses reserved
bits, checks the LBA range against the namespace and the transfer size
against MDTS, turns the data pointer (PRPs or an SGL:
:mod:`~appliance.storage.transfer`) into client memory segments and moves
the data through the namespace.  Blocks a Write Uncorrectable marked
(:mod:`~appliance.storage.uncorrectable`) fail reads with Unrecovered Read
Error until they are written again.  A namespace with metadata (``ns.md``)
reads and writes through :func:`read_with_metadata` and its write twin
(buffered, the PI of :mod:`~appliance.storage.protection` checked there): a
fast path must hand such namespaces' Read and Write to these entry points.

Handlers return the completion's DWORD 0 and refuse a command by raising
:class:`~appliance.storage.spec.CommandError`; an unreachable data buffer
raises :class:`~appliance.memory.GuestMemoryError`, which the controller
reports as "Data Transfer Error".

Nothing here waits for the disk on the loop: what may block is returned as an
:class:`~appliance.storage.request.Offloaded` (a Flush's fdatasync, a FUA or
write-through write's sync, a read the page cache cannot serve at once), which
the controller runs on its offload (a worker thread) when the runtime gave it
one, or right here when it did not (unit tests).  Buffered writes and reads
the page cache holds stay on the loop: no thread hop on the fast path.  A
namespace whose image is an NBD export has no page cache to lean on: its
reads, and its Write, Write Zeroes and Dataset Management deallocate (a
network round trip each, as long as the server takes), all run on the
offload; the change hook and the uncorrectable marks follow on the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.storage.identity import MCL, MSRC, MSSRL
from appliance.storage.metadata import MetadataFile, interleave, split
from appliance.storage.namespace import Namespace
from appliance.storage.protection import (
    PRACT,
    PRCHK_APP,
    PRCHK_GUARD,
    PRCHK_REF,
    PiType,
    TagCheck,
    tuples_of,
    with_tuples,
)
from appliance.storage.request import Offloaded
from appliance.storage.spec import (
    NSID_ALL,
    Command,
    CommandError,
    DsmRange,
    IoOpcode,
    Psdt,
    SourceRange,
    Status,
)
from appliance.storage.transfer import Transfer, command_transfer, gather, psdt, scatter

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController

FLAGS_RESERVED = 0x3F  # FUSE (1:0, fused operations unsupported), 5:2; PSDT is 7:6
RW_RESERVED = 0x03FF0000  # CDW12 25:16: DTYPE and STC unsupported, the rest reserved
WU_RESERVED = 0xFFFF0000  # Write Uncorrectable CDW12 31:16
COPY_NR, COPY_FORMAT_SHIFT = 0xFF, 8  # CDW12 7:0 ranges (0-based), 11:8 descriptor format
COPY_RESERVED = 0x03FF0000  # CDW12 25:16: DTYPE, STCW (no storage tags) and reserved
VERIFY_CHUNK = 1 << 20  # Verify reads this many bytes at a time
RW_FUA = 1 << 30
WZ_RESERVED = 0x01FF0000  # CDW12 24:16
WZ_DEAC = 1 << 25
DSM_NR_RESERVED = 0xFFFFFF00
DSM_ATTR_RESERVED = 0xFFFFFFF8
DSM_DEALLOCATE = 1 << 2
PRCHK_ALL = PRCHK_GUARD | PRCHK_APP | PRCHK_REF

Handler = Callable[["NvmeController", Command], "int | Offloaded"]


def require_field(ok: bool, why: str) -> None:
    """Raises:
        CommandError: INVALID_FIELD with ``why`` unless ``ok``.
    """
    if not ok:
        raise CommandError(Status.INVALID_FIELD, why)


def _rw_args(ctrl: NvmeController, cmd: Command, reserved: int) -> tuple[Namespace, int, int]:
    """(namespace, SLBA, number of blocks) after the range check."""
    ns = ctrl.namespace(cmd.nsid)
    require_field(not cmd.cdw12 & reserved, f"reserved CDW12 bits {cmd.cdw12 & reserved:#x}")
    slba, nlb = cmd.cdw10 | cmd.cdw11 << 32, (cmd.cdw12 & 0xFFFF) + 1
    ns.check_range(slba, nlb)
    return ns, slba, nlb


def data_transfer(ctrl: NvmeController, cmd: Command, nbytes: int, to_device: bool) -> Transfer:
    """The client memory of the command's data (PRPs or an SGL; SGLs counted)."""
    transfer = command_transfer(ctrl.mem, cmd, nbytes, ctrl.mdts_bytes, to_device=to_device)
    if transfer.sgl:
        ctrl.counters["sgl_commands"] += 1
    return transfer


def _readable(ctrl: NvmeController, ns: Namespace, slba: int, nlb: int) -> None:
    """Unrecovered Read Error if a block of the range is marked uncorrectable; in
    a zoned namespace the zone rules for reads (Zone Boundary Error, Zone Is
    Offline)."""
    zones = ctrl.zones.get(ns.nsid)
    if zones is not None:
        zones.check_read(slba, nlb)
    ctrl.uncorrectable[ns.nsid].check(ns.nsid, slba, nlb)


def _writable(ctrl: NvmeController, ns: Namespace, slba: int, nlb: int) -> None:
    """The namespace is writable; in a zoned one, a write of the range is at the
    write pointer and within the limits (the statuses of ZoneTable.check_write)."""
    ns.check_writable()
    zones = ctrl.zones.get(ns.nsid)
    if zones is not None:
        zones.check_write(slba, nlb)


def written(ctrl: NvmeController, ns: Namespace, slba: int, nlb: int) -> None:
    """Blocks that were written are no longer uncorrectable; in a zoned namespace
    the write pointer moves past them."""
    ctrl.uncorrectable[ns.nsid].remove(slba, nlb)
    zones = ctrl.zones.get(ns.nsid)
    if zones is not None:
        zones.advance(slba, nlb)


def read(ctrl: NvmeController, cmd: Command) -> int | Offloaded:
    """Read (opcode 02h, NVM section 6.9): from the page cache on the loop, else
    off it.  A namespace with metadata: :func:`read_with_metadata`."""
    ns, slba, nlb = _rw_args(ctrl, cmd, RW_RESERVED)
    if ns.md is not None:
        return read_with_metadata(ctrl, cmd, ns, ns.md, slba, nlb)
    nbytes = nlb << ns.lba_shift
    transfer = data_transfer(ctrl, cmd, nbytes, to_device=False)
    _readable(ctrl, ns, slba, nlb)
    segments = transfer.segments

    def counted() -> int:
        ctrl.counters["bytes_read"] += nbytes
        return 0

    if transfer.discard:  # bit buckets: through a buffer
        scatter(ctrl.mem, transfer, ns.read_bytes(slba, nbytes))
        return counted()
    views = ns.views(ctrl.mem, segments, write=True)
    if views is None:  # memory reached through its fd or by DMA messages
        ns.read(ctrl.mem, segments, slba)
        return counted()
    try:
        if ns.read_into(views, slba, nowait=ctrl.offload is not None):
            return counted()
    except BaseException:
        _release(views)
        raise
    if ctrl.offload is None:  # cannot happen: nowait was off
        _release(views)
        raise CommandError(Status.INTERNAL_ERROR, "read did not complete")
    return Offloaded(lambda: ns.read_into(views, slba), counted, views, list(segments))


def _tag_check(ns: Namespace, cmd: Command, slba: int) -> tuple[TagCheck, int]:
    """The command's PI fields, checked, and the metadata bytes per block that
    cross the bus (0 when PRACT inserts or strips the tuple alone)."""
    check = TagCheck.from_dwords(cmd.cdw12, cmd.cdw14, cmd.cdw15)
    check.validate(ns.protection, slba)
    return check, 0 if ns.protection.strips(check.prinfo) else ns.metadata


def _host_metadata(ctrl: NvmeController, cmd: Command, ns: Namespace, nlb: int,
                   host_ms: int) -> tuple[bytes, bytes]:
    """(data, metadata) the host sent: one extended buffer or data + MPTR."""
    block = ns.block_size
    if ns.extended:
        raw = gather(ctrl.mem, data_transfer(ctrl, cmd, nlb * (block + host_ms), True))
        return split(raw, block, host_ms)
    data = gather(ctrl.mem, data_transfer(ctrl, cmd, nlb * block, to_device=True))
    return data, ctrl.mem.read(cmd.mptr, nlb * host_ms) if host_ms else b""


def read_with_metadata(ctrl: NvmeController, cmd: Command, ns: Namespace,
                       md_file: MetadataFile, slba: int, nlb: int) -> int:
    """Read of a namespace with metadata: the data from the image, the metadata
    from its side file, the PI checked as PRCHK asks (then left out when PRACT
    strips it), both to the host: interleaved (extended LBAs) or the metadata
    to MPTR's contiguous buffer.  Buffered, on the loop."""
    check, host_ms = _tag_check(ns, cmd, slba)
    block = ns.block_size
    nbytes = nlb * block
    transfer = data_transfer(ctrl, cmd, nbytes + (nlb * host_ms if ns.extended else 0),
                             to_device=False)
    _readable(ctrl, ns, slba, nlb)
    data = ns.read_bytes(slba, nbytes)
    md = md_file.read(slba, nlb)
    if ctrl.pi_fault is not None:  # an injected fault: the tuples as a bad medium returns them
        md = ctrl.pi_fault.apply(ns.protection, md, slba, nlb)
    if ns.protection.pi_type != PiType.NONE and check.prinfo & PRCHK_ALL:
        check.verify(ns.protection, memoryview(data), tuples_of(ns.protection, md, nlb),
                     block, slba)
    if ns.extended:
        scatter(ctrl.mem, transfer, interleave(data, md, block, host_ms))
    else:
        scatter(ctrl.mem, transfer, data)
        if host_ms:
            ctrl.mem.write(cmd.mptr, md)
    ctrl.counters["bytes_read"] += nbytes
    return 0


def _write_with_metadata(ctrl: NvmeController, cmd: Command, ns: Namespace,
                         md_file: MetadataFile, slba: int, nlb: int) -> None:
    """Write of a namespace with metadata: PRACT makes the PI tuples (inserted
    into the host's metadata when there is more of it), else PRCHK checks the
    host's tuples against its data before anything is stored."""
    check, host_ms = _tag_check(ns, cmd, slba)
    prot, block = ns.protection, ns.block_size
    data, md = _host_metadata(ctrl, cmd, ns, nlb, host_ms)
    if prot.pi_type != PiType.NONE and check.prinfo & PRACT:
        md = with_tuples(prot, md, check.generate(prot, memoryview(data), block), nlb)
    elif prot.pi_type != PiType.NONE and check.prinfo & PRCHK_ALL:
        check.verify(prot, memoryview(data), tuples_of(prot, md, nlb), block, slba)
    ns.write_bytes(slba, data)
    md_file.write(slba, md)


def write(ctrl: NvmeController, cmd: Command) -> int | Offloaded:
    """Write (opcode 01h, NVM section 6.15); FUA or a disabled write cache syncs."""
    ns, slba, nlb = _rw_args(ctrl, cmd, RW_RESERVED)
    _writable(ctrl, ns, slba, nlb)
    nbytes = nlb << ns.lba_shift
    if ns.md is not None:
        _write_with_metadata(ctrl, cmd, ns, ns.md, slba, nlb)
    else:
        transfer = data_transfer(ctrl, cmd, nbytes, to_device=True)
        if _changes_off_loop(ctrl, ns):
            views = (ns.views(ctrl.mem, transfer.segments, write=False)
                     or [memoryview(gather(ctrl.mem, transfer))])
            return _export_change(ctrl, ns, lambda: ns.write_views(views, slba), [(slba, nlb)],
                                  _sync_needed(ctrl, cmd), views, counted=nbytes)
        ns.write(ctrl.mem, transfer.segments, slba)  # the page cache: no wait
    written(ctrl, ns, slba, nlb)
    ctrl.counters["bytes_written"] += nbytes
    if _sync_needed(ctrl, cmd):
        return synced(ctrl, ns.flush)
    return 0


def compare(ctrl: NvmeController, cmd: Command) -> int:
    """Compare (opcode 05h, NVM section 6.5): COMPARE_FAILURE on any difference."""
    ns, slba, nlb = _rw_args(ctrl, cmd, RW_RESERVED)
    nbytes = nlb << ns.lba_shift
    host = gather(ctrl.mem, data_transfer(ctrl, cmd, nbytes, to_device=True))
    _readable(ctrl, ns, slba, nlb)
    if host != ns.read_bytes(slba, nbytes):
        raise CommandError(Status.COMPARE_FAILURE, f"nsid {ns.nsid}: LBA {slba}+{nlb} differ")
    ctrl.counters["bytes_read"] += nbytes
    return 0


def flush(ctrl: NvmeController, cmd: Command) -> int | Offloaded:
    """Flush (opcode 00h, NVM section 6.8); NSID FFFFFFFFh flushes all (VWC bits 2:1).
    The fdatasync runs off the loop."""
    targets = (ctrl.active_namespaces() if cmd.nsid == NSID_ALL
               else [ctrl.namespace(cmd.nsid)])

    def sync_all() -> None:
        for ns in targets:
            ns.flush()

    return synced(ctrl, sync_all)


def write_zeroes(ctrl: NvmeController, cmd: Command) -> int | Offloaded:
    """Write Zeroes (opcode 08h, NVM section 6.16); not bound by MDTS."""
    ns, slba, nlb = _rw_args(ctrl, cmd, WZ_RESERVED)
    _writable(ctrl, ns, slba, nlb)
    deallocate = bool(cmd.cdw12 & WZ_DEAC)
    if _changes_off_loop(ctrl, ns):
        return _export_change(ctrl, ns, lambda: ns.zero_blocks(slba, nlb, deallocate),
                              [(slba, nlb)], _sync_needed(ctrl, cmd))
    ns.write_zeroes(slba, nlb, deallocate=deallocate)
    written(ctrl, ns, slba, nlb)
    if cmd.cdw12 & RW_FUA or not ctrl.features.write_cache:
        return synced(ctrl, ns.flush)
    return 0


def dataset_management(ctrl: NvmeController, cmd: Command) -> int | Offloaded:
    """Dataset Management (opcode 09h, NVM section 6.7): only Deallocate acts."""
    ns = ctrl.namespace(cmd.nsid)
    require_field(not cmd.cdw10 & DSM_NR_RESERVED, "reserved CDW10 bits")
    require_field(not cmd.cdw11 & DSM_ATTR_RESERVED, "reserved CDW11 bits")
    count = (cmd.cdw10 & 0xFF) + 1
    data = gather(ctrl.mem, data_transfer(ctrl, cmd, count * DsmRange.SIZE, to_device=True))
    ranges = [DsmRange.unpack(data, i * DsmRange.SIZE) for i in range(count)]
    if not cmd.cdw11 & DSM_DEALLOCATE:
        return 0  # integral read/write hints: advisory
    ns.check_writable()
    for r in ranges:
        ns.check_range(r.slba, r.nlb)
    if _changes_off_loop(ctrl, ns):
        def deallocate() -> None:
            for r in ranges:
                ns.zero_blocks(r.slba, r.nlb, deallocate=True)
        return _export_change(ctrl, ns, deallocate, [(r.slba, r.nlb) for r in ranges], False,
                              advance=False)
    for r in ranges:
        ns.write_zeroes(r.slba, r.nlb, deallocate=True)
        ctrl.uncorrectable[ns.nsid].remove(r.slba, r.nlb)  # write pointers stay
    return 0


def write_uncorrectable(ctrl: NvmeController, cmd: Command) -> int:
    """Write Uncorrectable (opcode 04h, NVM section 6.17): reads of the blocks fail
    with Unrecovered Read Error until they are written; not bound by MDTS."""
    ns, slba, nlb = _rw_args(ctrl, cmd, WU_RESERVED)
    _writable(ctrl, ns, slba, nlb)
    ctrl.uncorrectable[ns.nsid].add(slba, nlb)
    zones = ctrl.zones.get(ns.nsid)
    if zones is not None:  # a write: the write pointer moves past the blocks
        zones.advance(slba, nlb)
    return 0


def verify(ctrl: NvmeController, cmd: Command) -> int | Offloaded:
    """Verify (opcode 0Ch, NVM 2.0 section 3.3.6): reads the blocks (off the loop),
    transfers nothing; Unrecovered Read Error for a block marked uncorrectable or
    a failing read.  Not bound by MDTS (Identify CSI Controller VSL = 0)."""
    ns, slba, nlb = _rw_args(ctrl, cmd, RW_RESERVED)
    _readable(ctrl, ns, slba, nlb)
    start, end = slba << ns.lba_shift, (slba + nlb) << ns.lba_shift
    chunk = VERIFY_CHUNK >> ns.lba_shift

    def read_all() -> None:
        for first in range(slba, slba + nlb, chunk):
            ns.read_bytes(first, min(VERIFY_CHUNK, end - (first << ns.lba_shift)))

    if ctrl.offload is None or end - start <= VERIFY_CHUNK:
        read_all()
        return 0
    return Offloaded(read_all)


def copy(ctrl: NvmeController, cmd: Command) -> int | Offloaded:
    """Copy (opcode 19h, NVM 2.0 section 3.3.1), descriptor format 0 only: the
    source ranges, in order, to the blocks from SDLBA in the same namespace.
    Past MSRC / MSSRL / MCL: Command Size Limit Exceeded."""
    ns = ctrl.namespace(cmd.nsid)
    nr, fmt = (cmd.cdw12 & COPY_NR) + 1, (cmd.cdw12 >> COPY_FORMAT_SHIFT) & 0xF
    require_field(fmt == 0, f"copy descriptor format {fmt}")
    require_field(not cmd.cdw12 & COPY_RESERVED, "DTYPE/STCW/reserved CDW12 bits")
    if nr > MSRC + 1:
        raise CommandError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"{nr} source ranges")
    data = gather(ctrl.mem, data_transfer(ctrl, cmd, nr * SourceRange.SIZE, to_device=True))
    ranges = [SourceRange.unpack(data, i * SourceRange.SIZE) for i in range(nr)]
    total = 0
    for r in ranges:
        if r.nlb + 1 > MSSRL or total + r.nlb + 1 > MCL:
            raise CommandError(Status.COMMAND_SIZE_LIMIT_EXCEEDED,
                               f"source range of {r.nlb + 1} blocks ({total} before)")
        total += r.nlb + 1
    sdlba = cmd.cdw10 | cmd.cdw11 << 32
    for r in ranges:
        ns.check_range(r.slba, r.nlb + 1)
    ns.check_range(sdlba, total)
    _writable(ctrl, ns, sdlba, total)
    for r in ranges:
        _readable(ctrl, ns, r.slba, r.nlb + 1)
    blocks = b"".join(ns.read_bytes(r.slba, (r.nlb + 1) << ns.lba_shift) for r in ranges)
    ns.write_bytes(sdlba, blocks)
    written(ctrl, ns, sdlba, total)
    ctrl.counters["bytes_read"] += len(blocks)
    ctrl.counters["bytes_written"] += len(blocks)
    if cmd.cdw12 & RW_FUA or not ctrl.features.write_cache:
        return synced(ctrl, ns.flush)
    return 0


HANDLERS: dict[int, Handler] = {
    IoOpcode.FLUSH: flush,
    IoOpcode.WRITE: write,
    IoOpcode.READ: read,
    IoOpcode.WRITE_UNCORRECTABLE: write_uncorrectable,
    IoOpcode.COMPARE: compare,
    IoOpcode.WRITE_ZEROES: write_zeroes,
    IoOpcode.DATASET_MANAGEMENT: dataset_management,
    IoOpcode.VERIFY: verify,
    IoOpcode.COPY: copy,
}


def _changes_off_loop(ctrl: NvmeController, ns: Namespace) -> bool:
    """Whether a change of ``ns`` runs on the offload: its image is an NBD export
    (a network round trip per request, as long as the server takes) and the
    runtime gave the controller an offload."""
    return ns.remote and ctrl.offload is not None


def _sync_needed(ctrl: NvmeController, cmd: Command) -> bool:
    """FUA set, or the volatile write cache disabled: the write syncs before completing."""
    return bool(cmd.cdw12 & RW_FUA or not ctrl.features.write_cache)


def _export_change(ctrl: NvmeController, ns: Namespace, change: Callable[[], None],
                   ranges: list[tuple[int, int]], sync: bool,
                   views: list[memoryview] | None = None, counted: int = 0,
                   advance: bool = True) -> Offloaded:
    """``change`` (and a flush when ``sync``) of an NBD-backed namespace, off the loop.

    Returns:
        The Offloaded whose ``then`` (on the loop, once the change is done)
        calls the change hook and clears the uncorrectable marks of the
        ``(slba, nlb)`` ranges (and, with ``advance``, moves a zone's write
        pointer as a write does) and counts ``counted`` written bytes.
    """
    def work() -> None:
        change()
        if sync:
            ns.flush()

    def then() -> int:
        for slba, nlb in ranges:
            ns.changed(slba << ns.lba_shift, nlb << ns.lba_shift)
            if advance:
                written(ctrl, ns, slba, nlb)
            else:  # a deallocation: write pointers stay
                ctrl.uncorrectable[ns.nsid].remove(slba, nlb)
        ctrl.counters["bytes_written"] += counted
        return 0

    return Offloaded(work, then, views or [])


def synced(ctrl: NvmeController, sync: Callable[[], None], result: int = 0) -> int | Offloaded:
    """A sync (fdatasync) that may take as long as the disk wants: off the loop;
    the command then completes with ``result``."""
    if ctrl.offload is None:
        sync()
        return result
    return Offloaded(sync, lambda: result)


def _release(views: list[memoryview]) -> None:
    for view in views:
        view.release()


def execute(ctrl: NvmeController, cmd: Command,
            handlers: dict[int, Handler] = HANDLERS) -> int | Offloaded:
    """Run one I/O command with ``handlers`` (its namespace's command set:
    :func:`appliance.storage.zns.execute` picks them).

    Returns:
        The completion's DWORD 0, or the blocking part to run off the loop.

    Raises:
        CommandError: the status to complete with.
        GuestMemoryError: a data buffer is not in reachable client memory.
    """
    handler = handlers.get(cmd.opcode)
    if handler is None:
        raise CommandError(Status.INVALID_OPCODE, f"I/O opcode {cmd.opcode:#04x}")
    require_field(not cmd.flags & FLAGS_RESERVED, f"FUSE/reserved flags {cmd.flags:#04x}")
    require_field(psdt(cmd) in (Psdt.PRP, Psdt.SGL_MPTR_BUFFER), f"PSDT {psdt(cmd):#04b}")
    return handler(ctrl, cmd)
