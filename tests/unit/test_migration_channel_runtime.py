"""The data channel's two ends on a real event loop: a record written while it
is being sent is retracted, bounded callbacks, the LISTEN socket's cleanup."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_nvme_driver import make_controller

from appliance.errors import LocalProtocolError
from appliance.runtime.loop import EventLoop
from appliance.runtime.migration_channel import (
    CHECK_EVERY,
    MAX_QUEUED_RANGES,
    MAX_STEP_RECORDS,
    DestinationChannel,
    Listener,
    SourceChannel,
    _Deadline,
    range_checksum,
)
from appliance.storage import nsmgmt
from appliance.storage.controller import NvmeController
from appliance.storage.migration import NvmeMigratable
from appliance.storage.migration_channel import NvmeChannelDevice
from appliance.storage.namespace import Namespace
from appliance.vfio_user.migration_channel import (
    ChannelHead,
    ChannelReceiver,
    ChannelType,
    channel_head,
)

MiB = 1 << 20


@dataclass
class Source:
    """A source channel over a socketpair, its namespace dirty-tracked."""

    ctrl: NvmeController
    ns: Namespace
    mig: NvmeMigratable
    loop: EventLoop
    chan: SourceChannel
    peer: socket.socket  # the other end, non-blocking
    notes: list[int]  # one entry per time the channel told its handler


@contextlib.contextmanager
def tracking_source(tmp_path: Path, size: int,
                    write: Callable[[Namespace], None]) -> Iterator[Source]:
    """A namespace of ``size`` bytes that ``write`` fills, dirty-tracked from
    then on, and a source channel on a fresh loop (5 s timeout)."""
    ctrl = make_controller(tmp_path, size=size)
    try:
        ns = ctrl.namespaces[1]
        write(ns)
        mig = NvmeMigratable(ctrl)
        mig.start_tracking()
        loop = EventLoop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        notes: list[int] = []
        chan = SourceChannel(loop, ours.detach(), NvmeChannelDevice(mig), 5.0,
                             lambda: notes.append(1))
        try:
            yield Source(ctrl, ns, mig, loop, chan, theirs, notes)
        finally:
            chan.close()
            theirs.close()
            loop.close()
    finally:
        ctrl.close()


def drain(src: Source, each: Callable[[], None] = lambda: None) -> bytearray:
    """Run the loop until the channel is idle (``each`` before every pass);
    returns what the peer received."""
    got = bytearray()
    while not src.chan.idle:
        each()
        src.loop.run_once(0)
        with contextlib.suppress(BlockingIOError):
            while chunk := src.peer.recv(MiB):
                got += chunk
    return got


def test_a_range_written_while_it_is_sent_is_retracted(tmp_path: Path) -> None:
    with tracking_source(tmp_path, 16 * MiB,
                         lambda ns: ns.write_bytes(0, os.urandom(12 * MiB))) as src:
        ns, mig, loop, chan = src.ns, src.mig, src.loop, src.chan
        assert chan.fill(16 * MiB) == 16 * MiB  # 12 data records and the hole
        loop.run_once(0)  # sends until the socket is full: a record is in flight
        assert chan._current is not None
        kind, rng = chan._current
        assert kind is ChannelType.DATA
        ns.write_bytes((rng.offset + 4096) >> ns.lba_shift, os.urandom(4096))  # the guest
        got = drain(src)
        # Every record checks out on a receiver, the torn one retracted right after.
        r = ChannelReceiver()
        at, kinds = 0, []
        while at < len(got):
            head = r.head(bytes(got[at:at + ChannelHead.SIZE]))
            at += ChannelHead.SIZE
            kinds.append((ChannelType(head.type), head.offset))
            if head.type == ChannelType.DATA:
                payload = bytes(got[at:at + head.length])
                at += head.length
                img = tmp_path / "payload"
                img.write_bytes(payload)
                fd = os.open(img, os.O_RDONLY)
                try:
                    ok = range_checksum(fd, 0, len(payload)) == head.checksum
                finally:
                    os.close(fd)
                if head.offset != rng.offset:
                    assert ok
                r.data_done(ok)
        torn = kinds.index((ChannelType.DATA, rng.offset))
        assert kinds[torn + 1] == (ChannelType.RETRACT, rng.offset)
        assert chan.sent == (r.records, r.bytes)
        pages = mig.dirty[1]
        first = rng.offset // pages.page
        assert pages.map[first:first + rng.length // pages.page] == b"\x01" * (rng.length
                                                                            // pages.page)
        assert src.notes  # told when it went idle


def test_one_callback_takes_a_bounded_number_of_records(tmp_path: Path) -> None:
    # A peer that sends heads only (ZEROES: no payload, no byte budget spent)
    # as fast as it can must not keep the destination's callback, and so the
    # event loop, to itself.
    ctrl = make_controller(tmp_path, size=1 * MiB)
    mig = NvmeMigratable(ctrl)
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    n = 2000
    theirs.sendall(b"".join(channel_head(ChannelType.ZEROES, seq, 1, 0, 4096)
                            for seq in range(n)))
    chan = DestinationChannel(loop, ours.detach(), NvmeChannelDevice(mig), 5.0, lambda: None)
    try:
        chan._readable()
        assert chan.error is None
        assert 0 < chan.receiver.records <= MAX_STEP_RECORDS < n
        while chan.receiver.records < n:  # the rest on later callbacks
            chan._readable()
        assert chan.error is None
    finally:
        chan.close()
        theirs.close()
        mig.abort_restore()
        ctrl.close()


def test_a_range_written_before_it_is_sent_goes_with_its_new_data(tmp_path: Path) -> None:
    # fill() takes a whole round's ranges at once; a write to a range still
    # queued lands before the record's checksum and payload are read, so the
    # record carries it: no RETRACT, nothing dirty again (a RETRACT per such
    # record made a busy guest owe the destination thousands of ranges).
    with tracking_source(tmp_path, 16 * MiB,
                         lambda ns: ns.write_bytes(0, os.urandom(16 * MiB))) as src:
        ns, mig, chan = src.ns, src.mig, src.chan
        assert chan.fill(16 * MiB) == 16 * MiB
        new = os.urandom(4096)
        ns.write_bytes((15 * MiB) >> ns.lba_shift, new)  # the last record, still queued
        got = drain(src)
        r = ChannelReceiver()
        at, image = 0, bytearray(16 * MiB)
        while at < len(got):
            head = r.head(bytes(got[at:at + ChannelHead.SIZE]))
            at += ChannelHead.SIZE
            assert head.type == ChannelType.DATA
            image[head.offset:head.offset + head.length] = got[at:at + head.length]
            at += head.length
            r.data_done(True)
        assert image == ns.read_bytes(0, 16 * MiB)
        assert image[15 * MiB:15 * MiB + 4096] == new
        assert mig.dirty[1].count == 0


def test_closing_a_listener_removes_only_its_own_socket(tmp_path: Path) -> None:
    # Whoever can write the base directory may move the per-session directory
    # away and leave a symlink to another directory in its place: the cleanup
    # must not follow it and delete that directory's "data.sock".
    base, victim = tmp_path / "base", tmp_path / "victim"
    base.mkdir()
    victim.mkdir()
    (victim / "data.sock").write_text("not ours")
    listener = Listener(str(base))
    moved = tmp_path / "moved"
    os.rename(listener.directory, moved)
    os.symlink(victim, listener.directory)
    listener.close()
    assert (victim / "data.sock").read_text() == "not ours"
    assert os.path.islink(listener.directory)  # not ours to remove either
    assert not (moved / "data.sock").exists()  # ours: removed where it went


def test_closing_a_listener_twice_leaves_a_new_directory_of_that_name(tmp_path: Path) -> None:
    listener = Listener(str(tmp_path))
    listener.close()
    assert not os.path.exists(listener.directory)
    os.mkdir(listener.directory)
    (Path(listener.directory) / "data.sock").write_text("someone else's")
    listener.close()
    assert (Path(listener.directory) / "data.sock").exists()


def test_a_listener_that_cannot_be_made_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Out of fds (EMFILE) when the socket is made: the SET fails with that
    # errno; the directory and the fd held on it must not stay behind.
    def no_socket(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(socket, "socket", no_socket)
    with pytest.raises(OSError) as raised:
        Listener(str(tmp_path))
    monkeypatch.undo()
    assert raised.value.errno == errno.EMFILE
    assert os.listdir(tmp_path) == []
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_namespace_deleted_while_its_range_is_sent_fails_the_channel(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Namespace Management may delete a namespace during pre-copy (the session
    # then fails at the next read, EBUSY); the channel must fail once, not leave
    # its writer raising on every loop pass until the timeout.
    with tracking_source(tmp_path, 16 * MiB,
                         lambda ns: ns.write_bytes(0, os.urandom(16 * MiB))) as src:
        loop, chan = src.loop, src.chan
        chan.fill(16 * MiB)
        loop.run_once(0)
        assert chan._current is not None  # a record in flight
        nsmgmt.delete(src.ctrl, 1)
        with contextlib.suppress(BlockingIOError):
            while src.peer.recv(MiB):
                pass
        for _ in range(3):
            loop.run_once(0)
        assert isinstance(chan.error, LocalProtocolError)
        assert chan.error.errno == errno.EBUSY and "namespace 1" in str(chan.error)
        assert src.notes  # the handler was told
        assert not [r for r in caplog.records if "handler for fd" in r.getMessage()]


def test_the_source_holds_a_bounded_queue_of_ranges(tmp_path: Path) -> None:
    # A round's ranges are taken as the channel drains, not all at once: an
    # image the guest left as data and holes page after page is two ranges per
    # 8 KiB, and queuing a whole round of them grew without bound.
    def data_and_holes(ns: Namespace) -> None:
        for at in range(0, 8 * MiB, 8192):
            ns.write_bytes(at >> ns.lba_shift, os.urandom(4096))

    with tracking_source(tmp_path, 8 * MiB, data_and_holes) as src:
        ns, mig, chan = src.ns, src.mig, src.chan
        assert chan.fill(8 * MiB) > 0
        queued = [len(chan.queue)]
        got = drain(src, lambda: queued.append(len(chan.queue)))
        most = max(queued)
        assert most <= MAX_QUEUED_RANGES < 1024
        r = ChannelReceiver()
        image, at = bytearray(8 * MiB), 0
        while at < len(got):
            head = r.head(bytes(got[at:at + ChannelHead.SIZE]))
            at += ChannelHead.SIZE
            if head.type == ChannelType.DATA:
                image[head.offset:head.offset + head.length] = got[at:at + head.length]
                at += head.length
                r.data_done(True)
        assert image == ns.read_bytes(0, 8 * MiB)  # the whole round went
        assert mig.dirty[1].count == 0 and src.notes


def test_a_closed_channel_is_not_kept_by_its_deadline(tmp_path: Path) -> None:
    # A client may start and end channel sessions as fast as it likes, each
    # with a 600 s timeout: the deadline's pending check must neither keep the
    # closed channel alive nor stay pending for the whole timeout.
    ctrl = make_controller(tmp_path, size=1 * MiB)
    try:
        mig = NvmeMigratable(ctrl)
        mig.start_tracking()
        loop = EventLoop()
        refs = []
        for _ in range(3):
            ours, theirs = socket.socketpair()
            chan = SourceChannel(loop, ours.detach(), NvmeChannelDevice(mig), 600.0,
                                 lambda: None)
            refs.append(weakref.ref(chan))
            chan.close()
            theirs.close()
            del chan
        gc.collect()
        assert all(ref() is None for ref in refs)
        assert max(when for when, _, _ in loop._timers) <= time.monotonic() + CHECK_EVERY
        loop.close()
    finally:
        ctrl.close()


def test_idle_time_before_work_arrives_does_not_count_against_the_deadline() -> None:
    # The destination has work only once a CHANNEL_SYNC announced records the
    # channel has not brought yet; the time it had nothing to do before that
    # is no stall: the end gets its whole timeout from when the work appeared.
    loop = EventLoop()
    busy = [False]
    asked = [0]
    failed: list[OSError] = []
    timeout = 0.05

    def has_work() -> bool:
        asked[0] += 1
        return busy[0]

    deadline = _Deadline(loop, timeout, has_work, failed.append)
    start = time.monotonic()
    while time.monotonic() - start < 4 * timeout:  # idle for longer than the timeout
        loop.run_once(timeout)
    assert asked[0] <= 6  # a check per timeout while idle, not one per pass
    busy[0] = True  # a sync announced records still on their way
    became_busy = time.monotonic()
    deadline._check()  # the periodic check happens to run right then
    assert not failed, "failed the moment the work appeared"
    while not failed and time.monotonic() - became_busy < 20 * timeout:
        loop.run_once(timeout / 5)
    assert failed, "a real stall must still fail the channel"
    assert time.monotonic() - became_busy >= timeout  # its whole timeout, no less
    loop.close()
