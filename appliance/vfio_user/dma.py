"""DMA_READ / DMA_WRITE to client memory mapped without an fd (protocol layer, sans-I/O).

Theory of operation
-------------------
:class:`DmaMessages` is the :class:`~appliance.memory.MessageTransport` of one
connection.  It never waits: a read that its :class:`~appliance.memory.DmaScope`
does not hold yet is sent as DMA_READ messages (split by the client's
``max_data_xfer_size``) and the access raises
:class:`~appliance.memory.DmaPending`; a write is sent as DMA_WRITE messages
and counted in flight.  Each reply (:meth:`DmaMessages.on_reply`) settles one
message of its scope; once a scope has nothing in flight its ``on_ready``
runs — the device then runs again what was waiting.

The runtime owns the clock: it asks :meth:`DmaMessages.outstanding` which
message ids are still unanswered and, past its timeout, gives up on the
client (disconnect, which :meth:`DmaMessages.close` turns into failed
scopes).  A reply to a message we did not send (or gave up on) is not ours:
:meth:`DmaMessages.expects` says so and the connection treats it as any
unsolicited message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import LocalProtocolError
from appliance.memory import DmaPending, DmaScope, GuestMemoryError
from appliance.vfio_user import wire as w
from appliance.vfio_user.framing import Frame

log = logging.getLogger("appliance.vfio_user")

#: (command, address, data or count) -> the message id the reply will carry
Send = Callable[[w.Command, int, "bytes | int"], int]
#: (reply frame, count) -> the data of a DMA_READ reply (LocalProtocolError if short)
ReplyData = Callable[[Frame, int], bytes]


@dataclass(eq=False)
class _Sent:
    scope: DmaScope
    key: tuple[int, int] | None  # the read it is part of; None for a write
    index: int  # its piece of that read
    size: int  # bytes this message moves
    command: w.Command
    address: int


class DmaMessages:
    """The message DMA of one connection: what is in flight, for whom."""

    def __init__(self, send: Send, reply_data: ReplyData, max_xfer: Callable[[], int],
                 name: str = "vfio-user") -> None:
        self.name = name
        self._send = send
        self._reply_data = reply_data
        self._max_xfer = max_xfer
        self._sent: dict[int, _Sent] = {}
        self._parts: dict[tuple[int, tuple[int, int]], list[bytes | None]] = {}
        self._writes = 0
        self.counters = {"dma_reads": 0, "dma_writes": 0, "dma_refused": 0}

    # ------------------------------------------------------------ MessageTransport
    @property
    def writes_in_flight(self) -> int:
        return self._writes

    def dma_read(self, address: int, count: int, scope: DmaScope) -> bytes:
        if scope.error is not None:
            raise GuestMemoryError(address, count, 0, why=scope.error)
        key = (address, count)
        data = scope.take(key)
        if data is not None:
            return data
        if key not in scope.loading:
            scope.loading.add(key)
            pieces = self._pieces(address, count)
            self._parts[(id(scope), key)] = [None] * len(pieces)
            for index, (addr, size) in enumerate(pieces):
                msg_id = self._send(w.Command.DMA_READ, addr, size)
                self._sent[msg_id] = _Sent(scope, key, index, size, w.Command.DMA_READ, addr)
                scope.in_flight += 1
                self.counters["dma_reads"] += 1
        raise DmaPending(f"DMA_READ {address:#x}+{count:#x} asked of the client")

    def dma_write(self, address: int, data: bytes, scope: DmaScope) -> None:
        for addr, size in self._pieces(address, len(data)):
            off = addr - address
            msg_id = self._send(w.Command.DMA_WRITE, addr, data[off:off + size])
            self._sent[msg_id] = _Sent(scope, None, 0, size, w.Command.DMA_WRITE, addr)
            scope.in_flight += 1
            self._writes += 1
            self.counters["dma_writes"] += 1

    # ------------------------------------------------------------ replies
    def expects(self, msg_id: int) -> bool:
        """Whether ``msg_id`` is one of our DMA messages awaiting its reply."""
        return msg_id in self._sent

    def outstanding(self) -> frozenset[int]:
        """The message ids still waiting for a reply."""
        return frozenset(self._sent)

    def on_reply(self, frame: Frame) -> None:
        """Take the reply to one of our messages (:meth:`expects` was true)."""
        sent = self._sent.pop(frame.header.msg_id)
        frame.close_fds()
        scope = sent.scope
        refused = bool(frame.header.flags & w.MsgFlag.ERROR)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s msg %#x %s %#x+%d -> %s", self.name, frame.header.msg_id,
                      sent.command.name, sent.address, sent.size,
                      f"error {frame.header.error}" if refused else "ok")
        if refused:
            self.counters["dma_refused"] += 1
            self._fail(sent, f"client refused DMA (errno {frame.header.error})")
            return
        if sent.key is not None:
            parts = self._parts.get((id(scope), sent.key))
            if parts is not None:
                try:
                    parts[sent.index] = self._reply_data(frame, sent.size)
                except LocalProtocolError as exc:  # a short reply: the read failed
                    self._fail(sent, str(exc))
                    return
                if all(p is not None for p in parts):
                    del self._parts[(id(scope), sent.key)]
                    scope.loading.discard(sent.key)
                    scope.reads[sent.key] = b"".join(p for p in parts if p is not None)
        else:
            self._writes -= 1
        scope.settle()

    def close(self, why: str = "client gone") -> None:
        """The connection ends: every scope still waiting fails (each once)."""
        sent = list(self._sent.values())
        self._sent.clear()
        for item in sent:
            self._fail(item, why)

    # ------------------------------------------------------------ helpers
    def _fail(self, sent: _Sent, why: str) -> None:
        scope = sent.scope
        if sent.key is None:
            self._writes -= 1
        else:
            self._parts.pop((id(scope), sent.key), None)
            scope.loading.discard(sent.key)
        if scope.error is None:
            scope.error = why
        scope.settle()

    def _pieces(self, address: int, count: int) -> list[tuple[int, int]]:
        step = max(1, self._max_xfer())
        return [(address + off, min(step, count - off)) for off in range(0, count, step)]
