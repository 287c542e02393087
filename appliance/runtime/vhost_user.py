"""Serve vhost-user-net ports on unix sockets (runtime layer).

:class:`NetService` builds the network of the process from the configuration's ``net``:
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
:mod:`appliance.runtime.handoff.net`'s (docs/net.md, "Live handoff").
"""

from __future__ import annotations

import ipaddress
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from appliance.config import NetConfig
from appliance.errors import ApplianceError
from appliance.net.native import NativeVring
from appliance.net.pcap import PcapWriter
from appliance.net.port import VirtioNetPort
from appliance.net.responder import Responder
from appliance.net.switch import Switch
from appliance.net.tap import TapPort
from appliance.net.vhost_protocol import BackendConnection
from appliance.protocol_common import close_quietly
from appliance.runtime.handoff import net as vhost_handoff
from appliance.runtime.listener import Claim, ListenerError
from appliance.runtime.loop import EventLoop
from appliance.runtime.tap import TapService, open_tap
from appliance.runtime.vhost_session import (
    DEFAULT_MAX_BACKLOG,
    PCAP_FLUSH_PERIOD,
    PortService,
    VhostUserSession,
    parse_mac,
)

# Declared in appliance.runtime.vhost_session, part of this module's interface.
__all__ = ["DEFAULT_MAX_BACKLOG", "NetService", "PortService", "VhostUserSession"]

log = logging.getLogger("appliance.net")

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

    def __init__(self, loop: EventLoop, cfg_net: NetConfig,
                 clock: Callable[[], float] = time.monotonic,
                 tap_opener: Callable[[str], int] = open_tap, standby: bool = False,
                 native: NativeVring | None = None) -> None:
        """Args:
            loop: the process's event loop.
            cfg_net: the configuration's ``net`` (:class:`appliance.config.NetConfig`).
            tap_opener: opens the TAP fd for ``net.tap.name`` (tests pass a fake).
            standby: a handoff destination: server ports do not listen, client
                ports do not connect and the TAP interface is not attached (the
                source holds them) until :meth:`handoff_import` takes the source's.
            native: the native fast path for the ports' rings (``appliance.fastpath.walker``),
                None for the pure-Python one.

        Raises:
            ApplianceError: a port's socket or the TAP interface cannot be set up
                (the message names the config key).
        """
        self.loop = loop
        self.switch = Switch(clock=clock)
        resp = cfg_net.responder
        self.responder = Responder(ip=ipaddress.IPv4Interface(resp.ip).ip.packed,
                                   mac=parse_mac(resp.mac), udp_echo_port=resp.udp_echo_port)
        self.responder.uplink = self.switch.forward
        self.switch.attach(self.responder, [self.responder.mac])
        self.services: list[PortService] = []
        self.pcaps: list[PcapWriter] = []
        self.tap: TapService | None = None
        self._closed = False
        self.quiesced = False  # handoff: nothing is read, drained or accepted
        self.handed_off = False  # handoff_release ran: the ports are another process's
        try:
            tap_name = cfg_net.tap.name
            if tap_name:
                tap_port = TapPort("tap0", tap_name)
                tap_port.uplink = self.switch.forward
                self.tap = TapService(loop, tap_port, self.switch.flush,
                                      None if standby else tap_opener)
                self.switch.attach(tap_port)
            for i, pcfg in enumerate(cfg_net.ports):
                pcap = None
                if pcfg.pcap:
                    # A standby destination continues the source's capture (the same
                    # path, appended to) rather than truncating it.
                    sink: BinaryIO = open(pcfg.pcap, "ab" if standby else "wb")  # noqa: SIM115 - closed in close()
                    pcap = PcapWriter(sink, time.time, header=sink.tell() == 0)
                    self.pcaps.append(pcap)
                port = VirtioNetPort(f"net{i}", parse_mac(pcfg.mac), pcfg.queues, pcap)
                port.map_unsealed_memory = cfg_net.map_unsealed_memory
                port.use_native(native)
                port.uplink = self.switch.forward
                port.switch = self.switch  # lets a transmit batch be switched natively
                self.switch.attach(port, [port.mac])
                try:
                    svc = PortService(loop, port, self.switch, pcfg.socket, pcfg.mode, standby,
                                      cfg_net.max_backlog)
                except OSError as exc:
                    raise ApplianceError(f"net.ports[{i}].socket: cannot listen on "
                                         f"{pcfg.socket}: {exc.strerror or exc}") from None
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
    def handoff_blocker(self) -> str:
        """Why the ports cannot be handed off faithfully now ("" when they can)."""
        return vhost_handoff.handoff_blocker(self)

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

    def handoff_export(self, fds: list[int]) -> vhost_handoff.NetState:
        """Source, quiesced: the state as a value; fds appended to ``fds`` (not dup'd).

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

    def handoff_check(self, state: vhost_handoff.NetState, fds: list[int] | None = None) -> None:
        """Destination: refuse a state that does not fit (changes nothing).

        With ``fds`` (what came) it is a dry run of :meth:`handoff_import`: the
        sockets, the locks, every connection replayed through a fresh
        :class:`BackendConnection` (kick/call/err fds, memory), the TAP fd —
        then all of it let go, so the import that follows cannot refuse
        half-way.

        Raises:
            ApplianceError: one line naming the mismatch or the bad field.
        """
        vhost_handoff.check_fit(self, state)
        if fds is not None:
            staged, tap_fd = self._stage(state, fds)
            for svc, st in zip(self.services, staged, strict=True):
                st.discard(svc.port)
            if tap_fd is not None:
                close_quietly(tap_fd)

    def handoff_import(self, state: vhost_handoff.NetState, fds: list[int],
                       serve: bool = True) -> None:
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
        parsed = state
        vhost_handoff.check_fit(self, parsed)
        staged, tap_fd = self._stage(parsed, fds)
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

    def _stage(self, parsed: vhost_handoff.NetState,
               fds: list[int]) -> tuple[list[_Staged], int | None]:
        """Adopt copies of every port's sockets, lock and connection (and the TAP
        fd) without committing them: all or nothing.

        Raises:
            ApplianceError: something does not fit; every copy is closed again.
        """
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
        return staged, tap_fd

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
