"""Namespaces created, deleted and detached at run time move with the device,
between real processes with the Python driver: a full-copy migration (pre-copy
rounds with verified writes in between), a shared-storage migration and a live
handoff (same files, and separate ones) each leave the destination with the
source's inventory (the created namespace attached with its data, configured 1
detached, configured 2 deleted), and it owns the created image.  Hostile
inventories in a real stream are refused with EINVAL, the destination's files
untouched and the source serving on."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from handoff_mitm import Resigner
from test_handoff_faults import Fault as HandoffFault
from test_handoff_faults import Rig, attempt, edit, finish_with_real_handoff
from test_migration_faults import RecordForwarder

from appliance.client import migrate as orch
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.storage.formats import format_index
from appliance.storage.ns_inventory import FLAG_CREATED, FLAG_OWNED, NamespaceEntry
from appliance.storage.nsmgmt import CNS_NS_CONTROLLER_LIST
from appliance.storage.protection import PRACT, PRCHK_APP, PRCHK_GUARD, PRCHK_REF, PRINFO_SHIFT
from appliance.storage.spec import AdminOpcode, Command, IoOpcode
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.workload import VerifiedWriter, move_driver, prepare_destination
from appliance.vfio_user.migration_states import MigState
from appliance.vfio_user.migration_stream import (
    DeviceKind,
    RecordHead,
    RecordType,
    device_state,
    parse_device_state,
)
from appliance.vfio_user.migration_stream import Record as StreamRecord

CREATED_BLOCKS = 16384  # 8 MiB


def configs(tmp: Path, shared: bool, size: str = "8M") -> list[dict[str, object]]:
    """Two configured namespaces of ``size``, Namespace Management (64 MiB, NN 4),
    images removed on delete; ``shared``: the same data_dir (images) for both."""
    out = []
    for name in ("src", "dst"):
        data = tmp / ("src" if shared else name) / "data"
        out.append(make_config(tmp / name, data_dir=str(data), storage={
            "capacity": "64M", "max_namespaces": 4, "namespace_images": "remove",
            "namespaces": [{"image": str(data / "disk0.img"), "size": size},
                           {"image": str(data / "disk1.img"), "size": size}]}))
    return out


@dataclass
class Setup:
    src: ApplianceProcess
    dst: ApplianceProcess
    driver: NvmeDriver
    writer: VerifiedWriter
    nsid: int
    name: str  # the created image's file name

    def data_dir(self, p: ApplianceProcess) -> Path:
        return Path(p.config.data_dir)


def start(tmp: Path, shared: bool, reuse: bool = False) -> Setup:
    """Both processes; on the source a created, attached namespace with verified
    data, configured 2 deleted and configured 1 detached; ``reuse``: 2 deleted
    first, so the created namespace gets NSID 2 (else 3), the configured ones 4 MiB
    (the created one has 8 MiB either way)."""
    src_cfg, dst_cfg = configs(tmp, shared, size="4M" if reuse else "8M")
    src = ApplianceProcess(src_cfg, tmp / "src" / "proc").start()
    dst = ApplianceProcess(dst_cfg, tmp / "dst" / "proc").start()
    driver = NvmeDriver(VfioUserClient.connect(src.config.storage.socket), mem_size=16 << 20)
    driver.setup(io_queues=1, depth=32)
    if reuse:
        assert driver.delete_namespace(2).status == 0
    done = driver.create_namespace(CREATED_BLOCKS)
    assert done.status == 0 and done.dw0 == (2 if reuse else 3)
    nsid = done.dw0
    assert driver.attach_namespace(nsid).status == 0
    driver.identify_namespace(nsid)
    if not reuse:
        assert driver.delete_namespace(2).status == 0
    assert driver.attach_namespace(1, detach=True).status == 0
    writer = VerifiedWriter(driver, nsid=nsid, blocks=8, seed=3)
    writer.step(30)
    (name,) = [n for n in os.listdir(src.config.data_dir) if n.startswith("nvme-ns")]
    return Setup(src, dst, driver, writer, nsid, name)


@pytest.fixture
def setups() -> Iterator[list[Setup]]:
    made: list[Setup] = []
    yield made
    for s in made:
        s.driver.c.close()
        for p in (s.src, s.dst):
            p.stop()
        for p in (s.src, s.dst):
            assert "Traceback" not in p.log_text(), p.log_text()


def check_destination(s: Setup, image_dir: Path) -> None:
    """The driver, now on the destination: the source's inventory, its data, and
    the destination owns the created image (delete removes it)."""
    d = s.driver
    assert d.active_namespaces() == [s.nsid]
    assert d.allocated_namespaces() == [1, s.nsid]
    assert d.controller_list(CNS_NS_CONTROLLER_LIST, 1) == []  # configured 1: detached
    assert d.identify_namespace(s.nsid).nsze == CREATED_BLOCKS
    assert s.writer.verify_all() == len(s.writer.written)
    s.writer.step(20)
    assert (image_dir / s.name).is_file()
    assert d.delete_namespace(s.nsid).status == 0
    assert not (image_dir / s.name).exists()  # owned: namespace_images: remove
    assert (image_dir / "disk1.img").exists()  # a configured image is never removed


def test_full_copy_migration(tmp_path: Path, setups: list[Setup]) -> None:
    s = start(tmp_path, shared=False)
    setups.append(s)
    s.writer.step(500)  # ~2 MiB of data, so that pre-copy takes many reads
    dst = VfioUserClient.connect(s.dst.config.storage.socket)
    prepare_destination(s.driver, dst)  # same memory and eventfds, before RESUMING
    steps: list[int] = []

    def load() -> None:  # between MIG_DATA_READs, while the source runs
        s.writer.step(2)
        steps.append(s.writer.ios)

    summary = orch.migrate(s.driver.c, dst, converge_bytes=0, max_rounds=4,
                           chunk=256 << 10, between_reads=load)
    assert steps and summary.rounds >= 1
    assert orch.get_state(dst) is MigState.RUNNING
    move_driver(s.driver, dst).close()
    check_destination(s, s.data_dir(s.dst))
    assert (s.data_dir(s.src) / s.name).is_file()  # the source's own copy stays


def test_shared_storage_migration(tmp_path: Path, setups: list[Setup]) -> None:
    s = start(tmp_path, shared=True)
    setups.append(s)
    dst = VfioUserClient.connect(s.dst.config.storage.socket)
    prepare_destination(s.driver, dst)
    orch.migrate(s.driver.c, dst, converge_bytes=0, shared_storage=True)
    move_driver(s.driver, dst).close()
    check_destination(s, s.data_dir(s.src))


def test_a_created_namespace_in_a_deleted_nsid_migrates(tmp_path: Path,
                                                        setups: list[Setup]) -> None:
    """Configured 2 deleted, then the created namespace gets NSID 2: the session's
    fingerprint is still the configuration's, so the destination takes the stream."""
    s = start(tmp_path, shared=True, reuse=True)
    setups.append(s)
    dst = VfioUserClient.connect(s.dst.config.storage.socket)
    prepare_destination(s.driver, dst)
    orch.migrate(s.driver.c, dst, converge_bytes=0, shared_storage=True)
    move_driver(s.driver, dst).close()
    check_destination(s, s.data_dir(s.src))


@pytest.mark.parametrize("shared", [True, False], ids=["same-files", "separate-files"])
def test_live_handoff(tmp_path: Path, setups: list[Setup], shared: bool) -> None:
    s = start(tmp_path, shared=shared)
    setups.append(s)
    done = subprocess.run([sys.executable, "-m", "appliance", "handoff", "--from",
                           s.src.config.control.socket, "--to", s.dst.config.control.socket],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("shared-storage" if shared else "full") in done.stdout
    assert s.src.proc is not None and s.src.proc.wait(timeout=30) == 0
    check_destination(s, s.data_dir(s.dst))  # the same client socket, served by dst


def test_a_namespace_created_during_the_migration_fails_it(tmp_path: Path,
                                                          setups: list[Setup]) -> None:
    s = start(tmp_path, shared=False)
    setups.append(s)
    s.writer.step(300)  # so that pre-copy takes several reads
    made: list[int] = []
    seen: list[str] = []  # what the destination had made when the namespace was created

    def load() -> None:  # between MIG_DATA_READs, while the source runs
        seen.append(",".join(n for n in os.listdir(s.data_dir(s.dst)) if n == s.name))
        if len(seen) == 3:
            made.append(s.driver.create_namespace(16).dw0)

    dst = VfioUserClient.connect(s.dst.config.storage.socket)
    try:
        with pytest.raises(orch.MigrationFailed) as err:
            orch.migrate(s.driver.c, dst, converge_bytes=0, max_rounds=4, chunk=256 << 10,
                         between_reads=load)
        assert made and "Device or resource busy" in str(err.value), err.value
        assert seen[2] == s.name, seen  # the destination had made its image by then
        assert orch.get_state(dst) is MigState.RUNNING
    finally:
        dst.close()
    # The destination removed the image it had made for the announced namespace.
    assert sorted(os.listdir(s.data_dir(s.dst))) == ["disk0.img", "disk1.img"]
    assert orch.get_state(s.driver.c) is MigState.RUNNING
    assert s.writer.verify_all() == len(s.writer.written)
    assert s.driver.delete_namespace(made[0]).status == 0


# ------------------------------------------------------------------ a formatted created namespace
PI_FORMAT = format_index(4096, 8)  # 4 KiB blocks with 8 bytes of metadata
GENERATE = PRACT << PRINFO_SHIFT
CHECK = (PRCHK_GUARD | PRCHK_APP | PRCHK_REF) << PRINFO_SHIFT | GENERATE


def format_created(s: Setup) -> bytes:
    """The created namespace formatted to PI_FORMAT with PI type 1 (tuple first),
    written with tuples the controller makes; returns the data."""
    d = s.driver
    fmt = Command(opcode=AdminOpcode.FORMAT_NVM, nsid=s.nsid, cdw10=PI_FORMAT | 1 << 5 | 1 << 8)
    assert d.admin(fmt).status == 0
    d.identify_namespace(s.nsid)
    data = os.urandom(16 * 4096)
    done, _ = d.io(IoOpcode.WRITE, 64, 16, nsid=s.nsid, data=data, cdw12=GENERATE, cdw14=64)
    assert done.status == 0
    return data


def check_formatted(s: Setup, data: bytes) -> None:
    """The driver, now on the destination: the created namespace's LBA format
    and protection as formatted, and every PI check of a read passes."""
    ns = s.driver.identify_namespace(s.nsid)
    assert (ns.flbas & 0xF, ns.dps) == (PI_FORMAT, 1 | 8)
    done, out = s.driver.io(IoOpcode.READ, 64, 16, nsid=s.nsid, cdw12=CHECK, cdw14=64)
    assert done.status == 0 and out == data


def test_a_formatted_created_namespace_migrates(tmp_path: Path, setups: list[Setup]) -> None:
    s = start(tmp_path, shared=False)
    setups.append(s)
    data = format_created(s)
    dst = VfioUserClient.connect(s.dst.config.storage.socket)
    prepare_destination(s.driver, dst)
    orch.migrate(s.driver.c, dst, converge_bytes=0, max_rounds=2, chunk=256 << 10)
    move_driver(s.driver, dst).close()
    check_formatted(s, data)
    assert (s.data_dir(s.dst) / f"{s.name}.md").is_file()


def test_a_formatted_created_namespace_hands_off(tmp_path: Path, setups: list[Setup]) -> None:
    s = start(tmp_path, shared=True)  # the same files
    setups.append(s)
    data = format_created(s)
    done = subprocess.run([sys.executable, "-m", "appliance", "handoff", "--from",
                           s.src.config.control.socket, "--to", s.dst.config.control.socket],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert s.src.proc is not None and s.src.proc.wait(timeout=30) == 0
    check_formatted(s, data)


# ------------------------------------------------------------------ hostile streams
def retyped(raw: bytes, change: Callable[[bytes], bytes]) -> bytes:
    """A DEVICE_STATE record (head and payload) with its blob changed."""
    kind, version, blob = parse_device_state(StreamRecord(RecordType.DEVICE_STATE,
                                                          raw[RecordHead.SIZE:]))
    new = device_state(kind, change(blob), version)
    head = RecordHead(type=RecordType.DEVICE_STATE, length=len(new.payload))
    return head.pack() + new.payload


def forwarder(kind: DeviceKind, change: Callable[[bytes], bytes]) -> RecordForwarder:
    """Change the blob of the DEVICE_STATE record of ``kind``; re-sign everything."""
    resign = Resigner()

    def transform(index: int, rtype: RecordType, raw: bytes) -> list[bytes]:
        if rtype is RecordType.DEVICE_STATE and parse_device_state(
                StreamRecord(rtype, raw[RecordHead.SIZE:]))[0] == kind:
            fwd.applied = True
            raw = retyped(raw, change)
        return [resign(raw)]

    fwd = RecordForwarder(transform)
    return fwd


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = start(tmp_path_factory.mktemp("nsmig-hostile"), shared=False)
    yield s
    s.driver.close()
    s.driver.c.close()
    for p in (s.src, s.dst):
        p.stop()
    for p in (s.src, s.dst):
        assert "Traceback" not in p.log_text(), p.log_text()


def entry(s: Setup, **values: object) -> bytes:
    fields: dict[str, object] = {"nsid": s.nsid, "flags": FLAG_CREATED | FLAG_OWNED,
                                 "size": CREATED_BLOCKS * 512, "block_size": 512,
                                 "name": s.name.encode()}
    return NamespaceEntry(**{**fields, **values}).pack()  # type: ignore[arg-type]


CASES: dict[str, tuple[DeviceKind, dict[str, object], str]] = {
    "state-nsid-0": (DeviceKind.NVME_CONTROLLER, {"nsid": 0}, "NSIDs must ascend"),
    "state-nsid-over-nn": (DeviceKind.NVME_CONTROLLER, {"nsid": 5}, "NSIDs must ascend"),
    "state-nsid-twice": (DeviceKind.NVME_CONTROLLER, {"nsid": 1}, "NSIDs must ascend"),
    "state-over-capacity": (DeviceKind.NVME_CONTROLLER, {"size": 64 << 20}, "capacity"),
    "announced-slash": (DeviceKind.NVME_NAMESPACES, {"name": b"../../x.img"},
                        "not a plain file name"),
    "announced-dot-dot": (DeviceKind.NVME_NAMESPACES, {"name": b".."}, "not a plain file name"),
    "announced-nsid-over-nn": (DeviceKind.NVME_NAMESPACES, {"nsid": 9}, "NSIDs must ascend"),
}


def refused_and_rolled_back(s: Setup, fwd: RecordForwarder, why: str) -> None:
    before = sorted(os.listdir(s.data_dir(s.dst)))
    dst = VfioUserClient.connect(s.dst.config.storage.socket)
    try:
        with pytest.raises(orch.MigrationFailed) as err:
            orch.migrate(s.driver.c, dst, converge_bytes=0, max_rounds=2, forward=fwd)
        assert fwd.applied
        assert "Invalid argument" in str(err.value), err.value
        assert why in s.dst.log_text()
        assert orch.get_state(dst) is MigState.RUNNING
    finally:
        dst.close()
    assert sorted(os.listdir(s.data_dir(s.dst))) == before  # nothing made stays
    assert orch.get_state(s.driver.c) is MigState.RUNNING  # the source serves on
    assert s.writer.verify_all() == len(s.writer.written)
    s.writer.step(4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_inventory_is_refused(hostile: Setup, case: str) -> None:
    kind, values, why = CASES[case]
    good = entry(hostile)
    bad = entry(hostile, **values)

    def change(blob: bytes) -> bytes:
        assert blob.count(good) == 1
        return blob.replace(good, bad)

    refused_and_rolled_back(hostile, forwarder(kind, change), why)


def test_an_existing_file_is_never_taken_over(hostile: Setup) -> None:
    theirs = hostile.data_dir(hostile.dst) / hostile.name
    theirs.write_bytes(b"not ours")
    try:
        refused_and_rolled_back(hostile, forwarder(DeviceKind.NVME_NAMESPACES, bytes),
                                "File exists")
        assert theirs.read_bytes() == b"not ours"
    finally:
        theirs.unlink()


HANDOFF_CASES: list[tuple[dict[str, object], str]] = [
    ({"nsid": 0}, "NSIDs must ascend"),
    ({"nsid": 5}, "NSIDs must ascend"),  # over NN
    ({"nsid": 2}, "NSIDs must ascend"),  # configured 2's NSID: twice
    ({"size": 64 << 20}, "capacity"),
    ({"name": b"../data/disk0.img"}, "not a plain file name"),
    ({"name": b".."}, "not a plain file name"),
    ({"name": b"nvme-ns3-0000beef.img"}, "No such file"),
    ({"name": b"disk0.img.md"}, "not a created namespace's image name"),  # no image of ours
]


def test_a_hostile_inventory_refuses_the_handoff(tmp_path: Path) -> None:
    """Through the handoff proxy (re-signed stream), the controller state's entry
    of the created namespace broken each way: the destination refuses before
    adopting anything, the source serves on; then the real handoff moves the
    inventory."""
    rig = Rig(tmp_path, shared=True)
    rig.src_cfg, rig.dst_cfg = configs(tmp_path, shared=True, size="16M")  # the rig's image
    try:
        rig.ready()
        assert rig.driver is not None
        nsid = rig.driver.create_namespace(CREATED_BLOCKS).dw0
        assert rig.driver.attach_namespace(nsid).status == 0
        names = [n for n in os.listdir(tmp_path / "src" / "data") if n.startswith("nvme-ns")]
        good = NamespaceEntry(nsid=nsid, flags=FLAG_CREATED | FLAG_OWNED,
                              size=CREATED_BLOCKS * 512, block_size=512,
                              name=names[0].encode()).pack()
        for values, why in HANDOFF_CASES:
            bad = NamespaceEntry.unpack(good).replace(**values).pack()

            def change(payload: bytes, bad: bytes = bad) -> bytes:
                assert payload.count(good) == 1
                return payload.replace(good, bad)

            attempt(rig, HandoffFault(edit(RecordType.DEVICE_STATE, change), resign=True,
                                      cli=why, log=why))
        finish_with_real_handoff(rig)
        assert rig.driver.allocated_namespaces() == [1, 2, nsid]
        assert rig.driver.active_namespaces() == [1, 2, nsid]
        # Owned there despite the refused attempts (each gave the source its images back).
        assert rig.driver.delete_namespace(nsid).status == 0
        assert not (tmp_path / "src" / "data" / names[0]).exists()
    finally:
        rig.close()
