"""One peer's unsent bytes: queued, written as far as the socket takes them (runtime layer).

Every service that answers a peer (the vfio-user client, a vhost-user
front-end, a control client) owns one :class:`OutputQueue`.  Its protocol
object hands over reply bytes (with the fds to pass along); the queue keeps
them in order and :meth:`OutputQueue.flush` writes what a non-blocking
socket takes now, gathering up to :data:`SEND_GATHER` messages into one
``sendmsg``.  The caller watches writability while bytes are left, and
disconnects the peer, with one log line of its own, once
:meth:`OutputQueue.over_cap` says the peer let the queue grow past its cap.

Fds travel with the first byte of their message: a message that carries
fds starts its own ``sendmsg``, and once a part of it is sent the rest goes
without them, so each fd is passed exactly once.  The fds are lent by the
protocol object (a device's own memfd): the queue never closes them.
"""

from __future__ import annotations

import enum
import itertools
import socket
from collections import deque
from collections.abc import Sequence

from appliance.runtime import unix

SEND_GATHER = 64  # messages gathered into one sendmsg


class Flush(enum.Enum):
    """What one :meth:`OutputQueue.flush` ended with."""

    DONE = "done"  # the queue is empty
    BLOCKED = "blocked"  # the socket takes nothing more now: wait for writability
    FAILED = "failed"  # the send failed (the peer is gone): ``OutputQueue.error`` says why


class OutputQueue:
    """Unsent bytes (and their fds) for one peer, with a cap on what may pile up."""

    def __init__(self, cap: int, *, cap_behind_head: bool = False) -> None:
        """``cap``: the bytes the peer may leave unread before :meth:`over_cap` is
        true.  ``cap_behind_head``: count only the bytes behind the message being
        written (a single message larger than the cap is never a reason to drop)."""
        self.cap = cap
        self.cap_behind_head = cap_behind_head
        self._items: deque[tuple[memoryview, Sequence[int]]] = deque()
        self.pending_bytes = 0  # every unsent byte in the queue
        self.error: OSError | None = None  # why the last flush failed

    def __len__(self) -> int:
        """The unsent bytes (:attr:`pending_bytes`): the queue is true while any are left."""
        return self.pending_bytes

    def push(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Queue ``data``; ``fds`` go with its first byte (lent: never closed here)."""
        if data:
            self._items.append((memoryview(data), fds))
            self.pending_bytes += len(data)

    def flush(self, sock: socket.socket) -> Flush:
        """Send from the queue until it is empty or ``sock`` (non-blocking) is full.

        Returns :attr:`Flush.DONE` (empty), :attr:`Flush.BLOCKED` (bytes left; wait
        for writability) or :attr:`Flush.FAILED` (the send raised: :attr:`error`;
        what was queued stays until :meth:`clear`).
        """
        items = self._items
        while items:
            first, fds = items[0]
            buffers = [first]
            for data, more_fds in itertools.islice(items, 1, SEND_GATHER):
                if more_fds:  # fds go with the first byte of a sendmsg: their own call
                    break
                buffers.append(data)
            try:
                sent = unix.send_some(sock, buffers, list(fds))
            except (BlockingIOError, InterruptedError):
                return Flush.BLOCKED
            except OSError as exc:
                self.error = exc
                return Flush.FAILED
            self.pending_bytes -= sent
            while sent:
                data, _ = items[0]
                if sent < len(data):
                    items[0] = (data[sent:], ())  # the fds went with the first part
                    break
                sent -= len(data)
                items.popleft()
        return Flush.DONE

    def over_cap(self) -> bool:
        """Whether the peer left more unsent bytes than the cap allows."""
        waiting = self.pending_bytes
        if self.cap_behind_head and self._items:
            waiting -= len(self._items[0][0])
        return waiting > self.cap

    def clear(self) -> None:
        """Forget every unsent byte (the peer is being disconnected)."""
        self._items.clear()
        self.pending_bytes = 0
