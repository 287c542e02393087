"""Serve a vfio-user device on a unix socket (runtime layer).

The listener accepts one client at a time per device (the protocol has one
client per connection and our devices are single-function); a second client
is refused by closing its socket.  Each readable event drains up to a batch
of messages with non-blocking ``recvmsg`` calls, each no larger than the
connection's :meth:`bytes_wanted`, so SCM_RIGHTS fds stay with their message.

The client's socket is non-blocking in both directions.  Replies go to an
output queue and are written as far as the socket takes them; the rest waits
for writability.  A client that sends requests and does not read the replies
(its queue, past the reply being written, grows beyond ``max_backlog``
bytes) is disconnected with one log line, so it never stalls the loop that
also serves the control socket and the net ports.

DMA to client memory that was mapped without an fd goes through
DMA_READ/DMA_WRITE messages that never block (:mod:`appliance.vfio_user.dma`):
the device holds what waits for a reply and the loop serves everything else.
A client that leaves one of them unanswered for ``DMA_TIMEOUT`` seconds is
disconnected, once, with one log line.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Callable

from appliance.control.events import CLIENT_CONNECTED, CLIENT_DISCONNECTED, Emit, ignore
from appliance.errors import ApplianceError, LocalProtocolError, RemoteProtocolError
from appliance.runtime import unix
from appliance.runtime.handoff.manifest import ClientEntry, VfioUserState
from appliance.runtime.listener import Claim, ListenerError, listen
from appliance.runtime.loop import EventLoop
from appliance.runtime.outqueue import Flush, OutputQueue
from appliance.vfio_user.backend import VfioUserDevice
from appliance.vfio_user.server import (
    MAX_MSG_FDS,
    DmaLayout,
    MigrationFactory,
    ServerConnection,
    check_handoff_state,
)

log = logging.getLogger("appliance.vfio_user")

BATCH = 64
MAX_PARKED_FRAMES = 8  # messages read behind one that waits, before reading stops
DMA_TIMEOUT = 5.0
MAX_BACKLOG = 1 << 20  # storage.max_backlog: unsent reply bytes behind the one being written
# SO_SNDBUF of a client's socket: a whole MIG_DATA_READ reply (1 MiB) goes in one
# sendmsg and is read whole (the 208 KiB default cuts it into rounds of wake-ups
# on both sides); the kernel caps it at net.core.wmem_max.
SEND_BUFFER = 2 << 20


def recv_chunk(sock: socket.socket, wanted: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One recvmsg of at most ``wanted`` bytes with up to MAX_MSG_FDS fds."""
    return unix.recv_chunk(sock, wanted, MAX_MSG_FDS, flags)


send_message = unix.send_message
signal_eventfd = unix.signal_eventfd


class VfioUserClientSocket:
    """One accepted client: feeds its socket to a :class:`ServerConnection`."""

    def __init__(self, loop: EventLoop, sock: socket.socket, device: VfioUserDevice,
                 on_close: Callable[[VfioUserClientSocket], None], name: str,
                 dma_layout: DmaLayout = DmaLayout.SPEC, max_backlog: int = MAX_BACKLOG,
                 migration: MigrationFactory | None = None) -> None:
        """Serve ``sock`` (made non-blocking here) until either side closes it.

        ``max_backlog``: unsent reply bytes, behind the reply being written,
        past which the client is disconnected.  ``migration``: the device's
        migration handler factory (:class:`ServerConnection`'s).
        """
        self.loop = loop
        self.sock = sock
        sock.setblocking(False)
        self.on_close = on_close
        self.conn = ServerConnection(device, notify=signal_eventfd, dma_layout=dma_layout,
                                     name=name, is_eventfd=unix.is_eventfd, migration=migration)
        self._dma_watch: frozenset[int] = frozenset()  # DMA messages the timer checks
        self.out = OutputQueue(max_backlog, cap_behind_head=True)
        self._writing = False  # a writer is registered with the loop
        self._paused = False  # reading stopped: MAX_PARKED_FRAMES wait behind a parked one
        if self.conn.migration is not None:  # a command waiting for the data channel
            self.conn.migration.wake = lambda: loop.call_later(0, self._wake)
        loop.add_reader(sock.fileno(), self._readable)

    def _wake(self) -> None:
        """Run the messages that waited for the migration data channel."""
        if self.sock.fileno() < 0:
            return
        if self.conn.parked:
            self.conn.process()
            self.flush()
            if self.conn.closed:
                self.close()
                return
        self._resume_reading()

    def _too_many_parked(self) -> bool:
        return self.conn.parked and self.conn.queued >= MAX_PARKED_FRAMES

    def _resume_reading(self) -> None:
        """Read the socket again once the messages behind a waiting one ran,
        whoever ran them (the wake, or a read the service made: :meth:`read_some`)."""
        if self._paused and not self._too_many_parked():
            self._paused = False
            self.loop.add_reader(self.sock.fileno(), self._readable)

    def read_some(self) -> bool:
        """Read what is available (up to a batch of messages); False once closed."""
        for _ in range(BATCH):
            try:
                data, fds = recv_chunk(self.sock, self.conn.bytes_wanted(), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except (OSError, RemoteProtocolError) as exc:
                log.warning("%s: %s; closing", self.conn.name, exc)
                self.close()
                return False
            try:
                self.conn.receive_data(data, fds)
            except RemoteProtocolError as exc:
                log.warning("%s: %s; closing", self.conn.name, exc)
                self.close()
                return False
            conn = self.conn
            conn.process()
            if conn.has_output or self.out or conn.closed:  # else flush has nothing to do
                self.flush()
            if conn.closed:
                self.close()
                return False
            if self._too_many_parked():
                # Nothing runs behind the waiting message: hold no more of the
                # client's messages (their data and fds) until it ran (_wake).
                self._paused = True
                self.loop.remove_reader(self.sock.fileno())
                break
        self._resume_reading()  # paused before this call (the service's read), and no longer
        return True

    def _readable(self) -> None:
        self.read_some()

    def flush(self) -> None:
        """Queue the connection's replies and write what the socket takes now.

        What is left waits for writability.  Closes the client when the send
        fails, when its backlog passes ``max_backlog``, or when the
        connection ended (after one attempt to send its last replies).
        """
        if self.sock.fileno() < 0:
            return
        for data, fds in self.conn.data_to_send():
            self.out.push(data, fds)
        if not self._write():
            return
        if self.conn.closed:
            self.close()
        elif not self._dma_watch and self.conn.dma.outstanding():
            self._watch_dma()

    def _watch_dma(self) -> None:
        self._dma_watch = self.conn.dma.outstanding()
        self.loop.call_later(DMA_TIMEOUT, self._dma_timer)

    def _dma_timer(self) -> None:
        """Disconnect a client that left a DMA message unanswered for DMA_TIMEOUT."""
        if self.sock.fileno() < 0:
            return
        late = self._dma_watch & self.conn.dma.outstanding()
        self._dma_watch = frozenset()
        if late:
            log.warning("%s: no reply to %d DMA message(s) within %g s; disconnecting",
                        self.conn.name, len(late), DMA_TIMEOUT)
            self.close()
        elif self.conn.dma.outstanding():
            self._watch_dma()

    def _write(self) -> bool:
        """Send from the queue until it is empty or the socket is full; False once closed."""
        out = self.out
        if out.flush(self.sock) is Flush.FAILED:
            log.warning("%s: send failed: %s; closing", self.conn.name, out.error)
            self.close()
            return False
        if out.over_cap():
            log.warning("%s: client left %d bytes of replies unread (storage.max_backlog %d); "
                        "disconnected", self.conn.name, out.pending_bytes, out.cap)
            self.close()
            return False
        if out and not self._writing:
            self.loop.add_writer(self.sock.fileno(), self._writable)
            self._writing = True
        elif not out and self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False
        return True

    def _writable(self) -> None:
        self._write()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_writer(self.sock.fileno())
        self.out.clear()
        self.conn.close()
        self.sock.close()
        self.on_close(self)


class VfioUserService:
    """A listening socket serving one device."""

    def __init__(self, loop: EventLoop, path: str, device: VfioUserDevice, name: str = "vfio-user",
                 dma_layout: DmaLayout = DmaLayout.SPEC, max_backlog: int = MAX_BACKLOG,
                 migration: MigrationFactory | None = None) -> None:
        """``migration``: builds each client connection's migration handler
        (None: the device does not migrate)."""
        self.loop = loop
        self.migration = migration
        self.dma_layout = dma_layout
        self.max_backlog = max_backlog
        self.path = path
        self.device = device
        self.name = name
        self.client: VfioUserClientSocket | None = None
        self.connections = 0
        self.emit: Emit = ignore  # the control socket's events (the app sets it)
        self.listener, self.claim = listen(path, 4)  # raises ListenerError
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.client is not None:
            # The old client's EOF may sit unread in this same loop pass: take it first.
            self.client.read_some()
        if self.client is not None:
            log.warning("%s: a client is already connected; refusing another", self.name)
            sock.close()
            return
        self.connections += 1
        log.info("%s: client connected on %s", self.name, self.path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.client = VfioUserClientSocket(self.loop, sock, self.device, self._closed,
                                           f"{self.name}#{self.connections}", self.dma_layout,
                                           self.max_backlog, self.migration)
        self.emit(CLIENT_CONNECTED, {"device": self.name, "protocol": "vfio-user"})

    def _closed(self, client: VfioUserClientSocket) -> None:
        if self.client is client:
            log.info("%s: client disconnected", self.name)
            self.client = None
            self.emit(CLIENT_DISCONNECTED, {"device": self.name, "protocol": "vfio-user"})

    # ------------------------------------------------------------ live handoff
    def handoff_blocker(self) -> str:
        """Why the device cannot move to another process now ("" when it can)."""
        if self.client is None:
            return ""
        if self.client.out.pending_bytes:
            return f"{self.client.conn.name}: replies are not yet sent"
        return self.client.conn.handoff_blocker()

    def handoff_quiesce(self) -> None:
        """Source: stop reading the listener and the client; what arrives waits in the socket."""
        self.loop.remove_reader(self.listener.fileno())
        if self.client is not None:
            self.loop.remove_reader(self.client.sock.fileno())

    def handoff_resume(self) -> None:
        """Serve again: the source after a failed handoff, the destination at the source's go."""
        self.loop.add_reader(self.listener.fileno(), self._accept)
        if self.client is not None:
            self.loop.add_reader(self.client.sock.fileno(), self.client._readable)
            self.client.read_some()

    def handoff_export(self, fds: list[int]) -> VfioUserState:
        """The listener and the connected client (socket, connection state); fds by index."""
        fds += [self.listener.fileno(), self.claim.fd]  # the path's lock moves with it
        listener, lock, client = len(fds) - 2, len(fds) - 1, None
        if self.client is not None:
            fds.append(self.client.sock.fileno())
            client = ClientEntry(len(fds) - 1, self.client.conn.handoff_export(fds))
        return VfioUserState(self.path, listener, lock, self.connections, client)

    def handoff_release(self) -> None:
        """Source, the destination took over: close our copies silently; the path stays."""
        if self.client is not None:
            client, self.client = self.client, None
            client.conn.handoff_release()
            client.sock.close()
        self.listener.close()
        self.claim.release()
        self.path = ""  # the socket file is the destination's now: never unlink it

    def handoff_check(self, state: VfioUserState, fds: list[int] | None = None) -> None:
        """Destination: refuse a handoff this service cannot take.

        With ``fds`` (what came with the manifest) everything :meth:`handoff_adopt`
        would refuse is refused now — what each fd is (sockets, the lock file)
        and the client connection replayed onto a scratch connection
        (:func:`check_handoff_state`) — so the adopt that follows cannot fail
        half-way.

        Raises:
            ApplianceError: a client is connected here already, or ``state``
                does not fit.
        """
        if self.client is not None:
            raise ApplianceError(f"{self.name}: a client is connected to this process already")
        if fds is None:
            return
        kinds = [(state.listener, stat.S_ISSOCK, "a socket"), (state.lock, stat.S_ISREG, "a lock file")]
        if state.client is not None:
            kinds.append((state.client.socket, stat.S_ISSOCK, "a socket"))
        for index, is_kind, kind in kinds:
            try:
                mode = os.fstat(fds[index]).st_mode
            except OSError as exc:
                raise ApplianceError(f"{self.name}: handoff fd {index}: {exc}") from None
            if not is_kind(mode):
                raise ApplianceError(f"{self.name}: bad handoff state: fd {index} is not {kind}")
        try:  # what adopting will take over: the path's own lock, a socket there
            Claim.adopt(state.path, fds[state.lock]).release()
        except ListenerError as exc:
            raise ApplianceError(f"{self.name}: {exc}") from None
        if state.client is not None:
            try:
                check_handoff_state(self.device, state.client.conn, fds, unix.is_eventfd)
            except LocalProtocolError as exc:
                raise ApplianceError(f"{self.name}: {exc}") from None

    def handoff_adopt(self, state: VfioUserState, fds: list[int]) -> VfioUserClientSocket | None:
        """Destination: serve the source's listener and continue its client.

        Returns the adopted client (not yet processing: call its
        ``conn.process()`` once the device state is in place), or None.

        Raises:
            ApplianceError: the state does not fit (nothing adopted then).
        """
        self.handoff_check(state)
        claim = Claim.adopt(state.path, fds[state.lock])  # raises ListenerError
        client = None
        if state.client is not None:
            sock = socket.socket(fileno=os.dup(fds[state.client.socket]))
            self.connections = state.connections
            client = VfioUserClientSocket(self.loop, sock, self.device, self._closed,
                                          f"{self.name}#{self.connections}", self.dma_layout,
                                          self.max_backlog, self.migration)
            try:
                client.conn.handoff_adopt(state.client.conn, fds)
            except BaseException as exc:
                client.close()
                claim.release()
                if isinstance(exc, LocalProtocolError):
                    raise ApplianceError(str(exc)) from None
                raise
            self.client = client
        listener = socket.socket(fileno=os.dup(fds[state.listener]))
        listener.setblocking(False)
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        self.claim.close()  # our own path: its socket and lock file go
        self.listener, self.path, self.claim = listener, state.path, claim
        self.loop.add_reader(listener.fileno(), self._accept)
        self.handoff_quiesce()  # nothing is read until the source's go (handoff_resume)
        log.info("%s: took over %s%s", self.name, self.path,
                 " and its connected client" if client is not None else "")
        return client

    def flush_pending(self) -> bool:
        """The loop's idle hook (after the device's own): send what the device
        queued outside any client message — a DMA_READ for a queue entry its
        poll needs, the DMA_WRITE of a completion a worker's I/O finished —
        which no reply flush would carry.  Never busy."""
        client = self.client
        if client is not None and client.conn.has_output:
            client.flush()
        return False

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        self.claim.close()  # removes the socket only if still ours (nothing after a handoff)
