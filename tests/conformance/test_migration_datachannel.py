"""The migration data channel (APPLIANCE_MIG_CHANNEL) between two real appliance
processes: a full copy under verified writes, and what a broken or hostile
channel does (the migration fails, the source runs on, the destination is
untouched)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xxhash
from migration_pair import image, running_pair, sock

from appliance.client import datachannel as dc
from appliance.client import migrate as orch
from appliance.client.datachannel import ChannelPlan, channel_offered, set_channel
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient, VfioUserError
from appliance.runtime.control import ControlClient
from appliance.testing.process import ApplianceProcess
from appliance.testing.workload import (
    VerifiedWriter,
    file_hash,
    move_driver,
    prepare_destination,
)
from appliance.vfio_user import wire as w
from appliance.vfio_user.migration_channel import HEAD_CHECKED, ChannelHead, ChannelType
from appliance.vfio_user.migration_states import MigState
from appliance.vfio_user.wire import CHANNEL_OFFERED, ChannelMode

SIZE = 64 << 20


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ApplianceProcess, ApplianceProcess]]:
    yield from running_pair(tmp_path, SIZE)


def test_full_copy_over_the_channel_under_verified_writes(
        pair: tuple[ApplianceProcess, ApplianceProcess]) -> None:
    src_p, dst_p = pair
    src = VfioUserClient.connect(sock(src_p))
    driver = NvmeDriver(src, mem_size=16 << 20)
    driver.setup(io_queues=2, depth=32)
    writer = VerifiedWriter(driver, blocks=8, seed=7)
    writer.step(50)
    dst = VfioUserClient.connect(sock(dst_p))
    assert channel_offered(src) == channel_offered(dst) == CHANNEL_OFFERED
    prepare_destination(driver, dst)
    steps = []
    answered: list[str] = []

    def load() -> None:  # while the round's data is on the channel
        if not steps:  # round 0's data is on its way: both control sockets answer
            for p in (src_p, dst_p):
                with ControlClient(p.config.control.socket, timeout=5.0) as ctl:
                    answered.append(str(ctl("status")))
        writer.step(20)
        steps.append(writer.ios)

    summary = orch.migrate(src, dst, converge_bytes=64 << 10, max_rounds=6,
                           between_reads=load, data_channel=ChannelPlan())
    assert summary.data_channel == "same host", summary.channel_fallback
    assert steps  # the load ran during pre-copy
    assert len(answered) == 2
    assert summary.rounds >= 1
    assert summary.channel_bytes >= 16 << 20  # the data went on the channel ...
    assert summary.bytes < 1 << 20  # ... and the stream carried device state and markers
    assert orch.get_state(src) is MigState.STOP
    assert orch.get_state(dst) is MigState.RUNNING
    assert file_hash(image(src_p)) == file_hash(image(dst_p))
    move_driver(driver, dst)
    assert writer.verify_all() == len(writer.written)
    writer.step(20)
    assert writer.verify_all() == len(writer.written)
    src.close()
    dst.close()


def test_a_client_that_does_not_set_it_gets_the_standard_stream(
        pair: tuple[ApplianceProcess, ApplianceProcess]) -> None:
    src_p, dst_p = pair
    with VfioUserClient.connect(sock(src_p)) as src, VfioUserClient.connect(sock(dst_p)) as dst:
        summary = orch.migrate(src, dst)
        assert summary.data_channel == "" and summary.channel_bytes == 0
        assert summary.bytes > 16 << 20  # the bulk data went through MIG_DATA
    assert file_hash(image(src_p)) == file_hash(image(dst_p))


def open_fds(p: ApplianceProcess) -> int:
    assert p.proc is not None
    return len(list(Path(f"/proc/{p.proc.pid}/fd").iterdir()))


def test_channel_fd_bounds(pair: tuple[ApplianceProcess, ApplianceProcess]) -> None:
    src_p, _ = pair
    with VfioUserClient.connect(sock(src_p)) as src:
        orch.get_state(src)
        before = open_fds(src_p)
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        with a, b, c, d:
            req = w.MigChannel(mode=ChannelMode.FD, timeout_ms=1000).pack()
            for fds in ([], [a.fileno(), c.fileno()]):  # FD mode takes exactly one
                with pytest.raises(VfioUserError) as err:
                    dc._channel_feature(src, w.FEATURE_SET, req, fds)
                assert err.value.errno == 22
            with pytest.raises(VfioUserError):  # LISTEN takes none
                set_channel(src, ChannelMode.LISTEN, 1.0, a.fileno())
            assert set_channel(src, ChannelMode.FD, 1.0, a.fileno()) == ""
            path = set_channel(src, ChannelMode.LISTEN, 1.0)
            assert Path(path).is_socket()
            assert (Path(path).parent.stat().st_mode & 0o777) == 0o700
            set_channel(src, ChannelMode.OFF)
            assert not Path(path).exists() and not Path(path).parent.exists()
        assert orch.get_state(src) is MigState.RUNNING
        assert open_fds(src_p) == before  # every fd refused or dropped was closed


def odd_fds(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """Fds a client might pass for FD mode that are no connected stream socket."""
    r, w_ = os.pipe()
    os.close(w_)
    yield "a pipe", r
    yield "a file", os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT, 0o600)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(tmp_path / "l.sock"))
    lsock.listen(1)
    yield "a listening socket", lsock.detach()
    yield "an unconnected stream socket", socket.socket(socket.AF_UNIX).detach()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.close()
    yield "a datagram socket", a.detach()


def test_a_set_refuses_an_fd_that_is_no_connected_stream_socket(
        pair: tuple[ApplianceProcess, ApplianceProcess], tmp_path: Path) -> None:
    # Refused at the SET (EINVAL), so the orchestrator falls back to the
    # standard path, instead of failing the session that would start with it.
    src_p, _ = pair
    with VfioUserClient.connect(sock(src_p)) as src:
        orch.get_state(src)
        before = open_fds(src_p)
        for what, fd in odd_fds(tmp_path):
            try:
                with pytest.raises(VfioUserError) as err:
                    set_channel(src, ChannelMode.FD, 1.0, fd)
                assert err.value.errno == errno.EINVAL, what
            finally:
                os.close(fd)
            reply, _ = dc._channel_feature(src, w.FEATURE_GET)
            assert reply.mode == ChannelMode.OFF, what
        assert orch.get_state(src) is MigState.RUNNING
        assert open_fds(src_p) == before  # every refused fd was closed


@pytest.mark.parametrize("no_channel", [False, True])
def test_the_command_uses_the_channel_unless_told_not_to(
        pair: tuple[ApplianceProcess, ApplianceProcess], no_channel: bool) -> None:
    src_p, dst_p = pair
    res = subprocess.run([sys.executable, "-m", "appliance", "migrate", sock(src_p), sock(dst_p),
                          *(["--no-data-channel"] if no_channel else [])],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[0]
    if no_channel:
        assert first.endswith("(full copy, standard path (--no-data-channel))")
        assert "on the data channel" not in res.stdout
    else:
        assert first.endswith("(full copy, data channel (same host))")
        assert "on the data channel" in res.stdout
    assert int(res.stdout.split("bytes: ")[1].split()[0]) > 16 << 20
    assert file_hash(image(src_p)) == file_hash(image(dst_p))


def test_a_destination_without_the_channel_means_the_standard_path(
        pair: tuple[ApplianceProcess, ApplianceProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    src_p, dst_p = pair
    with VfioUserClient.connect(sock(src_p)) as src, VfioUserClient.connect(sock(dst_p)) as dst:
        offered = dc.channel_offered
        # The destination answers as an appliance without the feature would (ENOTTY: 0).
        monkeypatch.setattr(dc, "channel_offered", lambda c: 0 if c is dst else offered(c))
        summary = orch.migrate(src, dst, data_channel=ChannelPlan())
        assert summary.data_channel == ""
        assert summary.channel_fallback == "the destination offers no data channel"
        assert summary.bytes > 16 << 20
    assert file_hash(image(src_p)) == file_hash(image(dst_p))


# ------------------------------------------------------------ a relay between the two ends
Mutate = Callable[[int, bytes, bytes], tuple[bytes, bytes] | None]


class Relay:
    """Carries the channel from the source's end to the destination's, record by
    record; ``mutate(index, head, payload)`` may return other bytes, or None to
    close both ends there.  ``stall_at``: stop forwarding at that record."""

    def __init__(self, mutate: Mutate | None = None, stall_at: int | None = None) -> None:
        self.mutate, self.stall_at = mutate, stall_at
        self.records = 0
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []

    def pair(self) -> tuple[socket.socket, socket.socket]:
        src_end, a = socket.socketpair()
        dst_end, b = socket.socketpair()
        t = threading.Thread(target=self._run, args=(a, b), daemon=True)
        t.start()
        self.threads.append(t)
        return src_end, dst_end

    def _read(self, s: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = s.recv(n - len(out))
            if not got:
                return out
            out += got
        return out

    def _run(self, a: socket.socket, b: socket.socket) -> None:
        with a, b:
            try:
                while True:
                    head = self._read(a, ChannelHead.SIZE)
                    if len(head) < ChannelHead.SIZE:
                        return
                    h = ChannelHead.unpack(head)
                    payload = self._read(a, h.length if h.type == ChannelType.DATA else 0)
                    if self.stall_at is not None and self.records >= self.stall_at:
                        self.stalled.set()
                        self.release.wait(60)  # reads nothing more: the source's end fills up
                        return
                    out = (head, payload) if self.mutate is None else \
                        self.mutate(self.records, head, payload)
                    if out is None:
                        b.sendall(head + payload[:len(payload) // 2])
                        return
                    b.sendall(out[0] + out[1])
                    self.records += 1
            except OSError:
                return


def rehead(head: bytes, **fields: int) -> bytes:
    """``head`` with ``fields`` changed and its head checksum made right again."""
    raw = ChannelHead.unpack(head).replace(**fields).pack()
    return ChannelHead.unpack(raw).replace(
        head_check=xxhash.xxh3_64_intdigest(raw[:HEAD_CHECKED])).pack()


def flip(index: int) -> Mutate:
    """One bit flipped in the first DATA payload from record ``index`` on."""
    done = []

    def mutate(i: int, head: bytes, payload: bytes) -> tuple[bytes, bytes]:
        if i >= index and payload and not done:
            done.append(i)
            payload = bytes([payload[0] ^ 1]) + payload[1:]
        return head, payload
    return mutate


def out_of_range(index: int) -> Mutate:
    def mutate(i: int, head: bytes, payload: bytes) -> tuple[bytes, bytes]:
        if i == index:
            head = rehead(head, offset=SIZE)
        return head, payload
    return mutate


def garbage_head(index: int) -> Mutate:
    def mutate(i: int, head: bytes, payload: bytes) -> tuple[bytes, bytes]:
        if i == index:
            head = b"\xff" * len(head)
        return head, payload
    return mutate


def one_more(index: int) -> Mutate:
    """A valid ZEROES record slipped in after record ``index`` (later ones renumbered)."""
    def mutate(i: int, head: bytes, payload: bytes) -> tuple[bytes, bytes]:
        if i < index:
            return head, payload
        head = rehead(head, seq=i + 1)
        if i == index:
            fake = rehead(ChannelHead(type=ChannelType.ZEROES, nsid=1, seq=i, offset=0,
                                      length=4096).pack())
            head = fake + head
        return head, payload
    return mutate


def closed_at(index: int) -> Mutate:
    def mutate(i: int, head: bytes, payload: bytes) -> tuple[bytes, bytes] | None:
        return None if i == index else (head, payload)
    return mutate


FAULTS = {
    "wrong checksum": (Relay(flip(3)), "checksum mismatch"),
    "range outside the namespace": (Relay(out_of_range(2)), "outside"),
    "garbage head": (Relay(garbage_head(1)), "bad magic"),
    "closed mid-stream": (Relay(closed_at(4)), "closed"),
    "more than announced": (Relay(one_more(5)), "more than the"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_broken_channel_fails_the_migration_and_rolls_back(
        pair: tuple[ApplianceProcess, ApplianceProcess], fault: str) -> None:
    src_p, dst_p = pair
    relay, why = FAULTS[fault]
    dst_before = file_hash(image(dst_p))
    src = VfioUserClient.connect(sock(src_p), timeout=10)
    driver = NvmeDriver(src, mem_size=16 << 20)
    driver.setup(io_queues=1, depth=16)
    writer = VerifiedWriter(driver, blocks=8, seed=3)
    writer.step(20)
    dst = VfioUserClient.connect(sock(dst_p), timeout=10)
    with pytest.raises(orch.MigrationFailed) as err:
        orch.migrate(src, dst, data_channel=ChannelPlan(pair=relay.pair))
    assert not err.value.rollback_errors, err.value
    assert orch.get_state(src) is MigState.RUNNING
    assert orch.get_state(dst) is MigState.RUNNING
    assert writer.verify_all() == len(writer.written)  # the source serves on
    writer.step(20)
    src_hash = file_hash(image(src_p))
    dst.close()
    assert file_hash(image(dst_p)) == dst_before  # nothing of it was committed
    assert why in dst_p.log_text() + src_p.log_text() + str(err.value)
    assert src_hash
    src.close()


def test_a_stalled_channel_fails_after_the_timeout_while_both_keep_serving(
        pair: tuple[ApplianceProcess, ApplianceProcess]) -> None:
    src_p, dst_p = pair
    relay = Relay(stall_at=2)
    dst_before = file_hash(image(dst_p))
    answered: list[str] = []

    def status_while_stalled() -> None:
        relay.stalled.wait(30)
        for p in (src_p, dst_p):  # the control sockets answer during the transfer
            with ControlClient(p.config.control.socket, timeout=5.0) as ctl:
                answered.append(str(ctl("status")))

    probe = threading.Thread(target=status_while_stalled, daemon=True)
    probe.start()
    with VfioUserClient.connect(sock(src_p), timeout=4) as src, \
            VfioUserClient.connect(sock(dst_p), timeout=4) as dst:
        with pytest.raises(orch.MigrationFailed) as err:
            orch.migrate(src, dst, data_channel=ChannelPlan(pair=relay.pair))
        relay.release.set()
        probe.join(10)
        assert len(answered) == 2
        assert "no progress on the data channel" in src_p.log_text() + dst_p.log_text() \
            + str(err.value)
        assert orch.get_state(src) is MigState.RUNNING
        assert orch.get_state(dst) is MigState.RUNNING
    assert file_hash(image(dst_p)) == dst_before


def test_records_arriving_after_the_final_sync_still_commit(
        pair: tuple[ApplianceProcess, ApplianceProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    # The final CHANNEL_SYNC travels through the orchestrator, the records it
    # counts on the channel (across hosts: two ssh channels): the destination
    # may read the sync first.  The relay holds the stop-copy records back until
    # the destination has answered the write that carried the final sync.
    src_p, dst_p = pair
    stopping, release = threading.Event(), threading.Event()
    held: list[int] = []

    class HoldingRelay(Relay):
        def _read(self, s: socket.socket, n: int) -> bytes:
            out = super()._read(s, n)
            if n == ChannelHead.SIZE and out and stopping.is_set() and not release.is_set():
                held.append(self.records)
                release.wait(60)
            return out

    final_write: list[int] = []
    set_state, write_send, wait_reply = orch.set_state, orch.data_write_send, orch.wait_reply

    def spy_set_state(client: VfioUserClient, state: MigState) -> MigState:
        if client is src and state is MigState.STOP_COPY:
            writer.step(5)  # the last writes: the stop-copy records carry them
            stopping.set()
        return set_state(client, state)

    def spy_write_send(client: VfioUserClient, data: bytes | memoryview) -> int:
        msg_id = write_send(client, data)
        if stopping.is_set() and not final_write:
            final_write.append(msg_id)
        return msg_id

    def spy_wait_reply(client: VfioUserClient, msg_id: int, command: w.Command) -> bytes:
        try:
            return wait_reply(client, msg_id, command)
        finally:
            if final_write and msg_id == final_write[0]:
                release.set()

    monkeypatch.setattr(orch, "set_state", spy_set_state)
    monkeypatch.setattr(orch, "data_write_send", spy_write_send)
    monkeypatch.setattr(orch, "wait_reply", spy_wait_reply)
    src = VfioUserClient.connect(sock(src_p), timeout=10)
    driver = NvmeDriver(src, mem_size=16 << 20)
    driver.setup(io_queues=1, depth=16)
    writer = VerifiedWriter(driver, blocks=8, seed=11)
    writer.step(20)
    dst = VfioUserClient.connect(sock(dst_p), timeout=10)
    prepare_destination(driver, dst)
    try:
        summary = orch.migrate(src, dst, converge_bytes=0, max_rounds=2,
                               between_reads=lambda: writer.step(5),
                               data_channel=ChannelPlan(pair=HoldingRelay().pair))
    finally:
        release.set()
    assert summary.data_channel == "same host"
    assert held  # stop-copy records came after the final sync
    assert file_hash(image(src_p)) == file_hash(image(dst_p))
    move_driver(driver, dst)
    assert writer.verify_all() == len(writer.written)
    src.close()
    dst.close()


def test_a_migration_that_fails_before_its_sessions_leaves_no_channel_set(
        pair: tuple[ApplianceProcess, ApplianceProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    # The channel was set on both, then the destination refused RESUMING: the
    # next migration on the same connections, without a channel, must not find
    # one still set for its sessions (nor the appliances keep the sockets).
    src_p, dst_p = pair
    set_state = orch.set_state

    def refuse_resuming(client: VfioUserClient, state: MigState) -> MigState:
        if state is MigState.RESUMING:
            raise VfioUserError(5, "injected")
        return set_state(client, state)

    with VfioUserClient.connect(sock(src_p)) as src, VfioUserClient.connect(sock(dst_p)) as dst:
        monkeypatch.setattr(orch, "set_state", refuse_resuming)
        with pytest.raises(orch.MigrationFailed):
            orch.migrate(src, dst, data_channel=ChannelPlan())
        monkeypatch.undo()
        for side in (src, dst):
            reply, _ = dc._channel_feature(side, w.FEATURE_GET)
            assert reply.mode == ChannelMode.OFF
        summary = orch.migrate(src, dst)
        assert summary.data_channel == ""
    assert file_hash(image(src_p)) == file_hash(image(dst_p))
