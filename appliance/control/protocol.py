"""Control-socket protocol: QMP, and the older JSON lines, sans-I/O (protocol layer).

Theory of operation
-------------------
The socket speaks QMP (QEMU's docs/interop/qmp-spec.rst): on connect the server
sends its greeting (:func:`greeting`, ``{"QMP": {"version": ..., "capabilities":
[]}}``); the connection is then in capabilities negotiation mode, where only
``qmp_capabilities`` runs (anything else is ``CommandNotFound``); after it, in
command mode, ``{"execute": NAME, "arguments": {...}, "id": ID}`` gets
``{"return": RESULT, "id": ID}`` or ``{"error": {"class": CLASS, "desc": TEXT},
"id": ID}`` (``id`` only when the request carried one; the error also carries
``__appliance_code``, the code below), and asynchronous events
(:func:`encode_event`) are delivered.  QMP output lines end in CRLF.

The older dialect, still answered: one request per line,
``{"id": ID, "cmd": "NAME", "args": {...}}`` (``args`` optional, ``id`` any
JSON scalar echoed back), one reply per line: ``{"id": ID, "ok": true,
"result": ...}`` or ``{"id": ID, "ok": false, "error": {"code": CODE,
"message": TEXT}}``.  A connection's first JSON object with ``execute`` makes it
a QMP connection, with ``cmd`` a JSON-lines one; until then an error reply
carries both forms (``ok``/``code``/``message`` and ``class``/``desc``).

:class:`ControlConnection` takes bytes in (:meth:`receive_data`) and yields
:class:`Request` objects or ready-made replies (:meth:`next_event`);
:func:`answer_ok` / :func:`answer_error` encode replies in the request's
dialect.  A line longer than :data:`MAX_LINE` is refused with
``line_too_long`` and discarded up to its newline; bytes that are not JSON, not
an object, or lack a string ``cmd`` (``execute``) get ``bad_request``, and so
do arrays and objects nested deeper than :data:`MAX_DEPTH` (counted before the
JSON decoder sees the line, so no depth can exhaust its recursion),
``NaN``/``Infinity`` and numbers that overflow to them (``1e999``), and
integers outside :data:`INT_RANGE`.  The connection never raises on bad input:
every rejection is a reply and the next line is read normally.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.control.stream import MessageSplitter

MAX_LINE = 64 * 1024
MAX_DEPTH = 32  # nested arrays/objects in one request
INT_RANGE = (-(1 << 63), 1 << 64)  # integers a request may carry: [lo, hi)

# Error codes (the protocol's own errors).
BAD_REQUEST = "bad_request"
LINE_TOO_LONG = "line_too_long"
UNKNOWN_COMMAND = "unknown_command"
BAD_ARGS = "bad_args"
FAILED = "failed"
UNAVAILABLE = "unavailable"

#: the QMP error class of each code (every other code is a GenericError)
QMP_CLASSES = {UNKNOWN_COMMAND: "CommandNotFound"}
QMP_GENERIC = "GenericError"
#: the member of a QMP error object carrying the code (a downstream name: QMP
#: reserves names beginning with ``__`` for servers other than QEMU)
QMP_CODE = "__appliance_code"
QMP_CAPABILITIES = "qmp_capabilities"
_QMP_MEMBERS = frozenset({"execute", "arguments", "id"})


class ControlError(Exception):
    """A request refused with ``code`` (one of the codes above)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Request:
    """One command to run: ``cmd`` is its name as the client sent it (a QMP name for
    a QMP request); ``qmp`` says which dialect answers; ``with_id`` whether a QMP
    request carried an ``id`` (a JSON-lines reply always has one)."""

    id: Any
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    qmp: bool = False
    with_id: bool = True


class Deferred:
    """A result that comes later: a command returns one instead of its result.

    The command's work goes on in the event loop (a live handoff talks to
    another process); it settles the deferred once, with :meth:`resolve` or
    :meth:`fail`.  The connection that asked answers then, and answers its
    next requests only after that (replies stay in request order).
    """

    def __init__(self) -> None:
        self._outcome: tuple[Any, ControlError | None] | None = None
        self._callback: Callable[[Any, ControlError | None], None] | None = None

    @property
    def settled(self) -> bool:
        return self._outcome is not None

    def then(self, callback: Callable[[Any, ControlError | None], None]) -> None:
        """Call ``callback(result, error)`` once settled (at once if it is)."""
        self._callback = callback
        if self._outcome is not None:
            callback(*self._outcome)

    def resolve(self, result: Any) -> None:
        self._settle((result, None))

    def fail(self, code: str, message: str) -> None:
        self._settle((None, ControlError(code, message)))

    def _settle(self, outcome: tuple[Any, ControlError | None]) -> None:
        if self._outcome is not None:
            raise RuntimeError("a deferred control result settles once")
        self._outcome = outcome
        if self._callback is not None:
            self._callback(*outcome)


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def _encode_qmp(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\r\n"


def reply_ok(request_id: Any, result: Any) -> bytes:
    """The success reply line (JSON lines)."""
    return _encode({"id": request_id, "ok": True, "result": result})


def reply_error(request_id: Any, code: str, message: str) -> bytes:
    """The error reply line (JSON lines)."""
    return _encode({"id": request_id, "ok": False, "error": {"code": code, "message": message}})


def _qmp_error(code: str, message: str) -> dict[str, Any]:
    return {"class": QMP_CLASSES.get(code, QMP_GENERIC), "desc": message, QMP_CODE: code}


def qmp_return(request_id: Any, result: Any, with_id: bool = True) -> bytes:
    """The QMP success response (``id`` only ``with_id``)."""
    obj: dict[str, Any] = {"return": {} if result is None else result}
    if with_id:
        obj["id"] = request_id
    return _encode_qmp(obj)


def qmp_error(request_id: Any, code: str, message: str, with_id: bool = True) -> bytes:
    """The QMP error response: ``class`` from the code, ``desc`` the message."""
    obj: dict[str, Any] = {"error": _qmp_error(code, message)}
    if with_id:
        obj["id"] = request_id
    return _encode_qmp(obj)


def either_error(code: str, message: str) -> bytes:
    """An error before the connection chose its dialect: a JSON-lines error reply
    whose error object is a QMP error object too."""
    return _encode({"id": None, "ok": False,
                    "error": {"code": code, "message": message, **_qmp_error(code, message)}})


def answer_ok(request: Request, result: Any) -> bytes:
    """The success reply to ``request``, in its dialect."""
    if request.qmp:
        return qmp_return(request.id, result, request.with_id)
    return reply_ok(request.id, result)


def answer_error(request: Request, code: str, message: str) -> bytes:
    """The error reply to ``request``, in its dialect."""
    if request.qmp:
        return qmp_error(request.id, code, message, request.with_id)
    return reply_error(request.id, code, message)


def greeting(version: tuple[int, int, int], package: str) -> bytes:
    """The QMP greeting: ``version`` in query-version's form (the appliance's own
    version in the ``qemu`` member, its name in ``package``), no capabilities."""
    major, minor, micro = version
    return _encode_qmp({"QMP": {"version": {"qemu": {"major": major, "minor": minor,
                                                     "micro": micro},
                                            "package": package},
                                "capabilities": []}})


def encode_event(name: str, data: dict[str, Any], now: float) -> bytes:
    """A QMP asynchronous event line; ``now`` is seconds since the Unix epoch."""
    seconds = int(now)
    return _encode_qmp({"event": name, "data": data,
                        "timestamp": {"seconds": seconds,
                                      "microseconds": int((now - seconds) * 1_000_000)}})


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def too_deep(line: bytes) -> bool:
    """Whether arrays and objects nest deeper than :data:`MAX_DEPTH` in ``line``
    (brackets inside strings do not count; an iterative scan, no recursion)."""
    if line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return False
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub(b"", line)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        if depth > MAX_DEPTH:
            return True
    return False


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ControlError(BAD_REQUEST, f"number {text[:40]} is out of range (overflows to infinity)")
    return value


def _not_a_number(text: str) -> Any:
    raise ControlError(BAD_REQUEST, f"{text} is not a JSON number")


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > 20:
        raise ControlError(BAD_REQUEST, f"an integer of {digits} digits is out of range "
                                        f"[{INT_RANGE[0]}, {INT_RANGE[1]})")
    value = int(text)
    if not INT_RANGE[0] <= value < INT_RANGE[1]:
        raise ControlError(BAD_REQUEST, f"integer {value} is out of range "
                                        f"[{INT_RANGE[0]}, {INT_RANGE[1]})")
    return value


def decode_line(line: bytes) -> Any:
    """One line as JSON, within the protocol's bounds.

    Raises:
        ControlError: BAD_REQUEST for bytes that are not JSON, nesting deeper than
            :data:`MAX_DEPTH`, numbers that are not finite, integers outside
            :data:`INT_RANGE`.
    """
    if too_deep(line):
        raise ControlError(BAD_REQUEST, f"arrays/objects nested deeper than {MAX_DEPTH}")
    try:
        return json.loads(line.decode("utf-8"), parse_float=_finite, parse_int=_bounded_int,
                          parse_constant=_not_a_number)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError(BAD_REQUEST, f"not JSON: {exc}") from None


def request_from(obj: Any) -> Request:
    """A JSON-lines request from a decoded line.

    Raises:
        ControlError: BAD_REQUEST for anything but a JSON object with a string ``cmd``
            and an object ``args``.
    """
    if not isinstance(obj, dict):
        raise ControlError(BAD_REQUEST, "a request is a JSON object")
    request_id = obj.get("id")
    if isinstance(request_id, (dict, list)):
        raise ControlError(BAD_REQUEST, "id must be a JSON scalar")
    cmd, args = obj.get("cmd"), obj.get("args", {})
    if not isinstance(cmd, str) or not cmd:
        err = ControlError(BAD_REQUEST, "cmd must be a non-empty string")
        err.request_id = request_id  # type: ignore[attr-defined]
        raise err
    if args is None:
        args = {}
    if not isinstance(args, dict):
        err = ControlError(BAD_REQUEST, "args must be a JSON object")
        err.request_id = request_id  # type: ignore[attr-defined]
        raise err
    return Request(request_id, cmd, args)


def parse_line(line: bytes) -> Request:
    """Decode one JSON-lines request line (without its newline).

    Raises:
        ControlError: BAD_REQUEST (see :func:`decode_line` and :func:`request_from`).
    """
    return request_from(decode_line(line))


def qmp_request(obj: Any) -> Request:
    """A QMP command from a decoded line: ``execute``, optional ``arguments`` and ``id``.

    Raises:
        ControlError: BAD_REQUEST for anything else (``exec-oob`` included: the
            greeting offers no ``oob``); carries ``request_id`` and ``with_id``
            once the id is known.
    """
    if not isinstance(obj, dict):
        raise ControlError(BAD_REQUEST, "QMP input must be a JSON object")
    with_id, request_id = "id" in obj, obj.get("id")

    def refuse(message: str) -> ControlError:
        err = ControlError(BAD_REQUEST, message)
        err.request_id, err.with_id = request_id, with_id  # type: ignore[attr-defined]
        return err

    if "exec-oob" in obj:
        raise refuse("out-of-band execution (exec-oob) is not offered: no 'oob' capability")
    for key in obj:
        if key not in _QMP_MEMBERS:
            raise refuse(f"QMP input member {key[:40]!r} is unexpected")
    name, args = obj.get("execute"), obj.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise refuse("QMP input member 'execute' must be a non-empty string")
    if not isinstance(args, dict):
        raise refuse("QMP input member 'arguments' must be an object")
    return Request(request_id, name, args, qmp=True, with_id=with_id)


class ControlConnection:
    """One client's byte stream: requests out, bad lines turned into error replies.

    :meth:`receive_data` only splits lines; each is decoded when
    :meth:`next_event` reaches it, so the caller decides how much work one
    read costs (it may answer a few requests and come back for the rest).
    The connection also keeps the QMP state: which dialect the client speaks
    (``dialect``: None until its first request, then :data:`QMP` or
    :data:`LINES`) and whether it left capabilities negotiation
    (:attr:`wants_events`).
    """

    QMP = "qmp"
    LINES = "lines"

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.dialect: str | None = None
        self.negotiated = False  # qmp_capabilities ran: command mode
        self._buf = bytearray()
        self._discarding = False  # inside an oversized message, skipping to a newline
        self._split = MessageSplitter()
        self._pending: deque[bytes | None] = deque()  # lines to decode; None: one too long

    @property
    def wants_events(self) -> bool:
        """Whether asynchronous events go to this client (QMP, in command mode)."""
        return self.dialect == self.QMP and self.negotiated

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the client (b"" at EOF is ignored: a partial message is
        dropped).  Messages end at a newline or where their top-level object or
        array closes (:class:`~appliance.control.stream.MessageSplitter`)."""
        self._buf += data
        while True:
            if self._discarding:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    self._buf.clear()
                    return
                del self._buf[:nl + 1]
                self._discarding = False
                continue
            end = self._split.next_end(self._buf)
            if end < 0:
                if len(self._buf) > self.max_line:
                    self._buf.clear()
                    self._split.reset()
                    self._discarding = True
                    self._pending.append(None)
                return
            line = bytes(self._buf[:end]).rstrip(b"\n")
            del self._buf[:end]
            self._split.reset()
            if len(line) > self.max_line:
                self._pending.append(None)
            elif line.strip():
                self._pending.append(line)

    @property
    def has_events(self) -> bool:
        """Whether :meth:`next_event` has something (a line received and not yet taken)."""
        return bool(self._pending)

    def next_event(self) -> Request | bytes | None:
        """The next request, or a reply (bytes) to send as is, or None."""
        if not self._pending:
            return None
        line = self._pending.popleft()
        try:
            if line is None:
                raise ControlError(LINE_TOO_LONG, f"request line longer than {self.max_line} bytes")
            obj = decode_line(line)
            if self.dialect is None and isinstance(obj, dict):
                if "execute" in obj or "exec-oob" in obj:
                    self.dialect = self.QMP
                elif "cmd" in obj:
                    self.dialect = self.LINES
            if self.dialect == self.QMP:
                return self._negotiate(qmp_request(obj))
            return request_from(obj)
        except ControlError as exc:
            request_id = getattr(exc, "request_id", None)
            if self.dialect == self.QMP:
                return qmp_error(request_id, exc.code, exc.message, getattr(exc, "with_id", False))
            if self.dialect == self.LINES:
                return reply_error(request_id, exc.code, exc.message)
            return either_error(exc.code, exc.message)

    def _negotiate(self, request: Request) -> Request | bytes:
        """The capabilities negotiation (QMP): ``qmp_capabilities`` is answered
        here, once, and before it nothing else runs."""
        if request.cmd != QMP_CAPABILITIES:
            if self.negotiated:
                return request
            return qmp_error(request.id, UNKNOWN_COMMAND, "expecting capabilities negotiation "
                             "with 'qmp_capabilities'", request.with_id)
        if self.negotiated:
            return qmp_error(request.id, UNKNOWN_COMMAND, "capabilities negotiation is already "
                             "complete, command ignored", request.with_id)
        extra = sorted(set(request.args) - {"enable"})
        enable = request.args.get("enable", [])
        if extra:
            return qmp_error(request.id, BAD_ARGS, f"qmp_capabilities: unknown argument "
                             f"{extra[0][:40]!r}", request.with_id)
        if not isinstance(enable, list) or enable:
            return qmp_error(request.id, BAD_ARGS, "enable: this server offers no "
                             "capabilities (expected [])", request.with_id)
        self.negotiated = True
        return qmp_return(request.id, {}, request.with_id)
