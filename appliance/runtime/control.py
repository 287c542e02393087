"""The control socket service on the event loop (runtime layer).

Listens on ``control.socket`` (mode 0600), greets each client in QMP, reads
its lines through :class:`~appliance.control.protocol.ControlConnection` and
answers each request with :func:`~appliance.control.commands.dispatch`.
:meth:`ControlService.emit` queues a QMP event on every client in command
mode (:mod:`appliance.control.events`): the fault set, the NVMe controller
(CSTS.CFS, changed namespaces, posted AERs), the commands (link, handoff) and
the runtime's vfio-user and vhost-user services report through it.  It also installs
the process's :class:`~appliance.control.faults.FaultSet`: on the NVMe controller
(its fault hooks) and around each net port's two frame paths (towards the
guest: ``port.deliver``; from the guest: ``port.uplink``), and runs the timer
that releases deferred completions and delayed frames.

No client can lock the socket out: a connection silent for ``idle_timeout``
seconds (nothing received, none of its pending replies taken) is closed by a
loop timer, and when :data:`MAX_CLIENTS` are connected a new connection
closes the one idle the longest instead of being refused.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import appliance
from appliance.control import events as ev
from appliance.control.commands import Target, dispatch
from appliance.control.fault_rules import Direction, FaultRule
from appliance.control.faults import FaultSet
from appliance.control.protocol import (
    FAILED,
    ControlConnection,
    ControlError,
    Deferred,
    Request,
    answer_error,
    answer_ok,
    encode_event,
    greeting,
)
from appliance.runtime.control_client import ControlClient
from appliance.runtime.listener import listen
from appliance.runtime.loop import EventLoop
from appliance.runtime.outqueue import Flush, OutputQueue

log = logging.getLogger("appliance.control")


def _event_level(name: str, data: dict[str, Any]) -> int:
    """INFO for an event worth a log line; DEBUG for a fault rule's repeated hits
    (every hit past the first that is not a power of ten)."""
    if name != ev.FAULT_FIRED:
        return logging.INFO
    hits = data.get("hits")
    if not isinstance(hits, int) or hits <= 1:
        return logging.INFO
    while hits % 10 == 0:
        hits //= 10
    return logging.INFO if hits == 1 else logging.DEBUG
RELEASE_PERIOD = 0.005  # seconds between checks for due deferred completions / frames
MAX_CLIENTS = 16
BACKLOG = 64  # connections the kernel queues until the loop accepts them
IDLE_TIMEOUT = 300.0  # seconds a connection may stay silent (config control.idle_timeout)
MAX_OUTPUT = 1 << 20  # unsent reply bytes a client may pile up before it is disconnected
BATCH = 32  # requests of one client answered per loop pass; the rest wait for the next


class _Client:
    """One control connection: requests in, replies out without blocking the loop.

    A read is split into lines at once, but each loop pass answers at most
    :data:`BATCH` of them; the rest wait for the next pass (a timer at once),
    so a client pipelining thousands of requests takes turns with every other
    socket of the process.  Replies are queued in ``out`` and sent as far as
    the socket takes them; the rest waits for writability.  The socket is read
    only when nothing is left to answer or to send (backpressure: a client
    cannot queue more work than one read).  A client whose unsent replies
    exceed :data:`MAX_OUTPUT` is disconnected.
    """

    def __init__(self, service: ControlService, sock: socket.socket) -> None:
        self.service = service
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = ControlConnection()
        self.out = OutputQueue(MAX_OUTPUT)
        self.reading = True
        self.writing = False  # waiting for writability (and not reading)
        self.scheduled = False  # a loop pass is due to answer more buffered requests
        self.waiting = False  # a command's answer is deferred (Deferred): the rest waits
        self.closed = False
        self.active = time.monotonic()  # last byte received or reply byte sent
        service.loop.add_reader(self.fd, self._readable)
        self.out.push(service.greeting)  # QMP: the server speaks first
        self._send()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.active = time.monotonic()
        self.conn.receive_data(data)
        self._work()

    def _work(self) -> None:
        """Answer up to :data:`BATCH` buffered requests, then send."""
        self.scheduled = False
        if self.closed or self.waiting:
            return
        for _ in range(BATCH):
            if self.closed:  # (an event this request emitted overflowed the queue)
                return
            event = self.conn.next_event()
            if event is None:
                break
            reply = event if isinstance(event, bytes) else self._answer(event)
            if reply is None:  # deferred: the rest waits for its answer
                break
            self.out.push(reply)
        self._send()

    def _answer(self, request: Request) -> bytes | None:
        """The reply, or None when the command answers later (:class:`Deferred`)."""
        try:
            result = dispatch(self.service.target, request)
        except ControlError as exc:
            return answer_error(request, exc.code, exc.message)
        except Exception as exc:  # a bug in a command: report it, keep serving
            log.exception("control: %s failed", request.cmd)
            return answer_error(request, FAILED, f"{type(exc).__name__}: {exc}")
        if not isinstance(result, Deferred):
            return answer_ok(request, result)
        self.waiting = True
        result.then(lambda value, error: self._settled(request, value, error))
        return None  # (settled already: _settled has queued the reply)

    def event(self, line: bytes) -> None:
        """Queue one event line (only in QMP command mode) and send what the socket takes."""
        if self.closed or not self.conn.wants_events:
            return
        self.out.push(line)
        self._send()  # (also when waiting for writability: the cap is checked there)

    def _settled(self, request: Request, result: Any, error: ControlError | None) -> None:
        """A deferred answer: send it now (the process may stop right after)."""
        self.waiting = False
        if self.closed:
            return
        self.active = time.monotonic()
        self.service._arm_sweep()  # timed again from now
        self.out.push(answer_ok(request, result) if error is None
                      else answer_error(request, error.code, error.message))
        self._send()

    def _send(self) -> None:
        """Send what the socket takes, then decide what to wait for."""
        unsent = len(self.out)
        if self.out.flush(self.sock) is Flush.FAILED:
            self.close()
            return
        if len(self.out) < unsent:
            self.active = time.monotonic()
        if self.out.over_cap():
            log.warning("control: client fd %d left %d bytes of replies unread (cap %d): "
                        "disconnected", self.fd, len(self.out), MAX_OUTPUT)
            self.close()
            return
        self._watch()

    def _watch(self) -> None:
        """Writability while replies are left; the next loop pass while requests
        are buffered; reading only when neither."""
        loop = self.service.loop
        more = self.conn.has_events and not self.waiting
        want_write = bool(self.out)
        want_read = not want_write and not more and not self.waiting
        if want_write != self.writing:
            if want_write:
                loop.add_writer(self.fd, self._send)
            else:
                loop.remove_writer(self.fd)
            self.writing = want_write
        if want_read != self.reading:
            if want_read:
                loop.add_reader(self.fd, self._readable)
            else:
                loop.remove_reader(self.fd)
            self.reading = want_read
        if more and not want_write and not self.scheduled:
            self.scheduled = True
            loop.call_later(0, self._work)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self in self.service.clients:
            self.service.clients.remove(self)
        self.service.loop.remove_reader(self.fd)
        self.service.loop.remove_writer(self.fd)
        self.sock.close()
        self.out.clear()


class ControlService:
    """The control socket, the fault set and its release timer."""

    def __init__(self, loop: EventLoop, path: str, controller: Any = None, net: Any = None,
                 clock: Callable[[], float] = time.monotonic, seed: int = 0,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        """``clock`` drives the fault set; idle connections are timed by the loop's clock.

        Raises:
            ListenerError: the socket path cannot be claimed or bound.
        """
        self.loop = loop
        self.path = path
        self.idle_timeout = idle_timeout
        self._sweep_due: float | None = None  # when the armed idle sweep runs
        self.faults = FaultSet(clock=clock, seed=seed)
        self.faults.notify = self._wake
        self.faults.fired = self._fault_fired
        self.target = Target(controller=controller, net=net, faults=self.faults, emit=self.emit)
        self.clients: list[_Client] = []
        self.greeting = greeting(version_triple(appliance.__version__),
                                 f"appliance {appliance.__version__}")
        self._timer = False
        self._closed = False
        if controller is not None:
            controller.faults = self.faults
            self._watch_controller(controller)
        if net is not None:
            for svc in net.services:
                self._wrap_port(svc.port, net)
        self.listener, self.claim = listen(path, BACKLOG)  # mode 0600; raises ListenerError
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        """Take every connection waiting in the backlog (a full backlog refuses
        connects: ``ctl`` would see EAGAIN)."""
        for _ in range(BACKLOG):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the next pass retries
                log.warning("control: accept failed: %s", exc)
                return
            if len(self.clients) >= MAX_CLIENTS:
                # (one waiting for a deferred answer only when every one does)
                oldest = min(self.clients, key=lambda c: (c.waiting, c.active))
                log.warning("control: %d connections: closing fd %d, silent for %.1f s, "
                            "for a new one", len(self.clients), oldest.fd,
                            time.monotonic() - oldest.active)
                oldest.close()
            sock.setblocking(False)
            client = _Client(self, sock)  # (greeted at once: a peer gone already is closed)
            if not client.closed:
                self.clients.append(client)
            self._arm_sweep()

    # ------------------------------------------------------------ events
    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Send the QMP event ``name`` to every client in command mode (an
        :data:`appliance.control.events.Emit`); a client whose queue passes
        the cap is disconnected, like one that leaves its replies unread.
        Each event is logged at INFO (a rule's FAULT_FIRED at its first hit and
        at 10, 100, ... hits, the others at DEBUG: a drop rule fires per frame)."""
        log.log(_event_level(name, data), "event %s %s", name,
                json.dumps(data, sort_keys=True, default=str))
        if self._closed or not any(c.conn.wants_events for c in self.clients):
            return
        line = encode_event(name, data, time.time())
        for client in list(self.clients):
            client.event(line)

    def _fault_fired(self, rule: FaultRule) -> None:
        self.emit(ev.FAULT_FIRED, {"id": rule.id, "target": str(rule.target),
                                   "action": str(rule.action), "hits": rule.hits})

    def _watch_controller(self, ctrl: Any) -> None:
        """Events from the NVMe controller: CSTS.CFS, a changed namespace, a posted
        AER (its methods wrapped, as the net ports' frame paths are)."""
        fatal, changed, take = ctrl.fatal, ctrl.notify_namespace_changed, ctrl.events.take

        def fatal_event(why: str) -> None:
            fatal(why)
            self.emit(ev.CONTROLLER_FATAL, {"reason": why, "csts": ctrl.regs.csts})

        def changed_event(nsid: int) -> None:
            self.emit(ev.NAMESPACE_CHANGED, {"nsid": nsid})  # (before the AER it may complete)
            changed(nsid)

        def posted_events() -> list[tuple[int, int]]:
            posted: list[tuple[int, int]] = take()
            for cid, dw0 in posted:
                self.emit(ev.AER_POSTED, {"cid": cid, "dw0": dw0})
            return posted

        ctrl.fatal = fatal_event
        ctrl.notify_namespace_changed = changed_event
        ctrl.events.take = posted_events

    # ------------------------------------------------------------ idle connections
    def _arm_sweep(self) -> None:
        """Arm one timer for the earliest idle deadline (none without clients, or
        while every client waits for a deferred answer: it re-arms once sent)."""
        timed = [c.active for c in self.clients if not c.waiting]  # (a deferred answer: not idle)
        if self._closed or not timed:
            return
        due = min(timed) + self.idle_timeout
        if self._sweep_due is not None and self._sweep_due <= due:
            return  # an earlier sweep is armed; it re-arms for the rest
        self._sweep_due = due
        self.loop.call_later(max(0.0, due - time.monotonic()), lambda: self._sweep(due))

    def _sweep(self, due: float) -> None:
        if due != self._sweep_due:
            return  # superseded by an earlier one
        self._sweep_due = None
        now = time.monotonic()
        for client in list(self.clients):
            if now - client.active >= self.idle_timeout and not client.waiting:
                log.info("control: fd %d silent for %.1f s (control.idle_timeout): closed",
                         client.fd, now - client.active)
                client.close()
        self._arm_sweep()

    # ------------------------------------------------------------ faults on the net ports
    def _wrap_port(self, port: Any, net: Any) -> None:
        faults, links_down = self.faults, self.target.links_down
        deliver, uplink = port.deliver, port.uplink

        def to_guest(frame: bytes) -> None:
            if port.name in links_down:
                faults.counters["net.link_down_drops"] = faults.counters.get(
                    "net.link_down_drops", 0) + 1
                return
            if not faults.rules and not faults.frames:
                deliver(frame)
                return
            for f in faults.frame(port.name, Direction.RX, frame, deliver):
                deliver(f)

        def from_guest(src: Any, frame: bytes) -> None:
            if port.name in links_down:
                faults.counters["net.link_down_drops"] = faults.counters.get(
                    "net.link_down_drops", 0) + 1
                return
            if not faults.rules and not faults.frames:
                uplink(src, frame)
                return
            for f in faults.frame(port.name, Direction.TX, frame, lambda fr: uplink(port, fr)):
                uplink(src, f)

        port.deliver = to_guest
        port.uplink = from_guest
        # the native switch bypasses both wrappers: only while they would pass frames through
        port.hooked = lambda: bool(port.name in links_down or faults.rules or faults.frames)
        self._net = net

    # ------------------------------------------------------------ release timer
    def _wake(self) -> None:
        if not self._timer and not self._closed:
            self._timer = True
            self.loop.call_every(RELEASE_PERIOD, self._release)

    def _release(self) -> bool:
        if self._closed:
            self._timer = False
            return False
        ctrl = self.target.controller
        if ctrl is not None and self.faults.deferred:
            ctrl.poll()
        due = self.faults.due_frames()
        for send, frame in due:
            send(frame)
        if due and self.target.net is not None:
            self.target.net.switch.flush()
        keep = self.faults.waiting
        self._timer = keep
        return keep

    def close(self) -> None:
        self._closed = True
        for client in list(self.clients):
            client.close()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        self.claim.close()  # the socket and lock file, if still ours


def version_triple(text: str) -> tuple[int, int, int]:
    """(major, minor, micro) of a version string (``0.1.0``; missing parts are 0)."""
    parts = [int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3]]
    parts += [0] * (3 - len(parts))
    return parts[0], parts[1], parts[2]


__all__ = ["ControlClient", "ControlService", "version_triple"]
