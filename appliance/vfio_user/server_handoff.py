"""Live handoff of a vfio-user server connection: export its state, adopt one
another process exported, release it after a handoff.

:class:`ConnectionHandoff` is a part of
:class:`~appliance.vfio_user.server.ServerConnection` (its base class), kept
apart because it is a concern of its own.  A connection is restored by
replaying the requests a client would have sent to reach its state
(:func:`replay_requests`: the negotiated VERSION, a DMA_MAP per region with its
fd, SET_IRQS for the enabled irqs, their eventfds and mask eventfds) through
the connection's own header checks and handlers, so a handed-over state passes
exactly the checks a live client's requests pass.  What no request sets is
installed directly: the message id counter, the counters and a message read
only in part (the framer takes its bytes as it takes a socket's).

A destination checks before it adopts anything
(:func:`~appliance.vfio_user.server.check_handoff_state`): the same
replay into a scratch connection over :class:`DryRunDevice`, which answers the
device's questions (irq counts, regions) and ignores what would change it.
"""

from __future__ import annotations

import errno
import json
from collections import deque
from collections.abc import Callable, Iterator

from appliance.errors import LocalProtocolError
from appliance.memory import ClientMemory
from appliance.protocol_common import close_quietly, dup_all
from appliance.vfio_user import wire as w
from appliance.vfio_user.backend import IrqDesc, IrqEventfd, IrqSink, RegionDesc, VfioUserDevice
from appliance.vfio_user.connection_state import ConnState, MigrationHandler
from appliance.vfio_user.dma import DmaMessages
from appliance.vfio_user.framing import Frame, Framer
from appliance.vfio_user.handoff_state import ClientCaps, ConnectionState, RegionState

Request = tuple[w.Command, bytes, list[int]]  # command, payload, fd indexes


def _set_irqs(flags: int, index: int, start: int, count: int, fds: list[int]) -> Request:
    return w.Command.DEVICE_SET_IRQS, w.IrqSet(flags=flags, index=index, start=start,
                                               count=count).pack(), fds


def replay_requests(s: ConnectionState) -> Iterator[Request]:
    """The requests that rebuild connection ``s`` on a fresh connection."""
    version = json.dumps({"capabilities": s.caps.to_json()}, separators=(",", ":"))
    yield w.Command.VERSION, w.VersionHead().pack() + version.encode() + b"\0", []
    for r in s.regions:
        flags = (w.DmaMapFlag.READ if r.readable else 0) | (w.DmaMapFlag.WRITE if r.writable else 0)
        yield w.Command.DMA_MAP, w.DmaMap(flags=flags, offset=r.fd_offset, address=r.address,
                                          size=r.size).pack(), [] if r.fd is None else [r.fd]
    trigger = w.IrqSetFlag.ACTION_TRIGGER
    for index, count in s.irq_enabled:  # enable (no fds yet), or disable all
        if count:
            yield _set_irqs(w.IrqSetFlag.DATA_EVENTFD | trigger, index, 0, count, [])
        else:
            yield _set_irqs(w.IrqSetFlag.DATA_NONE | trigger, index, 0, 0, [])
    for index, sub, fd in s.irq_fds:
        yield _set_irqs(w.IrqSetFlag.DATA_EVENTFD | trigger, index, sub, 1, [fd])
    for kind, index, sub, fd in s.irq_mask_fds:
        yield _set_irqs(w.IrqSetFlag.DATA_EVENTFD | kind, index, sub, 1, [fd])


class DryRunDevice:
    """A device's answers (regions, irqs) without its side effects: what a
    destination replays a handed-over connection onto before it adopts it."""

    def __init__(self, device: VfioUserDevice) -> None:
        self.device = device

    def region(self, index: int) -> RegionDesc:
        return self.device.region(index)

    def irq(self, index: int) -> IrqDesc:
        return self.device.irq(index)

    def set_irq_count(self, index: int, count: int) -> None:
        if not 0 <= count <= self.device.irq(index).count:
            raise LocalProtocolError(f"irq {index}: {count} sub-indexes", errno.EINVAL)

    def attach(self, memory: ClientMemory, irq: IrqSink, eventfd: IrqEventfd | None = None) -> None:
        pass

    def detach(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def dma_unmapping(self) -> None:
        pass

    def irqs_configured(self, index: int) -> None:
        pass

    def irq_mask(self, index: int, start: int, count: int, masked: bool) -> None:
        pass

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        raise LocalProtocolError("a dry run reads no region", errno.EINVAL)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        raise LocalProtocolError("a dry run writes no region", errno.EINVAL)


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
    _out: deque[tuple[bytes | memoryview, list[int]]]
    _handlers: dict[w.Command, Callable[[Frame], bytes | tuple[bytes, list[int]] | list[bytes | memoryview]]]

    is_eventfd: Callable[[int], bool] | None

    def _check_header(self, frame: Frame) -> w.Command:
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

    def handoff_export(self, fds: list[int]) -> ConnectionState:
        """What :meth:`handoff_adopt` needs to continue this connection elsewhere.

        The negotiated capabilities, every DMA region, the irq eventfds and a
        message not yet complete; each fd is appended to ``fds`` (still ours)
        and named by its index there.
        """
        def put(fd: int) -> int:
            fds.append(fd)
            return len(fds) - 1

        pending, pending_fds = self.framer.pending()
        return ConnectionState(
            caps=ClientCaps(self.client_max_msg_fds, self.client_max_data_xfer_size,
                            self.write_multiple),
            next_id=self._next_id,
            regions=tuple(RegionState(r.address, r.size, None if r.fd is None else put(r.fd),
                                      r.fd_offset, r.readable, r.writable)
                          for r in self.memory.regions),
            irq_fds=tuple((index, sub, put(fd)) for (index, sub), fd in sorted(self.irq_fds.items())),
            irq_mask_fds=tuple((kind, index, sub, put(fd))
                               for (kind, index, sub), fd in sorted(self.irq_mask_fds.items())),
            irq_enabled=tuple(sorted(self.irq_enabled.items())),
            pending=pending, pending_fds=tuple(put(fd) for fd in pending_fds),
            counters=tuple(self.counters.items()))

    def handoff_adopt(self, state: ConnectionState, fds: list[int]) -> None:
        """Continue a connection another process exported (:meth:`handoff_export`).

        Only on a fresh connection (no VERSION yet).  The connection is rebuilt
        by :func:`replay_requests` through this connection's own checks and
        handlers.  The fds in ``fds`` stay the caller's: what is kept is
        duplicated.

        Raises:
            LocalProtocolError: a replayed request was refused (its errno) or an
                fd could not be duplicated; the connection is left fresh
                (nothing adopted).
        """
        if self.state is not ConnState.AWAIT_VERSION:
            raise LocalProtocolError(f"{self.name}: handoff onto a used connection", errno.EBUSY)
        try:
            for command, payload, refs in replay_requests(state):
                try:
                    self._replay(command, payload, dup_all(fds, refs))
                except (LocalProtocolError, OSError) as exc:
                    raise LocalProtocolError(f"{self.name}: bad handoff state: {command.name} "
                                             f"refused: {exc}",
                                             getattr(exc, "errno", 0) or errno.EINVAL) from None
            # No request sets these: the message ids, the counters, a message half read.
            self._next_id = state.next_id
            for key, value in state.counters:
                if key in self.counters:
                    self.counters[key] = value
            dup_fds = dup_all(fds, state.pending_fds)
            pending = state.pending
            while pending:
                take = min(len(pending), self.framer.bytes_wanted())
                self.framer.feed(pending[:take], dup_fds)
                dup_fds, pending = [], pending[take:]
                while (frame := self.framer.next_frame()) is not None:
                    self._frames.append(frame)
        except BaseException:
            self._forget_adopted()
            raise

    def _replay(self, command: w.Command, payload: bytes, fds: list[int]) -> None:
        """Apply one request as if the client had sent it, without replying.

        Raises:
            LocalProtocolError: the request is refused (its fds are closed).
        """
        frame = Frame(w.Header(command=command, size=w.HEADER_SIZE + len(payload)), payload, fds)
        try:
            self._handlers[self._check_header(frame)](frame)
        finally:
            frame.close_fds()

    def _forget_adopted(self) -> None:
        self.memory.unmap_all()
        for fd in [*self.irq_fds.values(), *self.irq_mask_fds.values()]:
            close_quietly(fd)
        self.irq_fds.clear()
        self.irq_mask_fds.clear()
        self.irq_enabled.clear()
        for frame in self._frames:
            frame.close_fds()
        self._frames.clear()
        self.framer.close()
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

