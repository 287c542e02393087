"""Framing of a vfio-user byte stream into messages (protocol layer, sans-I/O).

vfio-user is :mod:`appliance.framing`'s framer with a 16-byte header whose
``size`` counts the whole message, header included.  The runtime reads first
the header, then exactly the rest of the message, so fds received with any
chunk belong to the message being assembled.  A header whose size is below 16
cannot be framed and raises :class:`~appliance.errors.RemoteProtocolError`
(the connection must close); a size above ``max_size`` is reported as an
oversized frame so the server can answer it with an error reply before
closing, without ever buffering the body.
"""

from __future__ import annotations

from appliance import framing
from appliance.vfio_user.wire import HEADER_SIZE, Header

#: One complete vfio-user message: header, payload and its fds.
Frame = framing.Frame[Header]


class Framer(framing.Framer[Header]):
    """Reassembles vfio-user messages from chunks of at most :meth:`bytes_wanted` bytes."""

    def __init__(self, max_size: int) -> None:
        """Args:
            max_size: the largest message (header included) accepted whole.
        """
        super().__init__(Header.unpack, HEADER_SIZE, max_size, size_counts_header=True)


def encode(header: Header, payload: bytes = b"") -> bytes:
    """Header (with its size filled in) followed by ``payload``."""
    header.size = HEADER_SIZE + len(payload)
    return header.pack() + payload
