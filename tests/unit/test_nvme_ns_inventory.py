"""The namespace inventory in a migration, in process: namespaces created,
deleted and detached at run time reach a destination started from the same
configuration (full copy: a new image made there and its data from the stream;
shared storage: the source's image opened), the Changed Namespace List and
the pending event with them, ownership of the images; every hostile inventory
refused with the destination untouched and the images a restore made removed."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.errors import LocalProtocolError
from appliance.storage import NvmeController
from appliance.storage.formats import format_index
from appliance.storage.migration import NvmeMigratable
from appliance.storage.ns_inventory import Allocated, Inventory, image_name, inventory_of
from appliance.storage.nsmgmt import NamespaceManagement
from appliance.storage.protection import PRACT, PRCHK_APP, PRCHK_GUARD, PRCHK_REF, PRINFO_SHIFT
from appliance.storage.spec import AdminOpcode, Command, FeatureId, IoOpcode
from appliance.testing.nvme import controller_driver
from appliance.vfio_user.migration_stream import (
    DeviceKind,
    Record,
    RecordType,
    device_state,
    namespace_blocks,
    namespace_metadata,
    parse_device_state,
)
from tests.unit.test_nvme_driver import make_controller, status

MIB = 1 << 20


def make(root: Path, image_dir: Path) -> NvmeController:
    """Two configured 1 MiB namespaces, 8 MiB capacity, NN 4."""
    root.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    return make_controller(root, namespaces=2, io_queues=1, queue_entries=64,
                           management=NamespaceManagement(
                               capacity=8 * MIB, max_namespaces=4, image_dir=str(image_dir),
                               remove_images=True))


@dataclass
class Source:
    ctrl: NvmeController
    drv: NvmeDriver
    mig: NvmeMigratable
    data: bytes
    nsid: int


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Source]:
    """Configured 2 deleted, a namespace created (NSID 2 again) and attached with
    data, configured 1 detached; Namespace Attribute Changed events enabled."""
    ctrl = make(tmp_path / "src", tmp_path / "src" / "images")
    drv = controller_driver(ctrl).ready(io_queues=1)
    aec = Command(opcode=AdminOpcode.SET_FEATURES, cdw10=FeatureId.ASYNC_EVENT_CONFIG,
                  cdw11=0x100)
    assert status(drv.command(0, aec))[0] == 0
    assert status(drv.delete_namespace(2))[0] == 0
    nsid = drv.create_namespace(4096).dw0  # 2 MiB
    assert nsid == 2
    assert status(drv.attach_namespace(nsid))[0] == 0
    drv.identify_namespace(nsid)
    data = os.urandom(64 * 512)
    drv.write(nsid, 100, data)
    assert status(drv.attach_namespace(1, detach=True))[0] == 0
    yield Source(ctrl, drv, NvmeMigratable(ctrl), data, nsid)
    ctrl.close()


def dest(tmp_path: Path, shared: bool = False) -> NvmeController:
    images = tmp_path / ("src" if shared else "dst") / "images"
    return make(tmp_path / "dst", images)


def full_stream(src: Source) -> list[Record]:
    """Pre-copy with a write between rounds, then the stop-copy records."""
    mig = src.mig
    mig.start_tracking()
    records = mig.precopy_records(256 << 10)
    assert records[0].type == RecordType.DEVICE_STATE  # the announcement comes first
    src.drv.write(src.nsid, 4000, src.data[:4096])  # dirty again, in round 1
    while batch := mig.precopy_records(1 * MIB):
        records += batch
    assert mig.precopy_pending() == 0
    mig.migration_stop()
    return records + mig.save_state()


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def check_converged(src: Source, dst: NvmeController, image_dir: Path,
                    source_owned: set[int] | None = None) -> None:
    """``source_owned``: what the source owns after it saved (shared storage:
    nothing, the destination took its images over)."""
    mgmt, smgmt = dst.ns_mgmt, src.ctrl.ns_mgmt
    assert sorted(dst.namespaces) == [1, 2]
    assert mgmt.detached == {1} and mgmt.deleted == {2} and mgmt.owned == {2}
    assert mgmt.created == {2: str(image_dir / os.path.basename(smgmt.created[2]))}
    assert smgmt.owned == ({2} if source_owned is None else source_owned)
    assert inventory_of(dst) == replace(inventory_of(src.ctrl), namespaces=tuple(
        replace(a, owned=a.created) for a in inventory_of(src.ctrl).namespaces))  # as saved
    assert dst.changed_ns == src.ctrl.changed_ns == [2, 1]
    assert dst.events.pending == src.ctrl.events.pending != []
    ns = dst.namespaces[2]
    assert ns.size == 2 * MIB and dst.is_active(2) and not dst.is_active(1)
    assert ns.read_bytes(100, len(src.data)) == src.data


def test_full_copy_makes_the_created_namespace_and_converges(source: Source,
                                                               tmp_path: Path) -> None:
    records = full_stream(source)
    dst = dest(tmp_path)
    try:
        mig = NvmeMigratable(dst)
        mig.load_records(records)
        name = os.path.basename(source.ctrl.ns_mgmt.created[2])
        made = listing(tmp_path / "dst" / "images")  # the new image and its staging file
        assert name in made and len(made) == 2 and not dst.ns_mgmt.created  # not adopted yet
        mig.commit_restore()
        check_converged(source, dst, tmp_path / "dst" / "images")
        assert dst.namespaces[2].read_bytes(4000, 4096) == source.data[:4096]  # round 1's write
        assert listing(tmp_path / "dst" / "images") == [name]  # staged data renamed over it
        mig.start_tracking()  # a next migration covers the created namespace
        assert 2 in mig.dirty
    finally:
        dst.close()


def test_shared_storage_opens_the_source_image(source: Source, tmp_path: Path) -> None:
    source.mig.start_tracking()
    source.mig.migration_stop()
    records = source.mig.save_state()  # no announcement, no blocks
    assert {parse_device_state(r)[0] for r in records if r.type == RecordType.DEVICE_STATE} == {
        DeviceKind.NVME_CONTROLLER}
    dst = dest(tmp_path, shared=True)
    try:
        mig = NvmeMigratable(dst)
        mig.load_records(records)
        mig.commit_restore()
        check_converged(source, dst, tmp_path / "src" / "images", source_owned=set())
        assert os.path.samefile(dst.ns_mgmt.created[2], source.ctrl.ns_mgmt.created[2])
        source.mig.migration_run()  # (had it not gone through) the source owns them again
        assert source.ctrl.ns_mgmt.owned == {2}
    finally:
        dst.close()


def test_ownership_follows_the_source(source: Source, tmp_path: Path) -> None:
    source.ctrl.ns_mgmt.owned.clear()
    source.mig.start_tracking()
    records = source.mig.save_state()  # (full copy: the source keeps its own copy's)
    dst = dest(tmp_path, shared=True)
    try:
        mig = NvmeMigratable(dst)
        mig.load_records(records)
        mig.commit_restore()
        assert dst.ns_mgmt.owned == set() and 2 in dst.ns_mgmt.created
    finally:
        dst.close()


def test_an_aborted_restore_removes_the_images_it_made(source: Source, tmp_path: Path) -> None:
    records = full_stream(source)
    dst = dest(tmp_path)
    (tmp_path / "dst" / "images" / "mine.img").write_bytes(b"keep")
    try:
        mig = NvmeMigratable(dst)
        mig.load_records(records[:-1])  # all but the controller state
        assert len(listing(tmp_path / "dst" / "images")) > 1
        with pytest.raises(LocalProtocolError, match="no controller state"):
            mig.commit_restore()
        mig.abort_restore()
        assert listing(tmp_path / "dst" / "images") == ["mine.img"]
        assert sorted(dst.namespaces) == [1, 2] and not dst.ns_mgmt.created
        assert dst.namespaces[2].image == str(tmp_path / "dst" / "ns2.img")
    finally:
        dst.close()


# ------------------------------------------------------------------ hostile inventories
def entries_of(records: list[Record], kind: DeviceKind) -> tuple[int, bytes]:
    """(record index, blob) of the DEVICE_STATE record of ``kind``."""
    for i, r in enumerate(records):
        if r.type == RecordType.DEVICE_STATE and parse_device_state(r)[0] == kind:
            return i, parse_device_state(r)[2]
    raise AssertionError(kind)


def edited(records: list[Record], saved: Inventory,
           change: Callable[[list[Allocated]], list[Allocated]],
           kind: DeviceKind = DeviceKind.NVME_CONTROLLER) -> list[Record]:
    """The records with the inventory in the ``kind`` record (``saved``: the
    source's when it saved) replaced by ``change``'s."""
    inventory = list(saved.namespaces)
    if kind == DeviceKind.NVME_NAMESPACES:
        inventory = [a for a in inventory if a.created]
    old = b"".join(a.entry().pack() for a in inventory)
    new_list = change(inventory)
    new = b"".join(a.entry().pack() for a in new_list)
    i, blob = entries_of(records, kind)
    assert blob.count(old) == 1
    blob = blob.replace(old, new)
    if kind == DeviceKind.NVME_CONTROLLER:  # n_namespaces: the head's last u32
        blob = blob[:100] + len(new_list).to_bytes(4, "little") + blob[104:]
    return [*records[:i], device_state(kind, blob), *records[i + 1:]]


def created(f: Callable[[Allocated], Allocated]) -> Callable[[list[Allocated]], list[Allocated]]:
    return lambda inv: [f(a) if a.created else a for a in inv]


HOSTILE: dict[str, Callable[[list[Allocated]], list[Allocated]]] = {
    "nsid-0": created(lambda a: replace(a, nsid=0)),
    "nsid-over-nn": created(lambda a: replace(a, nsid=5)),
    "nsid-twice": lambda inv: [inv[0], replace(inv[1], nsid=1)],
    "over-capacity": created(lambda a: replace(a, size=16 * MIB)),
    "4k-blocks": created(lambda a: replace(a, block_size=4096)),
    "slash": created(lambda a: replace(a, image="../x.img")),
    "dot-dot": created(lambda a: replace(a, image="..")),
    "hidden": created(lambda a: replace(a, image=".nvme.img")),
    "configured-resized": lambda inv: [replace(inv[0], size=2 * MIB), inv[1]],
    "configured-owned": lambda inv: [replace(inv[0], owned=True), inv[1]],
    "configured-format": lambda inv: [replace(inv[0], format=1), inv[1]],
    "format-reserved": created(lambda a: replace(a, format=0x200)),
    "format-past-nlbaf": created(lambda a: replace(a, format=8)),
    "format-block-size": created(lambda a: replace(a, format=4)),  # 4096-byte LBA format
    "pi-without-metadata": created(lambda a: replace(a, format=1 << 5)),
    "pil-without-pi": created(lambda a: replace(a, format=1 | 1 << 8)),
    "mset-without-metadata": created(lambda a: replace(a, format=1 << 4)),
}


def refused(dst: NvmeController, records: list[Record], why: str, image_dir: Path) -> None:
    before = listing(image_dir)
    mig = NvmeMigratable(dst)
    with pytest.raises(LocalProtocolError, match=why) as err:
        mig.load_records(records)
        mig.commit_restore()
    assert err.value.errno == errno.EINVAL
    mig.abort_restore()
    assert listing(image_dir) == before
    assert sorted(dst.namespaces) == [1, 2] and not dst.ns_mgmt.created
    assert not dst.ns_mgmt.detached and not dst.ns_mgmt.deleted


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_inventory_in_the_state(source: Source, tmp_path: Path, name: str) -> None:
    source.mig.start_tracking()
    saved = inventory_of(source.ctrl)
    records = edited(source.mig.save_state(), saved, HOSTILE[name])
    dst = dest(tmp_path, shared=True)
    try:
        refused(dst, records, "namespace inventory", tmp_path / "src" / "images")
    finally:
        dst.close()


@pytest.mark.parametrize("name", ["nsid-0", "nsid-over-nn", "over-capacity", "slash",
                                  "dot-dot", "hidden", "format-reserved", "pi-without-metadata"])
def test_hostile_announcement(source: Source, tmp_path: Path, name: str) -> None:
    records = edited(full_stream(source), inventory_of(source.ctrl), HOSTILE[name],
                     DeviceKind.NVME_NAMESPACES)
    dst = dest(tmp_path)
    try:
        refused(dst, records, "created namespaces", tmp_path / "dst" / "images")
    finally:
        dst.close()


def test_an_existing_file_is_never_taken_over(source: Source, tmp_path: Path) -> None:
    records = full_stream(source)
    dst = dest(tmp_path)
    theirs = tmp_path / "dst" / "images" / os.path.basename(source.ctrl.ns_mgmt.created[2])
    theirs.write_bytes(b"not ours")
    try:
        refused(dst, records, "File exists", tmp_path / "dst" / "images")
        assert theirs.read_bytes() == b"not ours"
    finally:
        dst.close()


def test_a_symlink_is_not_followed(source: Source, tmp_path: Path) -> None:
    source.mig.start_tracking()
    records = source.mig.save_state()
    image = Path(source.ctrl.ns_mgmt.created[2])
    (tmp_path / "elsewhere").mkdir()
    os.rename(image, tmp_path / "elsewhere" / "target.img")
    image.symlink_to(tmp_path / "elsewhere" / "target.img")
    dst = dest(tmp_path, shared=True)
    try:
        refused(dst, records, "created namespace image", tmp_path / "src" / "images")
        assert (tmp_path / "elsewhere" / "target.img").stat().st_size == 2 * MIB
    finally:
        dst.close()


@pytest.mark.parametrize("link", ["configured", "other-created"])
def test_a_created_image_of_its_own(source: Source, tmp_path: Path, link: str) -> None:
    """Shared storage: the created namespace's name is a hard link to a
    configured namespace's image, or to another created one's."""
    drv = source.drv
    other = drv.create_namespace(4096).dw0  # 2 MiB, as the first
    source.mig.start_tracking()
    records = source.mig.save_state()
    image = Path(source.ctrl.ns_mgmt.created[2])
    image.unlink()
    target = tmp_path / "dst" / "ns1.img" if link == "configured" else Path(
        source.ctrl.ns_mgmt.created[other])
    dst = dest(tmp_path, shared=True)  # (makes dst/ns1.img)
    try:
        if link == "configured":
            os.truncate(target, 2 * MIB)  # big enough to be opened
        os.link(target, image)
        refused(dst, records, "would share one image", tmp_path / "src" / "images")
    finally:
        dst.close()


def test_state_and_announcement_must_agree(source: Source, tmp_path: Path) -> None:
    records = full_stream(source)
    i, _ = entries_of(records, DeviceKind.NVME_NAMESPACES)
    dst = dest(tmp_path)
    try:  # a full stream's state without its announcement: FLAG_COPIED says data came
        bare = [r for j, r in enumerate(records) if j != i and r.type != RecordType.NAMESPACE_BLOCKS]
        refused(dst, bare, "disagree", tmp_path / "dst" / "images")
        refused(dst, edited(records, inventory_of(source.ctrl),
                            created(lambda a: replace(a, owned=False))),
                "differ from those announced", tmp_path / "dst" / "images")
    finally:
        dst.close()


def test_blocks_for_a_namespace_the_state_deletes(source: Source, tmp_path: Path) -> None:
    """Blocks for NSID 2 before the announcement land on the destination's
    configured namespace 2, which the state deletes (NSID 2 is the created one)."""
    records = [namespace_blocks(2, 0, bytes(4096)), *full_stream(source)]
    dst = dest(tmp_path)
    try:
        refused(dst, records, "blocks for a namespace the state deletes",
                tmp_path / "dst" / "images")
        assert (tmp_path / "dst" / "ns2.img").read_bytes() == bytes(1 * MIB)
    finally:
        dst.close()


def test_a_changed_destination_refuses(source: Source, tmp_path: Path) -> None:
    source.mig.start_tracking()
    records = source.mig.save_state()
    dst = dest(tmp_path, shared=True)
    drv = controller_driver(dst).ready(io_queues=1)
    assert status(drv.delete_namespace(1))[0] == 0
    try:
        with pytest.raises(LocalProtocolError, match="already differ"):
            NvmeMigratable(dst).load_records(records)
    finally:
        dst.close()


@pytest.mark.parametrize("raw", [b"", b"a/b", b"..", b".", b".x", b"a\0b", b"\xff", b"a b"])
def test_image_names_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a plain file name"):
        image_name(raw)
    assert image_name(b"nvme-ns2-0123abcd.img\0\0") == "nvme-ns2-0123abcd.img"


# ------------------------------------------------------------------ a created namespace's format
PI_FORMAT = format_index(4096, 8)  # 4 KiB blocks, 8 bytes of metadata: PI type 1, tuple first
GENERATE = PRACT << PRINFO_SHIFT
CHECK = (PRCHK_GUARD | PRCHK_APP | PRCHK_REF) << PRINFO_SHIFT | GENERATE


def formatted_source(src: Source) -> bytes:
    """The created namespace formatted to PI_FORMAT (PI type 1, metadata
    separate) and written with PI tuples the controller made; returns the data."""
    fmt = Command(opcode=AdminOpcode.FORMAT_NVM, nsid=src.nsid, cdw10=PI_FORMAT | 1 << 5 | 1 << 8)
    assert status(src.drv.command(0, fmt))[0] == 0
    src.drv.identify_namespace(src.nsid)
    data = os.urandom(4 * 4096)
    done, _ = src.drv.io(IoOpcode.WRITE, 10, 4, nsid=src.nsid, data=data, cdw12=GENERATE,
                         cdw14=10)
    assert status(done)[0] == 0
    return data


def check_format(src: Source, dst: NvmeController, data: bytes) -> None:
    """The destination's created namespace has the source's LBA format and its
    PI tuples: a read with every check passes."""
    ns, old = dst.namespaces[src.nsid], src.ctrl.namespaces[src.nsid]
    assert (ns.block_size, ns.metadata, ns.protection, ns.extended, ns.format_index) == (
        old.block_size, old.metadata, old.protection, old.extended, old.format_index)
    assert ns.md is not None and ns.md.read(10, 4) == old.md.read(10, 4) != b"\xff" * 32
    dst.reset_device()  # a new host on the destination
    drv = controller_driver(dst).ready(io_queues=1)
    drv.identify_namespace(src.nsid)
    done, out = drv.io(IoOpcode.READ, 10, 4, nsid=src.nsid, cdw12=CHECK, cdw14=10)
    assert status(done)[0] == 0 and out == data


def test_a_formatted_created_namespace_full_copy(source: Source, tmp_path: Path) -> None:
    data = formatted_source(source)
    mig = source.mig
    mig.start_tracking()
    records = []
    while batch := mig.precopy_records(1 * MIB):
        records += batch
    mig.migration_stop()
    records += mig.save_state()
    assert RecordType.NAMESPACE_METADATA in {r.type for r in records}
    dst = dest(tmp_path)
    try:
        mig = NvmeMigratable(dst)
        mig.load_records(records)
        mig.commit_restore()
        check_format(source, dst, data)
    finally:
        dst.close()


def test_a_formatted_created_namespace_shared_storage(source: Source, tmp_path: Path) -> None:
    data = formatted_source(source)
    source.mig.start_tracking()
    source.mig.migration_stop()
    records = source.mig.save_state()
    dst = dest(tmp_path, shared=True)
    try:
        mig = NvmeMigratable(dst)
        mig.load_records(records)
        mig.commit_restore()
        check_format(source, dst, data)
    finally:
        dst.close()


def test_a_side_file_is_never_taken_over(source: Source, tmp_path: Path) -> None:
    """Full copy: a file (or symlink) at the created image's side file name is
    refused, left as it was, and the image the restore made is removed."""
    formatted_source(source)
    source.mig.start_tracking()
    records = []
    while batch := source.mig.precopy_records(1 * MIB):
        records += batch
    source.mig.migration_stop()
    records += source.mig.save_state()
    dst = dest(tmp_path)
    name = os.path.basename(source.ctrl.ns_mgmt.created[2])
    elsewhere = tmp_path / "elsewhere.md"
    elsewhere.write_bytes(b"not ours")
    (tmp_path / "dst" / "images" / f"{name}.md").symlink_to(elsewhere)
    try:
        refused(dst, records, "File exists", tmp_path / "dst" / "images")
        assert elsewhere.read_bytes() == b"not ours"
    finally:
        dst.close()


def test_a_shared_side_file_symlink_is_not_followed(source: Source, tmp_path: Path) -> None:
    formatted_source(source)
    source.mig.start_tracking()
    source.mig.migration_stop()
    records = source.mig.save_state()
    side = Path(source.ctrl.ns_mgmt.created[2] + ".md")
    os.rename(side, tmp_path / "elsewhere.md")
    side.symlink_to(tmp_path / "elsewhere.md")
    dst = dest(tmp_path, shared=True)
    try:
        refused(dst, records, "created namespace image", tmp_path / "src" / "images")
    finally:
        dst.close()


@pytest.mark.parametrize("name", ["ns1.img.md", "notes.dat", "nvme-ns2-0123abcd.img.md",
                                  "nvme-ns2-0123abcd.img~", "nvme-ns2-xyz.img"])
def test_only_a_created_image_name_is_opened(source: Source, tmp_path: Path, name: str) -> None:
    """Shared storage: the state names a file of image_dir that is no created
    image (a configured namespace's side file, anything else there), owned:
    refused before it is opened, so the host can neither write it through
    the namespace nor have a delete remove it."""
    source.mig.start_tracking()
    saved = inventory_of(source.ctrl)
    records = edited(source.mig.save_state(), saved,
                     created(lambda a: replace(a, image=name, owned=True)))
    theirs = tmp_path / "src" / "images" / name
    theirs.write_bytes(b"not ours".ljust(2 * MIB, b"\0"))
    dst = dest(tmp_path, shared=True)
    try:
        refused(dst, records, "namespace inventory", tmp_path / "src" / "images")
        assert theirs.read_bytes()[:8] == b"not ours"
    finally:
        dst.close()


def test_metadata_for_a_created_namespace_without_any(source: Source, tmp_path: Path) -> None:
    """The created NSID 2 has no metadata; the configured namespace 2 it
    replaces has some here: a NAMESPACE_METADATA record for NSID 2 is refused
    with EINVAL (checked against the created namespace, not the configured one)."""
    records = full_stream(source)
    dst = dest(tmp_path)
    dst.namespaces[2].reformat(1, 0, True, False)  # configured 2: 512 + 8 bytes
    at = max(i for i, r in enumerate(records) if r.type == RecordType.NAMESPACE_BLOCKS)
    hostile = namespace_metadata(2, 100, 1, bytes(8))
    try:
        refused(dst, [*records[:at + 1], hostile, *records[at + 1:]], "without metadata",
                tmp_path / "dst" / "images")
    finally:
        dst.close()


def test_a_created_namespace_in_a_deleted_ones_nsid_keeps_the_fingerprint(
        tmp_path: Path) -> None:
    """Configured 2 deleted and a namespace created (it gets NSID 2, the lowest
    free one): the session's fingerprint is still the configuration's, the one a
    destination started from it has."""
    ctrl = make(tmp_path / "src", tmp_path / "src" / "images")
    mig = NvmeMigratable(ctrl)  # as at start-up
    dst = dest(tmp_path)
    drv = controller_driver(ctrl).ready(io_queues=1)
    try:
        assert status(drv.delete_namespace(2))[0] == 0
        assert drv.create_namespace(4096).dw0 == 2  # 2 MiB where configured 2 had 1 MiB
        assert mig.migration_fingerprint() == NvmeMigratable(dst).migration_fingerprint()
    finally:
        dst.close()
        ctrl.close()


def test_an_announcement_longer_than_nn_is_refused_unread(source: Source,
                                                          tmp_path: Path) -> None:
    """More entries than NN (4 here) can never fit: refused by its length, before
    any entry is decoded (a 16 MiB record would be some 190000 of them)."""
    records = full_stream(source)
    i, blob = entries_of(records, DeviceKind.NVME_NAMESPACES)
    long = [*records[:i], device_state(DeviceKind.NVME_NAMESPACES, blob * 5), *records[i + 1:]]
    dst = dest(tmp_path)
    try:
        refused(dst, long, "5 entries, NN is 4", tmp_path / "dst" / "images")
    finally:
        dst.close()
