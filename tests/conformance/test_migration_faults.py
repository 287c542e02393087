"""Migration faults with real processes, each proven with image hashes.

Whatever goes wrong, the destination refuses with a clear error and keeps its
image (hash before == after), and the source returns to RUNNING with its data
intact (hash, and the driver's reads of everything it wrote).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.client import migrate as orch
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.testing.process import ApplianceProcess
from appliance.testing.workload import VerifiedWriter, file_hash, make_image, pair_configs
from appliance.vfio_user.migration_states import MigState
from appliance.vfio_user.migration_stream import RecordHead, RecordType

SIZE = 32 << 20
Transform = Callable[[int, RecordType, bytes], list[bytes]]


class RecordForwarder:
    """A ``forward`` hook that cuts the stream into records and lets a transform
    replace each (``[]`` holds or drops it, several emit more)."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform
        self.buf = b""
        self.index = 0
        self.applied = False

    def __call__(self, data: bytes) -> bytes:
        self.buf += data
        out: list[bytes] = []
        while len(self.buf) >= RecordHead.SIZE:
            head = RecordHead.unpack(self.buf)
            end = RecordHead.SIZE + head.length
            if len(self.buf) < end:
                break
            raw, self.buf = self.buf[:end], self.buf[end:]
            out += self.transform(self.index, RecordType(head.type), raw)
            self.index += 1
        return b"".join(out)


def flip_middle(kind: RecordType, nth: int = 0) -> RecordForwarder:
    """Flip one bit in the middle of the ``nth`` record of ``kind``."""
    seen = [0]

    def transform(index: int, rtype: RecordType, raw: bytes) -> list[bytes]:
        if rtype is kind:
            seen[0] += 1
            if seen[0] == nth + 1:
                fwd.applied = True
                mid = len(raw) // 2
                return [raw[:mid] + bytes([raw[mid] ^ 0x10]) + raw[mid + 1:]]
        return [raw]

    fwd = RecordForwarder(transform)
    return fwd


def truncate_at(kind: RecordType) -> RecordForwarder:
    """Drop the first record of ``kind`` and everything after it."""
    cut = [False]

    def transform(index: int, rtype: RecordType, raw: bytes) -> list[bytes]:
        if rtype is kind:
            cut[0] = fwd.applied = True
        return [] if cut[0] else [raw]

    fwd = RecordForwarder(transform)
    return fwd


def swap_after(index_at: int) -> RecordForwarder:
    """Send record ``index_at + 1`` before record ``index_at``."""
    held: list[bytes] = []

    def transform(index: int, rtype: RecordType, raw: bytes) -> list[bytes]:
        if index == index_at:
            held.append(raw)
            return []
        if index == index_at + 1:
            fwd.applied = True
            return [raw, *held]
        return [raw]

    fwd = RecordForwarder(transform)
    return fwd


@dataclass
class Pair:
    src: ApplianceProcess
    dst: ApplianceProcess
    tmp: Path

    def image(self, p: ApplianceProcess) -> str:
        return p.config.storage.namespaces[0].image

    def sock(self, p: ApplianceProcess) -> str:
        return p.config.storage.socket


@pytest.fixture
def pair_factory(tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def make(dst_size: int | None = None) -> Pair:
        src_cfg, dst_cfg = pair_configs(tmp_path, SIZE, dst_size=dst_size)
        make_image(tmp_path / "src" / "data" / "disk0.img", SIZE, seed=5, random_mib=3)
        make_image(tmp_path / "dst" / "data" / "disk0.img", dst_size or SIZE, seed=6, fill=3)
        pair = Pair(ApplianceProcess(src_cfg, tmp_path / "src" / "proc").start(),
                    ApplianceProcess(dst_cfg, tmp_path / "dst" / "proc").start(), tmp_path)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.src.stop()
        pair.dst.stop()


@dataclass
class Session:
    pair: Pair
    src: VfioUserClient
    dst: VfioUserClient
    driver: NvmeDriver
    writer: VerifiedWriter
    hashes: tuple[str, str]

    def close(self) -> None:
        self.driver.close()
        self.src.close()
        self.dst.close()


def session(pair: Pair) -> Session:
    src = VfioUserClient.connect(pair.sock(pair.src))
    driver = NvmeDriver(src, mem_size=8 << 20)
    driver.setup(io_queues=1, depth=16)
    writer = VerifiedWriter(driver, blocks=8, seed=11)
    writer.step(20)
    dst = VfioUserClient.connect(pair.sock(pair.dst))
    return Session(pair, src, dst, driver, writer,
                   (file_hash(pair.image(pair.src)), file_hash(pair.image(pair.dst))))


def check_rolled_back(s: Session, exc: orch.MigrationFailed, *, dst_alive: bool = True) -> None:
    """Both sides where they were: images, states, and the driver's data."""
    pair = s.pair
    assert file_hash(pair.image(pair.dst)) == s.hashes[1], "destination image changed"
    if dst_alive:
        assert not exc.rollback_errors, exc.rollback_errors
        assert orch.get_state(s.dst) is MigState.RUNNING
    assert orch.get_state(s.src) is MigState.RUNNING
    assert file_hash(pair.image(pair.src)) == s.hashes[0], "source image changed"
    assert s.writer.verify_all() == len(s.writer.written)
    s.writer.step(5)  # and the source keeps serving writes
    s.writer.verify_all()


CORRUPTED = [RecordType.HEADER, RecordType.DIRTY_ROUND, RecordType.NAMESPACE_BLOCKS,
             RecordType.PCI_CONFIG, RecordType.MSIX, RecordType.DEVICE_STATE, RecordType.END]


@pytest.mark.parametrize("kind", CORRUPTED, ids=[k.name for k in CORRUPTED])
def test_corrupted_record(pair_factory: Callable[..., Pair], kind: RecordType) -> None:
    pair = pair_factory()
    s = session(pair)
    fwd = flip_middle(kind, nth=1 if kind in (RecordType.NAMESPACE_BLOCKS,
                                              RecordType.DIRTY_ROUND) else 0)
    with pytest.raises(orch.MigrationFailed) as err:
        orch.migrate(s.src, s.dst, converge_bytes=0, max_rounds=2, forward=fwd)
    assert fwd.applied
    assert "Invalid argument" in str(err.value)
    assert "checksum mismatch" in pair.dst.log_text() or kind is RecordType.HEADER
    check_rolled_back(s, err.value)
    s.close()


@pytest.mark.parametrize("kind", [RecordType.NAMESPACE_BLOCKS, RecordType.DEVICE_STATE,
                                  RecordType.END])
def test_truncated_stream(pair_factory: Callable[..., Pair], kind: RecordType) -> None:
    pair = pair_factory()
    s = session(pair)
    fwd = truncate_at(kind)
    with pytest.raises(orch.MigrationFailed) as err:
        orch.migrate(s.src, s.dst, converge_bytes=0, forward=fwd)
    assert fwd.applied and err.value.phase == "commit"
    assert "truncated" in pair.dst.log_text()
    check_rolled_back(s, err.value)
    s.close()


def test_records_out_of_order(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    s = session(pair)
    fwd = swap_after(3)
    with pytest.raises(orch.MigrationFailed):
        orch.migrate(s.src, s.dst, converge_bytes=0, forward=fwd)
    assert fwd.applied
    assert "sequence number" in pair.dst.log_text()
    with pytest.raises(orch.MigrationFailed) as err:  # again, to check the rollback
        orch.migrate(s.src, s.dst, converge_bytes=0, forward=swap_after(3))
    check_rolled_back(s, err.value)
    s.close()


def test_other_device_configuration(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory(dst_size=SIZE // 2)
    s = session(pair)
    with pytest.raises(orch.MigrationFailed) as err:
        orch.migrate(s.src, s.dst)
    assert "Invalid argument" in str(err.value)
    assert "another device configuration" in pair.dst.log_text()
    check_rolled_back(s, err.value)
    s.close()


def test_destination_killed_mid_stream(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    s = session(pair)
    reads = [0]

    def kill_dst() -> None:
        reads[0] += 1
        if reads[0] == 3:
            assert pair.dst.proc is not None
            pair.dst.proc.send_signal(signal.SIGKILL)
            pair.dst.proc.wait(10)

    with pytest.raises(orch.MigrationFailed) as err:
        orch.migrate(s.src, s.dst, converge_bytes=0, max_rounds=4, between_reads=kill_dst)
    assert reads[0] >= 3 and err.value.rollback_errors  # the destination is gone
    check_rolled_back(s, err.value, dst_alive=False)
    s.close()


def test_source_killed_mid_stream(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    s = session(pair)
    reads = [0]

    def kill_src() -> None:
        reads[0] += 1
        if reads[0] == 3:
            assert pair.src.proc is not None
            pair.src.proc.send_signal(signal.SIGKILL)
            pair.src.proc.wait(10)

    with pytest.raises(orch.MigrationFailed) as err:
        orch.migrate(s.src, s.dst, converge_bytes=0, max_rounds=4, between_reads=kill_src)
    assert isinstance(err.value.__cause__, ConnectionError)  # closed, reset or broken pipe
    assert reads[0] >= 3
    # The destination refused the partial stream and runs with its old image.
    assert orch.get_state(s.dst) is MigState.RUNNING
    assert file_hash(pair.image(pair.dst)) == s.hashes[1]
    # The source comes back (a new process on the same image) with every write.
    assert file_hash(pair.image(pair.src)) == s.hashes[0]
    pair.src.start()
    with VfioUserClient.connect(pair.sock(pair.src)) as c:
        driver = NvmeDriver(c, mem_size=8 << 20)
        driver.setup(io_queues=1, depth=16)
        assert orch.get_state(c) is MigState.RUNNING
        writer = VerifiedWriter(driver, blocks=8, seed=12)
        writer.written = s.writer.written
        assert writer.verify_all() == 20
        driver.close()
    s.dst.close()
