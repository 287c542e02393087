"""The migration data channel's sans-I/O parts: the channel record checks
(:class:`ChannelReceiver`), the APPLIANCE_MIG_CHANNEL feature and a session's
CHANNEL_SYNC records and waits (NotYet)."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

import pytest
import xxhash
from test_vfio_user_migration import Disk, feature, handler, read, refused, set_state, write

from appliance.protocol_common import Reject
from appliance.vfio_user import wire as w
from appliance.vfio_user.connection_state import NotYet
from appliance.vfio_user.migration_channel import (
    HEAD_CHECKED,
    ChannelHead,
    ChannelListener,
    ChannelReceiver,
    ChannelType,
    channel_head,
    channel_sync,
)
from appliance.vfio_user.migration_states import MigState
from appliance.vfio_user.migration_stream import (
    ChannelSync,
    ChannelSyncFlag,
    HeaderFlag,
    RecordType,
    StreamError,
    StreamReader,
    StreamWriter,
    dirty_round,
)

GET, SET = w.FEATURE_GET, w.FEATURE_SET
F = w.Feature.APPLIANCE_MIG_CHANNEL


def data(seq: int, offset: int = 0, length: int = 4096, checksum: int = 0) -> bytes:
    return channel_head(ChannelType.DATA, seq, 1, offset, length, checksum)


def sync(records: int, nbytes: int, final: bool = False) -> ChannelSync:
    return ChannelSync(records=records, bytes=nbytes, flags=ChannelSyncFlag.FINAL if final else 0)


# ------------------------------------------------------------ ChannelReceiver
def test_records_verified_and_counted_until_the_final_sync() -> None:
    r = ChannelReceiver()
    r.head(data(0))
    r.data_done(True)
    r.head(channel_head(ChannelType.ZEROES, 1, 1, 4096, 8192))
    r.sync(sync(2, 2 * 48 + 4096, final=True))
    assert r.caught_up()
    r.check_complete()
    with pytest.raises(StreamError, match="more than the 2 records announced"):
        r.head(data(2))


@pytest.mark.parametrize("edit, why", [
    (lambda raw: b"XXXX" + raw[4:], "bad magic"),
    (lambda raw: raw[:20] + b"\x01" + raw[21:], "head checksum"),
])
def test_a_garbled_head_is_refused(edit: Callable[[bytes], bytes], why: str) -> None:
    with pytest.raises(StreamError, match=why):
        ChannelReceiver().head(edit(data(0)))


def rehead(**fields: int) -> bytes:
    raw = ChannelHead.unpack(data(0)).replace(**fields).pack()
    return ChannelHead.unpack(raw).replace(head_check=xxhash.xxh3_64_intdigest(
        raw[:HEAD_CHECKED])).pack()


@pytest.mark.parametrize("fields, why", [
    ({"type": 9}, "unknown type"),
    ({"flags": 1}, "reserved flags"),
    ({"seq": 1}, "sequence number"),
    ({"length": 0}, "DATA length"),
    ({"length": (16 << 20) + 1}, "DATA length"),
    ({"type": ChannelType.RETRACT}, "RETRACT does not name"),
])
def test_a_well_formed_but_wrong_head_is_refused(fields: dict[str, int], why: str) -> None:
    with pytest.raises(StreamError, match=why):
        ChannelReceiver().head(rehead(**fields))


def test_an_unverified_record_must_be_retracted_and_sent_again() -> None:
    r = ChannelReceiver()
    r.head(data(0, 0, 8192))
    r.data_done(False)
    with pytest.raises(StreamError, match="checksum mismatch"):
        r.head(data(1, 8192))

    r = ChannelReceiver()
    r.head(data(0, 0, 8192))
    r.data_done(False)
    r.head(channel_head(ChannelType.RETRACT, 1, 1, 0, 8192))
    r.head(data(2, 0, 4096))
    r.data_done(True)
    r.sync(sync(3, 48 * 3 + 8192 + 4096, final=True))
    with pytest.raises(StreamError, match="never sent again"):
        r.check_complete()  # 4096..8192 is still unverified

    r = ChannelReceiver()
    r.head(data(0, 0, 8192))
    r.data_done(False)
    r.head(channel_head(ChannelType.RETRACT, 1, 1, 0, 8192))
    r.head(channel_head(ChannelType.ZEROES, 2, 1, 0, 8192))
    r.sync(sync(3, 48 * 3 + 8192, final=True))
    r.check_complete()


def test_counts_must_match_the_announcement() -> None:
    r = ChannelReceiver()
    r.head(data(0))
    r.data_done(True)
    with pytest.raises(StreamError, match="more than the 0 announced"):
        r.sync(sync(0, 0, final=True))
    r = ChannelReceiver()
    r.sync(sync(2, 96))
    assert not r.caught_up()
    with pytest.raises(StreamError, match="CHANNEL_SYNC 1 after 2"):
        r.sync(sync(1, 48))
    r.closed = True
    with pytest.raises(StreamError, match="closed after 0 records, 2 announced"):
        r.caught_up()
    with pytest.raises(StreamError, match="without the data channel's final sync"):
        ChannelReceiver().check_complete()


# ------------------------------------------------------------ the feature
class FakeChannel:
    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.error: Exception | None = None
        self.queued = 0
        self.records = 0
        self.receiver_ = ChannelReceiver()
        self.closed = False

    def fill(self, max_bytes: int) -> int:
        taken = sum(len(r.payload) for r in self.disk.precopy_records(max_bytes))
        self.queued += taken
        return taken

    @property
    def idle(self) -> bool:
        return self.queued == 0

    @property
    def sent(self) -> tuple[int, int]:
        return self.records, self.records * 48

    @property
    def receiver(self) -> ChannelReceiver:
        return self.receiver_

    def close(self) -> None:
        self.closed = True


class FakeFactory:
    def __init__(self, disk: Disk) -> None:
        self.made: list[tuple[str, object]] = []
        self.channel = FakeChannel(disk)
        self.why_not = ""

    def blocker(self) -> str:
        return self.why_not

    def listen(self) -> ChannelListener:
        raise OSError(errno.EACCES, "no")

    def check_fd(self, fd: int) -> None:
        os.fstat(fd)

    def source(self, fd: int, timeout: float, notify: Callable[[], None]) -> FakeChannel:
        self.made.append(("source", fd))
        return self.channel

    def destination(self, endpoint: int | ChannelListener, timeout: float,
                    notify: Callable[[], None]) -> FakeChannel:
        self.made.append(("destination", endpoint))
        return self.channel


def channel_set(h: object, mode: int, fds: list[int], timeout_ms: int = 1000, **kw: int) -> bytes:
    req = w.MigChannel(mode=mode, timeout_ms=timeout_ms, **kw).pack()
    head = w.DeviceFeatureHead(argsz=8 + 16 + 108, flags=SET | F)
    return h.handle(w.Command.DEVICE_FEATURE, head.pack() + req, fds)  # type: ignore[attr-defined,no-any-return]


def test_not_offered_without_a_factory() -> None:
    assert refused(errno.ENOTTY, feature, handler(), GET | F)


def test_the_set_takes_exactly_the_fds_its_mode_needs() -> None:
    disk = Disk()
    h = handler(disk)
    h.channel.factory = factory = FakeFactory(disk)  # type: ignore[assignment]
    reply = w.MigChannel.unpack(feature(h, GET | F), 8)
    assert reply.offered == w.CHANNEL_OFFERED and reply.mode == w.ChannelMode.OFF
    a, b = socket.socketpair()
    with a, b:
        for mode, fds in ((w.ChannelMode.FD, []), (w.ChannelMode.FD, [1, 2]),
                          (w.ChannelMode.OFF, [3]), (7, [])):
            with pytest.raises(Reject) as err:
                channel_set(h, mode, list(fds))
            assert err.value.errno == errno.EINVAL
        for bad in ({"timeout_ms": 0}, {"offered": 1}, {"reserved": 1}):
            with pytest.raises(Reject):
                channel_set(h, w.ChannelMode.FD, [a.fileno()], **bad)
        with pytest.raises(Reject) as err:
            channel_set(h, w.ChannelMode.LISTEN, [])
        assert err.value.errno == errno.EACCES  # the socket could not be made
        fd = os.dup(a.fileno())
        fds = [fd]
        channel_set(h, w.ChannelMode.FD, fds)
        assert fds == []  # the handler kept it
        assert h.channel.configured
        # The source session starts with it; its HEADER says so.
        assert set_state(h, MigState.PRE_COPY) is MigState.PRE_COPY
        assert factory.made == [("source", fd)]
        with pytest.raises(Reject) as err:
            channel_set(h, w.ChannelMode.OFF, [])
        assert err.value.errno == errno.EBUSY  # not while saving


def test_a_session_syncs_before_each_round_and_waits_for_an_idle_channel() -> None:
    disk = Disk()
    h = handler(disk)
    h.channel.factory = factory = FakeFactory(disk)  # type: ignore[assignment]
    a, b = socket.socketpair()
    with a, b:
        channel_set(h, w.ChannelMode.FD, [os.dup(a.fileno())])
    set_state(h, MigState.PRE_COPY)
    chan = factory.channel
    watch = StreamReader(None, None)
    first = watch.feed(read(h, 1 << 20))  # HEADER, CHANNEL_SYNC, DIRTY_ROUND; data went to the channel
    assert [r.type for r in first] == [RecordType.HEADER, RecordType.CHANNEL_SYNC,
                                       RecordType.DIRTY_ROUND]
    assert watch.flags == HeaderFlag.DATA_CHANNEL
    assert chan.queued > 0
    with pytest.raises(NotYet):  # the next round waits until the channel sent this one
        read(h, 1 << 20)
    chan.queued, chan.records = 0, 5
    second = watch.feed(read(h, 1 << 20))
    assert second[0].type == RecordType.CHANNEL_SYNC
    assert ChannelSync.unpack(second[0].payload).records == 5
    set_state(h, MigState.STOP_COPY)
    chan.queued = 0
    rest = watch.feed(read(h, 1 << 20))
    kinds = [r.type for r in rest]
    assert RecordType.NAMESPACE_BLOCKS not in kinds
    final = [r for r in rest if r.type == RecordType.CHANNEL_SYNC][-1]
    assert ChannelSync.unpack(final.payload).flags == ChannelSyncFlag.FINAL
    assert kinds[-1] == RecordType.END
    watch.check_complete()
    set_state(h, MigState.STOP)
    assert chan.closed  # the session ended: so did its channel


def test_the_destination_waits_for_what_a_sync_announced() -> None:
    disk = Disk()
    h = handler(disk)
    h.channel.factory = factory = FakeFactory(disk)  # type: ignore[assignment]
    a, b = socket.socketpair()
    with a, b:
        channel_set(h, w.ChannelMode.FD, [os.dup(a.fileno())])
    set_state(h, MigState.RESUMING)
    assert factory.made[0][0] == "destination"
    received = factory.channel.receiver_
    stream = StreamWriter(disk.migration_fingerprint(), flags=HeaderFlag.DATA_CHANNEL)
    stream.add(channel_sync(2, 96))
    write(h, stream.read(1 << 20))  # the sync itself is taken ...
    stream.add(dirty_round(0, 0))
    chunk = stream.read(1 << 20)
    with pytest.raises(NotYet):  # ... what follows waits for the two records
        write(h, chunk)
    received.head(channel_head(ChannelType.ZEROES, 0, 1, 0, 4096))
    with pytest.raises(NotYet):
        set_state(h, MigState.STOP)  # the commit waits too
    received.head(channel_head(ChannelType.ZEROES, 1, 1, 4096, 4096))
    write(h, chunk)
    stream.add(channel_sync(2, 96, final=True))
    write(h, stream.read(1 << 20))
    # Caught up: the commit runs, and refuses this stream (no device state, no END).
    with pytest.raises(Reject) as err:
        set_state(h, MigState.STOP)
    assert err.value.errno == errno.EINVAL
    assert factory.channel.closed


def test_a_failed_channel_fails_the_destination_session() -> None:
    disk = Disk()
    h = handler(disk)
    h.channel.factory = factory = FakeFactory(disk)  # type: ignore[assignment]
    a, b = socket.socketpair()
    with a, b:
        channel_set(h, w.ChannelMode.FD, [os.dup(a.fileno())])
    set_state(h, MigState.RESUMING)
    stream = StreamWriter(disk.migration_fingerprint(), flags=HeaderFlag.DATA_CHANNEL)
    stream.add(channel_sync(5, 240))
    write(h, stream.read(1 << 20))
    factory.channel.error = OSError(errno.ECONNRESET, "closed in the middle of a record")
    stream.add(dirty_round(0, 0))
    with pytest.raises(Reject) as err:
        write(h, stream.read(1 << 20))
    assert "closed in the middle" in str(err.value)


def test_records_announced_by_the_final_sync_may_arrive_after_it() -> None:
    # The final CHANNEL_SYNC travels on the vfio-user socket, the records it
    # counts on the channel: either may arrive first (an ssh forward, a relay).
    r = ChannelReceiver()
    r.head(data(0))
    r.data_done(True)
    r.sync(sync(2, 2 * 48 + 8192, final=True))
    assert not r.caught_up()
    r.head(data(1, 4096))
    r.data_done(True)
    assert r.caught_up()
    r.check_complete()
    with pytest.raises(StreamError, match="more than the 2 records announced"):
        r.head(data(2, 8192))


def retract_pair(r: ChannelReceiver, offset: int, length: int = 4096) -> None:
    r.head(data(r.records, offset, length))
    r.data_done(False)
    r.head(channel_head(ChannelType.RETRACT, r.records, 1, offset, length))


def test_retracted_ranges_merge_and_are_bounded() -> None:
    # Touching and overlapping retracted ranges are kept as one; a peer that
    # retracts ever more separate ranges is refused once they pass the bound
    # (each is work and memory until a later record covers it).
    r = ChannelReceiver(max_retracted=4)
    for at in range(0, 64 * 4096, 4096):
        retract_pair(r, at)
    retract_pair(r, 2048, 8192)
    assert r.retracted == 1
    r.head(data(r.records, 0, 64 * 4096))
    r.data_done(True)
    assert r.retracted == 0
    for k in range(4):
        retract_pair(r, k * 8192)
    assert r.retracted == 4
    with pytest.raises(StreamError, match="more than 4 retracted ranges"):
        retract_pair(r, 4 * 8192)


def test_covering_part_of_a_retracted_range_leaves_the_rest() -> None:
    r = ChannelReceiver()
    retract_pair(r, 0, 16 * 4096)
    retract_pair(r, 32 * 4096, 4096)
    r.head(data(r.records, 4 * 4096, 4 * 4096))
    r.data_done(True)
    assert r.retracted == 3  # 0..4, 8..16 and 32 are still owed
    r.head(data(r.records, 0, 33 * 4096))
    r.data_done(True)
    assert r.retracted == 0
