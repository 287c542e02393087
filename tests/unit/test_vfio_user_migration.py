"""VfioUserMigration driven in-process with a fake Migratable; PCI state; the orchestrator.

The fake device (:class:`Disk`) is a real PciDevice with a "disk" of blocks
behind a :class:`~appliance.pci.migration.PciMigratable`: it records every
call the handler makes and can be told to fail one.  The orchestrator tests
serve real ServerConnections over socketpairs in threads.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from test_nvme_driver import make_controller, status

from appliance.client import migrate as orch
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import DEFAULT_CAPS, VfioUserClient
from appliance.errors import LocalProtocolError
from appliance.memory import ClientMemory, DirtyLog
from appliance.pci import Bar, MsixLayout, PciDevice
from appliance.pci.config import STATUS, PciStatus
from appliance.pci.migration import PciMigratable, apply_pci_state, pci_state_records
from appliance.protocol_common import Reject
from appliance.runtime.vfio_user import recv_chunk, send_message
from appliance.storage import NvmeController
from appliance.storage.migration import (
    CtrlStateHead,
    NvmeMigratable,
    SqState,
    decode_controller,
    encode_controller,
)
from appliance.storage.spec import AdminOpcode, Command, FeatureId, IoOpcode
from appliance.testing.nvme import controller_driver
from appliance.vfio_user import migration as m
from appliance.vfio_user import migration_stream as s
from appliance.vfio_user import wire as w
from appliance.vfio_user.dma_logging import report_bitmap
from appliance.vfio_user.framing import encode
from appliance.vfio_user.migration import Feature, VfioUserMigration
from appliance.vfio_user.migration_states import MigState, allow_list_markdown
from appliance.vfio_user.migration_stream import Record, RecordType, StreamReader
from appliance.vfio_user.server import MAX_DATA_XFER_SIZE, ServerConnection
from appliance.vfio_user.wire import PciIrq, PciRegion

BLOCK = 4096
GET, SET, PROBE = w.FEATURE_GET, w.FEATURE_SET, w.FEATURE_PROBE
C = w.Command


# ------------------------------------------------------------ the fake device
class Card(PciDevice):
    """A small PCI function; ``device_id`` changes its configuration fingerprint."""

    def __init__(self, device_id: int = 0x0001, vectors: int = 4) -> None:
        self.migration: Disk | None = None
        super().__init__(vendor_id=0xA9A9, device_id=device_id, subsystem_vendor_id=0xA9A9,
                         subsystem_id=1, revision=0, class_code=0x010802,
                         bars=[Bar(0, 0x4000, is_64bit=True)], msix=MsixLayout(vectors=vectors))

    def migration_handler(self, memory: ClientMemory) -> VfioUserMigration:
        assert self.migration is not None
        return VfioUserMigration(self.migration, memory)


class Disk(PciMigratable):
    """Migratable with bulk data: ``blocks`` blocks of 4 KiB, dirty tracking, a state blob."""

    def __init__(self, dev: Card | None = None, blocks: int = 16, fill: int = 0,
                 extra: bytes = b"disk") -> None:
        dev = dev or Card()
        super().__init__(dev, extra_fingerprint=extra + blocks.to_bytes(4, "little"))
        dev.migration = self
        self.data = bytearray(bytes([fill]) * (blocks * BLOCK))
        self.dirty: set[int] = set()
        self.blob = b"controller-state-%d" % fill
        self.calls: list[str] = []
        self.fail: dict[str, BaseException] = {}
        self.staged_blocks: dict[int, bytes] = {}
        self.staged_blob: bytes | None = None

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail.pop(name)

    def guest_write(self, block: int, byte: int) -> None:
        self.data[block * BLOCK:(block + 1) * BLOCK] = bytes([byte]) * BLOCK
        if self.tracking:
            self.dirty.add(block)

    # Migratable
    def migration_stop(self) -> None:
        self._call("migration_stop")
        super().migration_stop()

    def migration_run(self) -> None:
        self._call("migration_run")
        super().migration_run()

    def start_tracking(self) -> None:
        self._call("start_tracking")
        super().start_tracking()
        self.dirty = set(range(len(self.data) // BLOCK))

    def stop_tracking(self) -> None:
        self._call("stop_tracking")
        super().stop_tracking()
        self.dirty.clear()

    def precopy_pending(self) -> int:
        return len(self.dirty) * BLOCK

    def precopy_records(self, max_bytes: int) -> list[Record]:
        self._call("precopy_records")
        out: list[Record] = []
        for block in sorted(self.dirty):
            if out and (len(out) + 1) * BLOCK > max_bytes:
                break
            out.append(s.namespace_blocks(1, block * BLOCK,
                                          bytes(self.data[block * BLOCK:(block + 1) * BLOCK])))
        for r in out:
            self.dirty.discard(s.parse_namespace_blocks(r)[1] // BLOCK)
        return out

    def save_state(self) -> list[Record]:
        self._call("save_state")
        return [*super().save_state(), s.device_state(s.DeviceKind.NVME_CONTROLLER, self.blob)]

    def stage(self, record: Record) -> None:
        if record.type == RecordType.NAMESPACE_BLOCKS:
            nsid, offset, data = s.parse_namespace_blocks(record)
            if nsid != 1 or offset % BLOCK or offset + len(data) > len(self.data):
                raise LocalProtocolError(f"blocks {nsid}:{offset:#x}", errno.EINVAL)
            self.staged_blocks[offset] = data
        elif record.type == RecordType.DEVICE_STATE:
            self.staged_blob = s.parse_device_state(record)[2]
        else:
            super().stage(record)

    def load_records(self, records: Sequence[Record]) -> None:
        self._call("load_records")
        super().load_records(records)

    def commit_restore(self) -> None:
        self._call("commit_restore")
        if self.staged_blob is None:
            raise LocalProtocolError("no DEVICE_STATE", errno.EINVAL)
        super().commit_restore()
        for offset, data in self.staged_blocks.items():
            self.data[offset:offset + len(data)] = data
        self.blob, self.staged_blob = self.staged_blob, None
        self.staged_blocks = {}

    def abort_restore(self) -> None:
        self._call("abort_restore")
        super().abort_restore()
        self.staged_blocks, self.staged_blob = {}, None


def handler(disk: Disk | None = None, **kw: int) -> VfioUserMigration:
    return VfioUserMigration(disk or Disk(), ClientMemory(), **kw)


# ------------------------------------------------------------ request helpers
def feature(h: VfioUserMigration, flags: int, data: bytes = b"", argsz: int | None = None) -> bytes:
    if argsz is None:
        argsz = 8 + max(len(data), 64)
    return h.handle(C.DEVICE_FEATURE, w.DeviceFeatureHead(argsz=argsz, flags=flags).pack() + data)


def refused(err: int, fn: object, *args: object) -> Reject:
    with pytest.raises(Reject) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.errno == err, info.value
    return info.value


def set_state(h: VfioUserMigration, state: int) -> MigState:
    reply = feature(h, SET | Feature.MIG_DEVICE_STATE, m.MigStateData(device_state=state).pack())
    head = w.DeviceFeatureHead.unpack(reply)
    data = m.MigStateData.unpack(reply, 8)
    assert head.argsz == 16 and data.data_fd == 0xFFFFFFFF
    return MigState(data.device_state)


def get_state(h: VfioUserMigration) -> MigState:
    reply = feature(h, GET | Feature.MIG_DEVICE_STATE)
    return MigState(m.MigStateData.unpack(reply, 8).device_state)


def read(h: VfioUserMigration, size: int, argsz: int | None = None) -> bytes:
    req = w.MigDataHead(argsz=8 + size if argsz is None else argsz, size=size)
    reply = h.handle(C.MIG_DATA_READ, req.pack())
    head = w.MigDataHead.unpack(reply)
    assert head.size == len(reply) - 8 and head.argsz == len(reply)
    return reply[8:]


def write(h: VfioUserMigration, data: bytes) -> None:
    req = w.MigDataHead(argsz=8 + len(data), size=len(data))
    assert h.handle(C.MIG_DATA_WRITE, req.pack() + data) == b""


def drain(h: VfioUserMigration, chunk: int = 1 << 20) -> bytes:
    """Read until a short read."""
    out = []
    while True:
        data = read(h, chunk)
        out.append(data)
        if len(data) < chunk:
            return b"".join(out)


def records_of(data: bytes) -> list[Record]:
    return StreamReader(None).feed(data)


# ------------------------------------------------------------ DEVICE_FEATURE
def test_migration_feature_get_and_probe() -> None:
    h = handler()
    reply = feature(h, GET | Feature.MIGRATION)
    head = w.DeviceFeatureHead.unpack(reply)
    assert head.argsz == 16 and head.flags == GET | Feature.MIGRATION
    assert m.MigrationInfo.unpack(reply, 8).flags == 0x1 | 0x4  # STOP_COPY | PRE_COPY
    for flags in (PROBE | Feature.MIGRATION, PROBE | GET | Feature.MIGRATION,
                  PROBE | GET | SET | Feature.MIG_DEVICE_STATE,
                  PROBE | SET | Feature.DMA_LOGGING_START,
                  PROBE | GET | Feature.DMA_LOGGING_REPORT):
        payload = w.DeviceFeatureHead(argsz=8, flags=flags).pack()
        assert h.handle(C.DEVICE_FEATURE, payload) == payload


@pytest.mark.parametrize(("payload", "err"), [
    (b"\x08\0\0", errno.EINVAL),  # short head
    (w.DeviceFeatureHead(argsz=7, flags=GET | 1).pack(), errno.EINVAL),
    (w.DeviceFeatureHead(argsz=64, flags=GET | 1 | (1 << 19)).pack(), errno.EINVAL),  # reserved
    (w.DeviceFeatureHead(argsz=64, flags=GET | SET | 2).pack(), errno.EINVAL),  # both, no probe
    (w.DeviceFeatureHead(argsz=64, flags=GET | 3).pack(), errno.ENOTTY),  # unknown feature
    (w.DeviceFeatureHead(argsz=64, flags=PROBE | 9).pack(), errno.ENOTTY),
    (w.DeviceFeatureHead(argsz=64, flags=SET | 1).pack(), errno.EINVAL),  # MIGRATION is GET-only
    (w.DeviceFeatureHead(argsz=64, flags=PROBE | SET | 1).pack(), errno.EINVAL),
    (w.DeviceFeatureHead(argsz=64, flags=1).pack(), errno.EINVAL),  # neither GET nor SET
    (w.DeviceFeatureHead(argsz=15, flags=GET | 1).pack(), errno.EINVAL),  # no room for the reply
    (w.DeviceFeatureHead(argsz=64, flags=SET | 2).pack() + b"\x01\0\0\0", errno.EINVAL),  # short
    (w.DeviceFeatureHead(argsz=12, flags=SET | 2).pack() + bytes(8), errno.EINVAL),
    (w.DeviceFeatureHead(argsz=64, flags=GET | 7).pack(), errno.EINVAL),  # STOP is SET-only
])
def test_device_feature_errors(payload: bytes, err: int) -> None:
    h = handler()
    refused(err, h.handle, C.DEVICE_FEATURE, payload)
    assert h.state is MigState.RUNNING


def test_unknown_command_to_the_handler() -> None:
    refused(errno.EINVAL, handler().handle, C.REGION_READ, b"")


# ------------------------------------------------------------ device state
def test_get_state_and_no_op_set() -> None:
    h = handler()
    assert get_state(h) is MigState.RUNNING
    assert set_state(h, MigState.RUNNING) is MigState.RUNNING
    assert h.device.calls == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(("start", "target", "calls"), [
    ([], MigState.STOP, ["migration_stop"]),
    ([], MigState.PRE_COPY, ["start_tracking"]),
    ([], MigState.STOP_COPY, ["migration_stop", "start_tracking"]),
    ([], MigState.RESUMING, ["migration_stop", "abort_restore"]),
    ([MigState.PRE_COPY], MigState.STOP_COPY, ["migration_stop"]),
    ([MigState.PRE_COPY], MigState.STOP, ["stop_tracking", "migration_stop"]),
    ([MigState.PRE_COPY], MigState.RESUMING, ["stop_tracking", "migration_stop", "abort_restore"]),
    ([MigState.STOP_COPY], MigState.RUNNING, ["stop_tracking", "migration_run"]),
    ([MigState.RESUMING], MigState.PRE_COPY, ["abort_restore", "migration_run", "start_tracking"]),
])
def test_one_device_call_per_arc(start: list[MigState], target: MigState, calls: list[str]) -> None:
    disk = Disk()
    h = handler(disk)
    for state in start:
        set_state(h, state)
    disk.calls.clear()
    assert set_state(h, target) is target
    assert disk.calls == calls
    assert h.counters["transitions"] > 0


@pytest.mark.parametrize("target", [MigState.ERROR, MigState.RUNNING_P2P, MigState.PRE_COPY_P2P,
                                    8, 0xFFFFFFFF])
def test_refused_targets_change_nothing(target: int) -> None:
    disk = Disk()
    h = handler(disk)
    refused(errno.EINVAL, set_state, h, target)
    assert h.state is MigState.RUNNING and disk.calls == []


def test_stop_copy_to_pre_copy_refused() -> None:
    h = handler()
    set_state(h, MigState.STOP_COPY)
    refused(errno.EINVAL, set_state, h, MigState.PRE_COPY)
    assert h.state is MigState.STOP_COPY


def test_failed_arc_keeps_the_last_state_reached() -> None:
    disk = Disk()
    h = handler(disk)
    disk.fail["start_tracking"] = LocalProtocolError("cannot track", errno.ENOMEM)
    refused(errno.ENOMEM, set_state, h, MigState.STOP_COPY)  # RUNNING -> STOP ok, -> STOP_COPY not
    assert get_state(h) is MigState.STOP
    assert set_state(h, MigState.RUNNING) is MigState.RUNNING


def test_device_bug_moves_to_error_which_only_reset_leaves() -> None:
    disk = Disk()
    h = handler(disk)
    disk.fail["migration_stop"] = RuntimeError("boom")
    refused(errno.EIO, set_state, h, MigState.STOP)
    assert get_state(h) is MigState.ERROR
    for target in (MigState.RUNNING, MigState.STOP, MigState.ERROR):
        refused(errno.EINVAL, set_state, h, target)
    assert not h.allows(C.REGION_WRITE) and not h.allows(C.REGION_READ)
    assert h.allows(C.DEVICE_RESET) and h.allows(C.DEVICE_FEATURE) and h.allows(C.DMA_UNMAP)
    h.device_reset()
    assert get_state(h) is MigState.RUNNING and h.allows(C.REGION_WRITE)


def test_device_reset_unquiesces_and_drops_sessions() -> None:
    disk = Disk()
    h = handler(disk)
    set_state(h, MigState.STOP_COPY)
    read(h, 100)
    disk.calls.clear()
    h.device_reset()
    assert disk.calls == ["stop_tracking", "migration_run"]
    assert h.state is MigState.RUNNING and not disk.stopped
    set_state(h, MigState.RESUMING)
    write(h, b"partial")
    disk.calls.clear()
    h.device_reset()
    assert disk.calls == ["abort_restore", "migration_run"]


def test_close_stops_logging_and_sessions() -> None:
    h = handler()
    feature(h, SET | Feature.DMA_LOGGING_START, m.DmaLoggingControl().pack())
    set_state(h, MigState.PRE_COPY)
    h.close()
    assert h.memory.dirty_log is None and h.dma_log is None and h.state is MigState.RUNNING


@pytest.mark.parametrize(("state", "allowed", "refused_cmds"), [
    (MigState.RUNNING, set(C), set()),
    (MigState.PRE_COPY, set(C), set()),
    (MigState.STOP, {C.REGION_READ, C.DEVICE_SET_IRQS, C.DMA_MAP},
     {C.REGION_WRITE, C.REGION_WRITE_MULTI}),
    (MigState.STOP_COPY, {C.REGION_READ, C.MIG_DATA_READ, C.DMA_UNMAP},
     {C.REGION_WRITE, C.REGION_WRITE_MULTI, C.DEVICE_SET_IRQS}),
    (MigState.RESUMING, {C.DEVICE_SET_IRQS, C.MIG_DATA_WRITE, C.DEVICE_GET_REGION_INFO},
     {C.REGION_WRITE, C.REGION_WRITE_MULTI, C.REGION_READ}),
])
def test_allow_list_per_state(state: MigState, allowed: set[w.Command],
                              refused_cmds: set[w.Command]) -> None:
    h = handler()
    set_state(h, state)
    for command in allowed:
        assert h.allows(command), command
    for command in refused_cmds:
        assert not h.allows(command), command
    for command in (C.DEVICE_FEATURE, C.DEVICE_RESET, C.MIG_DATA_READ, C.MIG_DATA_WRITE):
        assert h.allows(command)  # wrong-state data commands get EINVAL from the handler


# ------------------------------------------------------------ MIG_DATA_READ / WRITE checks
def test_docs_carry_the_generated_allow_list() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "migration.md").read_text()
    assert allow_list_markdown() in doc


def test_data_read_checks() -> None:
    h = handler()
    refused(errno.EINVAL, read, h, 16)  # RUNNING: not a saving state
    set_state(h, MigState.PRE_COPY)
    refused(errno.EINVAL, h.handle, C.MIG_DATA_READ, b"\0" * 7)
    refused(errno.EINVAL, h.handle, C.MIG_DATA_READ, bytes(12))  # argsz 0
    refused(errno.EINVAL, read, h, (1 << 20) + 1)
    refused(errno.EINVAL, read, h, 100, 107)  # argsz below 8 + size
    assert len(read(h, 100)) == 100
    # Bytes after the head are ignored (libvfio-user reads the head only).
    reply = h.handle(C.MIG_DATA_READ, w.MigDataHead(argsz=8 + 100, size=100).pack() + bytes(16))
    assert w.MigDataHead.unpack(reply).size == len(reply) - 8 == 100


def test_data_write_checks() -> None:
    h = handler()
    refused(errno.EINVAL, write, h, b"x")  # RUNNING
    set_state(h, MigState.STOP_COPY)
    refused(errno.EINVAL, write, h, b"x")  # saving, not resuming
    set_state(h, MigState.RESUMING)
    refused(errno.EINVAL, h.handle, C.MIG_DATA_WRITE, b"\0" * 7)
    size_mismatch = w.MigDataHead(argsz=12, size=4).pack() + b"abc"
    refused(errno.EINVAL, h.handle, C.MIG_DATA_WRITE, size_mismatch)
    small_argsz = w.MigDataHead(argsz=9, size=4).pack() + b"abcd"
    refused(errno.EINVAL, h.handle, C.MIG_DATA_WRITE, small_argsz)
    big = bytes((1 << 20) + 1)
    refused(errno.EINVAL, h.handle, C.MIG_DATA_WRITE,
            w.MigDataHead(argsz=8 + len(big), size=len(big)).pack() + big)
    # Bytes after ``size`` are ignored (libvfio-user writes ``size`` bytes only):
    # the stream sees exactly the first four, a valid start of nothing yet.
    h.handle(C.MIG_DATA_WRITE, w.MigDataHead(argsz=8 + 4, size=4).pack() + b"\0" * 4 + b"tail")
    assert h.counters["bytes_written"] == 4


# ------------------------------------------------------------ the stream end to end
def migrate_in_process(src: VfioUserMigration, dst: VfioUserMigration, chunk: int = 10000,
                       between_rounds: object = None) -> list[int]:
    """Pre-copy until a round starts with nothing dirty; returns the pending counts seen."""
    set_state(dst, MigState.RESUMING)
    set_state(src, MigState.PRE_COPY)
    pendings = []
    for _ in range(10):
        data = drain(src, chunk)
        write(dst, data)
        markers = [s.parse_dirty_round(r) for r in records_of_tail(data)]
        pendings.append(markers[0].pending)
        if callable(between_rounds):
            between_rounds()
        if markers[0].pending == 0:
            break
    set_state(src, MigState.STOP_COPY)
    write(dst, drain(src, chunk))
    set_state(dst, MigState.STOP)
    set_state(dst, MigState.RUNNING)
    set_state(src, MigState.STOP)
    return pendings


def records_of_tail(data: bytes) -> list[Record]:
    """DIRTY_ROUND records of a chunk that starts at a record boundary (no header check)."""
    out, pos = [], 0
    while pos < len(data):
        head = s.RecordHead.unpack(data, pos)
        if head.type == RecordType.DIRTY_ROUND:
            out.append(Record(RecordType.DIRTY_ROUND, data[pos + 24:pos + 24 + head.length]))
        pos += 24 + head.length
    return out


def test_full_migration_with_dirtying_between_rounds() -> None:
    src_disk, dst_disk = Disk(fill=1), Disk(fill=9)
    src, dst = handler(src_disk), handler(dst_disk)
    writes = iter([(3, 0x33), (5, 0x55), None])

    def guest() -> None:
        if (nxt := next(writes, None)) is not None:
            src_disk.guest_write(*nxt)

    pendings = migrate_in_process(src, dst, between_rounds=guest)
    assert pendings[0] == 16 * BLOCK and pendings[1:3] == [BLOCK, BLOCK] and pendings[-1] == 0
    assert dst_disk.data == src_disk.data and dst_disk.blob == src_disk.blob
    assert bytes(dst_disk.dev.config.data) == bytes(src_disk.dev.config.data)
    assert dst.state is MigState.RUNNING and src.state is MigState.STOP
    assert dst_disk.calls[-2:] == ["commit_restore", "migration_run"]


def test_pre_copy_rounds_end_with_a_short_read() -> None:
    disk = Disk(blocks=4)
    h = handler(disk)
    set_state(h, MigState.PRE_COPY)
    first = read(h, 200)  # HEADER, marker of round 0, then block data
    assert len(first) == 200
    rest = drain(h, 1 << 16)
    assert len(rest) < 1 << 16
    round0 = records_of(first + rest)
    assert [r.type for r in round0][:2] == [RecordType.HEADER, RecordType.DIRTY_ROUND]
    assert sum(r.type == RecordType.NAMESPACE_BLOCKS for r in round0) == 4
    # The next read opens round 1: its marker, alone when asked for just that.
    marker = read(h, s.ROUND_MARKER_SIZE)
    assert s.parse_dirty_round(records_of_tail(marker)[0]).round == 1
    assert read(h, 100) == b""  # nothing dirty: the round ends at once
    disk.guest_write(2, 7)
    data = drain(h)
    kinds = [r.type for r in records_of_tail(data)]
    assert kinds == [RecordType.DIRTY_ROUND] and data.count(bytes([7]) * BLOCK) == 1


def test_round_budget_bounds_a_round_under_constant_dirtying() -> None:
    disk = Disk(blocks=4)
    h = handler(disk)
    set_state(h, MigState.PRE_COPY)
    drain(h)
    reads = 0
    disk.guest_write(0, 1)
    while True:  # the guest re-dirties a block after every read: the round still ends
        data = read(h, BLOCK + 100)
        reads += 1
        disk.guest_write(reads % 4, reads)
        if len(data) < BLOCK + 100:
            break
        assert reads < 10


def test_stop_copy_short_read_ends_the_stream() -> None:
    h = handler()
    set_state(h, MigState.STOP_COPY)
    data = drain(h, 3000)
    records = records_of(data)
    kinds = [r.type for r in records]
    assert kinds[0] == RecordType.HEADER and kinds[-1] == RecordType.END
    assert kinds.count(RecordType.NAMESPACE_BLOCKS) == 16
    assert {RecordType.PCI_CONFIG, RecordType.MSIX, RecordType.DEVICE_STATE} <= set(kinds)
    assert s.parse_dirty_round(records[1]).flags == s.DirtyRoundFlag.FINAL
    assert read(h, 100) == b""


def test_device_failure_while_saving_poisons_the_session() -> None:
    disk = Disk()
    h = handler(disk)
    set_state(h, MigState.PRE_COPY)
    disk.fail["precopy_records"] = RuntimeError("read error")
    refused(errno.EIO, read, h, 1 << 16)
    refused(errno.EIO, read, h, 1 << 16)  # data may be lost: no more reads
    set_state(h, MigState.RUNNING)
    set_state(h, MigState.PRE_COPY)  # a new session starts clean
    assert len(drain(h)) > 16 * BLOCK


def test_staging_failure_is_eio_and_sticky() -> None:
    data = stream_from(Disk(fill=1))
    dst_disk = Disk(fill=9)
    dst = handler(dst_disk)
    set_state(dst, MigState.RESUMING)
    dst_disk.fail["load_records"] = OSError(errno.ENOSPC, "no space")
    refused(errno.EIO, write, dst, data[:5000])
    refused(errno.EIO, write, dst, data[5000:])
    refused(errno.EIO, set_state, dst, MigState.STOP)
    assert set_state(dst, MigState.STOP) is MigState.STOP and dst_disk.data[0] == 9


def test_cancelled_pre_copy_starts_a_new_stream_next_time() -> None:
    disk = Disk()
    h = handler(disk)
    set_state(h, MigState.PRE_COPY)
    read(h, 1000)
    set_state(h, MigState.RUNNING)
    assert disk.calls[-1] == "stop_tracking" and not disk.tracking
    set_state(h, MigState.PRE_COPY)
    assert records_of(read(h, 1000))[0].type == RecordType.HEADER


def stream_from(disk: Disk) -> bytes:
    h = handler(disk)
    set_state(h, MigState.STOP_COPY)
    return drain(h)


def test_destination_refuses_another_configuration_at_once() -> None:
    data = stream_from(Disk(Card(device_id=0x0002)))
    dst_disk = Disk(fill=9)
    dst = handler(dst_disk)
    set_state(dst, MigState.RESUMING)
    refused(errno.EINVAL, write, dst, data[:100])  # the HEADER alone is enough
    refused(errno.EINVAL, write, dst, data[100:200])  # sticky
    refused(errno.EINVAL, set_state, dst, MigState.STOP)  # the session is refused once ...
    assert dst.state is MigState.RESUMING
    assert set_state(dst, MigState.STOP) is MigState.STOP  # ... then the empty one cancels
    assert set_state(dst, MigState.RUNNING) is MigState.RUNNING
    assert dst_disk.data == bytes([9]) * len(dst_disk.data)
    assert "commit_restore" not in dst_disk.calls


def test_corrupted_chunk_leaves_the_destination_as_it_was() -> None:
    data = bytearray(stream_from(Disk(fill=1)))
    data[len(data) // 2] ^= 0x10
    dst_disk = Disk(fill=9)
    dst = handler(dst_disk)
    set_state(dst, MigState.RESUMING)
    with pytest.raises(Reject):
        for i in range(0, len(data), 4096):
            write(dst, bytes(data[i:i + 4096]))
    refused(errno.EINVAL, set_state, dst, MigState.RUNNING)
    set_state(dst, MigState.RUNNING)
    assert dst_disk.data == bytes([9]) * len(dst_disk.data)
    assert dst_disk.blob == b"controller-state-9"


def test_truncated_stream_is_refused_at_commit() -> None:
    data = stream_from(Disk(fill=1))
    dst_disk = Disk(fill=9)
    dst = handler(dst_disk)
    set_state(dst, MigState.RESUMING)
    write(dst, data[:-1])
    err = refused(errno.EINVAL, set_state, dst, MigState.STOP)
    assert "truncated" in str(err)
    assert dst_disk.calls[-1] == "abort_restore" and dst_disk.data[0] == 9
    write(dst, data)  # a fresh session takes a whole stream
    set_state(dst, MigState.RUNNING)
    assert dst_disk.data == bytes([1]) * len(dst_disk.data)


def test_empty_resume_cancels() -> None:
    disk = Disk(fill=9)
    h = handler(disk)
    set_state(h, MigState.RESUMING)
    assert set_state(h, MigState.RUNNING) is MigState.RUNNING
    assert "commit_restore" not in disk.calls and disk.data[0] == 9


def test_device_refusing_a_record_is_sticky() -> None:
    dst_disk = Disk(fill=9)
    dst = handler(dst_disk)
    set_state(dst, MigState.RESUMING)
    writer = s.StreamWriter(dst_disk.migration_fingerprint())
    writer.add(s.namespace_blocks(2, 0, bytes(BLOCK)))  # nsid 2 does not exist
    writer.finish()
    data = writer.read(1 << 20)
    refused(errno.EINVAL, write, dst, data)
    refused(errno.EINVAL, write, dst, b"")
    refused(errno.EINVAL, set_state, dst, MigState.STOP)
    assert set_state(dst, MigState.STOP) is MigState.STOP


def test_commit_failure_keeps_resuming() -> None:
    dst_disk = Disk(fill=9)
    dst = handler(dst_disk)
    set_state(dst, MigState.RESUMING)
    writer = s.StreamWriter(dst_disk.migration_fingerprint())
    writer.finish()  # complete, but no DEVICE_STATE / PCI records
    write(dst, writer.read(1 << 20))
    refused(errno.EINVAL, set_state, dst, MigState.STOP)
    assert dst.state is MigState.RESUMING and dst_disk.data[0] == 9


def test_records_applied_only_after_end() -> None:
    data = stream_from(Disk(fill=1))
    dst_disk = Disk(fill=9)
    dst = handler(dst_disk)
    set_state(dst, MigState.RESUMING)
    write(dst, data[:-30])
    assert dst_disk.data[0] == 9 and dst_disk.staged_blocks  # staged, not applied
    write(dst, data[-30:])
    assert dst_disk.data[0] == 9
    set_state(dst, MigState.STOP)
    assert dst_disk.data[0] == 1


# ------------------------------------------------------------ DMA logging
def memfd_memory(size: int, address: int = 0x10000) -> tuple[ClientMemory, mmap.mmap]:
    fd = os.memfd_create("client")
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size)
    mem = ClientMemory()
    mem.map(address, size, fd=os.dup(fd))
    os.close(fd)
    return mem, mm


def log_start(h: VfioUserMigration, page_size: int = 4096,
              ranges: Sequence[tuple[int, int]] = ()) -> int:
    data = m.DmaLoggingControl(page_size=page_size, num_ranges=len(ranges)).pack()
    data += b"".join(m.DmaLoggingRange(iova=a, length=n).pack() for a, n in ranges)
    reply = feature(h, SET | Feature.DMA_LOGGING_START, data, argsz=8 + len(data))
    assert reply[8 + 16:] == data[16:]
    return int(m.DmaLoggingControl.unpack(reply, 8).page_size)


def report(h: VfioUserMigration, iova: int, length: int, page_size: int = 4096) -> int:
    req = m.DmaLoggingReport(iova=iova, length=length, page_size=page_size).pack()
    reply = feature(h, GET | Feature.DMA_LOGGING_REPORT, req, argsz=8 + 24 + (1 << 16))
    nbits = -(-length // page_size)
    bitmap = reply[8 + 24:]
    assert len(bitmap) == -(-nbits // 64) * 8 and reply[8:32] == req
    assert w.DeviceFeatureHead.unpack(reply).argsz == len(reply)
    return int.from_bytes(bitmap, "little")


def test_dma_logging_marks_device_writes_and_report_clears() -> None:
    mem, _ = memfd_memory(1 << 20)
    h = VfioUserMigration(Disk(), mem)
    assert log_start(h) == 4096
    mem.write(0x10000 + 5 * 4096 + 10, b"x")
    mem.write(0x10000 + 70 * 4096 - 1, b"yz")  # straddles pages 69 and 70
    assert report(h, 0x10000, 1 << 20) == (1 << 5) | (1 << 69) | (1 << 70)
    assert report(h, 0x10000, 1 << 20) == 0  # reported bits were cleared
    mem.write(0x10000, bytes(3 * 4096))
    assert report(h, 0x10000, 1 << 20, page_size=8192) == 0b11  # pages 0-2 in units 0-1
    feature(h, SET | Feature.DMA_LOGGING_STOP)
    assert mem.dirty_log is None
    refused(errno.EINVAL, report, h, 0x10000, 4096)


def test_report_with_a_smaller_page_than_the_log_replicates_bits() -> None:
    mem, _ = memfd_memory(1 << 20)
    h = VfioUserMigration(Disk(), mem)
    assert log_start(h, page_size=16384) == 16384
    mem.write(0x10000 + 16384 + 1, b"x")  # log page 1 of the region
    base = 0x10000 & ~16383  # 0x10000 is 16 KiB aligned
    assert report(h, base, 1 << 16) == 0b11110000


def test_partially_reported_page_stays_dirty() -> None:
    mem, _ = memfd_memory(1 << 20)
    h = VfioUserMigration(Disk(), mem)
    log_start(h, page_size=16384)
    mem.write(0x10000, b"x")
    assert report(h, 0x10000, 4096) == 1  # first quarter of a 16 KiB log page
    assert report(h, 0x10000 + 4096, 4096) == 1  # still dirty: reported again
    assert report(h, 0x10000, 16384) == 0b1111
    assert report(h, 0x10000, 16384) == 0


def test_dma_logging_start_page_size_negotiation() -> None:
    h = handler()
    assert log_start(h, page_size=1024) == 4096  # the device picks 4 KiB
    feature(h, SET | Feature.DMA_LOGGING_STOP)
    assert log_start(h, page_size=1 << 21) == 1 << 21
    refused(errno.EBUSY, log_start, h)  # already logging
    feature(h, SET | Feature.DMA_LOGGING_STOP)
    feature(h, SET | Feature.DMA_LOGGING_STOP)  # idempotent, as the kernel's log_stop
    refused(errno.EINVAL, log_start, h, 3000)
    refused(errno.EINVAL, log_start, h, 0)


@pytest.mark.parametrize(("ranges", "err"), [
    ([(0x1000, 0x800)], errno.EINVAL),  # length not page aligned
    ([(0x800, 0x1000)], errno.EINVAL),  # iova not page aligned
    ([(0, 0)], errno.EINVAL),
    ([(0, 0x4000), (0x2000, 0x4000)], errno.EINVAL),  # overlap
    ([((1 << 64) - 0x1000, 0x2000)], errno.EOVERFLOW),
    ([(i * 0x1000, 0x1000) for i in range(257)], errno.E2BIG),
])
def test_dma_logging_start_range_errors(ranges: list[tuple[int, int]], err: int) -> None:
    h = handler()
    refused(err, log_start, h, 4096, ranges)
    assert h.dma_log is None and h.memory.dirty_log is None


def test_dma_logging_start_short_ranges_data() -> None:
    h = handler()
    data = m.DmaLoggingControl(num_ranges=2).pack() + m.DmaLoggingRange(iova=0, length=4096).pack()
    refused(errno.EINVAL, feature, h, SET | Feature.DMA_LOGGING_START, data, 8 + 48)
    refused(errno.EINVAL, feature, h, SET | Feature.DMA_LOGGING_START,
            m.DmaLoggingControl(reserved=1).pack())


def test_report_checks() -> None:
    mem, _ = memfd_memory(1 << 20)
    h = VfioUserMigration(Disk(), mem, max_bitmap_size=64)
    log_start(h, ranges=[(0x10000, 0x10000), (0x20000, 0x10000)])
    assert report(h, 0x10000, 0x20000) == 0  # two adjacent logged ranges cover it
    refused(errno.EINVAL, report, h, 0x8000, 0x10000)  # not logged
    refused(errno.EINVAL, report, h, 0x10000, 0x1000, 2048)  # page below 4 KiB
    refused(errno.EINVAL, report, h, 0x10000, 0x1000, 12288)  # not a power of two
    refused(errno.EINVAL, report, h, 0x10000, 0)
    refused(errno.EOVERFLOW, report, h, (1 << 64) - 4096, 8192)
    everything = VfioUserMigration(Disk(), mem, max_bitmap_size=64)
    log_start(everything)
    refused(errno.E2BIG, report, everything, 0x10000, 4096 * 64 * 9)  # bitmap > 64 bytes
    req = m.DmaLoggingReport(iova=0x10000, length=0x20000).pack()
    refused(errno.EINVAL, feature, h, GET | Feature.DMA_LOGGING_REPORT, req, 8 + 24 + 7)
    refused(errno.EINVAL, feature, h, GET | Feature.DMA_LOGGING_REPORT, req[:20])


def test_report_is_bounded_by_the_message_limit() -> None:
    # A 32-byte request for 8 TiB asks for a 256 MiB bitmap: refused before any
    # allocation, because the reply could not exceed the message size limit.
    mem, _ = memfd_memory(1 << 20)
    h = VfioUserMigration(Disk(), mem)
    assert h.max_bitmap_size == MAX_DATA_XFER_SIZE
    log_start(h)
    req = m.DmaLoggingReport(iova=0, length=8 << 40, page_size=4096).pack()
    refused(errno.E2BIG, feature, h, GET | Feature.DMA_LOGGING_REPORT, req, 0xFFFFFFFF)
    # The largest allowed report (32 GiB of 4 KiB pages) is answered.
    mem.write(0x10000, b"x")
    reply = feature(h, GET | Feature.DMA_LOGGING_REPORT,
                    m.DmaLoggingReport(iova=0, length=32 << 30, page_size=4096).pack(), 0xFFFFFFFF)
    bitmap = reply[8 + 24:]
    assert len(bitmap) == MAX_DATA_XFER_SIZE and bitmap[2] == 1 and bitmap.count(0) == len(bitmap) - 1


@pytest.mark.parametrize("log_page, page_size", [(4096, 4096), (4096, 16384), (65536, 4096),
                                                 (8192, 8192)])
def test_report_bitmap_matches_page_by_page(log_page: int, page_size: int) -> None:
    # The bitmap against a direct definition: bit n is set when a dirty logged page
    # overlaps [iova + n * page_size, iova + (n + 1) * page_size).
    rng = random.Random(log_page * 7 + page_size)
    dirty = DirtyLog(log_page)
    dirty.pages.update(rng.sample(range(600), 60))
    iova, length = 5 * log_page, 500 * log_page - 3 * 4096
    expected_pages = set(dirty.pages)
    got = int.from_bytes(report_bitmap(dirty, iova, length, page_size), "little")
    nbits = -(-length // page_size)
    want = 0
    for n in range(nbits):
        lo, hi = iova + n * page_size, min(iova + (n + 1) * page_size, iova + length)
        if any(p * log_page < hi and lo < (p + 1) * log_page for p in expected_pages):
            want |= 1 << n
    assert got == want


# ------------------------------------------------------------ PCI state
def test_pci_state_round_trip() -> None:
    src, dst = Card(), Card()
    src.config.write(0x04, (0x0406).to_bytes(2, "little"))  # memory, bus master, INTx disable
    src.config.write(0x10, (0xFEB00000).to_bytes(4, "little"))
    src.set_irq_count(PciIrq.MSIX, 3)
    src.irq_mask(PciIrq.MSIX, 1, 1, True)
    assert src.msix is not None
    src.msix.write_table(16, bytes(range(16)))
    src.msix.set_pending(2, True)
    src.config.set_bits(STATUS, 2, PciStatus.INTERRUPT, True)
    records = pci_state_records(src)
    assert [r.type for r in records] == [RecordType.PCI_CONFIG, RecordType.MSIX]
    for record in records:
        apply_pci_state(dst, record)
    assert bytes(dst.config.data) == bytes(src.config.data)
    assert dst.msix is not None
    assert dst.msix.read_table(0, 64) == src.msix.read_table(0, 64)
    assert dst.msix.read_pba(0, 8) == src.msix.read_pba(0, 8) and dst.msix.table_in_use
    assert dst.irq_mode == PciIrq.MSIX and pci_state_records(dst) == records


def test_pci_state_of_another_model_is_refused() -> None:
    records = pci_state_records(Card(device_id=2))
    dst = Card()
    before = bytes(dst.config.data)
    with pytest.raises(LocalProtocolError, match="read-only config byte 0x2"):
        apply_pci_state(dst, records[0])
    assert bytes(dst.config.data) == before
    with pytest.raises(LocalProtocolError, match="vectors"):
        apply_pci_state(Card(vectors=8), pci_state_records(Card(vectors=4))[1])


def test_pci_state_malformed_records() -> None:
    dev = Card()
    config, msix = pci_state_records(dev)
    for bad in (config.payload[:-1], config.payload + b"\0",
                bytes([2]) + config.payload[1:]):  # version 2
        with pytest.raises(LocalProtocolError):
            apply_pci_state(dev, Record(RecordType.PCI_CONFIG, bad))
    too_many = bytearray(config.payload)
    too_many[12:14] = (99).to_bytes(2, "little")  # MSI-X sub-indexes enabled > vectors
    with pytest.raises(LocalProtocolError, match="sub-indexes"):
        apply_pci_state(dev, Record(RecordType.PCI_CONFIG, bytes(too_many)))
    pba_past_end = msix.payload[:-8] + (1 << 10).to_bytes(8, "little")
    with pytest.raises(LocalProtocolError, match="pending bits"):
        apply_pci_state(dev, Record(RecordType.MSIX, pba_past_end))
    with pytest.raises(LocalProtocolError):
        apply_pci_state(dev, s.dirty_round(0, 0))


def test_pci_fingerprint_depends_on_configuration_not_state() -> None:
    a, b = Card(), Card()
    b.config.write(0x04, b"\x06\x00")
    b.config.set_bits(STATUS, 2, PciStatus.INTERRUPT, True)
    def fingerprint(card: Card) -> bytes:
        return PciMigratable(card).migration_fingerprint()

    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(Card(device_id=3))
    assert fingerprint(a) != fingerprint(Card(vectors=5))


def test_restored_pending_interrupts_fire_when_the_device_runs() -> None:
    src_disk, dst_disk = Disk(fill=1), Disk(fill=9)
    src_disk.dev.set_irq_count(PciIrq.MSIX, 4)
    assert src_disk.dev.msix is not None
    src_disk.dev.msix.set_pending(3, True)
    fired: list[tuple[int, int]] = []
    dst_disk.dev.attach(ClientMemory(), lambda index, sub: fired.append((index, sub)) or True)
    migrate_in_process(handler(src_disk), handler(dst_disk))
    assert fired == [(PciIrq.MSIX, 3)]


# ------------------------------------------------------------ through a real server connection
def test_without_a_migration_factory_commands_16_to_18_are_not_supported() -> None:
    disk = Disk()
    conn = ServerConnection(disk.dev, notify=lambda fd: None)
    assert conn.migration is None  # the device's own migration_handler is not looked up
    replies = []
    for msg_id, (command, payload) in enumerate([
            (C.VERSION, w.VersionHead().pack() + b"{}\0"),
            (C.DEVICE_FEATURE, w.DeviceFeatureHead(argsz=8, flags=Feature.MIG_DEVICE_STATE).pack()),
            (C.MIG_DATA_READ, w.MigDataHead(argsz=108, size=100).pack())]):
        message = encode(w.Header(msg_id=msg_id, command=command), payload)
        while message:  # as the runtime does: never more than bytes_wanted() at a time
            n = conn.bytes_wanted()
            conn.receive_data(message[:n], [])
            message = message[n:]
        conn.process()
        replies.append(w.Header.unpack(conn.data_to_send()[-1][0]).error)
    assert replies == [0, errno.ENOTSUP, errno.ENOTSUP]


def test_server_refuses_region_writes_while_stopped_with_ebusy() -> None:
    disk = Disk()
    conn = ServerConnection(disk.dev, notify=lambda fd: None, migration=disk.dev.migration_handler)
    assert isinstance(conn.migration, VfioUserMigration)
    sent: list[bytes] = []

    def request(command: int, payload: bytes) -> w.Header:
        message = encode(w.Header(msg_id=len(sent), command=command), payload)
        while message:  # as the runtime does: never more than bytes_wanted() at a time
            n = conn.bytes_wanted()
            conn.receive_data(message[:n], [])
            message = message[n:]
        conn.process()
        out = conn.data_to_send()
        sent.append(out[-1][0])
        return w.Header.unpack(out[-1][0])

    request(C.VERSION, w.VersionHead().pack() + b"{}\0")
    write_cfg = w.RegionAccess(offset=0x3C, region=PciRegion.CONFIG, count=1).pack() + b"\x05"
    assert not request(C.REGION_WRITE, write_cfg).flags & w.MsgFlag.ERROR
    head = w.DeviceFeatureHead(argsz=16, flags=SET | Feature.MIG_DEVICE_STATE).pack()
    assert not request(C.DEVICE_FEATURE, head + m.MigStateData(device_state=1).pack()).error
    reply = request(C.REGION_WRITE, write_cfg)
    assert reply.flags & w.MsgFlag.ERROR and reply.error == errno.EBUSY
    read_cfg = w.RegionAccess(offset=0, region=PciRegion.CONFIG, count=4).pack()
    assert not request(C.REGION_READ, read_cfg).error
    reply = request(C.MIG_DATA_READ, w.MigDataHead(argsz=108, size=100).pack())
    assert reply.error == errno.EINVAL  # STOP is not a saving state


# ------------------------------------------------------------ the orchestrator
class Served:
    """A ServerConnection for ``device`` on one end of a socketpair, pumped by a thread."""

    def __init__(self, device: Card) -> None:
        self.server_sock, client_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn = ServerConnection(device, notify=lambda fd: None,
                                     migration=device.migration_handler)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.client = VfioUserClient(client_sock, timeout=10)
        self.client.negotiate(DEFAULT_CAPS)

    def _run(self) -> None:
        while True:
            data, fds = recv_chunk(self.server_sock, self.conn.bytes_wanted())
            self.conn.receive_data(data, fds)
            if not data:
                return
            self.conn.process()
            for message, out_fds in self.conn.data_to_send():
                send_message(self.server_sock, message, out_fds)

    def close(self) -> None:
        self.client.close()
        self.thread.join(5)
        self.server_sock.close()


@pytest.fixture
def pair() -> Iterator[tuple[Disk, Disk, Served, Served]]:
    src_disk, dst_disk = Disk(blocks=64, fill=1), Disk(blocks=64, fill=9)
    src, dst = Served(src_disk.dev), Served(dst_disk.dev)
    yield src_disk, dst_disk, src, dst
    src.close()
    dst.close()


def test_orchestrated_migration_converges(pair: tuple[Disk, Disk, Served, Served]) -> None:
    src_disk, dst_disk, src, dst = pair
    seen: list[orch.Progress] = []
    dirtied = iter(range(6))

    def progress(p: orch.Progress) -> None:
        seen.append(p)
        if p.phase == "pre-copy" and (block := next(dirtied, None)) is not None:
            src_disk.guest_write(block, 0x40 + block)  # the guest keeps writing for a while

    summary = orch.migrate(src.client, dst.client, max_rounds=8, converge_bytes=0, chunk=16384,
                           progress=progress)
    assert dst_disk.data == src_disk.data and dst_disk.blob == src_disk.blob
    assert bytes(dst_disk.dev.config.data) == bytes(src_disk.dev.config.data)
    assert summary.rounds >= 2 and summary.bytes >= 64 * BLOCK
    assert summary.pending_at_stop == 0 and summary.downtime <= summary.seconds
    assert seen[-1].phase == "done" and {"pre-copy", "stop-copy"} <= {p.phase for p in seen}
    assert orch.get_state(src.client) is MigState.STOP
    assert orch.get_state(dst.client) is MigState.RUNNING


def test_orchestrator_max_rounds_zero_goes_straight_to_stop_copy(
        pair: tuple[Disk, Disk, Served, Served]) -> None:
    src_disk, dst_disk, src, dst = pair
    summary = orch.migrate(src.client, dst.client, max_rounds=0, converge_bytes=0)
    assert summary.rounds == 0 and summary.precopy_bytes < 200
    assert dst_disk.data == src_disk.data


def test_orchestrator_rolls_back_on_configuration_mismatch() -> None:
    src_disk, dst_disk = Disk(fill=1), Disk(Card(device_id=7), fill=9)
    src, dst = Served(src_disk.dev), Served(dst_disk.dev)
    try:
        with pytest.raises(orch.MigrationFailed) as info:
            orch.migrate(src.client, dst.client)
        assert info.value.rollback_errors == []
        assert orch.get_state(src.client) is MigState.RUNNING
        assert orch.get_state(dst.client) is MigState.RUNNING
        assert dst_disk.data == bytes([9]) * len(dst_disk.data) and not src_disk.tracking
        assert src_disk.data == bytes([1]) * len(src_disk.data)
    finally:
        src.close()
        dst.close()


def test_orchestrator_rolls_back_when_the_destination_refuses_the_commit(
        pair: tuple[Disk, Disk, Served, Served]) -> None:
    src_disk, dst_disk, src, dst = pair
    dst_disk.fail["commit_restore"] = LocalProtocolError("disk full", errno.ENOSPC)
    with pytest.raises(orch.MigrationFailed, match="commit") as info:
        orch.migrate(src.client, dst.client)
    assert info.value.rollback_errors == []
    assert orch.get_state(src.client) is MigState.RUNNING and not src_disk.stopped
    assert orch.get_state(dst.client) is MigState.RUNNING and not dst_disk.stopped
    assert dst_disk.data == bytes([9]) * len(dst_disk.data)


def test_orchestrator_refuses_a_source_not_running(
        pair: tuple[Disk, Disk, Served, Served]) -> None:
    _, _, src, dst = pair
    orch.set_state(src.client, MigState.STOP)
    with pytest.raises(orch.MigrationFailed, match="setup"):
        orch.migrate(src.client, dst.client)
    assert orch.get_state(dst.client) is MigState.RUNNING


def test_client_helpers_for_dma_logging(pair: tuple[Disk, Disk, Served, Served]) -> None:
    _, _, src, _ = pair
    assert orch.dma_logging_start(src.client, 4096) == 4096
    assert orch.dma_logging_report(src.client, 0, 1 << 20, 4096) == bytes(32)
    orch.dma_logging_stop(src.client)
    assert orch.migration_flags(src.client) & 0x4


# ------------------------------------------------------------ the NVMe controller
def nvme_pair(tmp_path: Path, **kw: Any) -> tuple[NvmeDriver, NvmeController]:
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    src = make_controller(tmp_path / "src", io_queues=2, queue_entries=64, namespaces=2, **kw)
    dst = make_controller(tmp_path / "dst", io_queues=2, queue_entries=64, namespaces=2, **kw)
    return controller_driver(src).ready(io_queues=2), dst


def test_nvme_controller_migrates_mid_flight(tmp_path: Path) -> None:
    drv, dst_ctrl = nvme_pair(tmp_path)
    src_ctrl = drv.bus.ctrl
    first = os.urandom(8192)
    assert status(drv.io(IoOpcode.WRITE, slba=0, nlb=16, data=first)[0])[0] == 0
    assert status(drv.admin_command(AdminOpcode.SET_FEATURES, cdw10=FeatureId.ASYNC_EVENT_CONFIG,
                            cdw11=0x100))[0] == 0
    aer = drv.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))  # held across
    src, dst = NvmeMigratable(src_ctrl), NvmeMigratable(dst_ctrl)
    hs, hd = VfioUserMigration(src, ClientMemory()), VfioUserMigration(dst, ClientMemory())
    dst_ctrl.attach(drv.bus.memory, drv.bus.interrupts)  # the destination's client shares guest memory
    set_state(hd, MigState.RESUMING)
    set_state(hs, MigState.PRE_COPY)
    round0 = drain(hs)
    write(hd, round0)
    heads = [s.parse_blocks_head(r)[0] for r in records_of(round0)
             if r.type == RecordType.NAMESPACE_BLOCKS]
    # 2 namespaces of 1 MiB: only the 8 KiB written travel as data, the rest as ZEROES.
    assert sum(h.length for h in heads if not h.flags & s.BlocksFlag.ZEROES) == 8192
    assert sum(h.length for h in heads) == 2 << 20
    second = os.urandom(4096)
    assert status(drv.io(IoOpcode.WRITE, slba=1000, nlb=8, data=second, nsid=2)[0])[0] == 0
    assert src.precopy_pending() == 4096  # the page written during pre-copy
    write(hd, drain(hs))
    set_state(hs, MigState.STOP_COPY)
    # Stopped: a doorbell rung now is not processed on the source.
    flush = drv.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert drv.reap(1) == [] and src_ctrl.sqs[1].tail != src_ctrl.sqs[1].head
    write(hd, drain(hs))
    assert dst_ctrl.namespaces[1].read_bytes(0, 8192) == bytes(8192)  # staged only
    set_state(hd, MigState.STOP)
    assert encode_controller(dst_ctrl) == encode_controller(src_ctrl)
    assert bytes(dst_ctrl.config.data) == bytes(src_ctrl.config.data)
    set_state(hd, MigState.RUNNING)  # catches up: the flush rung while stopped completes
    set_state(hs, MigState.STOP)
    drv.bus.ctrl = dst_ctrl
    assert [c.cid for c in drv.reap(1)] == [flush]
    done, data = drv.io(IoOpcode.READ, slba=0, nlb=16)
    assert status(done)[0] == 0 and data == first
    done, data = drv.io(IoOpcode.READ, slba=1000, nlb=8, nsid=2)
    assert status(done)[0] == 0 and data == second
    dst_ctrl.notify_namespace_changed(1)
    assert [c.cid for c in drv.reap(0)] == [aer]
    src_ctrl.close()
    dst_ctrl.close()


def test_nvme_fingerprint_covers_namespaces(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_controller(tmp_path / "a", size=1 << 20)
    b = make_controller(tmp_path / "b", size=2 << 20)
    assert NvmeMigratable(a).migration_fingerprint() != NvmeMigratable(b).migration_fingerprint()
    c = make_controller(tmp_path / "b", size=1 << 20)
    assert NvmeMigratable(a).migration_fingerprint() == NvmeMigratable(c).migration_fingerprint()
    for ctrl in (a, b, c):
        ctrl.close()


def test_nvme_state_is_checked_before_anything_applies(tmp_path: Path) -> None:
    drv, dst_ctrl = nvme_pair(tmp_path)
    blob = encode_controller(drv.bus.ctrl)
    decode_controller(dst_ctrl, blob)  # valid as saved
    head = CtrlStateHead.unpack(blob)
    sq = SqState.unpack(blob, CtrlStateHead.SIZE)
    for bad in (
        head.replace(version=1).pack() + blob[CtrlStateHead.SIZE:],  # before uncorrectable
        head.replace(version=2).pack() + blob[CtrlStateHead.SIZE:],  # before zones
        head.replace(version=3).pack() + blob[CtrlStateHead.SIZE:],  # before firmware slots
        head.replace(version=4).pack() + blob[CtrlStateHead.SIZE:],  # before the inventory
        head.replace(version=6).pack() + blob[CtrlStateHead.SIZE:],
        head.replace(ctrl_state=0).pack() + blob[CtrlStateHead.SIZE:],  # queues while disabled
        blob[:-1],
        blob + b"\0",
        blob[:CtrlStateHead.SIZE] + sq.replace(size=65).pack() + blob[CtrlStateHead.SIZE + 32:],
        blob[:CtrlStateHead.SIZE] + sq.replace(base=0x1001).pack() + blob[CtrlStateHead.SIZE + 32:],
        blob[:CtrlStateHead.SIZE] + sq.replace(tail=64).pack() + blob[CtrlStateHead.SIZE + 32:],
    ):
        with pytest.raises(LocalProtocolError):
            decode_controller(dst_ctrl, bad)
    dst = NvmeMigratable(dst_ctrl)
    with pytest.raises(LocalProtocolError, match="namespace 3"):
        dst.load_records([s.namespace_blocks(3, 0, bytes(512))])
    with pytest.raises(LocalProtocolError, match="aligned"):
        dst.load_records([s.namespace_blocks(1, 100, bytes(512))])
    with pytest.raises(LocalProtocolError, match="controller state"):
        dst.load_records(pci_state_records(dst_ctrl))
        dst.commit_restore()
    drv.bus.ctrl.close()
    dst_ctrl.close()


# ------------------------------------------------------------ shared-storage option
def options(h: VfioUserMigration, value: int | None = None) -> int:
    if value is None:
        reply = feature(h, GET | Feature.APPLIANCE_MIG_OPTIONS)
    else:
        reply = feature(h, SET | Feature.APPLIANCE_MIG_OPTIONS, w.MigOptions(options=value).pack())
    return int(w.MigOptions.unpack(reply, 8).options)


def test_mig_options_feature_checks() -> None:
    h = handler()
    assert options(h) == 0
    assert options(h, w.MigOption.SHARED_STORAGE) == 1 and options(h) == 1
    refused(errno.EINVAL, options, h, 0x2)  # reserved bit
    refused(errno.EINVAL, feature, h, SET | Feature.APPLIANCE_MIG_OPTIONS,
            w.MigOptions(options=1, reserved=1).pack())
    set_state(h, MigState.PRE_COPY)
    refused(errno.EBUSY, options, h, 0)  # not while a session runs
    h.device_reset()
    assert options(h) == 0  # reset returns to the default


def test_shared_storage_stream_carries_device_state_only() -> None:
    src_disk = Disk(fill=1)
    src = handler(src_disk)
    options(src, w.MigOption.SHARED_STORAGE)
    set_state(src, MigState.PRE_COPY)
    reader = StreamReader(None, None)
    marker = reader.feed(read(src, 1 << 20))
    assert [r.type for r in marker] == [RecordType.HEADER, RecordType.DIRTY_ROUND]
    assert s.parse_dirty_round(marker[1]).pending == 0 and reader.flags == 1
    set_state(src, MigState.STOP_COPY)
    rest = reader.feed(drain(src))
    assert RecordType.NAMESPACE_BLOCKS not in {r.type for r in rest}
    assert RecordType.DEVICE_STATE in {r.type for r in rest} and reader.finished

    # A destination set the same way takes it; its blocks stay (same image).
    full = _restart_stream(src_disk)
    dst_disk = Disk(fill=9)
    dst = handler(dst_disk)
    options(dst, w.MigOption.SHARED_STORAGE)
    set_state(dst, MigState.RESUMING)
    write(dst, full)
    set_state(dst, MigState.RUNNING)
    assert dst_disk.blob == src_disk.blob and dst_disk.data[0] == 9

    # One set for a full copy refuses the shared-storage stream at its HEADER.
    other = handler(Disk(fill=9))
    set_state(other, MigState.RESUMING)
    err = refused(errno.EINVAL, write, other, full[:200])
    assert "shared-storage mode differs" in str(err)


def _restart_stream(disk: Disk) -> bytes:
    h = handler(disk)
    options(h, w.MigOption.SHARED_STORAGE)
    set_state(h, MigState.STOP_COPY)
    return drain(h)


def test_full_stream_refused_by_a_shared_storage_destination() -> None:
    data = stream_from(Disk(fill=1))
    dst = handler(Disk(fill=9))
    options(dst, w.MigOption.SHARED_STORAGE)
    set_state(dst, MigState.RESUMING)
    refused(errno.EINVAL, write, dst, data[:200])


def test_orchestrator_shared_storage(pair: tuple[Disk, Disk, Served, Served]) -> None:
    src_disk, dst_disk, src, dst = pair
    summary = orch.migrate(src.client, dst.client, converge_bytes=0, shared_storage=True)
    assert summary.bytes < 16 << 10  # no blocks
    assert dst_disk.blob == src_disk.blob and dst_disk.data[0] == 9
    assert orch.get_options(dst.client) == w.MigOption.SHARED_STORAGE


def test_orchestrator_pipelined_write_error_rolls_back(
        pair: tuple[Disk, Disk, Served, Served]) -> None:
    _, dst_disk, src, dst = pair
    flipped = [False]

    def corrupt(chunk: bytes) -> bytes:
        if not flipped[0] and len(chunk) > 1000:
            flipped[0] = True
            return chunk[:500] + bytes([chunk[500] ^ 1]) + chunk[501:]
        return chunk

    with pytest.raises(orch.MigrationFailed) as err:
        orch.migrate(src.client, dst.client, converge_bytes=0, chunk=4096, forward=corrupt)
    assert flipped[0] and not err.value.rollback_errors
    assert orch.get_state(src.client) is MigState.RUNNING
    assert orch.get_state(dst.client) is MigState.RUNNING
    assert dst_disk.data == bytes([9]) * len(dst_disk.data)
