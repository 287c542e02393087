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

Each command is checked from the outside in, so a malformed message is refused
before any of its fields is trusted: header (type, reserved flags, allowed in
this state, size limits), then the payload's own fields (``argsz`` against
the real length, reserved bits, ranges), then semantics (device state,
negotiated maxima).  Every rejection is an error reply carrying an errno and
closes every fd the message brought; a message that makes the stream
unframeable closes the connection.  Commands with
No_reply get no reply, not even an error one (QEMU posts region writes).
"""

from __future__ import annotations

import errno
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from appliance.errors import LocalProtocolError
from appliance.memory import ClientMemory, MapError
from appliance.protocol_common import Reject, close_quietly, require, step
from appliance.vfio_user import wire as w
from appliance.vfio_user.backend import VfioUserDevice
from appliance.vfio_user.connection_state import (
    ALLOWED,
    MAX_DATA_XFER_SIZE,
    MAX_DMA_MAPS,
    MAX_MSG_FDS,
    MAX_VERSION_JSON,
    MAX_WRITE_MULTI,
    MIG_MAX_BITMAP_SIZE,
    PGSIZE,
    TAKES_FDS,
    TRANSITIONS,
    ConnState,
    DmaLayout,
    MigrationFactory,
    MigrationHandler,
    NotYet,
)
from appliance.vfio_user.dma import DmaMessages
from appliance.vfio_user.framing import Frame, Framer, encode
from appliance.vfio_user.handoff_state import ClientCaps, ConnectionState, parse_client_caps
from appliance.vfio_user.request_payload import command_name, fits, request_struct
from appliance.vfio_user.server_handoff import ConnectionHandoff, DryRunDevice
from appliance.vfio_user.server_irqs import ServerIrqs

# Declared in appliance.vfio_user.connection_state, used by importers of this module.
__all__ = ["MAX_DATA_XFER_SIZE", "MAX_MSG_FDS", "MIG_MAX_BITMAP_SIZE", "ConnState", "DmaLayout",
           "MigrationFactory", "MigrationHandler", "Reject", "ServerConnection",
           "check_handoff_state"]

log = logging.getLogger("appliance.vfio_user")

#: What a command handler returns: the reply payload, with the fds to pass, or
#: as pieces in order (sent gathered, never joined).
Result = bytes | tuple[bytes, list[int]] | list[bytes | memoryview]


#: the commands by number (a dict lookup: cheaper than the enum's own call per message)
_COMMANDS: dict[int, w.Command] = {int(c): c for c in w.Command}
_NO_REPLY = int(w.MsgFlag.NO_REPLY)  # a plain int: IntFlag arithmetic costs per message


class ServerConnection(ServerIrqs, ConnectionHandoff):
    """The server side of one vfio-user client connection (its interrupts:
    :class:`~appliance.vfio_user.server_irqs.ServerIrqs`; its live handoff:
    :class:`~appliance.vfio_user.server_handoff.ConnectionHandoff`)."""

    def __init__(
        self,
        device: VfioUserDevice,
        *,
        notify: Callable[[int], None],
        max_data_xfer_size: int = MAX_DATA_XFER_SIZE,
        dma_layout: DmaLayout = DmaLayout.SPEC,
        name: str = "vfio-user",
        is_eventfd: Callable[[int], bool] | None = None,
        migration: MigrationFactory | None = None,
    ) -> None:
        """Args:
            device: the device this connection exposes.
            notify: signals an eventfd (the runtime writes 1 to it).
            max_data_xfer_size: our max ``count`` per data message.
            is_eventfd: whether a received fd is an eventfd (the runtime
                knows how to ask the kernel); SET_IRQS refuses any other fd
                with EINVAL.  None accepts every fd.
            migration: builds the handler of commands 16-18 (migration v2,
                appliance.vfio_user.migration) from this connection's client
                memory; None: the device does not migrate and those commands
                are "not supported".
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
        self._out: deque[tuple[bytes | memoryview, list[int]]] = deque()
        self._frames: deque[Frame] = deque()
        self.parked = False  # the first frame waits for the migration handler (NotYet)
        self._next_id = 0
        self.counters = {"messages": 0, "errors": 0}
        self._handlers: dict[w.Command, Callable[[Frame], Result]] = {
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
        self.migration = migration(self.memory) if migration is not None else None
        device.attach(self.memory, self._signal_irq, self._irq_eventfd)

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
                close_quietly(fd)
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
        """Dispatch every complete message; replies go to :meth:`data_to_send`.

        A message the migration handler cannot answer yet (:class:`NotYet`) stays
        first and nothing after it runs until the next call (``parked``).
        """
        self.parked = False
        while self._frames and self.state is not ConnState.CLOSED and not self.parked:
            self._dispatch(self._frames.popleft())

    @property
    def queued(self) -> int:
        """Messages received and not yet dispatched (behind one that waits, ``parked``)."""
        return len(self._frames)

    @property
    def has_output(self) -> bool:
        """Whether messages wait for :meth:`data_to_send` (replies, or DMA messages the
        device made outside any client message: its idle poll, a timer, an I/O done)."""
        return bool(self._out)

    def data_to_send(self) -> list[tuple[bytes | memoryview, list[int]]]:
        """Messages to write, each with the fds to pass alongside (then close them).

        A MIG_DATA_READ reply comes as consecutive pieces (its header, then views
        of the stream: written in order they are the message); the fds of a
        message go with its first piece.
        """
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
            close_quietly(fd)
        self.irq_fds.clear()
        self.irq_mask_fds.clear()
        if self.migration is not None:
            self.migration.close()
        self.device.detach()  # drops its waiting work and waits for DMA in flight: then unmap
        self.memory.unmap_all()
        self.dma.close()

    # ------------------------------------------------------------ server -> client DMA
    def dma_request(self, command: w.Command, address: int, data: bytes | int) -> int:
        """Queue a DMA_READ (``data`` = count) or DMA_WRITE (``data`` = bytes).

        Returns the message id its reply carries (:class:`DmaMessages` keeps it).
        """
        msg_id = self._next_id = (self._next_id + 1) & 0xFFFF
        while self.dma.expects(msg_id):  # a 16-bit id wraps: never reuse one still unanswered
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
        self.state = step(TRANSITIONS, self.state, event, where=self.name)

    def _dispatch(self, frame: Frame) -> None:
        hdr = frame.header
        self.counters["messages"] += 1
        no_reply = bool(hdr.flags & _NO_REPLY)
        nfds = len(frame.fds)
        try:
            command = self._check_header(frame)
            try:
                result = self._handlers[command](frame)
            except NotYet:
                self._frames.appendleft(frame)
                self.counters["messages"] -= 1
                self.parked = True
                return
            payload, fds = result if isinstance(result, tuple) else (result, [])
            frame.close_fds()
            size = sum(len(part) for part in payload) if isinstance(payload, list) else len(payload)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s msg %#x %s size=%d fds=%d -> ok (%d bytes%s)", self.name, hdr.msg_id,
                          command_name(hdr.command), hdr.size, nfds, size,
                          ", no reply" if no_reply else "")
            if not no_reply:
                # Reply fds are the device's own (e.g. a BAR's memfd): lent, never closed here.
                reply = w.Header(msg_id=hdr.msg_id, command=hdr.command, flags=w.MsgFlag.REPLY)
                if isinstance(payload, list):  # pieces, gathered by the runtime's sendmsg
                    reply.size = w.HEADER_SIZE + size
                    self._out.append((reply.pack(), fds))
                    self._out.extend((part, []) for part in payload if len(part))
                else:
                    self._out.append((encode(reply, payload), fds))
        except (Reject, LocalProtocolError) as exc:
            frame.close_fds()
            self.counters["errors"] += 1
            err = exc.errno or errno.EINVAL
            log.warning("%s msg %#x %s size=%d fds=%d: %s (errno %d)", self.name, hdr.msg_id,
                        command_name(hdr.command), hdr.size, nfds, exc, err)
            if not no_reply or frame.oversized:
                reply = w.Header(msg_id=hdr.msg_id, command=hdr.command,
                                 flags=w.MsgFlag.REPLY | w.MsgFlag.ERROR, error=err)
                self._out.append((encode(reply), []))
            if frame.oversized or (hdr.command == w.Command.VERSION and self.state is ConnState.AWAIT_VERSION):
                # An unframeable stream, or a failed negotiation, ends the connection
                # once the error reply is flushed.
                self.close()
        except Exception:  # the device failed, not the peer: EIO, logged as the bug it is
            frame.close_fds()
            self.counters["errors"] += 1
            log.exception("%s msg %#x %s: the device failed", self.name, hdr.msg_id,
                          command_name(hdr.command))
            if not no_reply:
                reply = w.Header(msg_id=hdr.msg_id, command=hdr.command,
                                 flags=w.MsgFlag.REPLY | w.MsgFlag.ERROR, error=errno.EIO)
                self._out.append((encode(reply), []))

    def _check_header(self, frame: Frame) -> w.Command:
        # Every message passes here: each check formats its message only when it refuses.
        hdr = frame.header
        if frame.oversized:
            raise Reject(f"message size {hdr.size} exceeds limit", errno.EMSGSIZE)
        if hdr.flags & w.MSG_FLAGS_RESERVED:
            raise Reject(f"reserved flags {hdr.flags:#x}", errno.EINVAL)
        require(hdr.flags & w.MSG_TYPE_MASK == w.MSG_TYPE_COMMAND, errno.EINVAL,
                "unsolicited reply from the client")
        require(hdr.error == 0, errno.EINVAL, "error field set in a command")
        command = _COMMANDS.get(hdr.command)
        if command is None:
            raise Reject(f"unknown command {hdr.command}", errno.EINVAL)
        if command not in ALLOWED[self.state]:
            raise Reject(f"{command.name} not allowed in state {self.state.value}", errno.EINVAL)
        if not self.allowed_in_migration_state(command):
            raise Reject(f"{command.name} not allowed in this migration state", errno.EBUSY)
        if frame.fds and command not in TAKES_FDS:
            log.warning("%s msg %#x %s: closed %d fd(s) the command does not take", self.name,
                        hdr.msg_id, command.name, len(frame.fds))
            frame.close_fds()
        return command

    # ------------------------------------------------------------ VERSION
    def _version(self, frame: Frame) -> bytes:
        require(len(frame.payload) >= w.VersionHead.SIZE, errno.EINVAL, "short VERSION")
        head = w.VersionHead.unpack(frame.payload)
        require(head.major == w.VERSION_MAJOR, errno.ENOTSUP, f"major version {head.major}")
        raw = frame.payload[w.VersionHead.SIZE:]
        require(len(raw) <= MAX_VERSION_JSON, errno.E2BIG, "VERSION JSON too large")
        caps: dict[str, Any] = {}
        text = raw.split(b"\0", 1)[0]
        if text.strip():
            try:
                doc = json.loads(text.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise Reject(f"VERSION JSON: {exc}", errno.EINVAL) from None
            require(isinstance(doc, dict), errno.EINVAL, "VERSION JSON is not an object")
            caps = doc.get("capabilities", {})
            require(isinstance(caps, dict), errno.EINVAL, "capabilities is not an object")
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
        self._use_caps(parse_client_caps(caps))

    def _use_caps(self, caps: ClientCaps) -> None:
        self.client_max_msg_fds = caps.max_msg_fds
        self.client_max_data_xfer_size = caps.max_data_xfer_size
        self.write_multiple = caps.write_multiple

    # ------------------------------------------------------------ DMA map / unmap
    def _dma_map(self, frame: Frame) -> bytes:
        req = request_struct(frame, w.DmaMap)
        require(req.argsz >= w.DmaMap.SIZE, errno.EINVAL, f"DMA_MAP argsz {req.argsz}")
        require(not req.flags & w.DMA_MAP_FLAGS_RESERVED, errno.EINVAL,
                f"DMA_MAP flags {req.flags:#x}")
        require(len(frame.fds) <= 1, errno.EINVAL, "DMA_MAP with more than one fd")
        require(req.address % PGSIZE == 0 and req.size % PGSIZE == 0 and req.size > 0, errno.EINVAL,
                f"DMA_MAP {req.address:#x}+{req.size:#x} not page aligned")
        require(req.offset % PGSIZE == 0, errno.EINVAL, f"DMA_MAP offset {req.offset:#x}")
        fd = frame.fds.pop() if frame.fds else None
        try:
            self.memory.map(req.address, req.size, fd=fd, fd_offset=req.offset if fd is not None else 0,
                            readable=bool(req.flags & w.DmaMapFlag.READ),
                            writable=bool(req.flags & w.DmaMapFlag.WRITE))
        except MapError as exc:
            raise Reject(str(exc), exc.errno) from None
        return b""

    def _dma_unmap(self, frame: Frame) -> bytes:
        req = request_struct(frame, w.DmaUnmap)
        require(req.argsz >= w.DmaUnmap.SIZE, errno.EINVAL, f"DMA_UNMAP argsz {req.argsz}")
        known = w.DmaUnmapFlag.ALL | w.DmaUnmapFlag.GET_DIRTY_BITMAP
        require(not req.flags & ~int(known), errno.EINVAL, f"DMA_UNMAP flags {req.flags:#x}")
        require(not req.flags & w.DmaUnmapFlag.GET_DIRTY_BITMAP, errno.ENOTSUP,
                "DMA_UNMAP dirty bitmap (use DMA_LOGGING_REPORT)")
        self.device.dma_unmapping()  # no DMA of the device's may still run in that memory
        if req.flags & w.DmaUnmapFlag.ALL:
            require(req.address == 0 and req.size == 0, errno.EINVAL, "UNMAP ALL with a range")
            self.memory.unmap_all()
        else:
            try:
                self.memory.unmap(req.address, req.size)
            except MapError as exc:
                raise Reject(str(exc), exc.errno) from None
        return req.replace(argsz=w.DmaUnmap.SIZE).pack()

    # ------------------------------------------------------------ device info
    def _get_info(self, frame: Frame) -> bytes:
        req = request_struct(frame, w.DeviceInfo)
        require(req.argsz >= w.DeviceInfo.SIZE, errno.EINVAL, f"GET_INFO argsz {req.argsz}")
        return w.DeviceInfo(flags=w.DeviceFlag.RESET | w.DeviceFlag.PCI,
                            num_regions=w.PCI_NUM_REGIONS, num_irqs=w.PCI_NUM_IRQS).pack()

    def _get_region_info(self, frame: Frame) -> tuple[bytes, list[int]]:
        req = request_struct(frame, w.RegionInfo)
        require(req.argsz >= w.RegionInfo.SIZE, errno.EINVAL, f"GET_REGION_INFO argsz {req.argsz}")
        require(req.index < w.PCI_NUM_REGIONS, errno.EINVAL, f"region index {req.index}")
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
        req = request_struct(frame, w.RegionIoFds)
        require(req.argsz >= w.RegionIoFds.SIZE, errno.EINVAL,
                f"GET_REGION_IO_FDS argsz {req.argsz}")
        require(req.flags == 0 and req.count == 0, errno.EINVAL,
                "GET_REGION_IO_FDS fields must be 0")
        require(req.index < w.PCI_NUM_REGIONS and self.device.region(req.index).size > 0, errno.EINVAL,
                f"region index {req.index}")
        # No sub-region is offered as an ioeventfd: without KVM, QEMU forwards
        # every access itself, and doorbells are reached by mmap instead.
        return w.RegionIoFds(argsz=w.RegionIoFds.SIZE, index=req.index, count=0).pack()

    def _get_irq_info(self, frame: Frame) -> bytes:
        req = request_struct(frame, w.IrqInfo)
        require(req.argsz >= w.IrqInfo.SIZE, errno.EINVAL, f"GET_IRQ_INFO argsz {req.argsz}")
        require(req.index < w.PCI_NUM_IRQS, errno.EINVAL, f"irq index {req.index}")
        desc = self.device.irq(req.index)
        flags = w.IrqInfoFlag.EVENTFD
        flags |= w.IrqInfoFlag.MASKABLE if desc.maskable else 0
        flags |= w.IrqInfoFlag.AUTOMASKED if desc.automasked else 0
        flags |= w.IrqInfoFlag.NORESIZE if desc.noresize else 0
        return w.IrqInfo(flags=flags, index=req.index, count=desc.count).pack()

    # ------------------------------------------------------------ region access
    def _check_region(self, index: int, offset: int, count: int, write: bool) -> None:
        # (every doorbell message passes here: messages are formatted only on refusal)
        if index >= w.PCI_NUM_REGIONS:
            raise Reject(f"region index {index}", errno.EINVAL)
        desc = self.device.region(index)
        if desc.size <= 0:
            raise Reject(f"region {index} is absent", errno.EINVAL)
        if not (desc.writable if write else desc.readable):
            raise Reject(f"region {index} not {'writable' if write else 'readable'}", errno.EACCES)
        if not 0 < count <= self.max_data_xfer_size:
            raise Reject(f"count {count}", errno.EINVAL)
        if not fits(offset, count, desc.size):
            raise Reject(f"region {index} access {offset:#x}+{count} beyond size {desc.size:#x}",
                         errno.EINVAL)

    def _region_read(self, frame: Frame) -> bytes:
        req = request_struct(frame, w.RegionAccess)
        self._check_region(req.region, req.offset, req.count, write=False)
        data = self.device.region_read(req.region, req.offset, req.count)
        return frame.payload[:w.RegionAccess.SIZE] + data

    def _region_write(self, frame: Frame) -> bytes:
        require(len(frame.payload) >= w.RegionAccess.SIZE, errno.EINVAL,
                "REGION_WRITE payload size")
        req = w.RegionAccess.unpack(frame.payload)
        if len(frame.payload) != w.RegionAccess.SIZE + req.count:
            raise Reject(f"REGION_WRITE count {req.count} != data "
                         f"{len(frame.payload) - w.RegionAccess.SIZE}", errno.EINVAL)
        self._check_region(req.region, req.offset, req.count, write=True)
        self.device.region_write(req.region, req.offset, frame.payload[w.RegionAccess.SIZE:])
        return frame.payload[:w.RegionAccess.SIZE]

    def _write_multi(self, frame: Frame) -> bytes:
        require(self.write_multiple, errno.ENOTSUP, "write_multiple was not negotiated")
        require(len(frame.payload) >= w.WriteMultiHead.SIZE, errno.EINVAL,
                "WRITE_MULTI payload size")
        n = w.WriteMultiHead.unpack(frame.payload).wr_cnt
        require(0 < n <= MAX_WRITE_MULTI, errno.EINVAL, f"WRITE_MULTI wr_cnt {n}")
        require(len(frame.payload) == w.WriteMultiHead.SIZE + n * w.WriteMultiEntry.SIZE, errno.EINVAL,
                "WRITE_MULTI payload does not match wr_cnt")
        entries = [w.WriteMultiEntry.unpack(frame.payload, w.WriteMultiHead.SIZE + i * w.WriteMultiEntry.SIZE)
                   for i in range(n)]
        for e in entries:  # validate all before applying any
            require(e.count in (1, 2, 4, 8), errno.EINVAL, f"WRITE_MULTI count {e.count}")
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

    def _migration_command(self, frame: Frame) -> bytes | list[bytes | memoryview]:
        if self.migration is None:
            raise Reject(f"{command_name(frame.header.command)} is not supported", errno.ENOTSUP)
        command = w.Command(frame.header.command)
        if command == w.Command.MIG_DATA_READ:  # up to 1 MiB of stream: never joined
            return self.migration.handle_parts(command, frame.payload)
        return self.migration.handle(command, frame.payload, frame.fds)

    def allowed_in_migration_state(self, command: w.Command) -> bool:
        """The migration state's command allow-list (all commands without migration)."""
        return self.migration is None or self.migration.allows(command)


def check_handoff_state(device: VfioUserDevice, state: ConnectionState, fds: list[int],
                        is_eventfd: Callable[[int], bool] | None) -> None:
    """Everything adopting ``state`` on ``device`` would refuse, refused now:
    the same replay (:meth:`ServerConnection.handoff_adopt`) onto a scratch
    connection over a :class:`DryRunDevice`, then let go; ``device`` is not
    touched and nothing is kept.

    Raises:
        LocalProtocolError: the first replayed request refused (its errno).
    """
    scratch = ServerConnection(DryRunDevice(device), notify=lambda fd: None, is_eventfd=is_eventfd)
    try:
        scratch.handoff_adopt(state, fds)
    finally:
        scratch.close()
