"""One framer for every length-prefixed protocol on a unix stream socket
(vfio-user, vhost-user): bytes and SCM_RIGHTS fds in, whole messages out.

Theory of operation
-------------------
A message is a fixed-size header carrying a ``size`` field, then a body.  The
protocols differ only in the header's size and in whether ``size`` counts the
header (vfio-user: the whole message; vhost-user: the payload alone), so one
:class:`Framer` takes both as parameters.

File descriptors travel as SCM_RIGHTS ancillary data attached to the bytes of
the message that carries them.  To keep "which message do these fds belong
to" exact, the reader never asks the kernel for more than
:meth:`Framer.bytes_wanted`: first the header, then exactly the rest of that
message, so whatever fds arrive with any chunk belong to the message being
assembled.

Incomplete input is not an error: :meth:`Framer.feed` buffers it and
:meth:`Framer.next_frame` returns None (the NEED_DATA case).  A header whose
``size`` is below the header's own size cannot be framed and raises
:class:`RemoteProtocolError` (the connection must close); a ``size`` above
``max_size`` comes back as an oversized frame (header and fds, no body: the
body is never buffered), so the protocol decides how to refuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from appliance.errors import RemoteProtocolError
from appliance.protocol_common import close_quietly


class SizedHeader(Protocol):
    """What the framer needs of a header: its ``size`` field and its bytes."""

    @property
    def size(self) -> int: ...

    def pack(self) -> bytes: ...


H = TypeVar("H", bound=SizedHeader)


@dataclass
class Frame(Generic[H]):
    """One complete message: header, payload (after the header) and its fds."""

    header: H
    payload: bytes
    fds: list[int] = field(default_factory=list)
    oversized: bool = False  # header only: its size exceeded the limit

    def take_fd(self, fd: int) -> int:
        """Hand ``fd`` on (its new owner closes it); the message forgets it."""
        self.fds.remove(fd)
        return fd

    def close_fds(self) -> None:
        """Close every fd this message still holds (each rejection path calls this)."""
        while self.fds:
            close_quietly(self.fds.pop())


class Framer(Generic[H]):
    """Reassembles messages from chunks of at most :meth:`bytes_wanted` bytes."""

    def __init__(self, unpack: Callable[[bytearray], H], header_size: int, max_size: int,
                 *, size_counts_header: bool) -> None:
        """Args:
            unpack: decodes a header from the first ``header_size`` bytes.
            header_size: bytes of the header.
            max_size: the largest ``size`` field accepted (a larger one gives an
                oversized frame).
            size_counts_header: whether ``size`` includes the header (else it is
                the body's size).
        """
        self.unpack = unpack
        self.header_size = header_size
        self.max_size = max_size
        self._counted = header_size if size_counts_header else 0
        self._buf = bytearray()
        self._whole: bytes | None = None  # a body that arrived in one chunk
        self._fds: list[int] = []
        self._header: H | None = None
        self._body = 0  # body bytes of the current message, once its header is in

    def bytes_wanted(self) -> int:
        """How many bytes complete the header or the current message."""
        if self._header is None:
            return self.header_size - len(self._buf)
        if self._whole is not None:
            return 0
        return self._body - len(self._buf)

    def feed(self, data: bytes, fds: list[int]) -> None:
        """Buffer a chunk (never more than :meth:`bytes_wanted`) and its fds.

        Raises:
            RemoteProtocolError: the chunk is longer than wanted (its fds are closed).
        """
        if len(data) > self.bytes_wanted():
            for fd in fds:
                close_quietly(fd)
            raise RemoteProtocolError("reader fed more than one message at once")
        if self._header is not None and not self._buf and len(data) == self._body and data:
            self._whole = bytes(data)  # no copy of a bytes object: kept as is
        else:
            self._buf += data
        self._fds += fds

    def next_frame(self) -> Frame[H] | None:
        """A complete message, or None when more bytes are needed.

        Raises:
            RemoteProtocolError: the header's size is below the header size.
        """
        if self._header is None:
            if len(self._buf) < self.header_size:
                return None
            header = self.unpack(self._buf)
            del self._buf[:self.header_size]
            size = header.size
            if size < self._counted:
                self.close()
                raise RemoteProtocolError(f"message size {size} is below the header size")
            if size > self.max_size:
                return Frame(header, b"", self._take_fds(), oversized=True)
            self._header, self._body = header, size - self._counted
        if self._whole is not None:  # the body came in one chunk: it is the payload
            payload, self._whole = self._whole, None
        elif len(self._buf) < self._body:
            return None
        else:
            payload = bytes(self._buf)
            self._buf.clear()
        frame = Frame(self._header, payload, self._take_fds())
        self._header = None
        return frame

    def pending(self) -> tuple[bytes, list[int]]:
        """The bytes (header included) and fds of a message not yet complete.

        A live handoff carries them to the next process, which feeds them
        first; the fds stay owned by this framer.
        """
        head = self._header.pack() if self._header is not None else b""
        return head + (self._whole or bytes(self._buf)), list(self._fds)

    def _take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def close(self) -> None:
        """Drop buffered bytes and close fds that never made a message."""
        for fd in self._take_fds():
            close_quietly(fd)
        self._buf.clear()
        self._whole = None
        self._header = None
