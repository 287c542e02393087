"""One vhost-user-net port on its unix socket (runtime layer): the
:class:`PortService` that listens on (or connects to) the port's socket, and
the :class:`VhostUserSession` of the connected front-end (its non-blocking
socket, bounded output queue, kick fds and ring draining).
:class:`~appliance.runtime.vhost_user.NetService` builds the ports; its module
docstring describes the whole.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from typing import Any

from appliance.control.events import CLIENT_CONNECTED, CLIENT_DISCONNECTED, Emit, ignore
from appliance.errors import RemoteProtocolError
from appliance.net import vhost_wire as vw
from appliance.net.port import VirtioNetPort
from appliance.net.switch import Switch
from appliance.net.vhost_protocol import BackendConnection
from appliance.protocol_common import close_quietly
from appliance.runtime import unix
from appliance.runtime.listener import Claim, listen
from appliance.runtime.loop import EventLoop
from appliance.runtime.outqueue import Flush, OutputQueue

log = logging.getLogger("appliance.net")

BATCH = 64  # messages per readable event
TX_BUDGET = 256  # chains per drain pass
POLL_PERIOD = 0.001
RECONNECT_DELAY = 1.0
PCAP_FLUSH_PERIOD = 1.0
DEFAULT_MAX_BACKLOG = 1 << 20  # net.max_backlog: unsent reply bytes per front-end


def parse_mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def recv_chunk(sock: socket.socket, wanted: int) -> tuple[bytes, list[int]]:
    """One non-blocking recvmsg of at most ``wanted`` bytes with its SCM_RIGHTS fds.

    Raises:
        BlockingIOError: nothing to read now.
        RemoteProtocolError: more fds than any request carries (all closed).
    """
    return unix.recv_chunk(sock, wanted, 2 * vw.MAX_FDS, socket.MSG_DONTWAIT)


signal_eventfd = unix.signal_eventfd


class VhostUserSession:
    """One connected front-end: its socket, its kick fds, its protocol connection."""

    def __init__(self, service: PortService, sock: socket.socket,
                 conn: BackendConnection | None = None) -> None:
        """``conn``: a connection taken over from another process (a handoff); the
        session then waits for :meth:`serve` before it reads anything."""
        self.service = service
        self.loop = service.loop
        self.port = service.port
        self.sock = sock
        self.closed = False
        self.paused = conn is not None  # a handoff: nothing is read or drained
        self.kicks: dict[int, int] = {}  # watched kick fd -> ring index
        self._unwatchable: set[int] = set()  # kick fds dropped from the loop (EOF, error)
        self.out = OutputQueue(service.max_backlog)  # replies the socket has not taken yet
        self._writing = False  # the loop watches the socket for writability
        self._scheduled: set[int] = set()
        self._polling = False
        self.port.notify = signal_eventfd
        self.port.retire_fd = self._retire_fd
        if conn is None:
            self.port.connections += 1
            self.conn = BackendConnection(self.port, name=self.port.name,
                                          is_eventfd=unix.is_eventfd,
                                          map_unsealed=self.port.map_unsealed_memory)
            self.loop.add_reader(sock.fileno(), self._readable)
        else:
            self.conn = conn

    # ------------------------------------------------------------ socket
    def _readable(self) -> None:
        if self.paused:  # dispatched in the pass that paused us
            return
        try:
            self._read_messages()
        finally:
            self.service.switch.flush()  # frames a request moved (GET_VRING_BASE drains TX)

    def _read_messages(self) -> None:
        for _ in range(BATCH):
            if self.closed:
                return
            try:
                data, fds = recv_chunk(self.sock, self.conn.bytes_wanted())
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, RemoteProtocolError) as exc:
                self.close(str(exc))
                return
            try:
                self.conn.receive_data(data, fds)
            except RemoteProtocolError as exc:
                log.warning("%s: %s; closing", self.port.name, exc)
                self.close(self.conn.close_reason)
                return
            self.conn.process()
            self._send_replies()
            if self.closed:
                return
            if self.conn.closed:
                self.close(self.conn.close_reason)
                return
            self._sync_kicks()

    def _send_replies(self) -> None:
        for data in self.conn.data_to_send():
            self.out.push(data)
        self._flush(send=not self._writing)  # while writing, the writer callback sends

    def _flush(self, send: bool = True) -> None:
        """Send what the socket takes now; watch for writability while bytes are left.

        Closes the session when sending fails or the backlog passes the limit.
        """
        if send and self.out.flush(self.sock) is Flush.FAILED:
            exc = self.out.error
            self.close(f"send failed: {exc.strerror or exc}" if exc else "send failed")
            return
        if self.out.over_cap():
            self.close(f"{len(self.out)} bytes of replies left unread, over net.max_backlog "
                       f"({self.out.cap})", warn=True)
            return
        fd = self.sock.fileno()
        if self.out and not self._writing:
            self.loop.add_writer(fd, self._flush)
            self._writing = True
        elif not self.out and self._writing:
            self.loop.remove_writer(fd)
            self._writing = False

    # ------------------------------------------------------------ rings
    def _retire_fd(self, fd: int) -> None:
        if self.kicks.pop(fd, None) is not None:
            self.loop.remove_reader(fd)
        self._unwatchable.discard(fd)
        close_quietly(fd)

    def _sync_kicks(self) -> None:
        want = self.port.kick_fds()
        for fd in [fd for fd in self.kicks if fd not in want]:
            self.loop.remove_reader(fd)
            del self.kicks[fd]
        for fd, index in want.items():
            if fd in self.kicks or fd in self._unwatchable:
                continue
            try:
                os.set_blocking(fd, False)
                self.loop.add_reader(fd, functools.partial(self._kicked, fd))
            except (OSError, ValueError, KeyError) as exc:
                self._unwatchable.add(fd)  # one warning, not one per message
                log.warning("%s: cannot watch kick fd of vring %d: %s", self.port.name, index, exc)
                continue
            self.kicks[fd] = index
            self._schedule(index)  # the driver may have queued before the kick fd came
        if self.port.polled_rings() and not self._polling:
            self._polling = True
            self.loop.call_every(POLL_PERIOD, self._poll)

    def _kicked(self, fd: int) -> None:
        if self.paused or self.closed:  # the kick stays pending in the eventfd
            return
        try:
            got = os.read(fd, 8)
        except (BlockingIOError, InterruptedError):
            got = None
        except OSError as exc:
            self._unwatch_kick(fd, f"read failed: {exc.strerror or exc}")
            return
        if got == b"":
            self._unwatch_kick(fd, "end of file")
            return
        index = self.kicks.get(fd)
        if index is not None:
            self._drain(index)

    def _unwatch_kick(self, fd: int, why: str) -> None:
        """A kick fd that can never deliver a kick again: stop watching it (it
        would be readable forever); the fd itself stays the ring's until replaced."""
        index = self.kicks.pop(fd, None)
        self.loop.remove_reader(fd)
        self._unwatchable.add(fd)
        log.warning("%s: kick fd of vring %s: %s; no longer watched", self.port.name, index, why)

    def _drain(self, index: int) -> None:
        if self.closed or self.paused:
            return
        more = self.port.process_tx(index, TX_BUDGET)
        self.service.switch.flush()
        if more:
            self._schedule(index)

    def _schedule(self, index: int) -> None:
        if index in self._scheduled:
            return
        self._scheduled.add(index)

        def run() -> None:
            self._scheduled.discard(index)
            self._drain(index)

        self.loop.call_later(0, run)

    def _poll(self) -> bool:
        if self.closed or self.paused:
            self._polling = False
            return False
        rings = self.port.polled_rings()
        for index in rings:
            self._drain(index)
        if not rings:
            self._polling = False
        return bool(rings)

    # ------------------------------------------------------------ live handoff
    def pause(self) -> None:
        """Stop reading the socket and the kick fds; what arrives waits there."""
        self.paused = True
        self.loop.remove_reader(self.sock.fileno())
        for fd in self.kicks:
            self.loop.remove_reader(fd)

    def serve(self) -> None:
        """Read again; drain every started transmit ring once (a kick may have
        been taken by the process before us, or be pending)."""
        if self.closed:
            return
        self.paused = False
        fd = self.sock.fileno()
        self.loop.remove_reader(fd)
        self.loop.add_reader(fd, self._readable)
        for kick in self.kicks:
            self.loop.remove_reader(kick)
            self.loop.add_reader(kick, functools.partial(self._kicked, kick))
        self._sync_kicks()
        for index in sorted(set(self.port.kick_fds().values()) | set(self.port.polled_rings())):
            self._schedule(index)

    def signal_calls(self) -> None:
        """Interrupt the driver once on every started ring (after a handoff: a
        spare interrupt is harmless, a missing one could stall the guest)."""
        for index, fd in enumerate(self.port.call):
            if fd is not None and self.port.rings[index].started:
                try:
                    signal_eventfd(fd)
                except OSError as exc:
                    log.warning("%s: call fd of vring %d: %s", self.port.name, index, exc)

    def release(self) -> None:
        """Let go silently (another process serves the front-end now): close our
        copies of every fd and mapping, send nothing, log no disconnect."""
        if self.closed:
            return
        self.pause()
        self.closed = True
        self.kicks.clear()
        self._stop_writing()
        self.port.notify = lambda fd: None
        self.port.retire_fd = close_quietly
        self.conn.close("handed off")  # the port forgets the rings; fds and mappings closed
        self.sock.close()  # close(2) only: no shutdown, the other process holds the socket

    # ------------------------------------------------------------ teardown
    def _stop_writing(self) -> None:
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False
        self.out.clear()

    def close(self, reason: str, warn: bool = False) -> None:
        """Disconnect the front-end; ``warn``: its fault (logged as a warning)."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self._stop_writing()
        self.conn.close(reason)  # the port retires its fds through _retire_fd
        for fd in list(self.kicks):
            self.loop.remove_reader(fd)
        self.kicks.clear()
        self._unwatchable.clear()
        self.sock.close()
        self.port.notify = lambda fd: None
        self.service.session_closed(self, reason or self.conn.close_reason, warn)


class PortService:
    """One port's socket: listening (server mode) or connecting (client mode)."""

    def __init__(self, loop: EventLoop, port: VirtioNetPort, switch: Switch, path: str,
                 mode: str = "server", standby: bool = False,
                 max_backlog: int = DEFAULT_MAX_BACKLOG) -> None:
        """``standby``: a handoff destination; neither listen nor connect until
        :meth:`handoff_commit` brings the source's socket.  ``max_backlog``:
        unsent reply bytes past which a front-end is disconnected."""
        self.loop = loop
        self.max_backlog = max_backlog
        self.port = port
        self.switch = switch
        self.path = path
        self.mode = mode
        self.session: VhostUserSession | None = None
        self.listener: socket.socket | None = None
        self.claim: Claim | None = None  # the path's lock, while we listen there
        self.closed = False
        self.paused = False
        self.standby = standby
        self._connect_failures = 0
        self.emit: Emit = ignore  # the control socket's events (the app sets it)
        if standby:
            return
        if mode == "server":
            self._listen()
        else:
            self._try_connect()

    def _listen(self) -> None:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        listener, self.claim = listen(self.path, 4)  # raises ListenerError
        self.listener = listener
        self.loop.add_reader(listener.fileno(), self._accept)
        log.info("%s: listening on %s", self.port.name, self.path)

    def _accept(self) -> None:
        if self.listener is None or self.paused:  # dispatched in the pass that paused us
            return
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.session is not None:
            log.warning("%s: a front-end is already connected; refusing another", self.port.name)
            sock.close()
            return
        sock.setblocking(False)  # accept() may hand back a blocking socket
        log.info("%s: front-end connected on %s", self.port.name, self.path)
        self._start(sock)

    def _try_connect(self) -> None:
        if self.closed or self.session is not None:
            return
        if self.paused:
            self.loop.call_later(RECONNECT_DELAY, self._try_connect)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            if not self._connect_failures:
                log.info("%s: cannot connect to %s (%s); retrying every %.0f s", self.port.name,
                         self.path, exc.strerror, RECONNECT_DELAY)
            self._connect_failures += 1
            self.loop.call_later(RECONNECT_DELAY, self._try_connect)
            return
        self._connect_failures = 0
        log.info("%s: connected to %s", self.port.name, self.path)
        self._start(sock)

    def _start(self, sock: socket.socket) -> None:
        self.switch.learn(self.port.mac, self.port)  # the configured guest MAC
        self.session = VhostUserSession(self, sock)
        self.emit(CLIENT_CONNECTED, {"device": self.port.name, "protocol": "vhost-user"})

    def session_closed(self, session: VhostUserSession, reason: str, warn: bool = False) -> None:
        if self.session is session:
            self.session = None
            self.emit(CLIENT_DISCONNECTED, {"device": self.port.name, "protocol": "vhost-user"})
        self.switch.forget(self.port)
        stats = self.port.stats()
        counters = {k: v for k, v in stats.items() if k != "queues"}
        log.log(logging.WARNING if warn else logging.INFO,
                "%s: front-end disconnected (%s); counters %s", self.port.name, reason,
                json.dumps(counters, sort_keys=True))
        if self.mode == "client" and not self.closed:
            self.loop.call_later(RECONNECT_DELAY, self._try_connect)

    # ------------------------------------------------------------ live handoff
    def pause(self) -> None:
        self.paused = True
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
        if self.session is not None:
            self.session.pause()

    def serve(self) -> None:
        self.paused = False
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.loop.add_reader(self.listener.fileno(), self._accept)
        if self.session is not None:
            self.session.serve()

    def release(self) -> None:
        """Let go of the listener and the session silently (the path stays)."""
        self.closed = True
        self.paused = True
        if self.session is not None:
            self.session.release()
            self.session = None
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()  # no unlink: the other process listens there now
            self.listener = None
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def handoff_commit(self, path: str, listener: socket.socket | None,
                       adopted: tuple[socket.socket, BackendConnection] | None,
                       counters: dict[str, Any], claim: Claim | None = None) -> None:
        """Take over another process's listener (at ``path``, locked by ``claim``)
        and connection; both stay paused until :meth:`serve`."""
        self.paused = True
        if listener is not None:
            if self.listener is not None:
                self.loop.remove_reader(self.listener.fileno())
                self.listener.close()
            if self.claim is not None:
                self.claim.close()  # our own path: its socket and lock file go
            self.listener, self.path, self.claim = listener, path, claim
        if adopted is not None:
            sock, conn = adopted
            self.session = VhostUserSession(self, sock, conn)
        elif self.mode == "client" and self.standby:
            self.loop.call_later(0, self._try_connect)  # the source was not connected either
        self.standby = False
        self.port.restore_counters(counters)
        log.info("%s: took over %s%s", self.port.name, path,
                 " and its connected front-end" if adopted is not None else "")

    def close(self) -> None:
        self.closed = True
        if self.session is not None:
            self.session.close("service stopping")
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        if self.claim is not None:
            self.claim.close()  # the socket and lock file, if still ours
            self.claim = None

    def stats(self) -> dict[str, Any]:
        return {"socket": self.path, "mode": self.mode, **self.port.stats(),
                **({"protocol": dict(self.session.conn.counters)} if self.session else {})}
