"""Framing of a vfio-user byte stream into messages (protocol layer, sans-I/O).

Theory of operation
-------------------
vfio-user runs over a SOCK_STREAM unix socket; file descriptors travel as
SCM_RIGHTS ancillary data attached to the bytes of the message that carries
them.  To keep "which message do these fds belong to" exact, the reader never
asks the kernel for more than :meth:`Framer.bytes_wanted`: first the 16-byte
header, then exactly the rest of that message.  Whatever fds arrive with any
chunk therefore belong to the message being assembled.

Incomplete input is not an error: :meth:`Framer.feed` buffers it and
:meth:`Framer.next_frame` returns None (the NEED_DATA case).  A header whose
size is below 16 cannot be framed and raises :class:`RemoteProtocolError`
(the connection must close); a size above ``max_size`` is reported as an
oversized frame so the caller can answer it with an error reply before
closing, without ever buffering the body.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.errors import RemoteProtocolError
from appliance.protocol_common import close_quietly
from appliance.vfio_user.wire import HEADER_SIZE, Header


@dataclass
class Frame:
    """One complete message: header, payload (after the header) and its fds."""

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)
    oversized: bool = False  # header only: size exceeded the limit

    def close_fds(self) -> None:
        """Close every fd this message carried (each rejection path calls this)."""
        while self.fds:
            close_quietly(self.fds.pop())


class Framer:
    """Reassembles messages from chunks of at most :meth:`bytes_wanted` bytes."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: Header | None = None

    def bytes_wanted(self) -> int:
        """How many bytes complete the header or the current message."""
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return int(self._header.size) - HEADER_SIZE - len(self._buf)

    def feed(self, data: bytes, fds: list[int]) -> None:
        """Buffer a chunk (never more than :meth:`bytes_wanted`) and its fds."""
        if len(data) > self.bytes_wanted():
            for fd in fds:
                close_quietly(fd)
            raise RemoteProtocolError("reader fed more than one message at once")
        self._buf += data
        self._fds += fds

    def next_frame(self) -> Frame | None:
        """A complete message, or None when more bytes are needed.

        Raises:
            RemoteProtocolError: the header's size is below the header size.
        """
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            header = Header.unpack(self._buf)
            del self._buf[:HEADER_SIZE]
            if header.size < HEADER_SIZE:
                self.close()
                raise RemoteProtocolError(f"message size {header.size} is below the header size")
            if header.size > self.max_size:
                frame = Frame(header, b"", self._take_fds(), oversized=True)
                return frame
            self._header = header
        if len(self._buf) < self._header.size - HEADER_SIZE:
            return None
        frame = Frame(self._header, bytes(self._buf), self._take_fds())
        self._buf.clear()
        self._header = None
        return frame

    def pending(self) -> tuple[bytes, list[int]]:
        """The bytes (header included) and fds of a message not yet complete.

        A live handoff carries them to the next process, which feeds them
        first; the fds stay owned by this framer.
        """
        head = self._header.pack() if self._header is not None else b""
        return head + bytes(self._buf), list(self._fds)

    def _take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def close(self) -> None:
        """Drop buffered bytes and close fds that never made a message."""
        for fd in self._take_fds():
            close_quietly(fd)
        self._buf.clear()
        self._header = None


def encode(header: Header, payload: bytes = b"") -> bytes:
    """Header (with its size filled in) followed by ``payload``."""
    header.size = HEADER_SIZE + len(payload)
    return header.pack() + payload
