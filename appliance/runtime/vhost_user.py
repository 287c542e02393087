"""Serve vhost-user-net ports on unix sockets (runtime layer).

:class:`NetService` builds the network of the process from ``config["net"]``:
one :class:`~appliance.net.switch.Switch`, the
:class:`~appliance.net.responder.Responder`, and per ``net.ports`` entry a
:class:`~appliance.net.port.VirtioNetPort` served by a :class:`PortService`,
which either listens on the port's socket (server mode, socket file mode 0600,
one front-end at a time; a second one is refused) or connects to it and
reconnects after a disconnect (client mode).

Per connection (:class:`VhostUserSession`):

* the socket is non-blocking; it is read with ``recvmsg`` calls of exactly
  :meth:`BackendConnection.bytes_wanted` bytes (header, then payload), so
  SCM_RIGHTS fds stay with their message;
* replies go to the session's output queue and are written as far as the
  socket takes them; the rest waits for the socket to be writable (the loop
  watches it only while bytes wait).  The socket is read on meanwhile, so a
  front-end that sends requests and does not read the replies makes the queue
  grow: past ``net.max_backlog`` bytes (:data:`DEFAULT_MAX_BACKLOG`) it is
  disconnected, with one warning naming the port.  The loop never waits on a
  front-end;
* kick, call and err fds must be eventfds (:func:`appliance.runtime.unix.is_eventfd`;
  others are refused by the connection like any bad request);
* after each message the kick eventfds of started transmit rings are synced
  with the loop's readers; a kick fd that reads end of file or fails is
  dropped from the loop with one warning, never spun on; a kick (or a freshly
  started ring) drains that ring in budgets of :data:`TX_BUDGET` chains,
  rescheduling itself with a zero timer while more is waiting, then the switch
  lets every port publish;
* call eventfds are signalled with ``os.write``; rings whose front-end asked
  for polling (the "no fd" bit) are drained from a :data:`POLL_PERIOD` timer;
* a disconnect stops every ring, unmaps the connection's memory, closes every
  fd, forgets the port's MACs in the switch, logs the port's counters
  (``<port>: front-end disconnected (...); counters {json}``), and the next
  connection brings the port up again.

Live handoff (``appliance handoff``): :meth:`NetService.handoff_quiesce`,
``_export``, ``_release`` / ``_resume`` on the source, ``handoff_check``,
``_import``, ``_start`` on the destination; the state itself is
:mod:`appliance.runtime.vhost_handoff`'s (docs/net.md, "Live handoff").
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from appliance.errors import ApplianceError, RemoteProtocolError
from appliance.net import vhost_wire as vw
from appliance.net.pcap import PcapWriter
from appliance.net.port import VirtioNetPort
from appliance.net.responder import Responder
from appliance.net.switch import Switch
from appliance.net.tap import TapPort
from appliance.net.vhost_protocol import BackendConnection
from appliance.protocol_common import close_quietly
from appliance.runtime import unix, vhost_handoff
from appliance.runtime.listener import Claim, ListenerError, listen
from appliance.runtime.loop import EventLoop
from appliance.runtime.tap import TapService, open_tap

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
        self.out = bytearray()  # replies the socket has not taken yet
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
            self.out += data
        self._flush(send=not self._writing)  # while writing, the writer callback sends

    def _flush(self, send: bool = True) -> None:
        """Send what the socket takes now; watch for writability while bytes are left.

        Closes the session when sending fails or the backlog passes the limit.
        """
        if send and self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.close(f"send failed: {exc.strerror or exc}")
                return
            del self.out[:sent]
        limit = self.service.max_backlog
        if len(self.out) > limit:
            self.close(f"{len(self.out)} bytes of replies left unread, over net.max_backlog "
                       f"({limit})", warn=True)
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

    def session_closed(self, session: VhostUserSession, reason: str, warn: bool = False) -> None:
        if self.session is session:
            self.session = None
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


@dataclass
class _Staged:
    """What handoff_import has adopted for one port before it commits."""

    listener: socket.socket | None = None
    claim: Claim | None = None
    sock: socket.socket | None = None
    conn: BackendConnection | None = None

    def discard(self, port: VirtioNetPort) -> None:
        """Undo: close our copies; the port is unconnected again."""
        if self.conn is not None:
            self.conn.close("handoff refused")
        for sock in (self.listener, self.sock):
            if sock is not None:
                sock.close()
        if self.claim is not None:
            self.claim.release()  # our copy of the source's lock: the source keeps it
        port.notify = lambda fd: None
        port.retire_fd = close_quietly


def _check_pollable(fd: int, what: str) -> None:
    """Raises OSError when ``fd`` cannot be watched by the loop (e.g. a regular file)."""
    with selectors.DefaultSelector() as probe:
        try:
            probe.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError) as exc:
            raise OSError(f"{what}: cannot be polled: {exc}") from None


def _adopt_socket(fds: list[int], index: int, listening: bool) -> socket.socket:
    """Our copy of the source's unix stream socket ``fds[index]``.

    Raises:
        OSError: not such a socket (or not listening, for a listener).
    """
    fd = os.dup(fds[index])
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        close_quietly(fd)
        raise
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise OSError(f"fd index {index} is not a unix stream socket")
        if bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)) != listening:
            raise OSError(f"fd index {index} is {'not ' if listening else ''}a listening socket")
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class NetService:
    """Every vhost-user-net port of the process, their switch and the responder."""

    def __init__(self, loop: EventLoop, cfg_net: dict[str, Any],
                 clock: Callable[[], float] = time.monotonic,
                 tap_opener: Callable[[str], int] = open_tap, standby: bool = False) -> None:
        """Args:
            loop: the process's event loop.
            cfg_net: ``config["net"]`` from :func:`appliance.config.load`.
            tap_opener: opens the TAP fd for ``net.tap.name`` (tests pass a fake).
            standby: a handoff destination: server ports do not listen, client
                ports do not connect and the TAP interface is not attached (the
                source holds them) until :meth:`handoff_import` takes the source's.

        Raises:
            ApplianceError: a port's socket or the TAP interface cannot be set up
                (the message names the config key).
        """
        self.loop = loop
        self.switch = Switch(clock=clock)
        resp = cfg_net["responder"]
        self.responder = Responder(ip=ipaddress.IPv4Interface(resp["ip"]).ip.packed,
                                   mac=parse_mac(resp["mac"]),
                                   udp_echo_port=resp["udp_echo_port"])
        self.responder.uplink = self.switch.forward
        self.switch.attach(self.responder, [self.responder.mac])
        self.services: list[PortService] = []
        self.pcaps: list[PcapWriter] = []
        self.tap: TapService | None = None
        self._closed = False
        self.quiesced = False  # handoff: nothing is read, drained or accepted
        self.handed_off = False  # handoff_release ran: the ports are another process's
        try:
            tap_name = cfg_net.get("tap", {}).get("name")
            if tap_name:
                tap_port = TapPort("tap0", tap_name)
                tap_port.uplink = self.switch.forward
                self.tap = TapService(loop, tap_port, self.switch.flush,
                                      None if standby else tap_opener)
                self.switch.attach(tap_port)
            for i, pcfg in enumerate(cfg_net["ports"]):
                pcap = None
                if pcfg.get("pcap"):
                    # A standby destination continues the source's capture (the same
                    # path, appended to) rather than truncating it.
                    sink: BinaryIO = open(pcfg["pcap"], "ab" if standby else "wb")  # noqa: SIM115 - closed in close()
                    pcap = PcapWriter(sink, time.time, header=sink.tell() == 0)
                    self.pcaps.append(pcap)
                port = VirtioNetPort(f"net{i}", parse_mac(pcfg["mac"]), pcfg.get("queues", 1), pcap)
                port.map_unsealed_memory = bool(cfg_net.get("map_unsealed_memory", False))
                port.uplink = self.switch.forward
                self.switch.attach(port, [port.mac])
                try:
                    svc = PortService(loop, port, self.switch, pcfg["socket"],
                                      pcfg.get("mode", "server"), standby,
                                      cfg_net.get("max_backlog", DEFAULT_MAX_BACKLOG))
                except OSError as exc:
                    raise ApplianceError(f"net.ports[{i}].socket: cannot listen on "
                                         f"{pcfg['socket']}: {exc.strerror or exc}") from None
                except ListenerError as exc:
                    raise ApplianceError(f"net.ports[{i}].socket: {exc}") from None
                self.services.append(svc)
        except BaseException:
            self.close()
            raise
        if self.pcaps:
            loop.call_every(PCAP_FLUSH_PERIOD, self._flush_pcaps)

    def _flush_pcaps(self) -> bool:
        for pcap in self.pcaps:
            pcap.flush()
        return not self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for svc in self.services:
            svc.close()
        if self.tap is not None:
            self.tap.close()
        for pcap in self.pcaps:
            pcap.close()

    # ------------------------------------------------------------ live handoff
    # Source: handoff_quiesce, handoff_export, then handoff_release (the destination
    # took over) or handoff_resume (it did not).  Destination: handoff_check,
    # handoff_import (paused unless serve), handoff_start.  See docs/net.md.
    def handoff_busy(self) -> str:
        """Why the ports cannot be handed off faithfully now ("" when they can)."""
        return vhost_handoff.blocker(self)

    def handoff_quiesce(self) -> None:
        """Source: stop serving, keep everything.

        Readers of every session socket, kick fd, listener and the TAP fd are
        removed and drain/poll timers do nothing while quiesced; what the switch
        took from a ring is published now.  Kicks stay pending in their
        eventfds, bytes in the sockets.  A request read only in part stays in
        its connection and travels in :meth:`handoff_export` (no blocking read).
        """
        self.quiesced = True
        for svc in self.services:
            svc.pause()
        if self.tap is not None:
            self.tap.pause()
        self.switch.flush()
        self._flush_pcaps()

    def handoff_export(self, fds: list[int]) -> dict[str, Any]:
        """Source, quiesced: the JSON-able state; fds appended to ``fds`` (not dup'd).

        Raises:
            ApplianceError: not quiesced, or a handoff could not be faithful
                (dirty logging active, a broken ring).
        """
        if not self.quiesced or self.handed_off:
            raise ApplianceError("net: handoff_export needs handoff_quiesce first")
        return vhost_handoff.export_net(self, fds)

    def handoff_resume(self) -> None:
        """Source, the handoff failed: serve again as before quiesce."""
        if self.handed_off:
            return
        self._serve()

    def handoff_release(self) -> None:
        """The other process serves now: close our copies of every fd and mapping,
        send nothing, shut nothing down, unlink nothing, log no disconnect."""
        self.quiesced = True
        self.handed_off = True
        for svc in self.services:
            svc.release()
        if self.tap is not None:
            self.tap.close()  # our copy only: the interface lives on in the other process
        self._flush_pcaps()

    def handoff_check(self, state: dict[str, Any], nfds: int | None = None) -> None:
        """Destination: refuse a state that does not fit (changes nothing).

        ``nfds``: how many fds came (fd indexes are checked against it).

        Raises:
            ApplianceError: one line naming the mismatch or the bad field.
        """
        vhost_handoff.check_fit(self, vhost_handoff.parse(state, nfds))

    def handoff_import(self, state: dict[str, Any], fds: list[int], serve: bool = True) -> None:
        """Destination: adopt the source's listeners, connections and TAP fd.

        ``fds`` stay the caller's (it closes them all); we keep duplicates.
        Each connection is rebuilt by replaying its requests through a fresh
        :class:`BackendConnection`; counters, the MAC table and the responder's
        state are restored.  ``serve``: read and drain at once (every started
        ring drained once, every call fd signalled once); otherwise the ports
        stay paused until :meth:`handoff_start`.

        Raises:
            ApplianceError: the state does not fit or was refused; nothing was
                adopted and this service is as it was.
        """
        parsed = vhost_handoff.parse(state, len(fds))
        vhost_handoff.check_fit(self, parsed)
        staged = [_Staged() for _ in self.services]
        tap_fd: int | None = None
        try:
            for svc, p, st in zip(self.services, parsed.ports, staged, strict=True):
                if p.listener is not None:
                    st.listener = _adopt_socket(fds, p.listener, listening=True)
                    bound = st.listener.getsockname()
                    if bound != p.socket:  # the path we will serve and one day unlink
                        raise ApplianceError(f"{svc.port.name}: the source's listener is bound "
                                             f"to {bound!r}, not {p.socket!r}")
                    if p.lock is None:  # check_fit() refused that already
                        raise ApplianceError(f"{svc.port.name}: the listener came without its lock")
                    st.claim = Claim.adopt(p.socket, fds[p.lock])  # raises ListenerError
                if p.session is not None:
                    st.sock = _adopt_socket(fds, p.session.socket, listening=False)
                    st.conn = vhost_handoff.build_connection(svc.port, p.session, fds)
            if parsed.tap is not None:
                tap_fd = vhost_handoff.dup_all(fds, [parsed.tap["fd"]])[0]
                _check_pollable(tap_fd, "net.tap.fd")
        except BaseException as exc:
            for svc, st in zip(self.services, staged, strict=True):
                st.discard(svc.port)
            if tap_fd is not None:
                close_quietly(tap_fd)
            if isinstance(exc, OSError):
                raise ApplianceError(f"net: cannot adopt the source's fds: {exc}") from None
            raise
        # Commit: nothing below can fail on the state's account.
        self.quiesced = True
        for svc, p, st in zip(self.services, parsed.ports, staged, strict=True):
            adopted = (st.sock, st.conn) if st.sock is not None and st.conn is not None else None
            svc.handoff_commit(p.socket, st.listener, adopted, p.counters, st.claim)
        by_name = {getattr(port, "name", "?"): port for port in self.switch.ports}
        self.switch.handoff_restore(parsed.switch_counters,
                                    [(mac, by_name[name], age) for mac, name, age in parsed.table])
        self.responder.counters.update(parsed.responder["counters"])
        self.responder._ident = parsed.responder["ident"]
        if self.tap is not None and parsed.tap is not None and tap_fd is not None:
            self.tap.adopt(tap_fd)
            self.tap.port.counters.update(parsed.tap["counters"])
        if serve:
            self.handoff_start()

    def handoff_start(self) -> None:
        """Destination: serve what :meth:`handoff_import` adopted."""
        self._serve()
        for svc in self.services:
            if svc.session is not None:
                svc.session.signal_calls()

    def _serve(self) -> None:
        self.quiesced = False
        for svc in self.services:
            svc.serve()
        if self.tap is not None:
            self.tap.serve()

    def stats(self) -> dict[str, Any]:
        return {
            "ports": {svc.port.name: svc.stats() for svc in self.services},
            "switch": self.switch.stats(),
            "responder": self.responder.stats(),
            **({"tap": self.tap.stats()} if self.tap is not None else {}),
        }
