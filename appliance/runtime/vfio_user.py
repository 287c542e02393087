"""Serve a vfio-user device on a unix socket (runtime layer).

The listener accepts one client at a time per device (the protocol has one
client per connection and our devices are single-function); a second client
is refused by closing its socket.  Each readable event drains up to a batch
of messages with non-blocking ``recvmsg`` calls, each no larger than the
connection's :meth:`bytes_wanted`, so SCM_RIGHTS fds stay with their message.

DMA to client memory that was mapped without an fd goes through
DMA_READ/DMA_WRITE messages: :class:`SocketTransport` sends the request and
waits (bounded by ``DMA_TIMEOUT``) for its reply on the same socket, framing
and queueing any client commands that arrive meanwhile; they are dispatched
right after the current one.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable

from appliance.errors import LocalProtocolError, RemoteProtocolError
from appliance.loop import EventLoop
from appliance.memory import GuestMemoryError
from appliance.runtime import unix
from appliance.vfio_user import wire as w
from appliance.vfio_user.backend import VfioUserDevice
from appliance.vfio_user.framing import Frame
from appliance.vfio_user.server import MAX_MSG_FDS, DmaLayout, ServerConnection

log = logging.getLogger("appliance.vfio_user")

BATCH = 64
DMA_TIMEOUT = 5.0


def recv_chunk(sock: socket.socket, wanted: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One recvmsg of at most ``wanted`` bytes with up to MAX_MSG_FDS fds."""
    return unix.recv_chunk(sock, wanted, MAX_MSG_FDS, flags)


send_message = unix.send_message
signal_eventfd = unix.signal_eventfd


class SocketTransport:
    """DMA_READ / DMA_WRITE round trips for regions mapped without an fd."""

    def __init__(self, service: VfioUserClientSocket) -> None:
        self.service = service

    def _round_trip(self, command: w.Command, address: int, data: bytes | int) -> Frame:
        conn = self.service.conn
        msg_id = conn.dma_request(command, address, data)
        self.service.flush()
        deadline = time.monotonic() + DMA_TIMEOUT
        while (reply := conn.take_reply(msg_id)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.service.sock], [], [], left)[0]:
                conn.forget_request(msg_id)
                raise GuestMemoryError(address, _count(data), 0, why="no reply to DMA message")
            self.service.read_some(dispatch=False)
            conn.process_during_dma()
            self.service.flush()
            if conn.closed:
                raise GuestMemoryError(address, _count(data), 0, why="client gone during DMA")
        log.debug("%s msg %#x %s %#x+%d -> %s", conn.name, msg_id, command.name, address,
                  _count(data), f"error {reply.header.error}" if reply.header.flags & w.MsgFlag.ERROR
                  else "ok")
        if reply.header.flags & w.MsgFlag.ERROR:
            raise GuestMemoryError(address, _count(data), 0, why=f"client refused DMA (errno {reply.header.error})")
        return reply

    def _chunks(self, address: int, count: int) -> list[tuple[int, int, int]]:
        """(address, offset, size) pieces no larger than the client's max_data_xfer_size."""
        step = self.service.conn.client_max_data_xfer_size
        return [(address + off, off, min(step, count - off)) for off in range(0, count, step)]

    def dma_read(self, address: int, count: int) -> bytes:
        parts = []
        for addr, _, size in self._chunks(address, count):
            reply = self._round_trip(w.Command.DMA_READ, addr, size)
            try:
                parts.append(self.service.conn.dma_reply_data(reply, size))
            except LocalProtocolError as exc:
                raise GuestMemoryError(address, count, len(b"".join(parts)), why=str(exc)) from None
        return b"".join(parts)

    def dma_write(self, address: int, data: bytes) -> None:
        for addr, off, size in self._chunks(address, len(data)):
            self._round_trip(w.Command.DMA_WRITE, addr, data[off:off + size])


def _count(data: bytes | int) -> int:
    return data if isinstance(data, int) else len(data)


class VfioUserClientSocket:
    """One accepted client: feeds its socket to a :class:`ServerConnection`."""

    def __init__(self, loop: EventLoop, sock: socket.socket, device: VfioUserDevice,
                 on_close: Callable[[VfioUserClientSocket], None], name: str,
                 dma_layout: DmaLayout = DmaLayout.SPEC) -> None:
        self.loop = loop
        self.sock = sock
        self.on_close = on_close
        self.conn = ServerConnection(device, notify=signal_eventfd, transport=SocketTransport(self),
                                     dma_layout=dma_layout, name=name)
        loop.add_reader(sock.fileno(), self._readable)

    def read_some(self, dispatch: bool = True) -> bool:
        """Read what is available (up to a batch of messages); False once closed."""
        for _ in range(BATCH):
            try:
                data, fds = recv_chunk(self.sock, self.conn.bytes_wanted(), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except (OSError, RemoteProtocolError) as exc:
                log.warning("%s: %s; closing", self.conn.name, exc)
                self.close()
                return False
            try:
                self.conn.receive_data(data, fds)
            except RemoteProtocolError as exc:
                log.warning("%s: %s; closing", self.conn.name, exc)
                self.close()
                return False
            if dispatch:
                self.conn.process()
                self.flush()
            if self.conn.closed:
                self.close()
                return False
        return True

    def _readable(self) -> None:
        self.read_some()

    def flush(self) -> None:
        for data, fds in self.conn.data_to_send():
            try:
                send_message(self.sock, data, fds)
            except OSError as exc:
                log.warning("%s: send failed: %s; closing", self.conn.name, exc)
                self.close()
                return
        if self.conn.closed:
            self.close()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.loop.remove_reader(self.sock.fileno())
        self.conn.close()
        self.sock.close()
        self.on_close(self)


class VfioUserService:
    """A listening socket serving one device."""

    def __init__(self, loop: EventLoop, path: str, device: VfioUserDevice, name: str = "vfio-user",
                 dma_layout: DmaLayout = DmaLayout.SPEC) -> None:
        self.loop = loop
        self.dma_layout = dma_layout
        self.path = path
        self.device = device
        self.name = name
        self.client: VfioUserClientSocket | None = None
        self.connections = 0
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # socket file mode 0600
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        self.listener.listen(4)
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.client is not None:
            # The old client's EOF may sit unread in this same loop pass: take it first.
            self.client.read_some()
        if self.client is not None:
            log.warning("%s: a client is already connected; refusing another", self.name)
            sock.close()
            return
        sock.setblocking(True)
        self.connections += 1
        log.info("%s: client connected on %s", self.name, self.path)
        self.client = VfioUserClientSocket(self.loop, sock, self.device, self._closed,
                                           f"{self.name}#{self.connections}", self.dma_layout)

    def _closed(self, client: VfioUserClientSocket) -> None:
        if self.client is client:
            log.info("%s: client disconnected", self.name)
            self.client = None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
