"""Live handoff of a vfio-user server connection: export its state, adopt one
another process exported, release it after a handoff.

:class:`ConnectionHandoff` is a part of
:class:`~appliance.vfio_user.server.ServerConnection` (its base class), kept
apart because it is a concern of its own: every value adopted passes the checks
the equivalent command would (capabilities as in VERSION, regions through
:meth:`ClientMemory.map`, irq indexes and ranges as in SET_IRQS).
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from appliance.errors import LocalProtocolError
from appliance.memory import ClientMemory, MapError
from appliance.protocol_common import close_quietly
from appliance.vfio_user import wire as w
from appliance.vfio_user.backend import VfioUserDevice
from appliance.vfio_user.connection_state import (
    MAX_DATA_XFER_SIZE,
    MAX_DMA_MAPS,
    MAX_MSG_FDS,
    ConnState,
    MigrationHandler,
)
from appliance.vfio_user.dma import DmaMessages
from appliance.vfio_user.framing import Frame, Framer
from appliance.vfio_user.handoff_state import (
    ClientCaps,
    ConnectionState,
    check_fds,
    parse_connection,
)


def check_handoff_state(device: VfioUserDevice, state: Any, fds: list[int],
                        is_eventfd: Callable[[int], bool] | None,
                        max_message: int = w.HEADER_SIZE + 16 + MAX_DATA_XFER_SIZE,
                        ) -> ConnectionState:
    """A handed-over connection's state for ``device``, checked whole (see
    :mod:`appliance.vfio_user.handoff_state`); nothing is adopted or kept.

    Raises:
        LocalProtocolError: the first field or fd that does not fit.
    """
    s = parse_connection(state, len(fds),
                         lambda index: device.irq(index).count if 0 <= index < w.PCI_NUM_IRQS else 0,
                         max_message, MAX_MSG_FDS)
    check_fds(s, fds, is_eventfd, MAX_DMA_MAPS)
    return s


class ConnectionHandoff:
    """The handoff methods of :class:`~appliance.vfio_user.server.ServerConnection`."""

    # Set by ServerConnection.__init__.
    name: str
    state: ConnState
    device: VfioUserDevice
    framer: Framer
    memory: ClientMemory
    dma: DmaMessages
    migration: MigrationHandler | None
    irq_fds: dict[tuple[int, int], int]
    irq_mask_fds: dict[tuple[int, int, int], int]
    irq_enabled: dict[int, int]
    client_max_msg_fds: int
    client_max_data_xfer_size: int
    write_multiple: bool
    counters: dict[str, int]
    _next_id: int
    _frames: deque[Frame]
    _out: deque[tuple[bytes, list[int]]]

    is_eventfd: Callable[[int], bool] | None

    def _use_caps(self, caps: ClientCaps) -> None:
        raise NotImplementedError  # ServerConnection's

    def _transition(self, event: str) -> None:
        raise NotImplementedError  # ServerConnection's

    def handoff_blocker(self) -> str:
        """Why this connection cannot move to another process now ("" when it can)."""
        if self.state is not ConnState.READY:
            return f"{self.name}: connection in state {self.state.value}"
        if self._frames or self._out:
            return f"{self.name}: messages are queued"
        if self.dma.outstanding():
            return f"{self.name}: a DMA message awaits its reply"
        if self.migration is not None and (why := self.migration.handoff_blocker()):
            return f"{self.name}: {why}"
        return ""

    def handoff_export(self, fds: list[int]) -> dict[str, Any]:
        """What :meth:`handoff_adopt` needs to continue this connection elsewhere.

        The negotiated capabilities, every DMA region, the irq eventfds and a
        message not yet complete; each fd is appended to ``fds`` (still ours)
        and named by its index there.
        """
        def put(fd: int) -> int:
            fds.append(fd)
            return len(fds) - 1

        pending, pending_fds = self.framer.pending()
        return {
            "caps": {"max_msg_fds": self.client_max_msg_fds,
                     "max_data_xfer_size": self.client_max_data_xfer_size,
                     "write_multiple": self.write_multiple},
            "next_id": self._next_id,
            "regions": [{"address": r.address, "size": r.size, "fd_offset": r.fd_offset,
                         "readable": r.readable, "writable": r.writable,
                         "fd": None if r.fd is None else put(r.fd)}
                        for r in self.memory.regions],
            "irq_fds": [[index, sub, put(fd)] for (index, sub), fd in sorted(self.irq_fds.items())],
            "irq_mask_fds": [[kind, index, sub, put(fd)]
                             for (kind, index, sub), fd in sorted(self.irq_mask_fds.items())],
            "irq_enabled": [[index, count] for index, count in sorted(self.irq_enabled.items())],
            "pending": pending.hex(),
            "pending_fds": [put(fd) for fd in pending_fds],
            "counters": dict(self.counters),
        }

    def handoff_adopt(self, state: dict[str, Any], fds: list[int]) -> None:
        """Continue a connection another process exported (:meth:`handoff_export`).

        Only on a fresh connection (no VERSION yet).  Every value passes the
        checks the equivalent command would: capabilities as in VERSION,
        regions through the same :meth:`ClientMemory.map`, irq indexes and
        ranges as in SET_IRQS.  The fds in ``fds`` stay the caller's: what is
        kept is duplicated.

        Raises:
            LocalProtocolError: the state is malformed or does not fit this
                device; the connection is left fresh (nothing adopted).
        """
        if self.state is not ConnState.AWAIT_VERSION:
            raise LocalProtocolError(f"{self.name}: handoff onto a used connection", errno.EBUSY)
        try:
            self._adopt(state, fds)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, MapError) as exc:
            self._forget_adopted()
            raise LocalProtocolError(f"{self.name}: bad handoff state: {exc}", errno.EINVAL) from None
        except BaseException:
            self._forget_adopted()
            raise

    def check_handoff(self, state: Any, fds: list[int]) -> ConnectionState:
        """Everything :meth:`handoff_adopt` would refuse, refused now, with nothing
        adopted or kept (a destination checks before it adopts anything).

        Raises:
            LocalProtocolError: the first field or fd that does not fit.
        """
        return check_handoff_state(self.device, state, fds, self.is_eventfd,
                                   self.framer.max_size)

    def _adopt(self, state: dict[str, Any], fds: list[int]) -> None:
        s = self.check_handoff(state, fds)
        self._use_caps(s.caps)
        for r in s.regions:
            fd = None if r.fd is None else os.dup(fds[r.fd])
            self.memory.map(r.address, r.size, fd=fd, fd_offset=r.fd_offset,
                            readable=r.readable, writable=r.writable)
        # Nothing below can fail: install the interrupts, then the half message.
        self._next_id = s.next_id
        self._transition("version")
        for index, sub, fd in s.irq_fds:
            self.irq_fds[(index, sub)] = os.dup(fds[fd])
        for kind, index, sub, fd in s.irq_mask_fds:
            self.irq_mask_fds[(kind, index, sub)] = os.dup(fds[fd])
        self.irq_enabled.update(dict(s.irq_enabled))
        for index, count in s.irq_enabled:
            self.device.set_irq_count(index, count)
            self.device.irqs_configured(index)
        for key, value in s.counters:
            if key in self.counters:
                self.counters[key] = value
        dup_fds = [os.dup(fds[fd]) for fd in s.pending_fds]
        pending = s.pending
        while pending:
            take = min(len(pending), self.framer.bytes_wanted())
            self.framer.feed(pending[:take], dup_fds)
            dup_fds, pending = [], pending[take:]
            while (frame := self.framer.next_frame()) is not None:
                self._frames.append(frame)

    def _forget_adopted(self) -> None:
        self.memory.unmap_all()
        for fd in [*self.irq_fds.values(), *self.irq_mask_fds.values()]:
            close_quietly(fd)
        self.irq_fds.clear()
        self.irq_mask_fds.clear()
        self.irq_enabled.clear()
        self.state = ConnState.AWAIT_VERSION

    def handoff_release(self) -> None:
        """The next process took this connection over: forget it without a word.

        Our copies of the fds are closed and the memory unmapped; the device is
        not detached or reset (its state lives on elsewhere) and nothing is sent.
        """
        self.state = ConnState.CLOSED
        self.framer.close()
        for fd in [*self.irq_fds.values(), *self.irq_mask_fds.values()]:
            close_quietly(fd)
        self.irq_fds.clear()
        self.irq_mask_fds.clear()
        self.memory.unmap_all()
