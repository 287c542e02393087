"""One end of a live-handoff socket on the event loop (runtime layer).

Both sides of a handoff (:mod:`~appliance.runtime.handoff.source`,
:mod:`~appliance.runtime.handoff.sink`) talk to the other process through a
:class:`ChannelEnd`: a non-blocking stream socket whose output is a queue of
(bytes, fds) sent as far as the socket takes them, the rest on writability.
The queue holds at most what its owner puts in; the source adds a piece (at
most :data:`MAX_PIECE`) only while less than :data:`LOW_WATER` is unsent, so a
destination that stops reading holds at most ``LOW_WATER + MAX_PIECE`` of the
source's memory.  A peer that makes no
progress (no byte read or written) for ``timeout`` seconds fails the
channel: the loop never waits on the other process.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.runtime.loop import EventLoop
from appliance.runtime.outqueue import Flush, OutputQueue

if TYPE_CHECKING:
    from appliance.runtime.app import Appliance

log = logging.getLogger("appliance.handoff")

TIMEOUT = 30.0  # seconds the other process may make no progress
LOW_WATER = 4 << 20  # the source adds records while less than this is unsent
MAX_PIECE = 4 << 20  # the most the source adds at once (a chunk of records, in frames)


def image_ids(app: Appliance) -> list[list[int]]:
    """(nsid, st_dev, st_ino) of every writable configured namespace's image (not
    those created at run time: the destination opens those by name)."""
    assert app.controller is not None
    out = []
    created = app.controller.ns_mgmt.created
    for nsid, ns in sorted(app.controller.namespaces.items()):
        if not ns.read_only and not ns.remote and nsid not in created:  # NBD blocks the handoff
            st = os.fstat(ns.fd)
            out.append([nsid, st.st_dev, st.st_ino])
    return out


class ChannelEnd:
    """A non-blocking socket to the other process: queued output, a progress deadline.

    ``on_readable`` reads (the owner knows the framing); ``on_sent`` is called
    whenever the queue shrank (the owner may add more); ``on_error`` once, with
    the OSError of a failed send or a timeout (TimeoutError).  After that, or
    after :meth:`close`, nothing is called any more.
    """

    def __init__(self, loop: EventLoop, sock: socket.socket, on_readable: Callable[[], None],
                 on_error: Callable[[OSError], None], on_sent: Callable[[], None] | None = None,
                 timeout: float = TIMEOUT) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        self.on_readable = on_readable
        self.on_error = on_error
        self.on_sent = on_sent
        self.timeout = timeout
        self.closed = False
        self._failed = False
        self._out = OutputQueue(LOW_WATER + MAX_PIECE)  # the source adds only below LOW_WATER
        self._reading = self._writing = False
        self._last = time.monotonic()
        self.read(True)
        loop.call_later(timeout, self._check)

    # ------------------------------------------------------------ output
    @property
    def queued(self) -> int:
        """Unsent bytes."""
        return self._out.pending_bytes

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        """Queue ``data`` (``fds`` travel with its first byte) and send what the
        socket takes.  The fds are not ours: they are never closed here."""
        if self.closed:
            return
        self._out.push(data, list(fds or ()))
        if self._out.over_cap():  # the owner adds only below LOW_WATER: never here
            self._fail(OSError(errno.ENOBUFS, f"{self.queued} bytes unsent"))
            return
        self._flush()

    def _flush(self) -> None:
        before = self._out.pending_bytes
        if self._out.flush(self.sock) is Flush.FAILED:
            assert self._out.error is not None
            self._fail(self._out.error)
            return
        sent_any = self._out.pending_bytes < before
        if sent_any:
            self.progress()
        want = bool(self._out)
        if want != self._writing:
            if want:
                self.loop.add_writer(self.fd, self._flush)
            else:
                self.loop.remove_writer(self.fd)
            self._writing = want
        if sent_any and self.on_sent is not None:
            self.on_sent()

    # ------------------------------------------------------------ input
    def read(self, on: bool) -> None:
        """Watch the socket for input (or stop: a peer that closed its end)."""
        if self.closed or on == self._reading:
            return
        if on:
            self.loop.add_reader(self.fd, self._readable)
        else:
            self.loop.remove_reader(self.fd)
        self._reading = on

    def _readable(self) -> None:
        if not self.closed:
            self.on_readable()

    # ------------------------------------------------------------ life
    def progress(self) -> None:
        """The other process did something: the deadline starts again."""
        self._last = time.monotonic()

    def _check(self) -> None:
        if self.closed:
            return
        idle = time.monotonic() - self._last
        if idle >= self.timeout:
            self._fail(TimeoutError(errno.ETIMEDOUT, f"no progress for {self.timeout:g} s"))
            return
        self.loop.call_later(self.timeout - idle, self._check)

    def _fail(self, exc: OSError) -> None:
        """Report ``exc`` once (the socket is still open: what the peer said
        before it went may still be read), then close."""
        if self.closed or self._failed:
            return
        self._failed = True
        self.on_error(exc)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False
        if self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
        self._out.clear()
        self.sock.close()


def connect(path: str) -> socket.socket:
    """A non-blocking Unix stream socket connected (or connecting) to ``path``.

    Raises:
        BlockingIOError: the listener's backlog is full (the handoff fails; the
            destination's listener takes one connection, the control socket 64).
        OSError: nothing listens there.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                         | socket.SOCK_NONBLOCK)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock
