"""The control socket service on the event loop (runtime layer).

Listens on ``control.socket`` (mode 0600), reads JSON lines through
:class:`~appliance.control.protocol.ControlConnection` and answers each
request with :func:`~appliance.control.commands.dispatch`.  It also installs
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
import select
import socket
import time
from collections.abc import Callable
from typing import Any, Self

from appliance.control.commands import Target, dispatch
from appliance.control.faults import Direction, FaultSet
from appliance.control.protocol import (
    FAILED,
    ControlConnection,
    ControlError,
    Deferred,
    Request,
    reply_error,
    reply_ok,
    too_deep,
)
from appliance.runtime.listener import listen
from appliance.runtime.loop import EventLoop
from appliance.runtime.outqueue import Flush, OutputQueue

log = logging.getLogger("appliance.control")
RELEASE_PERIOD = 0.005  # seconds between checks for due deferred completions / frames
MAX_CLIENTS = 16
BACKLOG = 64  # connections the kernel queues until the loop accepts them
IDLE_TIMEOUT = 300.0  # seconds a connection may stay silent (config control.idle_timeout)
MAX_OUTPUT = 1 << 20  # unsent reply bytes a client may pile up before it is disconnected
MAX_REPLY = 64 << 20  # what ControlClient buffers while waiting for one reply line
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
            return reply_error(request.id, exc.code, exc.message)
        except Exception as exc:  # a bug in a command: report it, keep serving
            log.exception("control: %s failed", request.cmd)
            return reply_error(request.id, FAILED, f"{type(exc).__name__}: {exc}")
        if not isinstance(result, Deferred):
            return reply_ok(request.id, result)
        self.waiting = True
        result.then(lambda value, error: self._settled(request.id, value, error))
        return None  # (settled already: _settled has queued the reply)

    def _settled(self, request_id: Any, result: Any, error: ControlError | None) -> None:
        """A deferred answer: send it now (the process may stop right after)."""
        self.waiting = False
        if self.closed:
            return
        self.active = time.monotonic()
        self.service._arm_sweep()  # timed again from now
        self.out.push(reply_ok(request_id, result) if error is None
                     else reply_error(request_id, error.code, error.message))
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
        self.target = Target(controller=controller, net=net, faults=self.faults)
        self.clients: list[_Client] = []
        self._timer = False
        self._closed = False
        if controller is not None:
            controller.faults = self.faults
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
            self.clients.append(_Client(self, sock))
            self._arm_sweep()

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


class ControlClient:
    """A blocking control-socket client (the ``appliance ctl`` front, the test fixture)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        """Raises:
            OSError: nothing listens on ``path``.
        """
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:  # the listener's backlog is full: it is being drained
                if time.monotonic() < deadline:
                    select.select([], [], [], 0.005)
                    continue
                self.sock.close()
                raise
            except OSError:
                self.sock.close()
                raise
        self._buf = b""
        self._next = 1

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request and return the whole reply object.

        Raises:
            ConnectionError: the socket closed, or the reply is not a JSON object
                (too long, nested too deep, not JSON): the peer is no appliance.
            OSError: the socket failed or timed out.
        """
        request_id, self._next = self._next, self._next + 1
        line = json.dumps({"id": request_id, "cmd": cmd, "args": args}).encode() + b"\n"
        self.sock.sendall(line)
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_REPLY:
                raise ConnectionError(f"control reply longer than {MAX_REPLY} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("control socket closed")
            self._buf += chunk
        reply, self._buf = self._buf.split(b"\n", 1)
        if too_deep(reply):
            raise ConnectionError("control reply nested too deep")
        try:
            out = json.loads(reply)
        except ValueError as exc:
            raise ConnectionError(f"control reply is not JSON: {exc}") from None
        if not isinstance(out, dict):
            raise ConnectionError("control reply is not a JSON object")
        return out

    def __call__(self, cmd: str, **args: Any) -> Any:
        """Send one request and return its result.

        Raises:
            ControlError: the appliance refused it (``code`` and ``message`` from the reply).
        """
        reply = self.request(cmd, **args)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ControlError(str(err.get("code")), str(err.get("message")))
        return reply.get("result")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
