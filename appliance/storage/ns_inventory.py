"""The namespace inventory in migration and live handoff (device layer).

Theory of operation
-------------------
A destination is started from the source's configuration; what the host
changed at run time through Namespace Management and Attachment
(:mod:`appliance.storage.nsmgmt`) travels as state.  The
:class:`Inventory` is every allocated namespace (NSID, size, LBA format,
attached or not; for one created at run time the file name of its image in
``image_dir``, whether the process owns that image for the delete rule, and
its LBA format: a host may have formatted it to another block size, with
metadata and protection, since it was created)
and, implied, the configured namespaces deleted (configured NSIDs it does
not list as configured).  The controller blob carries it
(:mod:`appliance.storage.controller_state`, :class:`NamespaceEntry` each);
the Changed Namespace List and a pending Namespace Attribute Changed event
are already part of that blob.  The migration fingerprint keeps covering the
configuration only.

A full-copy stream announces the created namespaces first (a DEVICE_STATE
record of kind NVME_NAMESPACES, before their NAMESPACE_BLOCKS): the
destination makes each image then, a new sparse file in its own
``image_dir`` under the source's name, created exclusively (an existing
file is refused, never taken over), and its metadata side file
(``<image>.md``) the same way when its LBA format has metadata, and stages
the blocks and their metadata into them.  A
shared-storage stream (and so a live handoff on the same files) has no
announcement: at the controller blob the destination opens the images the
source made, by a name checked to be a plain file name (no ``/``, not
hidden, so neither ``.`` nor ``..``) of the form created images have
(``nvme-ns<NSID>-<8 hex digits>.img``: nothing else of ``image_dir``, such
as a configured namespace's side file), without following a symlink (nor
one at the side file's name).

Nothing of the controller changes before the commit
(:meth:`IncomingNamespaces.adopt`: the configured namespaces the source
deleted are closed, the created ones join, the attached set is the
source's); an aborted or refused restore closes what it opened and removes
the images and side files it made, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from appliance.storage.formats import LBA_FORMATS
from appliance.storage.metadata import side_file
from appliance.storage.namespace import Namespace
from appliance.storage.nsmgmt import IMAGE_NAME, make_image, namespace_count
from appliance.storage.protection import PI_TUPLE_SIZE
from appliance.storage.uncorrectable import LbaRanges
from appliance.wire import U32, U64, Struct

if TYPE_CHECKING:
    from appliance.storage.controller import NvmeController

NAME_MAX = 64  # bytes of an image name in an entry
FLAG_CREATED, FLAG_OWNED, FLAG_DETACHED = 0x1, 0x2, 0x4
FLAGS = FLAG_CREATED | FLAG_OWNED | FLAG_DETACHED
#: an entry's ``format``: a created namespace's LBA format as Format NVM's CDW10
#: bits 8:0 give it (LBAF 3:0, MSET 4, PI 7:5, PIL 8; PIL only with PI)
FORMAT_LBAF, FORMAT_EXTENDED, FORMAT_PI_SHIFT, FORMAT_PI_FIRST = 0xF, 0x10, 5, 0x100
FORMAT_BITS = 0x1FF


class NamespaceEntry(Struct, size=88):
    """One allocated namespace; ``name`` (NUL-padded) and ``format`` only when
    FLAG_CREATED (a configured namespace's format is the fingerprint's)."""

    nsid: U32 = 0
    flags: U32 = 0
    size: U64 = 0  # bytes
    block_size: U32 = 0
    format: U32 = 0  # FORMAT_* bits
    name: Annotated[bytes, "64s"] = b""


@dataclass(frozen=True)
class Allocated:
    """An allocated namespace; ``image`` is the file name of a created one's image
    in ``image_dir`` ("" for a configured one), ``format`` its LBA format
    (FORMAT_* bits; 0 for a configured one)."""

    nsid: int
    size: int
    block_size: int
    detached: bool = False
    image: str = ""
    owned: bool = False
    format: int = 0

    @property
    def created(self) -> bool:
        return bool(self.image)

    @property
    def metadata(self) -> int:
        """Metadata bytes per block of the LBA format."""
        return LBA_FORMATS[self.format & FORMAT_LBAF].metadata if self.created else 0

    def entry(self) -> NamespaceEntry:
        flags = (FLAG_CREATED if self.created else 0) | (FLAG_OWNED if self.owned else 0) | (
            FLAG_DETACHED if self.detached else 0)
        return NamespaceEntry(nsid=self.nsid, flags=flags, size=self.size,
                              block_size=self.block_size, format=self.format,
                              name=self.image.encode())

    def same_image(self, other: Allocated) -> bool:
        """Whether both name the same created image (attachment aside)."""
        return (self.nsid, self.size, self.block_size, self.image, self.owned, self.format) == (
            other.nsid, other.size, other.block_size, other.image, other.owned, other.format)


@dataclass(frozen=True)
class Inventory:
    """The allocated namespaces in NSID order and the configured ones deleted."""

    namespaces: tuple[Allocated, ...]
    deleted: frozenset[int] = frozenset()

    @property
    def created(self) -> tuple[Allocated, ...]:
        return tuple(a for a in self.namespaces if a.created)

    def blocks(self) -> dict[int, int]:
        """Logical blocks of each allocated namespace, by NSID."""
        return {a.nsid: a.size // a.block_size for a in self.namespaces}

    def kept(self) -> set[int]:
        """The configured namespaces that stay."""
        return {a.nsid for a in self.namespaces if not a.created}


def format_of(ns: Namespace) -> int:
    """``ns``'s LBA format as FORMAT_* bits."""
    pi = int(ns.protection.pi_type)
    return (ns.format_index | (FORMAT_EXTENDED if ns.extended else 0) | pi << FORMAT_PI_SHIFT
            | (FORMAT_PI_FIRST if pi and ns.protection.pi_first else 0))


def inventory_of(ctrl: NvmeController) -> Inventory:
    """The controller's inventory now (the source's side)."""
    mgmt = ctrl.ns_mgmt
    return Inventory(tuple(
        Allocated(nsid, ns.size, ns.block_size, nsid in mgmt.detached,
                  os.path.basename(mgmt.created.get(nsid, "")), nsid in mgmt.owned,
                  format_of(ns) if nsid in mgmt.created else 0)
        for nsid, ns in sorted(ctrl.namespaces.items())), frozenset(mgmt.deleted))


def check_format(value: int, block_size: int, size: int) -> None:
    """A created namespace's FORMAT_* bits, as Format NVM would have left them:
    an LBA format this controller lists, of ``block_size``-byte blocks that
    divide ``size``; PI only with 8 bytes of metadata at least, PIL only with
    PI, MSET only with metadata.

    Raises:
        ValueError: the first rule broken.
    """
    lbaf, pi = value & FORMAT_LBAF, value >> FORMAT_PI_SHIFT & 0x7
    if value & ~FORMAT_BITS or lbaf >= len(LBA_FORMATS) or pi > 3:
        raise ValueError(f"format {value:#x}")
    fmt = LBA_FORMATS[lbaf]
    if fmt.block_size != block_size or not (0 < size and size % block_size == 0):
        raise ValueError(f"{size} bytes of {block_size}-byte blocks in LBA format {lbaf}")
    if (pi and fmt.metadata < PI_TUPLE_SIZE) or (value & FORMAT_PI_FIRST and not pi) or (
            value & FORMAT_EXTENDED and not fmt.metadata):
        raise ValueError(f"format {value:#x}: PI {pi} / PIL / MSET with {fmt.metadata} bytes "
                         "of metadata")


def image_name(raw: bytes) -> str:
    """The image name of an entry: a plain, visible file name, and one a
    created namespace's image has (:data:`~appliance.storage.nsmgmt.IMAGE_NAME`:
    never a configured image's side file or anything else of ``image_dir``).

    Raises:
        ValueError: empty, a NUL inside, not ASCII, a '/' in it, starting
            with '.' (so neither '.' nor '..'), or not a created image's name.
    """
    name = raw.rstrip(b"\0")
    if not name or b"\0" in name or b"/" in name or name.startswith(b".") or not all(
            0x20 < c < 0x7F for c in name):
        raise ValueError(f"image name {raw.rstrip(bytes(1))[:NAME_MAX]!r} is not a plain file name")
    if not IMAGE_NAME.fullmatch(name.decode()):
        raise ValueError(f"image name {name.decode()!r} is not a created namespace's image name")
    return name.decode()


def check_entries(ctrl: NvmeController, entries: list[NamespaceEntry],
                  announced: bool = False) -> Inventory:
    """The inventory ``entries`` describe, checked against ``ctrl``'s configuration:
    NSIDs ascending in 1..NN, each once; configured ones as configured here;
    created ones in an LBA format Format NVM can leave (:func:`check_format`),
    a plain image name each, all within the capacity.  ``announced``: only created namespaces (a full stream's
    announcement; nothing is implied deleted).

    Raises:
        ValueError: the first entry that does not fit (the caller's protocol
            error carries it).
    """
    mgmt = ctrl.ns_mgmt
    if mgmt.created or mgmt.deleted:
        raise ValueError("this process's namespaces already differ from its configuration")
    nn, last, total, names = namespace_count(ctrl), 0, 0, set()
    out: list[Allocated] = []
    for e in entries:
        where = f"namespace {e.nsid}"
        if not last < e.nsid <= nn:
            raise ValueError(f"{where}: NSIDs must ascend in 1..{nn}")
        last = e.nsid
        if e.flags & ~FLAGS:
            raise ValueError(f"{where}: flags {e.flags:#x}")
        if e.flags & FLAG_DETACHED and not mgmt.enabled:
            raise ValueError(f"{where}: detached without Namespace Management")
        created = bool(e.flags & FLAG_CREATED)
        if announced and not created:
            raise ValueError(f"{where}: the announcement lists a configured namespace")
        if created:
            if not mgmt.enabled:
                raise ValueError(f"{where}: created without Namespace Management")
            check_format(e.format, e.block_size, e.size)
            name = image_name(e.name)
            if name in names:
                raise ValueError(f"{where}: image {name} twice")
            names.add(name)
        else:
            ns = ctrl.namespaces.get(e.nsid)
            if e.flags & FLAG_OWNED or any(e.name) or e.format or ns is None or (
                    e.size, e.block_size) != (ns.size, ns.block_size):
                raise ValueError(f"{where}: not configured so here")
            name = ""
        total += e.size
        out.append(Allocated(e.nsid, e.size, e.block_size, bool(e.flags & FLAG_DETACHED), name,
                             bool(e.flags & FLAG_OWNED), e.format))
    if mgmt.enabled and total > mgmt.capacity:
        raise ValueError(f"{total} bytes allocated, the capacity is {mgmt.capacity}")
    if announced:
        return Inventory(tuple(out))
    deleted = frozenset(ctrl.namespaces) - {a.nsid for a in out if not a.created}
    if deleted and not mgmt.enabled:
        raise ValueError(f"namespaces {sorted(deleted)} deleted without Namespace Management")
    return Inventory(tuple(out), deleted)


class IncomingNamespaces:
    """The created namespaces a restore brings, not yet the controller's.

    :meth:`make` (full copy) and :meth:`open` (shared storage) add one;
    :meth:`adopt` hands them to the controller at commit; :meth:`discard`
    closes them and removes the images :meth:`make` created.
    """

    def __init__(self, image_dir: str) -> None:
        self.image_dir = image_dir
        self.namespaces: dict[int, Namespace] = {}
        self.announced: Inventory | None = None  # a full stream's announcement
        self._made: list[str] = []  # images this restore created

    def make(self, a: Allocated) -> Namespace:
        """A new sparse image for ``a`` under its name, and its side file when
        its format has metadata, each created exclusively.

        Raises:
            OSError: EEXIST when a file of either name exists (it is left
                alone), or a file cannot be made.
        """
        path = os.path.join(self.image_dir, a.image)
        make_image(path, a.size)
        self._made.append(path)
        if a.metadata:
            make_image(side_file(path), 0)
            self._made.append(side_file(path))
        return self._open(a, path)

    def open(self, a: Allocated) -> Namespace:
        """The image the source made for ``a`` (shared storage), and its side
        file, without following a symlink.

        Raises:
            OSError: missing, or a symlink (ELOOP).
            ValueError: not a regular file of ``a.size`` bytes at least.
        """
        return self._open(a, os.path.join(self.image_dir, a.image))

    def _open(self, a: Allocated, path: str) -> Namespace:
        pi = a.format >> FORMAT_PI_SHIFT & 0x7
        ns = Namespace(a.nsid, path, a.size, a.block_size, metadata=a.metadata, pi=pi,
                       existing=True, pi_first=not pi or bool(a.format & FORMAT_PI_FIRST),
                       extended=bool(a.format & FORMAT_EXTENDED))
        self.namespaces[a.nsid] = ns
        return ns

    def check_distinct(self, ctrl: NvmeController) -> None:
        """Every image opened here is a file of its own: not a configured
        namespace's image, not another created one's (a hard link).

        Raises:
            ValueError: naming the namespaces that share a file.
        """
        seen: dict[tuple[int, int], str] = {}
        for nsid, ns in ctrl.namespaces.items():
            if ns.fd >= 0:  # (not an NBD export)
                st = os.fstat(ns.fd)
                seen.setdefault((st.st_dev, st.st_ino), f"namespace {nsid}")
        for nsid, ns in self.namespaces.items():
            st = os.fstat(ns.fd)
            other = seen.setdefault((st.st_dev, st.st_ino), f"created namespace {nsid}")
            if other != f"created namespace {nsid}":
                raise ValueError(f"{other} and created namespace {nsid} would share one image")

    def discard(self) -> None:
        """Close every namespace opened here; remove the images and side files
        made here."""
        for ns in self.namespaces.values():
            ns.close()
        self.namespaces = {}
        self.announced = None
        made, self._made = self._made, []
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def adopt(self, ctrl: NvmeController, inventory: Inventory) -> None:
        """Make ``ctrl``'s namespaces the inventory: close the configured ones it
        deleted, add the created ones (owned as the source owned them), attach
        what it attaches."""
        mgmt = ctrl.ns_mgmt
        for nsid in sorted(inventory.deleted):
            ctrl.namespaces.pop(nsid).close()
            ctrl.zones.pop(nsid, None)
            ctrl.uncorrectable.pop(nsid, None)
            mgmt.deleted.add(nsid)
        for a in inventory.created:
            ctrl.namespaces[a.nsid] = self.namespaces.pop(a.nsid)
            ctrl.uncorrectable[a.nsid] = LbaRanges()
            mgmt.created[a.nsid] = os.path.join(self.image_dir, a.image)
            if a.owned:
                mgmt.owned.add(a.nsid)
        mgmt.detached = {a.nsid for a in inventory.namespaces if a.detached}
        self._made = []  # the controller's now
        self.discard()
        ctrl.identify_changed()
