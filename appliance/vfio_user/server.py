"""Sans-I/O vfio-user server connection (qemu/qemu docs/interop/vfio-user.rst).

Theory of operation
-------------------
One :class:`ServerConnection` serves one client socket.  The runtime feeds it
bytes and fds (never more than :meth:`bytes_wanted` at a time, see
:mod:`appliance.vfio_user.framing`), calls :meth:`process`, and sends what
:meth:`data_to_send` returns.  The connection owns the client's
:class:`~appliance.memory.ClientMemory` and the interrupt eventfds, and calls
the device through the :class:`~appliance.vfio_user.backend.VfioUserDevice`
protocol.  It never touches a socket: signalling an eventfd and the message
round trip for DMA_READ/DMA_WRITE are callables the runtime supplies.

Each command is checked in the order the style guide gives: header (type,
reserved flags, allowed in this state, size limits), then the payload's own
fields (``argsz`` against the real length, reserved bits, ranges), then
semantics (device state, negotiated maxima).  Every rejection is an error
reply carrying an errno and closes every fd the message brought; a message
that makes the stream unframeable closes the connection.  Commands with
No_reply get no reply, not even an error one (QEMU posts region writes).
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from appliance.errors import LocalProtocolError, RemoteProtocolError
from appliance.memory import ClientMemory, MapError
from appliance.vfio_user import wire as w
from appliance.vfio_user.backend import VfioUserDevice
from appliance.vfio_user.dma import DmaMessages
from appliance.vfio_user.framing import Frame, Framer, encode
from appliance.wire import Struct

log = logging.getLogger("appliance.vfio_user")

PGSIZE = 4096
MAX_MSG_FDS = 16  # QEMU refuses a larger value
MAX_DATA_XFER_SIZE = 1 << 20
MAX_DMA_MAPS = 1024
MAX_WRITE_MULTI = 256  # entries per REGION_WRITE_MULTI we accept
MAX_VERSION_JSON = 4096
# Migration capability values we announce (QEMU parses pgsize and max_bitmap_size).
# A DMA_LOGGING_REPORT reply carries its bitmap whole, so the bitmap is bounded
# by the message size limit: 1 MiB reports 32 GiB of 4 KiB pages per request.
MIG_MAX_BITMAP_SIZE = MAX_DATA_XFER_SIZE


class DmaLayout(enum.Enum):
    """Where DMA_READ/DMA_WRITE data sits.

    SPEC: address u64, count u64, data at 16 (docs/interop/vfio-user.rst).
    This is what QEMU 11.1 does on the wire: with the other layout its
    DMA_READ replies came back shifted by 4 bytes (seen with --trace).
    U32_COUNT: address u64, count u32, data at 12, 4 pad bytes after the data:
    the ``VFIOUserDMARW`` of some QEMU sources; kept for such clients.
    """

    SPEC = "spec"
    U32_COUNT = "u32-count"


class ConnState(enum.Enum):
    AWAIT_VERSION = "await-version"
    READY = "ready"
    CLOSED = "closed"


# Connection state machine: state -> {event: next state}.
TRANSITIONS: dict[ConnState, dict[str, ConnState]] = {
    ConnState.AWAIT_VERSION: {"version": ConnState.READY, "close": ConnState.CLOSED},
    ConnState.READY: {"close": ConnState.CLOSED},
    ConnState.CLOSED: {"close": ConnState.CLOSED},
}

# Per-state command allow-list, checked before dispatch.
ALLOWED: dict[ConnState, frozenset[w.Command]] = {
    ConnState.AWAIT_VERSION: frozenset({w.Command.VERSION}),
    ConnState.READY: frozenset(w.Command) - {w.Command.VERSION} - w.SERVER_TO_CLIENT,
    ConnState.CLOSED: frozenset(),
}

# Commands that may carry fds.  Fds on any other command are closed and the
# command runs (libvfio-user does the same: a stray fd is no reason to fail).
TAKES_FDS = frozenset({w.Command.DMA_MAP, w.Command.DEVICE_SET_IRQS})

S = TypeVar("S", bound=Struct)


class MigrationHandler(Protocol):
    """Commands 16-18 for one connection (see appliance.vfio_user.migration)."""

    def handle(self, command: w.Command, payload: bytes) -> bytes:
        """Answer DEVICE_FEATURE / MIG_DATA_READ / MIG_DATA_WRITE; raise Reject(errno)."""

    def allows(self, command: w.Command) -> bool:
        """Whether ``command`` may run in the current migration state."""

    def device_reset(self) -> None:
        """DEVICE_RESET: back to RUNNING (also from ERROR); called before the device resets."""

    def close(self) -> None:
        """The connection closes: drop sessions, stop dirty logging, un-quiesce the device."""

    def busy(self) -> str:
        """Why the device cannot be handed off now ("" when it can)."""


class Reject(LocalProtocolError):
    """A request is refused with ``errno``; the reply is header-only with Error set."""


def _require(cond: bool, err: int, message: str) -> None:
    if not cond:
        raise Reject(message, err)


def _fits(offset: int, count: int, size: int) -> bool:
    return 0 <= offset and 0 <= count and offset + count <= size


def _request(frame: Frame, cls: type[S]) -> S:
    """The fixed structure at the start of ``frame``'s payload.

    Bytes after it are ignored: "The *request* payload size is defined by the
    usual ``msg_size`` field in the header, not the ``argsz`` field"
    (docs/interop/vfio-user.rst, Message sizes), and libvfio-user reads each
    request by its structure; a client that sends its whole ``argsz`` buffer
    is served.

    Raises:
        Reject: EINVAL when the payload is shorter than the structure.
    """
    name = _cmd_name(frame.header.command)
    _require(len(frame.payload) >= cls.SIZE, errno.EINVAL,
             f"{name} payload of {len(frame.payload)} bytes, the request needs {cls.SIZE}")
    return cls.unpack(frame.payload)


class ServerConnection:
    """The server side of one vfio-user client connection."""

    def __init__(
        self,
        device: VfioUserDevice,
        *,
        notify: Callable[[int], None],
        max_data_xfer_size: int = MAX_DATA_XFER_SIZE,
        dma_layout: DmaLayout = DmaLayout.SPEC,
        name: str = "vfio-user",
        is_eventfd: Callable[[int], bool] | None = None,
    ) -> None:
        """Args:
            device: the device this connection exposes.
            notify: signals an eventfd (the runtime writes 1 to it).
            max_data_xfer_size: our max ``count`` per data message.
            is_eventfd: whether a received fd is an eventfd (the runtime
                knows how to ask the kernel); SET_IRQS refuses any other fd
                with EINVAL.  None accepts every fd.
        """
        self.device = device
        self.is_eventfd = is_eventfd
        self.dma_layout = dma_layout
        self.notify = notify
        self.name = name
        self.state = ConnState.AWAIT_VERSION
        self.max_data_xfer_size = max_data_xfer_size
        self.client_max_data_xfer_size = w.DEFAULT_MAX_DATA_XFER_SIZE
        self.client_max_msg_fds = w.DEFAULT_MAX_MSG_FDS
        self.write_multiple = False
        #: DMA_READ/DMA_WRITE for memory mapped without an fd (never waits)
        self.dma = DmaMessages(self.dma_request, self.dma_reply_data,
                               lambda: self.client_max_data_xfer_size, name)
        self.memory = ClientMemory(max_regions=MAX_DMA_MAPS, transport=self.dma)
        self.framer = Framer(max_size=w.HEADER_SIZE + 16 + max(max_data_xfer_size, 1 << 16))
        # (irq index, sub-index) -> eventfd, for trigger and for mask/unmask notices.
        self.irq_fds: dict[tuple[int, int], int] = {}
        self.irq_mask_fds: dict[tuple[int, int, int], int] = {}
        self.irq_enabled: dict[int, int] = {}  # irq index -> sub-indexes enabled
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._frames: deque[Frame] = deque()
        self._next_id = 0
        self.counters = {"messages": 0, "errors": 0}
        self._handlers: dict[w.Command, Callable[[Frame], bytes | tuple[bytes, list[int]]]] = {
            w.Command.VERSION: self._version,
            w.Command.DMA_MAP: self._dma_map,
            w.Command.DMA_UNMAP: self._dma_unmap,
            w.Command.DEVICE_GET_INFO: self._get_info,
            w.Command.DEVICE_GET_REGION_INFO: self._get_region_info,
            w.Command.DEVICE_GET_REGION_IO_FDS: self._get_region_io_fds,
            w.Command.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            w.Command.DEVICE_SET_IRQS: self._set_irqs,
            w.Command.REGION_READ: self._region_read,
            w.Command.REGION_WRITE: self._region_write,
            w.Command.DEVICE_RESET: self._reset,
            w.Command.REGION_WRITE_MULTI: self._write_multi,
            w.Command.DEVICE_FEATURE: self._migration_command,
            w.Command.MIG_DATA_READ: self._migration_command,
            w.Command.MIG_DATA_WRITE: self._migration_command,
        }
        # Commands 16-18 go to the migration handler when the device offers one
        # (appliance.vfio_user.migration); without it they are "not supported".
        factory = getattr(device, "migration_handler", None)
        self.migration: MigrationHandler | None = factory(self.memory) if factory else None
        device.attach(self.memory, self._signal_irq)

    # ------------------------------------------------------------ I/O surface
    def bytes_wanted(self) -> int:
        """The most bytes the runtime may read for the next chunk."""
        return self.framer.bytes_wanted()

    def receive_data(self, data: bytes, fds: list[int]) -> None:
        """Feed a chunk read from the socket; b"" means the peer closed.

        Raises:
            RemoteProtocolError: the stream can no longer be framed; close it.
        """
        if not data:
            for fd in fds:
                _close(fd)
            self.close()
            return
        self.framer.feed(data, fds)
        while (frame := self.framer.next_frame()) is not None:
            if frame.header.flags & w.MSG_TYPE_MASK == w.MSG_TYPE_REPLY and (
                self.dma.expects(frame.header.msg_id)
            ):
                self.dma.on_reply(frame)  # may run the device: what waited for it
            else:
                self._frames.append(frame)

    def process(self) -> None:
        """Dispatch every complete message; replies go to :meth:`data_to_send`."""
        while self._frames and self.state is not ConnState.CLOSED:
            self._dispatch(self._frames.popleft())

    def data_to_send(self) -> list[tuple[bytes, list[int]]]:
        """Messages to write, each with the fds to pass alongside (then close them)."""
        out = list(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED

    def close(self) -> None:
        """Client gone: unmap its memory, close its fds, detach the device."""
        if self.state is ConnState.CLOSED:
            return
        self._transition("close")
        self.framer.close()
        for frame in self._frames:
            frame.close_fds()
        self._frames.clear()
        for fd in [*self.irq_fds.values(), *self.irq_mask_fds.values()]:
            _close(fd)
        self.irq_fds.clear()
        self.irq_mask_fds.clear()
        if self.migration is not None:
            self.migration.close()
        self.memory.unmap_all()
        self.device.detach()  # drops the device's waiting work first: then nothing runs
        self.dma.close()

    # ------------------------------------------------------------ live handoff
    def handoff_busy(self) -> str:
        """Why this connection cannot move to another process now ("" when it can)."""
        if self.state is not ConnState.READY:
            return f"{self.name}: connection in state {self.state.value}"
        if self._frames or self._out:
            return f"{self.name}: messages are queued"
        if self.dma.outstanding():
            return f"{self.name}: a DMA message awaits its reply"
        if self.migration is not None and (why := self.migration.busy()):
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
        plan = check_handoff_state(state, len(fds), self.device, self.framer.max_size)
        try:
            self._adopt(plan, fds)
        except MapError as exc:  # the mmap itself (the ranges were checked)
            self._forget_adopted()
            raise LocalProtocolError(f"{self.name}: bad handoff state: {exc}", exc.errno) from None
        except BaseException:
            self._forget_adopted()
            raise

    def _adopt(self, plan: HandoffPlan, fds: list[int]) -> None:
        for address, size, src, fd_offset, readable, writable in plan.regions:
            self.memory.map(address, size, fd=None if src is None else os.dup(fds[src]),
                            fd_offset=fd_offset if src is not None else 0,
                            readable=readable, writable=writable)
        # Nothing below can fail: install the interrupts, then the half message.
        self.client_max_msg_fds, self.client_max_data_xfer_size, self.write_multiple = plan.caps
        self._next_id = plan.next_id
        self._transition("version")
        for index, sub, fd in plan.irqs:
            self.irq_fds[(index, sub)] = os.dup(fds[fd])
        for kind, index, sub, fd in plan.masks:
            self.irq_mask_fds[(kind, index, sub)] = os.dup(fds[fd])
        self.irq_enabled.update(plan.enabled)
        for index, count in plan.enabled.items():
            self.device.set_irq_count(index, count)
            self.device.irqs_configured(index)
        self.counters.update({k: v for k, v in plan.counters.items() if k in self.counters})
        dup_fds = [os.dup(fds[fd]) for fd in plan.pending_fds]
        pending = plan.pending
        while pending:
            take = min(len(pending), self.framer.bytes_wanted())
            self.framer.feed(pending[:take], dup_fds)
            dup_fds, pending = [], pending[take:]
            while (frame := self.framer.next_frame()) is not None:
                self._frames.append(frame)

    def _forget_adopted(self) -> None:
        self.memory.unmap_all()
        for fd in [*self.irq_fds.values(), *self.irq_mask_fds.values()]:
            _close(fd)
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
            _close(fd)
        self.irq_fds.clear()
        self.irq_mask_fds.clear()
        self.memory.unmap_all()

    # ------------------------------------------------------------ server -> client DMA
    def dma_request(self, command: w.Command, address: int, data: bytes | int) -> int:
        """Queue a DMA_READ (``data`` = count) or DMA_WRITE (``data`` = bytes).

        Returns the message id its reply carries (:class:`DmaMessages` keeps it).
        """
        msg_id = self._next_id = (self._next_id + 1) & 0xFFFF
        count = data if isinstance(data, int) else len(data)
        body = b"" if isinstance(data, int) else data
        if self.dma_layout is DmaLayout.U32_COUNT:
            # QEMU wants at least sizeof(VFIOUserDMARW) = 32 bytes: 4 bytes of tail
            # padding after the data (none for a read), or it answers EINVAL.
            payload = w.QemuDmaAccess(address=address, count=count).pack() + body + b"\0" * 4
        else:
            payload = w.DmaAccess(address=address, count=count).pack() + body
        self._out.append((encode(w.Header(msg_id=msg_id, command=command), payload), []))
        return msg_id

    def dma_reply_data(self, frame: Frame, count: int) -> bytes:
        """The data of a DMA_READ reply, by this connection's layout.

        Raises:
            LocalProtocolError: the reply is shorter than its layout requires.
        """
        start = w.QemuDmaAccess.SIZE if self.dma_layout is DmaLayout.U32_COUNT else w.DmaAccess.SIZE
        if len(frame.payload) < start + count:
            raise LocalProtocolError(f"short DMA_READ reply ({len(frame.payload)} bytes)", errno.EIO)
        return frame.payload[start:start + count]

    # ------------------------------------------------------------ dispatch
    def _transition(self, event: str) -> None:
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise LocalProtocolError(f"{self.name}: event {event} not allowed in {self.state.value}") from None

    def _dispatch(self, frame: Frame) -> None:
        hdr = frame.header
        self.counters["messages"] += 1
        no_reply = bool(hdr.flags & w.MsgFlag.NO_REPLY)
        nfds = len(frame.fds)
        try:
            command = self._check_header(frame)
            result = self._handlers[command](frame)
            payload, fds = result if isinstance(result, tuple) else (result, [])
            frame.close_fds()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s msg %#x %s size=%d fds=%d -> ok (%d bytes%s)", self.name, hdr.msg_id,
                          _cmd_name(hdr.command), hdr.size, nfds, len(payload),
                          ", no reply" if no_reply else "")
            if not no_reply:
                # Reply fds are the device's own (e.g. a BAR's memfd): lent, never closed here.
                reply = w.Header(msg_id=hdr.msg_id, command=hdr.command, flags=w.MsgFlag.REPLY)
                self._out.append((encode(reply, payload), fds))
        except (Reject, LocalProtocolError) as exc:
            frame.close_fds()
            self.counters["errors"] += 1
            err = exc.errno or errno.EINVAL
            log.warning("%s msg %#x %s size=%d fds=%d: %s (errno %d)", self.name, hdr.msg_id,
                        _cmd_name(hdr.command), hdr.size, nfds, exc, err)
            if not no_reply or frame.oversized:
                reply = w.Header(msg_id=hdr.msg_id, command=hdr.command,
                                 flags=w.MsgFlag.REPLY | w.MsgFlag.ERROR, error=err)
                self._out.append((encode(reply), []))
            if frame.oversized or (hdr.command == w.Command.VERSION and self.state is ConnState.AWAIT_VERSION):
                # An unframeable stream, or a failed negotiation, ends the connection
                # once the error reply is flushed.
                self.close()

    def _check_header(self, frame: Frame) -> w.Command:
        hdr = frame.header
        _require(not frame.oversized, errno.EMSGSIZE, f"message size {hdr.size} exceeds limit")
        _require(not hdr.flags & w.MSG_FLAGS_RESERVED, errno.EINVAL, f"reserved flags {hdr.flags:#x}")
        _require(hdr.flags & w.MSG_TYPE_MASK == w.MSG_TYPE_COMMAND, errno.EINVAL,
                 "unsolicited reply from the client")
        _require(hdr.error == 0, errno.EINVAL, "error field set in a command")
        try:
            command = w.Command(hdr.command)
        except ValueError:
            raise Reject(f"unknown command {hdr.command}", errno.EINVAL) from None
        _require(command in ALLOWED[self.state], errno.EINVAL,
                 f"{command.name} not allowed in state {self.state.value}")
        _require(self.allowed_in_migration_state(command), errno.EBUSY,
                 f"{command.name} not allowed in this migration state")
        if frame.fds and command not in TAKES_FDS:
            log.warning("%s msg %#x %s: closed %d fd(s) the command does not take", self.name,
                        hdr.msg_id, command.name, len(frame.fds))
            frame.close_fds()
        return command

    # ------------------------------------------------------------ VERSION
    def _version(self, frame: Frame) -> bytes:
        _require(len(frame.payload) >= w.VersionHead.SIZE, errno.EINVAL, "short VERSION")
        head = w.VersionHead.unpack(frame.payload)
        _require(head.major == w.VERSION_MAJOR, errno.ENOTSUP, f"major version {head.major}")
        raw = frame.payload[w.VersionHead.SIZE:]
        _require(len(raw) <= MAX_VERSION_JSON, errno.E2BIG, "VERSION JSON too large")
        caps: dict[str, Any] = {}
        text = raw.split(b"\0", 1)[0]
        if text.strip():
            try:
                doc = json.loads(text.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise Reject(f"VERSION JSON: {exc}", errno.EINVAL) from None
            _require(isinstance(doc, dict), errno.EINVAL, "VERSION JSON is not an object")
            caps = doc.get("capabilities", {})
            _require(isinstance(caps, dict), errno.EINVAL, "capabilities is not an object")
        self._apply_client_caps(caps)
        # Only capabilities the client proposed (the spec's subset rule), compact:
        # QEMU refuses a VERSION reply larger than its own request.
        ours: dict[str, Any] = {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": PGSIZE,
            "max_dma_maps": MAX_DMA_MAPS,
            "migration": {"pgsize": PGSIZE, "max_bitmap_size": MIG_MAX_BITMAP_SIZE},
            "write_multiple": self.write_multiple,
        }
        reply_caps = {k: v for k, v in ours.items() if k in caps}
        self._transition("version")
        body = json.dumps({"capabilities": reply_caps}, separators=(",", ":")).encode() + b"\0"
        minor = min(head.minor, w.VERSION_MINOR)
        return w.VersionHead(major=w.VERSION_MAJOR, minor=minor).pack() + body

    def _apply_client_caps(self, caps: dict[str, Any]) -> None:
        self.client_max_msg_fds, self.client_max_data_xfer_size, self.write_multiple = (
            client_caps(caps))

    # ------------------------------------------------------------ DMA map / unmap
    def _dma_map(self, frame: Frame) -> bytes:
        req = _request(frame, w.DmaMap)
        _require(req.argsz >= w.DmaMap.SIZE, errno.EINVAL, f"DMA_MAP argsz {req.argsz}")
        _require(not req.flags & w.DMA_MAP_FLAGS_RESERVED, errno.EINVAL, f"DMA_MAP flags {req.flags:#x}")
        _require(len(frame.fds) <= 1, errno.EINVAL, "DMA_MAP with more than one fd")
        _require(req.address % PGSIZE == 0 and req.size % PGSIZE == 0 and req.size > 0,
                 errno.EINVAL, f"DMA_MAP {req.address:#x}+{req.size:#x} not page aligned")
        _require(req.offset % PGSIZE == 0, errno.EINVAL, f"DMA_MAP offset {req.offset:#x}")
        fd = frame.fds.pop() if frame.fds else None
        try:
            self.memory.map(req.address, req.size, fd=fd, fd_offset=req.offset if fd is not None else 0,
                            readable=bool(req.flags & w.DmaMapFlag.READ),
                            writable=bool(req.flags & w.DmaMapFlag.WRITE))
        except MapError as exc:
            raise Reject(str(exc), exc.errno) from None
        return b""

    def _dma_unmap(self, frame: Frame) -> bytes:
        req = _request(frame, w.DmaUnmap)
        _require(req.argsz >= w.DmaUnmap.SIZE, errno.EINVAL, f"DMA_UNMAP argsz {req.argsz}")
        known = w.DmaUnmapFlag.ALL | w.DmaUnmapFlag.GET_DIRTY_BITMAP
        _require(not req.flags & ~int(known), errno.EINVAL, f"DMA_UNMAP flags {req.flags:#x}")
        _require(not req.flags & w.DmaUnmapFlag.GET_DIRTY_BITMAP, errno.ENOTSUP,
                 "DMA_UNMAP dirty bitmap (use DMA_LOGGING_REPORT)")
        if req.flags & w.DmaUnmapFlag.ALL:
            _require(req.address == 0 and req.size == 0, errno.EINVAL, "UNMAP ALL with a range")
            self.memory.unmap_all()
        else:
            try:
                self.memory.unmap(req.address, req.size)
            except MapError as exc:
                raise Reject(str(exc), exc.errno) from None
        return req.replace(argsz=w.DmaUnmap.SIZE).pack()

    # ------------------------------------------------------------ device info
    def _get_info(self, frame: Frame) -> bytes:
        req = _request(frame, w.DeviceInfo)
        _require(req.argsz >= w.DeviceInfo.SIZE, errno.EINVAL, f"GET_INFO argsz {req.argsz}")
        return w.DeviceInfo(flags=w.DeviceFlag.RESET | w.DeviceFlag.PCI,
                            num_regions=w.PCI_NUM_REGIONS, num_irqs=w.PCI_NUM_IRQS).pack()

    def _get_region_info(self, frame: Frame) -> tuple[bytes, list[int]]:
        req = _request(frame, w.RegionInfo)
        _require(req.argsz >= w.RegionInfo.SIZE, errno.EINVAL, f"GET_REGION_INFO argsz {req.argsz}")
        _require(req.index < w.PCI_NUM_REGIONS, errno.EINVAL, f"region index {req.index}")
        desc = self.device.region(req.index)
        flags = (w.RegionFlag.READ if desc.readable else 0) | (w.RegionFlag.WRITE if desc.writable else 0)
        caps = b""
        if desc.mmap_areas and desc.mmap_fd is not None:
            flags |= w.RegionFlag.MMAP | w.RegionFlag.CAPS
            caps = (
                w.CapHeader(id=w.CAP_SPARSE_MMAP, version=1, next=0).pack()
                + w.SparseMmapHead(nr_areas=len(desc.mmap_areas)).pack()
                + b"".join(w.SparseMmapArea(offset=o, size=s).pack() for o, s in desc.mmap_areas)
            )
        full = w.RegionInfo.SIZE + len(caps)
        info = w.RegionInfo(argsz=full, flags=flags, index=req.index, size=desc.size, offset=0)
        if req.argsz < full:
            # The spec: argsz says what is needed; the caps (and fd) are left out, and
            # so is the CAPS flag: QEMU refuses CAPS with a cap_offset below 32 (EINVAL)
            # before it retries with the larger argsz (libvfio-user does the same).
            return info.replace(cap_offset=0, flags=flags & ~int(w.RegionFlag.CAPS)).pack(), []
        if caps:
            info.cap_offset = w.RegionInfo.SIZE
        fds = [desc.mmap_fd] if flags & w.RegionFlag.MMAP and desc.mmap_fd is not None else []
        return info.pack() + caps, fds

    def _get_region_io_fds(self, frame: Frame) -> bytes:
        req = _request(frame, w.RegionIoFds)
        _require(req.argsz >= w.RegionIoFds.SIZE, errno.EINVAL, f"GET_REGION_IO_FDS argsz {req.argsz}")
        _require(req.flags == 0 and req.count == 0, errno.EINVAL, "GET_REGION_IO_FDS fields must be 0")
        _require(req.index < w.PCI_NUM_REGIONS and self.device.region(req.index).size > 0,
                 errno.EINVAL, f"region index {req.index}")
        # No sub-region is offered as an ioeventfd: without KVM, QEMU forwards
        # every access itself, and doorbells are reached by mmap instead.
        return w.RegionIoFds(argsz=w.RegionIoFds.SIZE, index=req.index, count=0).pack()

    def _get_irq_info(self, frame: Frame) -> bytes:
        req = _request(frame, w.IrqInfo)
        _require(req.argsz >= w.IrqInfo.SIZE, errno.EINVAL, f"GET_IRQ_INFO argsz {req.argsz}")
        _require(req.index < w.PCI_NUM_IRQS, errno.EINVAL, f"irq index {req.index}")
        desc = self.device.irq(req.index)
        flags = w.IrqInfoFlag.EVENTFD
        flags |= w.IrqInfoFlag.MASKABLE if desc.maskable else 0
        flags |= w.IrqInfoFlag.AUTOMASKED if desc.automasked else 0
        flags |= w.IrqInfoFlag.NORESIZE if desc.noresize else 0
        return w.IrqInfo(flags=flags, index=req.index, count=desc.count).pack()

    # ------------------------------------------------------------ interrupts
    def _set_irqs(self, frame: Frame) -> bytes:
        req = _request(frame, w.IrqSet)
        data = frame.payload[w.IrqSet.SIZE:]
        # Here argsz is the request's own size ("the size of the VFIO IRQ set request
        # payload, including any data field"), so it must agree with the message.
        _require(req.argsz == len(frame.payload), errno.EINVAL,
                 f"SET_IRQS argsz {req.argsz} != payload {len(frame.payload)}")
        _require(not req.flags & w.IRQ_SET_FLAGS_RESERVED, errno.EINVAL, f"SET_IRQS flags {req.flags:#x}")
        dflag = req.flags & w.IRQ_SET_DATA_MASK
        action = req.flags & w.IRQ_SET_ACTION_MASK
        _require(dflag.bit_count() == 1 and action.bit_count() == 1, errno.EINVAL,
                 f"SET_IRQS needs one data and one action flag, got {req.flags:#x}")
        _require(req.index < w.PCI_NUM_IRQS, errno.EINVAL, f"irq index {req.index}")
        total = self.device.irq(req.index).count
        disable_all = dflag == w.IrqSetFlag.DATA_NONE and req.count == 0 and req.start == 0
        _require(disable_all or (req.count > 0 and _fits(req.start, req.count, total)),
                 errno.EINVAL, f"irq range {req.start}+{req.count} of {total}")
        fds = frame.fds
        _require(dflag == w.IrqSetFlag.DATA_EVENTFD or not fds, errno.EINVAL, "fds without DATA_EVENTFD")
        if self.is_eventfd is not None:
            for fd in fds:
                _require(self.is_eventfd(fd), errno.EINVAL, f"SET_IRQS fd {fd} is not an eventfd")
        if dflag == w.IrqSetFlag.DATA_BOOL:
            _require(len(data) == req.count, errno.EINVAL, "SET_IRQS bool data size")
            selected = [i for i in range(req.count) if data[i]]
        else:
            # Data after a NONE/EVENTFD request is ignored, as libvfio-user ignores it.
            selected = list(range(req.count))

        if disable_all:
            if action == w.IrqSetFlag.ACTION_TRIGGER:
                self.irq_enabled[req.index] = 0
                self._set_irq_fds(req.index, 0, total, [])
            return b""
        if dflag == w.IrqSetFlag.DATA_EVENTFD:
            _require(len(fds) in (0, req.count), errno.EINVAL,
                     f"SET_IRQS {len(fds)} fds for {req.count} irqs")
            if action == w.IrqSetFlag.ACTION_TRIGGER:
                # A trigger enables the sub-indexes even without fds: QEMU enables
                # MSI-X with {start 0, count 1, no fd} before any vector is unmasked.
                enabled = max(self.irq_enabled.get(req.index, 0), req.start + req.count)
                self.irq_enabled[req.index] = enabled
                self._set_irq_fds(req.index, req.start, req.count, fds)
            else:
                kind = int(action)
                for i in range(req.count):
                    old = self.irq_mask_fds.pop((kind, req.index, req.start + i), None)
                    if old is not None:
                        _close(old)
                    if fds:
                        self.irq_mask_fds[(kind, req.index, req.start + i)] = fds[i]
            frame.fds = []  # ownership moved
            return b""
        subs = [req.start + i for i in selected]
        if action == w.IrqSetFlag.ACTION_TRIGGER:
            for sub in subs:
                self._signal_irq(req.index, sub)
        else:
            masked = action == w.IrqSetFlag.ACTION_MASK
            for sub in subs:
                self.device.irq_mask(req.index, sub, 1, masked)
                notice = self.irq_mask_fds.get((int(action), req.index, sub))
                if notice is not None:
                    self.notify(notice)
        return b""

    def _set_irq_fds(self, index: int, start: int, count: int, fds: list[int]) -> None:
        for i in range(count):
            old = self.irq_fds.pop((index, start + i), None)
            if old is not None:
                _close(old)
            if fds:
                self.irq_fds[(index, start + i)] = fds[i]
        self.device.set_irq_count(index, self.irq_enabled.get(index, 0))
        self.device.irqs_configured(index)

    def _signal_irq(self, index: int, sub: int) -> bool:
        fd = self.irq_fds.get((index, sub))
        if fd is None:
            return False
        self.notify(fd)
        return True

    def irq_count(self, index: int) -> int:
        """How many eventfds the client set for irq ``index``."""
        return sum(1 for (i, _) in self.irq_fds if i == index)

    # ------------------------------------------------------------ region access
    def _check_region(self, index: int, offset: int, count: int, write: bool) -> None:
        _require(index < w.PCI_NUM_REGIONS, errno.EINVAL, f"region index {index}")
        desc = self.device.region(index)
        _require(desc.size > 0, errno.EINVAL, f"region {index} is absent")
        _require(desc.writable if write else desc.readable, errno.EACCES,
                 f"region {index} not {'writable' if write else 'readable'}")
        _require(0 < count <= self.max_data_xfer_size, errno.EINVAL, f"count {count}")
        _require(_fits(offset, count, desc.size), errno.EINVAL,
                 f"region {index} access {offset:#x}+{count} beyond size {desc.size:#x}")

    def _region_read(self, frame: Frame) -> bytes:
        req = _request(frame, w.RegionAccess)
        self._check_region(req.region, req.offset, req.count, write=False)
        data = self.device.region_read(req.region, req.offset, req.count)
        return frame.payload[:w.RegionAccess.SIZE] + data

    def _region_write(self, frame: Frame) -> bytes:
        _require(len(frame.payload) >= w.RegionAccess.SIZE, errno.EINVAL, "REGION_WRITE payload size")
        req = w.RegionAccess.unpack(frame.payload)
        _require(len(frame.payload) == w.RegionAccess.SIZE + req.count, errno.EINVAL,
                 f"REGION_WRITE count {req.count} != data {len(frame.payload) - w.RegionAccess.SIZE}")
        self._check_region(req.region, req.offset, req.count, write=True)
        self.device.region_write(req.region, req.offset, frame.payload[w.RegionAccess.SIZE:])
        return frame.payload[:w.RegionAccess.SIZE]

    def _write_multi(self, frame: Frame) -> bytes:
        _require(self.write_multiple, errno.ENOTSUP, "write_multiple was not negotiated")
        _require(len(frame.payload) >= w.WriteMultiHead.SIZE, errno.EINVAL, "WRITE_MULTI payload size")
        n = w.WriteMultiHead.unpack(frame.payload).wr_cnt
        _require(0 < n <= MAX_WRITE_MULTI, errno.EINVAL, f"WRITE_MULTI wr_cnt {n}")
        _require(len(frame.payload) == w.WriteMultiHead.SIZE + n * w.WriteMultiEntry.SIZE,
                 errno.EINVAL, "WRITE_MULTI payload does not match wr_cnt")
        entries = [w.WriteMultiEntry.unpack(frame.payload, w.WriteMultiHead.SIZE + i * w.WriteMultiEntry.SIZE)
                   for i in range(n)]
        for e in entries:  # validate all before applying any
            _require(e.count in (1, 2, 4, 8), errno.EINVAL, f"WRITE_MULTI count {e.count}")
            self._check_region(e.region, e.offset, e.count, write=True)
        for e in entries:
            self.device.region_write(e.region, e.offset, e.data[:e.count])
        return w.WriteMultiHead(wr_cnt=n).pack()

    # ------------------------------------------------------------ reset, the rest
    def _reset(self, frame: Frame) -> bytes:
        # A payload is ignored, as libvfio-user ignores it.
        if self.migration is not None:
            self.migration.device_reset()
        self.device.reset()
        return b""

    def _migration_command(self, frame: Frame) -> bytes:
        if self.migration is None:
            raise Reject(f"{_cmd_name(frame.header.command)} is not supported", errno.ENOTSUP)
        return self.migration.handle(w.Command(frame.header.command), frame.payload)

    def allowed_in_migration_state(self, command: w.Command) -> bool:
        """The migration state's command allow-list (all commands without migration)."""
        return self.migration is None or self.migration.allows(command)


def client_caps(caps: dict[str, Any]) -> tuple[int, int, bool]:
    """A client's VERSION capabilities: (max_msg_fds, max_data_xfer_size, write_multiple).

    Raises:
        Reject: EINVAL for a value of the wrong type or out of range.
    """
    def number(key: str, default: int, lo: int, hi: int) -> int:
        value = caps.get(key, default)
        _require(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
                 errno.EINVAL, f"capability {key}={value!r} out of range")
        return int(value)

    max_msg_fds = number("max_msg_fds", w.DEFAULT_MAX_MSG_FDS, 1, 253)
    max_data_xfer_size = number("max_data_xfer_size", w.DEFAULT_MAX_DATA_XFER_SIZE, 1, 1 << 30)
    number("max_dma_maps", w.DEFAULT_MAX_DMA_MAPS, 1, 1 << 31)
    pgsizes = number("pgsizes", w.DEFAULT_PGSIZES, 1, (1 << 63) - 1)
    _require(bool(pgsizes & PGSIZE), errno.EINVAL, f"client pgsizes {pgsizes:#x} lack 4 KiB")
    wm = caps.get("write_multiple", False)
    _require(isinstance(wm, bool), errno.EINVAL, "write_multiple is not a boolean")
    mig = caps.get("migration", {})
    _require(isinstance(mig, dict), errno.EINVAL, "migration capability is not an object")
    return max_msg_fds, max_data_xfer_size, bool(wm)


@dataclass
class HandoffPlan:
    """A connection state that passed :func:`check_handoff_state` (fds by index)."""

    caps: tuple[int, int, bool]
    next_id: int
    irqs: list[tuple[int, int, int]]  # (irq index, sub-index, fd index)
    masks: list[tuple[int, int, int, int]]  # (action, irq index, sub-index, fd index)
    enabled: dict[int, int]
    counters: dict[str, int]
    pending: bytes
    pending_fds: list[int]
    regions: list[tuple[int, int, int | None, int, bool, bool]]  # address, size, fd index, ...


DEFAULT_MAX_FRAME = w.HEADER_SIZE + 16 + max(MAX_DATA_XFER_SIZE, 1 << 16)


def check_handoff_state(state: Any, nfds: int, device: VfioUserDevice,
                        max_frame: int = DEFAULT_MAX_FRAME) -> HandoffPlan:
    """Check a connection state from :meth:`ServerConnection.handoff_export` completely.

    Nothing is adopted or opened: the destination runs this before it takes
    anything over, and :meth:`ServerConnection.handoff_adopt` installs only a
    state that passed.  The checks are those of the equivalent commands:
    capabilities as in VERSION, regions as DMA_MAP (bounds, overlap, count,
    offset alignment), irq indexes and ranges as in SET_IRQS, the half-read
    message as the framer reads it.

    Raises:
        LocalProtocolError: EINVAL naming the bad field.
    """
    try:
        return _check_handoff_state(state, nfds, device, max_frame)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError,
            MapError, RemoteProtocolError) as exc:
        raise LocalProtocolError(f"bad handoff state: {exc}", errno.EINVAL) from None


def _check_handoff_state(state: Any, nfds: int, device: VfioUserDevice,
                         max_frame: int) -> HandoffPlan:
    def fd_at(index: Any) -> int:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < nfds:
            raise ValueError(f"fd index {index!r} of {nfds}")
        return index

    def integer(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{value!r} is not an integer")
        return value

    if not isinstance(state, dict):
        raise TypeError("the connection state is not an object")
    caps = client_caps(dict(state["caps"]))
    next_id = integer(state["next_id"])
    _require(0 <= next_id <= 0xFFFF, errno.EINVAL, f"next_id {next_id}")
    irqs = [(integer(i), integer(s), fd_at(f)) for i, s, f in state["irq_fds"]]
    masks = [(integer(k), integer(i), integer(s), fd_at(f)) for k, i, s, f in state["irq_mask_fds"]]
    enabled = {integer(i): integer(n) for i, n in state["irq_enabled"]}
    mask_kinds = {int(w.IrqSetFlag.ACTION_MASK), int(w.IrqSetFlag.ACTION_UNMASK)}
    for index, count in enabled.items():
        _require(0 <= index < w.PCI_NUM_IRQS and 0 <= count <= device.irq(index).count,
                 errno.EINVAL, f"irq {index}: {count} enabled")
    for kind, index, sub in [(None, i, s) for i, s, _ in irqs] + [(k, i, s) for k, i, s, _ in masks]:
        _require(0 <= index < w.PCI_NUM_IRQS and 0 <= sub < device.irq(index).count
                 and (kind is None or kind in mask_kinds), errno.EINVAL,
                 f"irq {index}.{sub} (action {kind}) out of range")
    counters = {str(key): value for key, value in dict(state.get("counters", {})).items()
                if isinstance(value, int) and not isinstance(value, bool)}
    pending = bytes.fromhex(state["pending"])
    pending_fds = [fd_at(f) for f in state["pending_fds"]]
    _require(len(pending) < max_frame and len(pending_fds) <= MAX_MSG_FDS,
             errno.EINVAL, "pending message too large")
    _require(bool(pending) or not pending_fds, errno.EINVAL,
             "pending fds without a pending message")  # fds arrive with bytes
    framer = Framer(max_frame)  # the half message must frame as it will be fed
    try:
        rest = pending
        while rest:
            take = framer.bytes_wanted()
            if take <= 0:
                raise ValueError("pending message does not frame")
            framer.feed(rest[:take], [])
            rest = rest[take:]
            while framer.next_frame() is not None:
                pass
    finally:
        framer.close()
    regions = []
    ranges = ClientMemory(max_regions=MAX_DMA_MAPS)  # bounds, overlap and count, no mapping
    for r in state["regions"]:
        region = (integer(r["address"]), integer(r["size"]),
                  None if r["fd"] is None else fd_at(r["fd"]), integer(r["fd_offset"]),
                  bool(r["readable"]), bool(r["writable"]))
        ranges.map(region[0], region[1], readable=region[4], writable=region[5])
        _require(region[2] is None or (region[3] >= 0 and region[3] % PGSIZE == 0),
                 errno.EINVAL, f"region fd offset {region[3]:#x}")
        regions.append(region)
    ranges.unmap_all()
    return HandoffPlan(caps, next_id, irqs, masks, enabled, counters, pending, pending_fds,
                       regions)


def _cmd_name(command: int) -> str:
    try:
        return w.Command(command).name
    except ValueError:
        return f"cmd{command}"


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


