"""A vfio-user client library (runtime layer: it owns a socket and blocks).

Used by the tests, the Python NVMe driver, the migration orchestrator and the
pytest fixtures.  It answers DMA_READ/DMA_WRITE in the spec's layout, as QEMU 11.1 does
(see :class:`~appliance.vfio_user.server.DmaLayout`).

Example::

    with VfioUserClient.connect("/run/appliance/nvme.sock") as c:
        mem = c.map_memfd(0x0, 64 << 20)         # shared guest memory
        cfg = c.region_read(PciRegion.CONFIG, 0, 4096)
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
from dataclasses import dataclass
from typing import Any, Self

from appliance.runtime.unix import wait_readable
from appliance.runtime.vfio_user import recv_chunk, send_message
from appliance.vfio_user import wire as w
from appliance.vfio_user.framing import Frame, Framer, encode
from appliance.vfio_user.server import DmaLayout

DEFAULT_CAPS: dict[str, Any] = {
    "max_msg_fds": 16,
    "max_data_xfer_size": 1 << 20,
    "pgsizes": 4096,
    "max_dma_maps": 65535,
    "migration": {"pgsize": 4096, "max_bitmap_size": 256 << 20},
    "write_multiple": True,
}


class VfioUserError(OSError):
    """The server answered a request with an error reply (``errno`` set)."""


@dataclass
class MemoryArea:
    """Client memory we shared (or only announced) to the server."""

    address: int
    size: int
    mm: mmap.mmap
    fd: int | None

    def view(self) -> memoryview:
        return memoryview(self.mm)


@dataclass
class RegionInfoReply:
    info: w.RegionInfo
    sparse_areas: list[tuple[int, int]]
    fd: int | None


class VfioUserClient:
    """One connection to a vfio-user server."""

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0,
                 dma_layout: DmaLayout = DmaLayout.SPEC) -> None:
        self.sock = sock
        self.timeout = timeout
        self.dma_layout = dma_layout
        self.framer = Framer(max_size=16 + 32 + (64 << 20))
        self._next_id = 0
        self.areas: list[MemoryArea] = []
        self.server_caps: dict[str, Any] = {}
        self.dma_requests = 0
        self.dma_largest = 0  # the largest count the server asked for

    # ------------------------------------------------------------ connection
    @classmethod
    def connect(cls, path: str, *, negotiate: bool = True, caps: dict[str, Any] | None = None,
                **kw: Any) -> Self:
        """Connect to ``path`` and (by default) do the VERSION handshake."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        client = cls(sock, **kw)
        if negotiate:
            client.negotiate(DEFAULT_CAPS if caps is None else caps)
        return client

    def negotiate(self, caps: dict[str, Any]) -> dict[str, Any]:
        """VERSION: propose 0.0 with ``caps``; returns the server's capabilities."""
        body = w.VersionHead(major=0, minor=0).pack()
        body += json.dumps({"capabilities": caps}, separators=(",", ":")).encode() + b"\0"
        _, payload, _ = self.request(w.Command.VERSION, body)
        head = w.VersionHead.unpack(payload)
        if head.major != 0 or head.minor != 0 or not payload.endswith(b"\0"):
            raise VfioUserError(errno.EPROTO, f"bad VERSION reply {head}")
        self.server_caps = json.loads(payload[w.VersionHead.SIZE:-1]).get("capabilities", {})
        return self.server_caps

    def close(self) -> None:
        for area in self.areas:
            try:
                area.mm.close()
            except BufferError:  # a caller still holds a view; the GC unmaps it later
                pass
            if area.fd is not None:
                os.close(area.fd)
        self.areas.clear()
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ raw messages
    def send(self, command: int, payload: bytes = b"", fds: list[int] | None = None, *,
             flags: int = 0, msg_id: int | None = None, size: int | None = None) -> int:
        """Send one command (``size`` overrides the header's size, for bad-input tests)."""
        if msg_id is None:
            msg_id = self._next_id = (self._next_id + 1) & 0xFFFF
        header = w.Header(msg_id=msg_id, command=command, flags=flags)
        data = encode(header, payload)
        if size is not None:
            data = w.Header(msg_id=msg_id, command=command, flags=flags, size=size).pack() + payload
        send_message(self.sock, data, fds or [])
        return msg_id

    def send_parts(self, command: int, parts: list[bytes | memoryview]) -> int:
        """Send one command whose payload is ``parts`` in order, gathered by
        ``sendmsg`` (the parts are not joined: a large payload is not copied);
        returns its message id."""
        msg_id = self._next_id = (self._next_id + 1) & 0xFFFF
        size = w.Header.SIZE + sum(len(part) for part in parts)
        views = [memoryview(w.Header(msg_id=msg_id, command=command, size=size).pack()),
                 *(memoryview(part).cast("B") for part in parts)]
        while views:
            sent = self.sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if sent:
                views[0] = views[0][sent:]
        return msg_id

    def send_bytes(self, data: bytes, fds: list[int] | None = None) -> None:
        send_message(self.sock, data, fds or [])

    def receive(self, timeout: float | None = None) -> Frame | None:
        """The next complete message, or None if the server closed the socket.

        Raises:
            TimeoutError: nothing complete arrived within ``timeout``.
        """
        while True:
            frame = self.framer.next_frame()
            if frame is not None:
                return frame
            if not wait_readable(self.sock, self.timeout if timeout is None else timeout):
                raise TimeoutError("no message from the server")
            try:
                data, fds = recv_chunk(self.sock, self.framer.bytes_wanted())
            except ConnectionResetError:  # closed with our unread bytes in its buffer
                return None
            if not data:
                for fd in fds:
                    os.close(fd)
                return None
            self.framer.feed(data, fds)

    def request(self, command: int, payload: bytes = b"", fds: list[int] | None = None,
                flags: int = 0) -> tuple[w.Header, bytes, list[int]]:
        """Send a command and wait for its reply, serving DMA requests meanwhile.

        Raises:
            VfioUserError: an error reply (errno from the server).
            ConnectionError: the server closed the connection.
        """
        msg_id = self.send(command, payload, fds, flags=flags)
        return self.wait_reply(msg_id, command)

    def wait_reply(self, msg_id: int, command: int) -> tuple[w.Header, bytes, list[int]]:
        """Wait for the reply to ``msg_id`` (sent earlier with :meth:`send`), serving
        the server's DMA requests meanwhile; replies to other ids are dropped.

        Raises:
            VfioUserError: an error reply (errno from the server).
            ConnectionError: the server closed the connection.
            TimeoutError: nothing arrived within the client's timeout.
        """
        while True:
            frame = self.receive()
            if frame is None:
                raise ConnectionError("server closed the connection")
            hdr = frame.header
            if hdr.flags & w.MSG_TYPE_MASK == w.MSG_TYPE_COMMAND:
                self._serve(frame)
                continue
            if hdr.msg_id != msg_id:
                frame.close_fds()
                continue
            if hdr.flags & w.MsgFlag.ERROR:
                frame.close_fds()
                raise VfioUserError(hdr.error, f"{_name(command)}: {os.strerror(hdr.error)}")
            return hdr, frame.payload, frame.fds

    def poll_requests(self, timeout: float = 0.0) -> int:
        """Serve server->client requests that arrive within ``timeout``; returns how many."""
        served = 0
        while wait_readable(self.sock, timeout):
            frame = self.receive()
            if frame is None:
                break
            self._serve(frame)
            served += 1
            timeout = 0.0
        return served

    def _serve(self, frame: Frame) -> None:
        """Answer DMA_READ / DMA_WRITE from our memory areas."""
        hdr = frame.header
        frame.close_fds()
        self.dma_requests += 1
        short = self.dma_layout is DmaLayout.U32_COUNT
        head_cls = w.QemuDmaAccess if short else w.DmaAccess
        reply = w.Header(msg_id=hdr.msg_id, command=hdr.command, flags=w.MsgFlag.REPLY)
        try:
            if hdr.command not in (w.Command.DMA_READ, w.Command.DMA_WRITE):
                raise VfioUserError(errno.ENOSYS, "unknown server request")
            req = head_cls.unpack(frame.payload)
            self.dma_largest = max(self.dma_largest, req.count)
            view = self._dma_view(req.address, req.count)
            if hdr.command == w.Command.DMA_READ:
                data = bytes(view)
                body = frame.payload[:head_cls.SIZE] + data + (b"\0" * 4 if short else b"")
            else:
                data = frame.payload[head_cls.SIZE:head_cls.SIZE + req.count]
                if len(data) != req.count:
                    raise VfioUserError(errno.EINVAL, "short DMA_WRITE")
                view[:] = data
                body = b"" if short else frame.payload[:head_cls.SIZE]
        except (VfioUserError, ValueError) as exc:
            err = exc.errno if isinstance(exc, VfioUserError) and exc.errno else errno.EFAULT
            reply.flags |= w.MsgFlag.ERROR
            reply.error = err
            body = b""
        if not hdr.flags & w.MsgFlag.NO_REPLY:
            send_message(self.sock, encode(reply, body), [])

    def _dma_view(self, address: int, count: int) -> memoryview:
        for area in self.areas:
            if area.address <= address and address + count <= area.address + area.size:
                off = address - area.address
                return area.view()[off:off + count]
        raise VfioUserError(errno.EFAULT, f"DMA to unmapped {address:#x}+{count}")

    # ------------------------------------------------------------ memory
    def map_memfd(self, address: int, size: int, *, share_fd: bool = True,
                  readable: bool = True, writable: bool = True) -> MemoryArea:
        """Create ``size`` bytes of memfd memory at client ``address`` and DMA_MAP it.

        With ``share_fd`` False the server gets no fd and must use DMA messages.
        The memfd allows sealing, as QEMU's memory-backend-memfd: the server
        seals it against shrinking and maps it.
        """
        fd = os.memfd_create(f"client-mem-{address:#x}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        area = MemoryArea(address, size, mm, fd)
        self.areas.append(area)
        flags = (w.DmaMapFlag.READ if readable else 0) | (w.DmaMapFlag.WRITE if writable else 0)
        self.dma_map(address, size, fd if share_fd else None, 0, flags)
        return area

    def dma_map(self, address: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = w.DmaMapFlag.READ | w.DmaMapFlag.WRITE) -> None:
        req = w.DmaMap(flags=flags, offset=offset, address=address, size=size)
        self.request(w.Command.DMA_MAP, req.pack(), [fd] if fd is not None else [])

    def dma_unmap(self, address: int, size: int, flags: int = 0) -> None:
        self.request(w.Command.DMA_UNMAP, w.DmaUnmap(flags=flags, address=address, size=size).pack())

    def memory(self, address: int, count: int) -> memoryview:
        """Our own view of client memory (what a guest would see)."""
        return self._dma_view(address, count)

    # ------------------------------------------------------------ device
    def device_info(self) -> w.DeviceInfo:
        _, payload, _ = self.request(w.Command.DEVICE_GET_INFO, w.DeviceInfo().pack())
        return w.DeviceInfo.unpack(payload)

    def region_info(self, index: int, argsz: int = 256) -> RegionInfoReply:
        req = w.RegionInfo(argsz=argsz, index=index)
        _, payload, fds = self.request(w.Command.DEVICE_GET_REGION_INFO, req.pack())
        info = w.RegionInfo.unpack(payload)
        areas: list[tuple[int, int]] = []
        off = info.cap_offset if info.flags & w.RegionFlag.CAPS else 0
        while off:
            cap = w.CapHeader.unpack(payload, off)
            if cap.id == w.CAP_SPARSE_MMAP:
                head = w.SparseMmapHead.unpack(payload, off + w.CapHeader.SIZE)
                base = off + w.CapHeader.SIZE + w.SparseMmapHead.SIZE
                for i in range(head.nr_areas):
                    a = w.SparseMmapArea.unpack(payload, base + i * w.SparseMmapArea.SIZE)
                    areas.append((a.offset, a.size))
            off = cap.next
        return RegionInfoReply(info, areas, fds[0] if fds else None)

    def irq_info(self, index: int) -> w.IrqInfo:
        _, payload, _ = self.request(w.Command.DEVICE_GET_IRQ_INFO, w.IrqInfo(index=index).pack())
        return w.IrqInfo.unpack(payload)

    def set_irqs(self, index: int, start: int, count: int, flags: int,
                 fds: list[int] | None = None, data: bytes = b"") -> None:
        req = w.IrqSet(argsz=w.IrqSet.SIZE + len(data), flags=flags, index=index, start=start,
                       count=count)
        self.request(w.Command.DEVICE_SET_IRQS, req.pack() + data, fds)

    def set_irq_eventfds(self, index: int, fds: list[int], start: int = 0) -> None:
        flags = w.IrqSetFlag.DATA_EVENTFD | w.IrqSetFlag.ACTION_TRIGGER
        self.set_irqs(index, start, len(fds), flags, fds)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        req = w.RegionAccess(offset=offset, region=index, count=count)
        _, payload, _ = self.request(w.Command.REGION_READ, req.pack())
        got = w.RegionAccess.unpack(payload)
        data = payload[w.RegionAccess.SIZE:]
        if got.count != count or len(data) != count:
            raise VfioUserError(errno.EIO, f"short region read {len(data)}/{count}")
        return data

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        """Write to a region; ``posted`` sets No_reply, as QEMU does for BAR writes."""
        req = w.RegionAccess(offset=offset, region=index, count=len(data)).pack() + data
        if posted:
            self.send(w.Command.REGION_WRITE, req, flags=w.MsgFlag.NO_REPLY)
        else:
            self.request(w.Command.REGION_WRITE, req)

    def read32(self, index: int, offset: int) -> int:
        return int.from_bytes(self.region_read(index, offset, 4), "little")

    def write32(self, index: int, offset: int, value: int, *, posted: bool = False) -> None:
        self.region_write(index, offset, value.to_bytes(4, "little"), posted=posted)

    def read64(self, index: int, offset: int) -> int:
        return int.from_bytes(self.region_read(index, offset, 8), "little")

    def write64(self, index: int, offset: int, value: int) -> None:
        self.region_write(index, offset, value.to_bytes(8, "little"))

    def reset(self) -> None:
        self.request(w.Command.DEVICE_RESET)


def new_eventfd() -> int:
    """A non-blocking eventfd for an interrupt."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def eventfd_count(fd: int) -> int:
    """Read (and reset) an eventfd's counter; 0 when it was not signalled."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def _name(command: int) -> str:
    try:
        return w.Command(command).name
    except ValueError:
        return str(command)
