"""Where one control message ends in the byte stream (protocol layer, sans-I/O).

QMP clients send JSON objects back to back and need not end them with a
newline (``qemu.qmp`` does not); JSON-lines clients end each request with
one.  :class:`MessageSplitter` serves both: a message ends at a newline, or
where its top-level JSON object or array closes.  Brackets inside strings do
not count; a closing bracket with nothing open does not end anything (the
line then ends at its newline and is refused as one).  A JSON string holds no
raw newline, so a newline always ends a message, which is how a client gets
past bad input.  The scan is incremental (each byte is looked at once, however
the stream is cut) and iterative: no depth of nesting costs recursion.
"""

from __future__ import annotations

import re

_OUTSIDE = re.compile(rb'[\[\]{}"\n]')  # what matters outside a string
_INSIDE = re.compile(rb'["\\\n]')  # and inside one
_QUOTE, _BACKSLASH, _NEWLINE = ord('"'), ord("\\"), ord("\n")
_OPEN = frozenset(b"[{")


class MessageSplitter:
    """Bytes in, the end of the next message out (:meth:`next_end`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the scan (the caller dropped what it had buffered)."""
        self._pos = 0  # scanned up to here
        self._depth = 0
        self._in_string = False

    def next_end(self, buf: bytearray) -> int:
        """The index just past the first message in ``buf`` (a newline is part of
        the message it ends), or -1 when ``buf`` holds no whole message yet.  After
        a message is taken off the front of ``buf``, call :meth:`reset`."""
        pos, size = self._pos, len(buf)
        while True:
            pattern = _INSIDE if self._in_string else _OUTSIDE
            m = pattern.search(buf, pos)
            if m is None:
                self._pos = size
                return -1
            c, pos = buf[m.start()], m.end()
            if c == _NEWLINE:
                return pos
            if self._in_string:
                if c == _QUOTE:
                    self._in_string = False
                elif pos >= size:  # a backslash: the escaped character is still to come
                    self._pos = m.start()
                    return -1
                elif buf[pos] != _NEWLINE:
                    pos += 1
            elif c == _QUOTE:
                self._in_string = True
            elif c in _OPEN:
                self._depth += 1
            elif self._depth:
                self._depth -= 1
                if not self._depth:
                    return pos
