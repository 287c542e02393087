"""A blocking NBD client over a socket (runtime layer): the remote image of a namespace.

:class:`NbdExport` connects to the export an NBD URI names (a Unix socket or
TCP), runs the handshake of :class:`~appliance.nbd.protocol.NbdClientConnection`
and then answers the namespace's reads, writes, flushes and zeroing with one
request at a time: a lock makes it safe to call from the loop thread and from
the offload workers (:mod:`appliance.runtime.offload`) alike; each call waits
for its reply (at most ``timeout`` seconds per socket operation).

A failed request is an ``OSError`` with the server's errno (the namespace
turns it into its NVMe status).  A broken connection (the server gone, a
timeout, a protocol violation) is an ``OSError(EIO)`` for that call and for
every later one: nothing reconnects behind the namespace's back.
"""

from __future__ import annotations

import errno
import socket
import threading

from appliance.nbd import wire as w
from appliance.nbd.protocol import (
    ExportInfo,
    NbdClientConnection,
    NbdProtocolError,
    NbdRefused,
    NbdUsageError,
    Negotiated,
    Reply,
)
from appliance.nbd.uri import NbdUri, parse

TIMEOUT = 30.0
RECV_CHUNK = 1 << 20
ZERO_CHUNK = 1 << 30  # the largest WRITE_ZEROES / TRIM one request asks for


class NbdExport:
    """One connection to one export, with a block-device interface."""

    def __init__(self, uri: str | NbdUri, timeout: float = TIMEOUT,
                 structured_replies: bool = True) -> None:
        """Connect and negotiate (``structured_replies``: ask for them).

        Raises:
            ValueError: a bad URI.
            OSError: the server cannot be reached, refused the export or broke
                the protocol (the message says which).
        """
        self.uri = parse(uri) if isinstance(uri, str) else uri
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._conn = NbdClientConnection(self.uri.export, structured_replies)
        if self.uri.socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(self.uri.socket)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((self.uri.host, self.uri.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        try:
            event = self._wait()
        except BaseException:
            self.close()
            raise
        if not isinstance(event, Negotiated):
            self.close()
            raise OSError(errno.EPROTO, f"{self.uri}: a reply before the handshake ended")
        self.info: ExportInfo = event.info

    # ------------------------------------------------------------ what it is
    @property
    def size(self) -> int:
        return self.info.size

    @property
    def read_only(self) -> bool:
        return self.info.read_only

    @property
    def block_size(self) -> int:
        """The export's minimum block size (requests are multiples of it)."""
        return self.info.minimum

    # ------------------------------------------------------------ I/O
    def pread(self, length: int, offset: int) -> bytes:
        """``length`` bytes at ``offset``.

        Raises:
            OSError: the server's error, or the connection is broken.
        """
        parts = []
        for at, n in self._pieces(offset, length, self.info.maximum):
            parts.append(self._call(w.Cmd.READ, at, n).data)
        return b"".join(parts)

    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (``fua``: durable before the reply).

        Raises:
            OSError: the server's error, or the connection is broken.
        """
        view = memoryview(data).cast("B")
        for at, n in self._pieces(offset, len(view), self.info.maximum):
            self._call(w.Cmd.WRITE, at, n, fua=fua, payload=view[at - offset:at - offset + n])

    def flush(self) -> None:
        """NBD_CMD_FLUSH when the export takes it (else its writes are durable).

        Raises:
            OSError: the server's error, or the connection is broken.
        """
        if self.info.can(w.TF_SEND_FLUSH) and not self.read_only:
            self._call(w.Cmd.FLUSH)

    def write_zeroes(self, offset: int, length: int, deallocate: bool,
                     fua: bool = False) -> None:
        """Make ``offset..offset+length`` read as zeroes; ``deallocate`` lets the
        server punch holes (else NBD_CMD_FLAG_NO_HOLE).  Without WRITE_ZEROES
        on the export, zeroes are written.

        Raises:
            OSError: the server's error, or the connection is broken.
        """
        if not self.info.can(w.TF_SEND_WRITE_ZEROES):
            step = min(self.info.maximum, 1 << 20)
            zeros = bytes(step)
            for at, n in self._pieces(offset, length, step):
                self.pwrite(zeros[:n], at, fua=fua)
            return
        for at, n in self._pieces(offset, length, ZERO_CHUNK):
            self._call(w.Cmd.WRITE_ZEROES, at, n, fua=fua, no_hole=not deallocate)

    def trim(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM (advisory: trimmed data may read back as anything).

        Raises:
            OSError: the server's error, or the connection is broken.
        """
        for at, n in self._pieces(offset, length, ZERO_CHUNK):
            self._call(w.Cmd.TRIM, at, n)

    def close(self) -> None:
        """Send NBD_CMD_DISC (when the connection is sound) and close (idempotent)."""
        with self._lock:
            if self._sock.fileno() < 0:
                return
            if self._broken is None and self._conn.info is not None and not self._conn.pending:
                try:
                    self._conn.request(w.Cmd.DISC)
                    self._sock.sendall(self._conn.data_to_send())
                except (OSError, NbdUsageError):
                    pass
            self._broken = "closed"
            self._sock.close()

    # ------------------------------------------------------------ internals
    def _pieces(self, offset: int, length: int, step: int) -> list[tuple[int, int]]:
        step -= step % self.info.minimum
        return [(at, min(step, offset + length - at)) for at in range(offset, offset + length, step)]

    def _call(self, cmd: w.Cmd, offset: int = 0, length: int = 0, *, fua: bool = False,
              no_hole: bool = False, payload: bytes | memoryview = b"") -> Reply:
        with self._lock:
            if self._broken is not None:
                raise OSError(errno.EIO, f"{self.uri}: connection {self._broken}")
            try:
                cookie = self._conn.request(cmd, offset, length, fua=fua, no_hole=no_hole,
                                            payload=payload)
            except NbdUsageError as exc:
                raise OSError(errno.EINVAL, f"{self.uri}: {exc}") from None
            try:
                self._sock.sendall(self._conn.data_to_send())
                reply = self._wait()
            except OSError as exc:
                self._broken = f"broken ({exc.strerror or exc})"
                raise OSError(errno.EIO, f"{self.uri}: {exc.strerror or exc}") from None
        if not isinstance(reply, Reply) or reply.cookie != cookie:
            self._broken = "broken (an unexpected reply)"
            raise OSError(errno.EIO, f"{self.uri}: an unexpected reply")
        if reply.error:
            text = f": {reply.message}" if reply.message else ""
            raise OSError(reply.error, f"{self.uri}: {cmd.name} {offset}+{length}: "
                          f"{errno.errorcode.get(reply.error, reply.error)}{text}")
        return reply

    def _wait(self) -> Negotiated | Reply:
        """Send what is queued, read until the next event.

        Raises:
            OSError: the socket failed or timed out; the server broke the
                protocol (EPROTO) or refused the export (ENOENT).
        """
        try:
            while True:
                event = self._conn.next_event()
                out = self._conn.data_to_send()  # what the handshake answered
                if out:
                    self._sock.sendall(out)
                if isinstance(event, (Negotiated, Reply)):
                    return event
                self._conn.receive_data(self._sock.recv(RECV_CHUNK))
        except NbdProtocolError as exc:
            self._broken = "broken (protocol)"
            raise OSError(errno.EPROTO, f"{self.uri}: {exc}") from None
        except NbdRefused as exc:
            raise OSError(errno.ENOENT, f"{self.uri}: {exc}") from None
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, "no answer from the server") from None
