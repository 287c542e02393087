"""A blocking QMP client of the control socket (runtime layer): ``appliance ctl``,
the test fixture and users' scripts.

It reads the greeting and negotiates capabilities before its first command,
names commands by their QMP names (``fault.add`` may be given as well: dots
become dashes), and keeps the events that arrive meanwhile (the last
:data:`MAX_EVENTS`) for :meth:`ControlClient.wait_event`.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections import deque
from typing import Any, Self

from appliance.control.protocol import QMP_CAPABILITIES, QMP_CODE, ControlError, too_deep

MAX_REPLY = 64 << 20  # what the client buffers while waiting for one line
MAX_EVENTS = 1000  # events kept until wait_event takes them (the oldest go first)


def qmp_name(cmd: str) -> str:
    """The QMP name of a command (``fault.add`` -> ``fault-add``)."""
    return cmd.replace(".", "-")


class ControlClient:
    """One QMP connection to an appliance's control socket."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        """Connect (the greeting is read with the first command).

        Raises:
            OSError: nothing listens on ``path``.
        """
        self.timeout = timeout
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
        self.greeting: dict[str, Any] | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)

    # ------------------------------------------------------------ lines
    def _line(self) -> dict[str, Any]:
        """The next JSON object the server sent.

        Raises:
            ConnectionError: the socket closed, or the line is not a JSON object
                (too long, nested too deep, not JSON): the peer is no appliance.
            OSError: the socket failed or timed out.
        """
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_REPLY:
                raise ConnectionError(f"control reply longer than {MAX_REPLY} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("control socket closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        if too_deep(line):
            raise ConnectionError("control reply nested too deep")
        try:
            out = json.loads(line)
        except ValueError as exc:
            raise ConnectionError(f"control reply is not JSON: {exc}") from None
        if not isinstance(out, dict):
            raise ConnectionError("control reply is not a JSON object")
        return out

    def _send(self, execute: str, args: dict[str, Any]) -> int:
        request_id, self._next = self._next, self._next + 1
        self.sock.sendall(json.dumps({"execute": execute, "arguments": args,
                                      "id": request_id}).encode() + b"\n")
        return request_id

    def _reply(self, request_id: int) -> dict[str, Any]:
        """The response to ``request_id``; events meanwhile are kept, responses to
        other ids dropped (as the QMP spec says)."""
        while True:
            msg = self._line()
            if "event" in msg:
                self.events.append(msg)
            elif msg.get("id") == request_id or ("error" in msg and "id" not in msg):
                return msg

    def negotiate(self) -> None:
        """Read the greeting and leave capabilities negotiation (once).

        Raises:
            ConnectionError: no QMP greeting, or qmp_capabilities failed.
            OSError: the socket failed or timed out.
        """
        if self.greeting is not None:
            return
        hello = self._line()
        if not isinstance(hello.get("QMP"), dict):
            raise ConnectionError("the control socket sent no QMP greeting")
        reply = self._reply(self._send(QMP_CAPABILITIES, {}))
        if "return" not in reply:
            raise ConnectionError(f"QMP capabilities negotiation failed: {reply.get('error')}")
        self.greeting = hello

    # ------------------------------------------------------------ commands, events
    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Run one command; returns the whole QMP response object.

        Raises:
            ConnectionError: see :meth:`_line` and :meth:`negotiate`.
            OSError: the socket failed or timed out.
        """
        self.negotiate()
        return self._reply(self._send(qmp_name(cmd), args))

    def __call__(self, cmd: str, **args: Any) -> Any:
        """Run one command and return its result.

        Raises:
            ControlError: the appliance refused it (its code and message).
        """
        reply = self.request(cmd, **args)
        if "return" not in reply:
            err = reply.get("error")
            err = err if isinstance(err, dict) else {}
            raise ControlError(str(err.get(QMP_CODE) or err.get("class")), str(err.get("desc")))
        return reply["return"]

    def wait_event(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """The first event called ``name`` that arrived since the last one taken
        (waiting up to ``timeout`` seconds, the client's timeout by default).

        Raises:
            TimeoutError: none came in time.
            ConnectionError, OSError: as :meth:`request`.
        """
        self.negotiate()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while True:
                for event in self.events:
                    if event.get("event") == name:
                        self.events.remove(event)
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {name} event within {timeout} s")
                self.sock.settimeout(left)
                try:
                    msg = self._line()
                except TimeoutError:
                    continue
                if "event" in msg:
                    self.events.append(msg)
        finally:
            self.sock.settimeout(self.timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
