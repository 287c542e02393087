"""Namespace Management and Namespace Attachment (NVMe 1.4 sections 5.20 and
5.19; device layer).

Theory of operation
-------------------
The controller is the only one of its NVM subsystem (CNTLID 1).  Its
*allocated* namespaces are ``NvmeController.namespaces``; the *attached*
(active) ones are those not in :attr:`NamespaceManagement.detached`.  A
namespace of the configuration starts allocated and attached.

With a configured total capacity (:attr:`NamespaceManagement.capacity`,
TNVMCAP) the host may create namespaces (512-byte blocks, LBA format 0, no
metadata or protection, NCAP = NSZE: no thin provisioning) while the sizes of
all allocated namespaces fit in it; each gets the lowest free NSID up to
:attr:`~NamespaceManagement.max_namespaces` (NN) and a new sparse image file
in :attr:`~NamespaceManagement.image_dir`, created exclusively (an existing
file is never taken over).  A created namespace starts detached (section
8.11).  Delete detaches it first and closes it; its image is removed only when
this process owns it (it created it, or a migration source that owned it
handed it over) and :attr:`~NamespaceManagement.remove_images` is set,
together with its metadata side file (``<image>.md``, made by a Format NVM to
an LBA format with metadata):
a configured namespace's image is always kept.  Attaching or detaching, and
deleting an attached namespace, add its NSID to the Changed Namespace List and
raise the Namespace Attribute Changed event
(:meth:`NvmeController.notify_namespace_changed`).

What the host changed here migrates and hands off with the controller
state (:mod:`appliance.storage.ns_inventory`): the destination, started from
the same configuration, converges to this inventory at commit and owns the
created images this process owned.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.storage.identify_spec import LBAF, IdentifyNamespace
from appliance.storage.identity import CNTLID
from appliance.storage.metadata import side_file
from appliance.storage.namespace import Namespace
from appliance.storage.spec import CSI_NVM, IDENTIFY_SIZE, NSID_ALL, CommandError, Status
from appliance.storage.uncorrectable import LbaRanges

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController

OACS_NS_MANAGEMENT = 1 << 3  # Identify Controller OACS: Namespace Management and Attachment
EFFECT_NIC = 1 << 3  # Commands Supported and Effects: Namespace Inventory Change
CNS_ALLOCATED_NS_LIST = 0x10
CNS_ALLOCATED_NAMESPACE = 0x11
CNS_NS_CONTROLLER_LIST = 0x12
CNS_CONTROLLER_LIST = 0x13
MANAGEMENT_CNS = (CNS_ALLOCATED_NS_LIST, CNS_ALLOCATED_NAMESPACE, CNS_NS_CONTROLLER_LIST,
                  CNS_CONTROLLER_LIST)
SEL_CREATE, SEL_DELETE = 0, 1  # Namespace Management CDW10.SEL
SEL_ATTACH, SEL_DETACH = 0, 1  # Namespace Attachment CDW10.SEL
CREATED_BLOCK_SIZE = 512  # LBA format 0 of a created namespace
#: the file name of a created namespace's image (its NSID, 8 random hex digits)
IMAGE_NAME = re.compile(r"nvme-ns[1-9][0-9]*-[0-9a-f]{8}\.img")
CONTROLLER_LIST_MAX = 2047  # identifiers in one 4 KiB controller list


@dataclass
class NamespaceManagement:
    """The namespace inventory settings and what the host changed at run time."""

    capacity: int = 0  # bytes (TNVMCAP); 0: Namespace Management is not offered
    max_namespaces: int = 0  # NN; 0: the configured namespaces' count
    image_dir: str = ""  # where created namespaces' images are made
    remove_images: bool = False  # delete removes the image of a namespace we created
    #: image paths of the namespaces created at run time (here or on a migration
    #: source), by NSID
    created: dict[int, str] = field(default_factory=dict)
    #: the created namespaces whose images this process owns: delete removes them
    #: (``remove_images``)
    owned: set[int] = field(default_factory=set)
    detached: set[int] = field(default_factory=set)  # allocated, not attached
    deleted: set[int] = field(default_factory=set)  # configured NSIDs the host deleted

    @property
    def enabled(self) -> bool:
        """Whether the host may create, delete, attach and detach (OACS bit 3)."""
        return self.capacity > 0


def _check(ok: bool, status: Status = Status.INVALID_FIELD, why: str = "") -> None:
    if not ok:
        raise CommandError(status, why)


def allocated_bytes(ctrl: NvmeController) -> int:
    """The capacity the allocated namespaces take."""
    return sum(ns.size for ns in ctrl.namespaces.values())


def unallocated_bytes(ctrl: NvmeController) -> int:
    """UNVMCAP: what is left for new namespaces (0 without Namespace Management)."""
    mgmt = ctrl.ns_mgmt
    return max(0, mgmt.capacity - allocated_bytes(ctrl)) if mgmt.enabled else 0


def namespace_count(ctrl: NvmeController) -> int:
    """NN: the highest NSID the controller may have."""
    mgmt = ctrl.ns_mgmt
    return mgmt.max_namespaces if mgmt.enabled else len(ctrl.namespaces)


def is_inactive_valid(ctrl: NvmeController, nsid: int) -> bool:
    """Whether ``nsid`` is a valid NSID (1..NN) that is not active: Identify
    Namespace then returns zeroes (section 5.15.2)."""
    return (ctrl.ns_mgmt.enabled and 1 <= nsid <= namespace_count(ctrl)
            and not ctrl.is_active(nsid) and nsid not in ctrl.zones)


def common_namespace() -> bytes:
    """Identify Namespace for NSID FFFFFFFFh: what every created namespace shares
    (the one LBA format create accepts)."""
    return IdentifyNamespace(nlbaf=0, flbas=0,
                             lbaf0=LBAF.encode(ms=0, lbads=CREATED_BLOCK_SIZE.bit_length() - 1,
                                               rp=0)).pack()


def identify(ctrl: NvmeController, cns: int, nsid: int, cntid: int) -> bytes:
    """The Identify data of CNS 10h-13h (allocated NSIDs, an allocated namespace,
    controller lists).

    Raises:
        CommandError: INVALID_FIELD without Namespace Management; INVALID_NAMESPACE
            for an NSID the CNS does not take.
    """
    _check(ctrl.ns_mgmt.enabled, why=f"CNS {cns:#x}: no Namespace Management")
    if cns == CNS_ALLOCATED_NS_LIST:
        _check(nsid < 0xFFFFFFFE, Status.INVALID_NAMESPACE, f"NSID {nsid:#x}")
        ids = [n for n in sorted(ctrl.namespaces) if n > nsid][:IDENTIFY_SIZE // 4]
        return struct.pack(f"<{len(ids)}I", *ids)
    if cns == CNS_ALLOCATED_NAMESPACE:
        ns = ctrl.namespaces.get(nsid)
        if ns is None:
            _check(1 <= nsid <= namespace_count(ctrl), Status.INVALID_NAMESPACE,
                   f"NSID {nsid:#x}")
            return b""
        return ns.identify()
    attached = [CNTLID] if cns == CNS_CONTROLLER_LIST else []
    if cns == CNS_NS_CONTROLLER_LIST:
        _check(nsid in ctrl.namespaces, Status.INVALID_NAMESPACE, f"NSID {nsid:#x}")
        attached = [] if nsid in ctrl.ns_mgmt.detached else [CNTLID]
    ids = [c for c in attached if c >= cntid]
    return struct.pack(f"<H{len(ids)}H", len(ids), *ids)


# ---------------------------------------------------------------- Namespace Management
def make_image(path: str, size: int) -> None:
    """A new sparse image file of ``size`` bytes at ``path``, created exclusively
    (an existing file or symlink there is never taken over).

    Raises:
        OSError: EEXIST when ``path`` exists (left alone), or the file cannot be
            made (then nothing is left behind).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def create(ctrl: NvmeController, csi: int, data: bytes) -> int:
    """Create a namespace from the host's Identify Namespace fields (NSZE, NCAP,
    FLBAS, DPS, NMIC); returns its NSID.

    Raises:
        CommandError: INVALID_FIELD (a zero or thin size, a shared namespace, a
            command set other than NVM), INVALID_FORMAT (an LBA format other
            than 0, metadata, protection), NS_INSUFFICIENT_CAPACITY,
            NS_ID_UNAVAILABLE (NN namespaces exist), INTERNAL_ERROR (the image
            cannot be made).
    """
    mgmt = ctrl.ns_mgmt
    _check(csi == CSI_NVM, why=f"create for CSI {csi:#x}: NVM namespaces only")
    want = IdentifyNamespace.unpack(data)
    _check(want.nsze > 0, why="NSZE 0")
    _check(want.ncap == want.nsze, why=f"NCAP {want.ncap} != NSZE {want.nsze}: "
                                       "thin provisioning is not supported")
    _check(want.flbas == 0 and want.dps == 0, Status.INVALID_FORMAT,
           f"FLBAS {want.flbas:#x} DPS {want.dps:#x}: LBA format 0 without protection only")
    _check(not want.nmic & 1, why="NMIC: a shared namespace needs a multi-controller subsystem")
    size = want.nsze * CREATED_BLOCK_SIZE
    _check(size <= unallocated_bytes(ctrl), Status.NS_INSUFFICIENT_CAPACITY,
           f"{size} bytes asked, {unallocated_bytes(ctrl)} unallocated")
    free = [n for n in range(1, namespace_count(ctrl) + 1) if n not in ctrl.namespaces]
    _check(bool(free), Status.NS_ID_UNAVAILABLE, f"{namespace_count(ctrl)} namespaces exist")
    nsid = free[0]
    path = os.path.join(mgmt.image_dir, f"nvme-ns{nsid}-{secrets.token_hex(4)}.img")
    assert IMAGE_NAME.fullmatch(os.path.basename(path))
    try:
        make_image(path, size)
    except OSError as exc:
        raise CommandError(Status.INTERNAL_ERROR, f"image {path}: {exc}") from None
    try:
        ns = Namespace(nsid, path, size, CREATED_BLOCK_SIZE, existing=True)
    except (OSError, ValueError) as exc:
        os.unlink(path)
        raise CommandError(Status.INTERNAL_ERROR, f"image {path}: {exc}") from None
    ctrl.namespaces[nsid] = ns
    ctrl.uncorrectable[nsid] = LbaRanges()
    mgmt.created[nsid] = path
    mgmt.owned.add(nsid)
    mgmt.detached.add(nsid)
    ctrl.identify_changed()
    return nsid


def delete(ctrl: NvmeController, nsid: int) -> None:
    """Delete namespace ``nsid`` (FFFFFFFFh: every one): detach, close, and remove
    the image (and its metadata side file, if a Format NVM made one) when this
    process owns it and the configuration says so.

    Raises:
        CommandError: INVALID_NAMESPACE for an NSID that is not allocated.
    """
    mgmt = ctrl.ns_mgmt
    targets = sorted(ctrl.namespaces) if nsid == NSID_ALL else [nsid]
    _check(nsid == NSID_ALL or nsid in ctrl.namespaces, Status.INVALID_NAMESPACE,
           f"NSID {nsid:#x} is not allocated")
    ctrl.drain_queue_io()
    for n in targets:
        was_attached = n not in mgmt.detached
        ctrl.namespaces.pop(n).close()
        ctrl.uncorrectable.pop(n, None)
        ctrl.zones.pop(n, None)
        mgmt.detached.discard(n)
        path = mgmt.created.pop(n, None)
        owned = n in mgmt.owned
        mgmt.owned.discard(n)
        if path is None:
            mgmt.deleted.add(n)
        elif owned and mgmt.remove_images:
            for name in (path, side_file(path)):  # the metadata side file goes with it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
        if was_attached:
            ctrl.notify_namespace_changed(n)
    ctrl.identify_changed()


# ---------------------------------------------------------------- Namespace Attachment
def controller_list(data: bytes) -> list[int]:
    """The controller identifiers of a Controller List (figure 255).

    Raises:
        CommandError: CONTROLLER_LIST_INVALID (empty, repeated or foreign ids).
    """
    count = struct.unpack_from("<H", data)[0]
    _check(1 <= count <= CONTROLLER_LIST_MAX, Status.CONTROLLER_LIST_INVALID,
           f"{count} controller identifiers")
    ids = list(struct.unpack_from(f"<{count}H", data, 2))
    _check(ids == [CNTLID], Status.CONTROLLER_LIST_INVALID,
           f"controllers {ids[:8]}: this subsystem has controller {CNTLID} only")
    return ids


def attach(ctrl: NvmeController, nsid: int, detach: bool, data: bytes) -> None:
    """Attach namespace ``nsid`` to this controller, or detach it.

    Raises:
        CommandError: INVALID_FIELD (NSID 0 or FFFFFFFFh), INVALID_NAMESPACE
            (not allocated), CONTROLLER_LIST_INVALID, NS_ALREADY_ATTACHED,
            NS_NOT_ATTACHED.
    """
    mgmt = ctrl.ns_mgmt
    _check(nsid not in (0, NSID_ALL), why=f"NSID {nsid:#x}")
    _check(nsid in ctrl.namespaces, Status.INVALID_NAMESPACE, f"NSID {nsid:#x} is not allocated")
    controller_list(data)
    if detach:
        _check(nsid not in mgmt.detached, Status.NS_NOT_ATTACHED, f"NSID {nsid} is not attached")
        ctrl.drain_queue_io()
        mgmt.detached.add(nsid)
    else:
        _check(nsid in mgmt.detached, Status.NS_ALREADY_ATTACHED, f"NSID {nsid} is attached")
        mgmt.detached.discard(nsid)
    ctrl.notify_namespace_changed(nsid)
