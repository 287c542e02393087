"""The migration data channel's two ends on the event loop (runtime layer).

The vfio-user migration handler (:mod:`appliance.vfio_user.migration_channel`)
asks :class:`ChannelEnds` for a session's end: :class:`SourceChannel` sends
dirty ranges straight from the image with ``os.sendfile`` (the checksum in
each record head is computed from an mmap of the range: no copy into user
space); :class:`DestinationChannel` splices each payload from the socket
through a pipe into the staging image (``os.splice``) and verifies it there,
from an mmap of the staged range, before it counts.  Both sockets are
non-blocking and each callback moves at most :data:`STEP` bytes (the
destination's at most :data:`MAX_STEP_RECORDS` records too), so the
vfio-user and control sockets keep being served while data flows.  A peer
that makes no progress for the session's timeout while the end has work to
do fails the channel (the handler then fails the migration).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import socket
import tempfile
import time
from collections.abc import Callable

import xxhash

from appliance.errors import LocalProtocolError
from appliance.runtime.loop import EventLoop
from appliance.storage.migration_channel import DirtyRange, NvmeChannelDevice
from appliance.vfio_user.migration_channel import (
    ChannelHead,
    ChannelListener,
    ChannelReceiver,
    ChannelType,
    channel_head,
)
from appliance.vfio_user.migration_stream import StreamError

log = logging.getLogger("appliance.migrate")

STEP = 8 << 20  # bytes one loop callback moves at most
MAX_QUEUED_RANGES = 256  # ranges the source queues at most; the rest of a round is taken as it drains
MAX_STEP_RECORDS = 256  # records one destination callback takes at most (heads cost no bytes)
PIPE_SIZE = 1 << 20  # the destination's splice pipe
SOCKET_BUFFER = 4 << 20  # SO_SNDBUF / SO_RCVBUF asked for (the kernel caps it at [wr]mem_max)
F_SETPIPE_SZ = 1031
CHECK_EVERY = 1.0  # seconds between a deadline's checks at most (a stopped one ends then)
SPLICE_F_MOVE, SPLICE_F_NONBLOCK = 1, 2


def range_checksum(fd: int, offset: int, length: int) -> int:
    """xxh3_64 of ``length`` bytes at ``offset`` of file ``fd``, read through an mmap.

    Raises:
        OSError: EIO when the file is shorter than the range (an mmap past its
            end would fault), or the mmap failed.
    """
    if os.fstat(fd).st_size < offset + length:
        raise OSError(errno.EIO, f"range {offset:#x}+{length:#x} past the end of the file")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    # MAP_POPULATE: the pages are mapped in one call, not faulted in one by one.
    with mmap.mmap(fd, offset + length - start, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                   mmap.PROT_READ, offset=start) as area:
        view = memoryview(area)
        try:
            return xxhash.xxh3_64_intdigest(view[offset - start:])
        finally:
            view.release()


class _Deadline:
    """Fails an end that has work but makes no progress for ``timeout`` seconds.

    Time with nothing to do does not count: the first check that finds work
    after one that found none starts the clock (so the end has at least
    ``timeout`` seconds from when work appears, at most a check interval more).
    It checks at least every :data:`CHECK_EVERY` seconds, and once stopped it
    holds nothing of its end: a session ended long before its timeout leaves
    at most a second-long pending check behind, not the channel for minutes.
    """

    def __init__(self, loop: EventLoop, timeout: float, busy: Callable[[], bool],
                 fail: Callable[[OSError], None]) -> None:
        self.loop, self.timeout = loop, timeout
        self._busy: Callable[[], bool] | None = busy
        self._fail: Callable[[OSError], None] | None = fail
        self.last = time.monotonic()
        self._was_idle = False  # the last check found nothing to do
        loop.call_later(min(timeout, CHECK_EVERY), self._check)

    def stop(self) -> None:
        self._busy = self._fail = None

    def progress(self) -> None:
        self.last = time.monotonic()

    def _check(self) -> None:
        busy, fail = self._busy, self._fail
        if busy is None or fail is None:
            return
        now = time.monotonic()
        wait = self.timeout
        if not busy():  # nothing to do is no stall
            self._was_idle = True
        elif self._was_idle:  # work appeared since the last check: its clock starts now
            self._was_idle = False
            self.last = now
        elif now - self.last >= self.timeout:
            self.stop()
            fail(TimeoutError(errno.ETIMEDOUT,
                              f"no progress on the data channel for {self.timeout:g} s"))
            return
        else:
            wait = self.timeout - (now - self.last)
        self.loop.call_later(min(wait, CHECK_EVERY), self._check)


def _stream_socket(fd: int) -> socket.socket:
    """Our socket object for ``fd`` (ours from now on: closed on failure too).

    Raises:
        OSError: EINVAL when it is not a stream socket.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        raise OSError(errno.EINVAL, "the data channel fd is not a stream socket")
    sock.setblocking(False)
    _buffers(sock)
    return sock


def check_connected_stream(fd: int) -> None:
    """Whether ``fd`` is a connected stream socket (it stays open, the caller's).

    Raises:
        OSError: EINVAL for anything else: not a socket (a pipe, a file), a
            datagram or packet socket, a listening or unconnected one.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        raise OSError(errno.EINVAL, "the data channel fd is not a socket") from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise OSError(errno.EINVAL, "the data channel fd is not a stream socket")
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(errno.EINVAL, "the data channel fd is a listening socket")
        try:
            sock.getpeername()
        except OSError:
            raise OSError(errno.EINVAL, "the data channel fd is not connected") from None
    finally:
        sock.detach()


def _buffers(sock: socket.socket) -> None:
    """Larger socket buffers: fewer wake-ups per MiB on both ends."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


class _End:
    """What both ends share: the socket, the error, the deadline, the notify callback."""

    def __init__(self, loop: EventLoop, timeout: float, notify: Callable[[], None]) -> None:
        self.loop = loop
        self.notify = notify
        self.error: Exception | None = None
        self.closed = False
        self.sock: socket.socket | None = None
        self.deadline = _Deadline(loop, timeout, self._busy, self._fail)

    def _busy(self) -> bool:
        return False

    def _fail(self, exc: Exception) -> None:
        if self.error is None and not self.closed:
            log.warning("migration data channel: %s", exc)
            self.error = exc
            self._stop()
            self.notify()

    def _stop(self) -> None:
        self.deadline.stop()
        if self.sock is not None and self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
            self.sock.close()

    def close(self) -> None:
        if not self.closed:
            self._stop()
            self.closed = True


class SourceChannel(_End):
    """The sending end: dirty ranges, queued as descriptors, sent from the image."""

    def __init__(self, loop: EventLoop, fd: int, device: NvmeChannelDevice, timeout: float,
                 notify: Callable[[], None]) -> None:
        super().__init__(loop, timeout, notify)
        self.sock = _stream_socket(fd)
        self.device = device
        self.queue: collections.deque[tuple[ChannelType, DirtyRange]] = collections.deque()
        self.allowance = 0  # bytes of the round still to take from the dirty map
        self.records = 0
        self.bytes = 0
        self._head = memoryview(b"")  # unsent head bytes of the current record
        self._current: tuple[ChannelType, DirtyRange] | None = None
        self._done = 0  # payload bytes of the current record sent
        self._writing = False

    @property
    def idle(self) -> bool:
        return not self.queue and self._current is None and self.allowance <= 0

    @property
    def sent(self) -> tuple[int, int]:
        return self.records, self.bytes

    @property
    def receiver(self) -> ChannelReceiver:
        raise LocalProtocolError("a source channel receives nothing", errno.EINVAL)

    def _busy(self) -> bool:
        return not self.idle

    def fill(self, max_bytes: int) -> int:
        """Send up to ``max_bytes`` of dirty data (the round's budget): up to
        :data:`MAX_QUEUED_RANGES` ranges are taken now, the rest as the queue
        drains; returns the bytes taken now (0: none, the queue is full).

        Raises:
            LocalProtocolError: as :meth:`NvmeChannelDevice.take_ranges`.
        """
        if self.error is not None or self.closed:
            return 0
        self.allowance = max_bytes
        taken = self._refill()
        if self.queue and not self._writing:
            assert self.sock is not None
            self.loop.add_writer(self.sock.fileno(), self._writable)
            self._writing = True
            self.deadline.progress()
        return taken

    def _refill(self) -> int:
        """Take more of the allowance into the queue, up to its bound; returns the bytes."""
        room = MAX_QUEUED_RANGES - len(self.queue)
        if self.allowance <= 0 or room <= 0:
            return 0
        ranges = self.device.take_ranges(self.allowance, room)
        for rng in ranges:
            self.queue.append((ChannelType.ZEROES if rng.zeroes else ChannelType.DATA, rng))
        taken = sum(rng.length for rng in ranges)
        self.allowance = self.allowance - taken if ranges else 0
        return taken

    def _writable(self) -> None:
        try:
            self._send(STEP)
        except BlockingIOError:
            pass
        except (OSError, LocalProtocolError) as exc:
            self._fail(exc)
        except Exception as exc:  # a bug: fail the channel once, not on every pass
            log.exception("migration data channel: sending failed")
            self._fail(exc)

    def _send(self, budget: int) -> None:
        sock = self.sock
        assert sock is not None
        while budget > 0:
            if self._current is None:
                if not self.queue:
                    self._refill()
                if not self.queue:
                    self.loop.remove_writer(sock.fileno())
                    self._writing = False
                    self.notify()  # idle: a waiting sync can go
                    return
                self._start(*self.queue.popleft())
            kind, rng = self._current  # type: ignore[misc]
            while self._head:
                n = sock.send(self._head, socket.MSG_NOSIGNAL)
                self._head = self._head[n:]
                self.deadline.progress()
            if kind is ChannelType.DATA:
                while self._done < rng.length and budget > 0:
                    n = os.sendfile(sock.fileno(), self.device.image_fd(rng.nsid),
                                    rng.offset + self._done,
                                    min(rng.length - self._done, budget))
                    if n == 0:
                        raise OSError(errno.EIO, "the image ended inside a range being sent")
                    self._done += n
                    budget -= n
                    self.deadline.progress()
                if self._done < rng.length:
                    return
            self._finish(kind, rng)

    def _start(self, kind: ChannelType, rng: DirtyRange) -> None:
        checksum = 0
        if kind is ChannelType.DATA:
            self.device.sending(rng)
            checksum = range_checksum(self.device.image_fd(rng.nsid), rng.offset, rng.length)
        self._head = memoryview(channel_head(kind, self.records, rng.nsid, rng.offset,
                                             rng.length, checksum))
        self._current = (kind, rng)
        self._done = 0

    def _finish(self, kind: ChannelType, rng: DirtyRange) -> None:
        self._current = None
        self.records += 1
        self.bytes += ChannelHead.SIZE + (rng.length if kind is ChannelType.DATA else 0)
        if kind is ChannelType.DATA and self.device.written_since_taken(rng):
            # Written while it was sent (the source runs in pre-copy): the
            # destination cannot trust it; it travels again in a later round.
            self.device.mark_again(rng)
            self.queue.appendleft((ChannelType.RETRACT, rng))


class DestinationChannel(_End):
    """The receiving end: heads checked, payloads spliced into the staging image, verified."""

    def __init__(self, loop: EventLoop, endpoint: int | ChannelListener,
                 device: NvmeChannelDevice, timeout: float, notify: Callable[[], None]) -> None:
        super().__init__(loop, timeout, notify)
        self.device = device
        self.receiver = ChannelReceiver()
        self.listener: Listener | None = None
        self._head = bytearray()
        self._current: ChannelHead | None = None
        self._target = -1
        self._done = 0
        self._pipe: tuple[int, int] | None = None
        if isinstance(endpoint, int):
            self._attach(_stream_socket(endpoint))
        else:
            assert isinstance(endpoint, Listener)
            self.listener = endpoint
            loop.add_reader(endpoint.sock.fileno(), self._accept)

    @property
    def idle(self) -> bool:
        return True

    @property
    def sent(self) -> tuple[int, int]:
        return 0, 0

    def fill(self, max_bytes: int) -> int:
        raise LocalProtocolError("a destination channel sends nothing", errno.EINVAL)

    def _busy(self) -> bool:
        try:
            return self.receiver.mid_record or not self.receiver.caught_up()
        except StreamError:
            return True

    def _accept(self) -> None:
        listener = self.listener
        assert listener is not None
        try:
            sock, _ = listener.sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(exc)
            return
        self.loop.remove_reader(listener.sock.fileno())
        listener.close()  # one connection per session; the path is gone now
        self.listener = None
        sock.setblocking(False)
        _buffers(sock)
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        self.sock = sock
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe = (r, w)
        with contextlib.suppress(OSError):  # a smaller pipe only means more calls
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        self.loop.add_reader(sock.fileno(), self._readable)
        self.deadline.progress()

    def _readable(self) -> None:
        try:
            self._receive(STEP)
        except BlockingIOError:
            pass
        except (OSError, LocalProtocolError, StreamError) as exc:
            self._fail(exc)
        except Exception as exc:  # a bug: fail the channel once, not on every pass
            log.exception("migration data channel: receiving failed")
            self._fail(exc)

    def _receive(self, budget: int) -> None:
        sock, pipe = self.sock, self._pipe
        assert sock is not None and pipe is not None
        heads = 0
        while budget > 0:
            if self._current is None:
                if heads == MAX_STEP_RECORDS:
                    return  # the rest on the next callback (the socket stays readable)
                heads += 1
                data = sock.recv(ChannelHead.SIZE - len(self._head))
                if not data:
                    self._eof()
                    return
                self.deadline.progress()
                self._head += data
                if len(self._head) < ChannelHead.SIZE:
                    continue
                raw, self._head = bytes(self._head), bytearray()
                self._begin(self.receiver.head(raw))
                continue
            head = self._current
            want = min(head.length - self._done, PIPE_SIZE, budget)
            n = os.splice(sock.fileno(), pipe[1], want, flags=SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n == 0:
                self._eof()
                return
            self.deadline.progress()
            left = n
            while left:
                left -= os.splice(pipe[0], self._target, left,
                                  offset_dst=head.offset + self._done + (n - left),
                                  flags=SPLICE_F_MOVE)
            self._done += n
            budget -= n
            if self._done == head.length:
                self._end_data(head)

    def _begin(self, head: ChannelHead) -> None:
        kind = ChannelType(head.type)
        if kind is ChannelType.DATA:
            self._target = self.device.stage_target(head.nsid, head.offset, head.length)
            self._current = head
            self._done = 0
            return
        if kind is ChannelType.ZEROES:
            self.device.stage_zeroes(head.nsid, head.offset, head.length)
        self.notify()  # a record counted (the receiver completed it)

    def _end_data(self, head: ChannelHead) -> None:
        self._current = None
        verified = range_checksum(self._target, head.offset, head.length) == head.checksum
        self.device.staged(head.nsid, head.offset, head.length)
        self.receiver.data_done(verified)
        self.notify()

    def _eof(self) -> None:
        if self.receiver.mid_record or self._head:
            raise OSError(errno.ECONNRESET, "the data channel closed in the middle of a record")
        self.receiver.closed = True
        assert self.sock is not None
        self.loop.remove_reader(self.sock.fileno())
        self.notify()

    def _stop(self) -> None:
        super()._stop()
        if self.listener is not None:
            self.loop.remove_reader(self.listener.sock.fileno())
            self.listener.close()
            self.listener = None
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None


class Listener:
    """A per-session Unix socket in a fresh 0700 directory (LISTEN mode).

    The directory is held open from its creation: :meth:`close` removes the
    socket through it and the directory only while its path still names it,
    so a directory moved away and replaced (by a symlink, by another one)
    never makes the cleanup delete what is not ours.
    """

    def __init__(self, base: str) -> None:
        self.directory = tempfile.mkdtemp(prefix="migch-", dir=base)  # 0700, created exclusively
        self.path = os.path.join(self.directory, "data.sock")
        try:
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY
                                   | os.O_NOFOLLOW | os.O_CLOEXEC)
        except BaseException:
            os.rmdir(self.directory)
            raise
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                                      | socket.SOCK_NONBLOCK)
        except BaseException:  # (out of fds): nothing of it stays
            os.close(self._dir_fd)
            os.rmdir(self.directory)
            raise
        try:
            self.sock.bind(self.path)
            self.sock.listen(1)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop listening, remove the socket and the directory (idempotent)."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self._dir_fd < 0:
            return
        dir_fd, self._dir_fd = self._dir_fd, -1
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink("data.sock", dir_fd=dir_fd)
            held = os.fstat(dir_fd)
            with contextlib.suppress(OSError):
                now = os.stat(self.directory, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    os.rmdir(self.directory)
        finally:
            os.close(dir_fd)


class ChannelEnds:
    """The runtime's :class:`~appliance.vfio_user.migration_channel.ChannelFactory`."""

    def __init__(self, loop: EventLoop, device: NvmeChannelDevice, base: str) -> None:
        """``base``: the directory LISTEN sockets are made in (the vfio-user socket's)."""
        self.loop, self.device, self.base = loop, device, base

    def blocker(self) -> str:
        return self.device.blocker()

    def check_fd(self, fd: int) -> None:
        check_connected_stream(fd)

    def listen(self) -> Listener:
        return Listener(self.base)

    def source(self, fd: int, timeout: float, notify: Callable[[], None]) -> SourceChannel:
        return SourceChannel(self.loop, fd, self.device, timeout, notify)

    def destination(self, endpoint: int | ChannelListener, timeout: float,
                    notify: Callable[[], None]) -> DestinationChannel:
        return DestinationChannel(self.loop, endpoint, self.device, timeout, notify)
