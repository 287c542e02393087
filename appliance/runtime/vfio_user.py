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
from typing import Any

from appliance.errors import ApplianceError, LocalProtocolError, RemoteProtocolError
from appliance.loop import EventLoop
from appliance.memory import GuestMemoryError
from appliance.runtime import unix
from appliance.runtime.listener import Claim, listen
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
        if conn.queued():
            # What the wait read and could not dispatch: when this DMA ran outside a
            # dispatch (the controller's idle poll), nothing else would get to it
            # until the client sends again, and it may be waiting for exactly that.
            self.service.dispatch_soon()
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
        self._dispatch_due = False
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

    def dispatch_soon(self) -> None:
        """Dispatch the queued messages in the loop's next pass (once)."""
        if not self._dispatch_due:
            self._dispatch_due = True
            self.loop.call_later(0, self._dispatch_queued)

    def _dispatch_queued(self) -> None:
        self._dispatch_due = False
        if self.sock.fileno() < 0 or self.conn.closed:
            return
        self.conn.process()
        self.flush()
        if self.conn.closed:
            self.close()

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
        self.listener, self.claim = listen(path, 4)  # raises ListenerError
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

    # ------------------------------------------------------------ live handoff
    def handoff_busy(self) -> str:
        """Why the device cannot move to another process now ("" when it can)."""
        return self.client.conn.handoff_busy() if self.client is not None else ""

    def handoff_quiesce(self) -> None:
        """Source: stop reading the listener and the client; what arrives waits in the socket."""
        self.loop.remove_reader(self.listener.fileno())
        if self.client is not None:
            self.loop.remove_reader(self.client.sock.fileno())

    def handoff_resume(self) -> None:
        """Source, the handoff failed: serve again."""
        self.loop.add_reader(self.listener.fileno(), self._accept)
        if self.client is not None:
            self.loop.add_reader(self.client.sock.fileno(), self.client._readable)
            self.client.read_some()

    def handoff_export(self, fds: list[int]) -> dict[str, Any]:
        """The listener and the connected client (socket, connection state); fds by index."""
        fds += [self.listener.fileno(), self.claim.fd]  # the path's lock moves with it
        state: dict[str, Any] = {"path": self.path, "listener": len(fds) - 2, "lock": len(fds) - 1,
                                 "client": None, "connections": self.connections}
        if self.client is not None:
            fds.append(self.client.sock.fileno())
            state["client"] = {"socket": len(fds) - 1, "conn": self.client.conn.handoff_export(fds)}
        return state

    def handoff_release(self) -> None:
        """Source, the destination took over: close our copies silently; the path stays."""
        if self.client is not None:
            client, self.client = self.client, None
            client.conn.handoff_release()
            client.sock.close()
        self.listener.close()
        self.claim.release()
        self.path = ""  # the socket file is the destination's now: never unlink it

    def handoff_check(self, state: Any, nfds: int | None = None) -> None:
        """Destination: refuse a handoff this service cannot take.

        ``nfds``: how many fds came; then every fd index in ``state`` is
        checked against it (the connection's own state is checked when it is
        adopted).

        Raises:
            ApplianceError: a client is connected here already, or ``state``
                is not what :meth:`handoff_export` makes.
        """
        if self.client is not None:
            raise ApplianceError(f"{self.name}: a client is connected to this process already")
        if nfds is None:
            return
        if not isinstance(state, dict) or not isinstance(state.get("path"), str):
            raise ApplianceError(f"{self.name}: bad handoff state: not an object with a path")
        client = state.get("client")
        indexes = [state.get("listener"), state.get("lock")]
        if client is not None:
            if not isinstance(client, dict) or not isinstance(client.get("conn"), dict):
                raise ApplianceError(f"{self.name}: bad handoff state: client")
            indexes.append(client.get("socket"))
        for index in indexes:
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < nfds:
                raise ApplianceError(f"{self.name}: bad handoff state: fd index {index!r} "
                                     f"({nfds} fds came)")

    def handoff_adopt(self, state: dict[str, Any], fds: list[int]) -> VfioUserClientSocket | None:
        """Destination: serve the source's listener and continue its client.

        Returns the adopted client (not yet processing: call its
        ``conn.process()`` once the device state is in place), or None.

        Raises:
            ApplianceError: the state does not fit (nothing adopted then).
        """
        self.handoff_check(state)
        try:
            listen_fd = fds[state["listener"]]
            client_state = state["client"]
            client_fd = fds[client_state["socket"]] if client_state is not None else None
            lock_fd = fds[state["lock"]]
        except (KeyError, IndexError, TypeError) as exc:
            raise ApplianceError(f"{self.name}: bad handoff state: {exc!r}") from None
        claim = Claim.adopt(str(state["path"]), lock_fd)  # raises ListenerError
        client = None
        if client_fd is not None:
            sock = socket.socket(fileno=os.dup(client_fd))
            sock.setblocking(True)
            self.connections = int(state.get("connections", self.connections))
            client = VfioUserClientSocket(self.loop, sock, self.device, self._closed,
                                          f"{self.name}#{self.connections}", self.dma_layout)
            try:
                client.conn.handoff_adopt(client_state["conn"], fds)
            except LocalProtocolError as exc:
                client.close()
                claim.release()
                raise ApplianceError(str(exc)) from None
            self.client = client
        listener = socket.socket(fileno=os.dup(listen_fd))
        listener.setblocking(False)
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        self.claim.close()  # our own path: its socket and lock file go
        self.listener, self.path, self.claim = listener, str(state["path"]), claim
        self.loop.add_reader(listener.fileno(), self._accept)
        log.info("%s: took over %s%s", self.name, self.path,
                 " and its connected client" if client is not None else "")
        return client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        self.claim.close()  # removes the socket only if still ours (nothing after a handoff)
