"""Serve vhost-user-net ports on unix sockets (runtime layer).

:class:`NetService` builds the network of the process from ``config["net"]``:
one :class:`~appliance.net.switch.Switch`, the
:class:`~appliance.net.responder.Responder`, and per ``net.ports`` entry a
:class:`~appliance.net.port.VirtioNetPort` served by a :class:`PortService`,
which either listens on the port's socket (server mode, socket file mode 0600,
one front-end at a time; a second one is refused) or connects to it and
reconnects after a disconnect (client mode).

Per connection (:class:`VhostUserSession`):

* the socket is read with non-blocking ``recvmsg`` calls of exactly
  :meth:`BackendConnection.bytes_wanted` bytes (header, then payload), so
  SCM_RIGHTS fds stay with their message; replies are written whole;
* after each message the kick eventfds of started transmit rings are synced
  with the loop's readers; a kick (or a freshly started ring) drains that ring
  in budgets of :data:`TX_BUDGET` chains, rescheduling itself with a zero
  timer while more is waiting, then the switch lets every port publish;
* call eventfds are signalled with ``os.write``; rings whose front-end asked
  for polling (the "no fd" bit) are drained from a :data:`POLL_PERIOD` timer;
* a disconnect stops every ring, unmaps the connection's memory, closes every
  fd, forgets the port's MACs in the switch, logs the port's counters
  (``<port>: front-end disconnected (...); counters {json}``), and the next
  connection brings the port up again.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from appliance.errors import ApplianceError, RemoteProtocolError
from appliance.loop import EventLoop
from appliance.net import vhost_wire as vw
from appliance.net.pcap import PcapWriter
from appliance.net.port import VirtioNetPort
from appliance.net.responder import Responder
from appliance.net.switch import Switch
from appliance.net.tap import TapPort
from appliance.net.vhost_protocol import BackendConnection
from appliance.runtime import unix
from appliance.runtime.tap import TapService, open_tap

log = logging.getLogger("appliance.net")

BATCH = 64  # messages per readable event
TX_BUDGET = 256  # chains per drain pass
POLL_PERIOD = 0.001
RECONNECT_DELAY = 1.0
PCAP_FLUSH_PERIOD = 1.0


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
_close = unix.close_quietly


class VhostUserSession:
    """One connected front-end: its socket, its kick fds, its protocol connection."""

    def __init__(self, service: PortService, sock: socket.socket) -> None:
        self.service = service
        self.loop = service.loop
        self.port = service.port
        self.sock = sock
        self.closed = False
        self.kicks: dict[int, int] = {}  # watched kick fd -> ring index
        self._scheduled: set[int] = set()
        self._polling = False
        self.port.notify = signal_eventfd
        self.port.retire_fd = self._retire_fd
        self.port.connections += 1
        self.conn = BackendConnection(self.port, name=self.port.name)
        self.loop.add_reader(sock.fileno(), self._readable)

    # ------------------------------------------------------------ socket
    def _readable(self) -> None:
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
            if self.conn.closed:
                self.close(self.conn.close_reason)
                return
            self._sync_kicks()

    def _send_replies(self) -> None:
        for data in self.conn.data_to_send():
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self.conn.close(f"send failed: {exc}")
                return

    # ------------------------------------------------------------ rings
    def _retire_fd(self, fd: int) -> None:
        if self.kicks.pop(fd, None) is not None:
            self.loop.remove_reader(fd)
        _close(fd)

    def _sync_kicks(self) -> None:
        want = self.port.kick_fds()
        for fd in [fd for fd in self.kicks if fd not in want]:
            self.loop.remove_reader(fd)
            del self.kicks[fd]
        for fd, index in want.items():
            if fd in self.kicks:
                continue
            try:
                os.set_blocking(fd, False)
                self.loop.add_reader(fd, functools.partial(self._kicked, fd))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("%s: cannot watch kick fd of vring %d: %s", self.port.name, index, exc)
                continue
            self.kicks[fd] = index
            self._schedule(index)  # the driver may have queued before the kick fd came
        if self.port.polled_rings() and not self._polling:
            self._polling = True
            self.loop.call_every(POLL_PERIOD, self._poll)

    def _kicked(self, fd: int) -> None:
        try:
            os.read(fd, 8)
        except BlockingIOError:
            pass
        except OSError as exc:
            log.warning("%s: kick fd read failed: %s", self.port.name, exc)
        index = self.kicks.get(fd)
        if index is not None:
            self._drain(index)

    def _drain(self, index: int) -> None:
        if self.closed:
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
        if self.closed:
            self._polling = False
            return False
        rings = self.port.polled_rings()
        for index in rings:
            self._drain(index)
        if not rings:
            self._polling = False
        return bool(rings)

    # ------------------------------------------------------------ teardown
    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.conn.close(reason)  # the port retires its fds through _retire_fd
        for fd in list(self.kicks):
            self.loop.remove_reader(fd)
        self.kicks.clear()
        self.sock.close()
        self.port.notify = lambda fd: None
        self.service.session_closed(self, reason or self.conn.close_reason)


class PortService:
    """One port's socket: listening (server mode) or connecting (client mode)."""

    def __init__(self, loop: EventLoop, port: VirtioNetPort, switch: Switch, path: str,
                 mode: str = "server") -> None:
        self.loop = loop
        self.port = port
        self.switch = switch
        self.path = path
        self.mode = mode
        self.session: VhostUserSession | None = None
        self.listener: socket.socket | None = None
        self.closed = False
        self._connect_failures = 0
        if mode == "server":
            self._listen()
        else:
            self._try_connect()

    def _listen(self) -> None:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # socket file mode 0600
        try:
            listener.bind(self.path)
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old)
        listener.listen(4)
        listener.setblocking(False)
        self.listener = listener
        self.loop.add_reader(listener.fileno(), self._accept)
        log.info("%s: listening on %s", self.port.name, self.path)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.session is not None:
            log.warning("%s: a front-end is already connected; refusing another", self.port.name)
            sock.close()
            return
        sock.setblocking(True)
        log.info("%s: front-end connected on %s", self.port.name, self.path)
        self._start(sock)

    def _try_connect(self) -> None:
        if self.closed or self.session is not None:
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
        sock.setblocking(True)
        log.info("%s: connected to %s", self.port.name, self.path)
        self._start(sock)

    def _start(self, sock: socket.socket) -> None:
        self.switch.learn(self.port.mac, self.port)  # the configured guest MAC
        self.session = VhostUserSession(self, sock)

    def session_closed(self, session: VhostUserSession, reason: str) -> None:
        if self.session is session:
            self.session = None
        self.switch.forget(self.port)
        stats = self.port.stats()
        counters = {k: v for k, v in stats.items() if k != "queues"}
        log.info("%s: front-end disconnected (%s); counters %s", self.port.name, reason,
                 json.dumps(counters, sort_keys=True))
        if self.mode == "client" and not self.closed:
            self.loop.call_later(RECONNECT_DELAY, self._try_connect)

    def close(self) -> None:
        self.closed = True
        if self.session is not None:
            self.session.close("service stopping")
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def stats(self) -> dict[str, Any]:
        return {"socket": self.path, "mode": self.mode, **self.port.stats(),
                **({"protocol": dict(self.session.conn.counters)} if self.session else {})}


class NetService:
    """Every vhost-user-net port of the process, their switch and the responder."""

    def __init__(self, loop: EventLoop, cfg_net: dict[str, Any],
                 clock: Callable[[], float] = time.monotonic,
                 tap_opener: Callable[[str], int] = open_tap) -> None:
        """Args:
            loop: the process's event loop.
            cfg_net: ``config["net"]`` from :func:`appliance.config.load`.
            tap_opener: opens the TAP fd for ``net.tap.name`` (tests pass a fake).

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
        try:
            tap_name = cfg_net.get("tap", {}).get("name")
            if tap_name:
                tap_port = TapPort("tap0", tap_name)
                tap_port.uplink = self.switch.forward
                self.tap = TapService(loop, tap_port, self.switch.flush, tap_opener)
                self.switch.attach(tap_port)
            for i, pcfg in enumerate(cfg_net["ports"]):
                pcap = None
                if pcfg.get("pcap"):
                    sink: BinaryIO = open(pcfg["pcap"], "wb")  # noqa: SIM115 - closed in close()
                    pcap = PcapWriter(sink, time.time)
                    self.pcaps.append(pcap)
                port = VirtioNetPort(f"net{i}", parse_mac(pcfg["mac"]), pcfg.get("queues", 1), pcap)
                port.uplink = self.switch.forward
                self.switch.attach(port, [port.mac])
                try:
                    svc = PortService(loop, port, self.switch, pcfg["socket"],
                                      pcfg.get("mode", "server"))
                except OSError as exc:
                    raise ApplianceError(f"net.ports[{i}].socket: cannot listen on "
                                         f"{pcfg['socket']}: {exc.strerror or exc}") from None
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

    def stats(self) -> dict[str, Any]:
        return {
            "ports": {svc.port.name: svc.stats() for svc in self.services},
            "switch": self.switch.stats(),
            "responder": self.responder.stats(),
            **({"tap": self.tap.stats()} if self.tap is not None else {}),
        }
