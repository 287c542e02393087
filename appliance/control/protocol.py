"""Control-socket protocol: JSON lines, sans-I/O (protocol layer).

Theory of operation
-------------------
One request per line, UTF-8 JSON: ``{"id": ID, "cmd": "NAME", "args": {...}}``
(``args`` optional, ``id`` any JSON scalar echoed back).  One reply per line:
``{"id": ID, "ok": true, "result": ...}`` or
``{"id": ID, "ok": false, "error": {"code": CODE, "message": TEXT}}``.

:class:`ControlConnection` takes bytes in (:meth:`receive_data`) and yields
:class:`Request` objects or ready-made error replies (:meth:`next_event`);
:func:`reply_ok` / :func:`reply_error` encode replies.  A line longer than
:data:`MAX_LINE` is refused with ``line_too_long`` and discarded up to its
newline; bytes that are not JSON, not an object, or lack a string ``cmd``
get ``bad_request``, and so do arrays and objects nested deeper than
:data:`MAX_DEPTH` (counted before the JSON decoder sees the line, so no depth
can exhaust its recursion), ``NaN``/``Infinity`` and numbers that overflow
to them (``1e999``), and integers outside :data:`INT_RANGE`.  The
connection never raises on bad input: every rejection is a reply and the
next line is read normally.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


class ControlError(Exception):
    """A request refused with ``code`` (one of the codes above)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Request:
    id: Any
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)


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


def reply_ok(request_id: Any, result: Any) -> bytes:
    """The success reply line."""
    return _encode({"id": request_id, "ok": True, "result": result})


def reply_error(request_id: Any, code: str, message: str) -> bytes:
    """The error reply line."""
    return _encode({"id": request_id, "ok": False, "error": {"code": code, "message": message}})


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


def parse_line(line: bytes) -> Request:
    """Decode one request line (without its newline).

    Raises:
        ControlError: BAD_REQUEST for anything but a JSON object with a string ``cmd``
            and an object ``args``, for nesting deeper than :data:`MAX_DEPTH` and for
            numbers that are not finite or integers outside :data:`INT_RANGE`.
    """
    if too_deep(line):
        raise ControlError(BAD_REQUEST, f"arrays/objects nested deeper than {MAX_DEPTH}")
    try:
        obj = json.loads(line.decode("utf-8"), parse_float=_finite, parse_int=_bounded_int,
                         parse_constant=_not_a_number)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError(BAD_REQUEST, f"not JSON: {exc}") from None
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


class ControlConnection:
    """One client's byte stream: requests out, bad lines turned into error replies.

    :meth:`receive_data` only splits lines; each is decoded when
    :meth:`next_event` reaches it, so the caller decides how much work one
    read costs (it may answer a few requests and come back for the rest).
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False  # inside an oversized line, skipping to its newline
        self._pending: deque[tuple[bool, bytes]] = deque()  # (to decode?, line or reply)

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the client (b"" at EOF is ignored: a partial line is dropped)."""
        self._buf += data
        too_long = reply_error(None, LINE_TOO_LONG,
                               f"request line longer than {self.max_line} bytes")
        while True:
            nl = self._buf.find(b"\n")
            if self._discarding:
                if nl < 0:
                    self._buf.clear()
                    return
                del self._buf[:nl + 1]
                self._discarding = False
                continue
            if nl < 0:
                if len(self._buf) > self.max_line:
                    self._buf.clear()
                    self._discarding = True
                    self._pending.append((False, too_long))
                return
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            if len(line) > self.max_line:
                self._pending.append((False, too_long))
            elif line.strip():
                self._pending.append((True, line))

    @property
    def has_events(self) -> bool:
        """Whether :meth:`next_event` has something (a line received and not yet taken)."""
        return bool(self._pending)

    def next_event(self) -> Request | bytes | None:
        """The next request, or an error reply (bytes) to send as is, or None."""
        if not self._pending:
            return None
        decode, data = self._pending.popleft()
        if not decode:
            return data
        try:
            return parse_line(data)
        except ControlError as exc:
            return reply_error(getattr(exc, "request_id", None), exc.code, exc.message)
