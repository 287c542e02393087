"""Sans-I/O vhost-user backend connection (qemu/qemu docs/interop/vhost-user.rst).

Theory of operation
-------------------
One :class:`BackendConnection` serves one front-end socket.  The runtime reads
at most :meth:`~BackendConnection.bytes_wanted` bytes at a time (first the
12-byte header, then exactly the payload) so SCM_RIGHTS fds stay with their
message, feeds each chunk and its fds to :meth:`~BackendConnection.receive_data`,
calls :meth:`~BackendConnection.process` and writes what
:meth:`~BackendConnection.data_to_send` returns.  The connection never touches a
socket or an eventfd: ring fds go to the device (the :class:`VhostUserBackend`
handler), which hands them to runtime callbacks.

Every request is checked in this order, each against a table:

1. header: version 1, no reply bit, no reserved flag bit (else the stream is
   not a vhost-user front-end's: close);
2. request known and served (:data:`SPECS`);
3. allowed in the connection state (:data:`ALLOWED`: before SET_OWNER only
   the negotiation queries and SET_OWNER);
4. gated protocol feature negotiated (``Spec.gate``);
5. payload size exact for the request; fd count as the request takes them
   (none, one, one per region, or one unless the "no fd" bit 8 is set);
6. payload fields: ring index in range, reserved bits clear, a kick, call or
   err fd an eventfd (the runtime's ``is_eventfd``), then semantics in the
   handler (ring state, memory bounds, limits).

A rejection closes every fd the message carried, then answers with the
protocol's own error: a NACK (a non-zero u64 reply) when REPLY_ACK is
negotiated and the front-end set need_reply on a request without a reply
body; otherwise nothing can tell the front-end, so the connection closes (only
this one).  Requests with a reply body (GET_*) always get exactly that reply.

Client memory (SET_MEM_TABLE, ADD/REM_MEM_REG) belongs to the connection: one
:class:`~appliance.memory.ClientMemory` per connection, where each region is
mmap'd from its fd at ``mmap_offset``, keyed by ``guest_phys_addr`` with the
front-end's ``userspace_addr`` as the region's user address.  A new table is
built and mapped completely before it replaces the old one (a failure leaves
the old table in place); the device is told to let go of its views first and
gets the new memory after, so rings keep their indices across a remap.

Live handoff: another process rebuilds a connection by :meth:`~BackendConnection.replay`-ing
the requests that led to its state (the same checks and handlers, no reply) and
takes back a request read only in part with :meth:`~BackendConnection.restore_input`.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
from collections import deque
from collections.abc import Callable

from appliance.errors import LocalProtocolError, RemoteProtocolError
from appliance.framing import Framer
from appliance.memory import ADDRESS_LIMIT, ClientMemory, MapError, mmap_unshrinkable
from appliance.net import vhost_wire as vw
from appliance.net.vhost_requests import (
    ALLOWED,
    MAX_MEM_SLOTS,
    OFFERED_PROTOCOL_FEATURES,
    REPLY_BODY,
    SPECS,
    TRANSITIONS,
    ConnState,
    Fds,
    Message,
    NegotiatedState,
    Spec,
    VhostUserBackend,
)
from appliance.net.vhost_wire import ProtocolFeature as PF
from appliance.net.vhost_wire import Request as R
from appliance.protocol_common import Reject, close_quietly, require, step

# Declared in appliance.net.vhost_requests, used by importers of this module.
__all__ = ["ALLOWED", "MAX_MEM_SLOTS", "OFFERED_PROTOCOL_FEATURES", "SPECS", "TRANSITIONS",
           "BackendConnection", "ConnState", "Message", "Reject", "VhostUserBackend"]

log = logging.getLogger("appliance.net.vhost")

def _name(request: int) -> str:
    try:
        return R(request).name
    except ValueError:
        return f"request {request}"


class BackendConnection:
    """The back-end side of one vhost-user connection."""

    def __init__(self, handler: VhostUserBackend, name: str = "vhost-user",
                 max_mem_slots: int = MAX_MEM_SLOTS,
                 is_eventfd: Callable[[int], bool] | None = None,
                 map_unsealed: bool = False) -> None:
        """``is_eventfd``: how the runtime tells an eventfd from other fds; with it,
        a kick, call or err fd that is not one is refused (None: not checked).
        ``map_unsealed``: see :class:`~appliance.memory.ClientMemory`
        (``net.map_unsealed_memory``)."""
        self.map_unsealed = map_unsealed
        self.handler = handler
        self.is_eventfd = is_eventfd
        self.name = name
        self.state = ConnState.AWAIT_OWNER
        self.max_mem_slots = max_mem_slots
        self.features = 0  # acked virtio features (SET_FEATURES)
        self.protocol_features = 0  # acked protocol features
        self.protocol_negotiated = False  # SET_PROTOCOL_FEATURES was received
        self.memory = ClientMemory(max_regions=max_mem_slots, map_unsealed=map_unsealed,
                                   guard_unsealed=True)
        self.log_mm: mmap.mmap | None = None
        self.log_fd: int | None = None
        self.close_reason = ""
        self.counters = {"messages": 0, "rejected": 0, "nacks": 0}
        self.framer = Framer(vw.Header.unpack, vw.HEADER_SIZE, vw.MAX_PAYLOAD,
                             size_counts_header=False)
        self._messages: deque[Message] = deque()
        self._out: list[bytes] = []
        self._handlers = {
            R.GET_FEATURES: self._get_features,
            R.SET_FEATURES: self._set_features,
            R.SET_OWNER: self._set_owner,
            R.RESET_OWNER: self._reset_owner,
            R.SET_MEM_TABLE: self._set_mem_table,
            R.SET_LOG_BASE: self._set_log_base,
            R.SET_LOG_FD: self._set_log_fd,
            R.SET_VRING_NUM: self._set_vring_num,
            R.SET_VRING_ADDR: self._set_vring_addr,
            R.SET_VRING_BASE: self._set_vring_base,
            R.GET_VRING_BASE: self._get_vring_base,
            R.SET_VRING_KICK: self._set_vring_fd,
            R.SET_VRING_CALL: self._set_vring_fd,
            R.SET_VRING_ERR: self._set_vring_fd,
            R.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.GET_QUEUE_NUM: self._get_queue_num,
            R.SET_VRING_ENABLE: self._set_vring_enable,
            R.SEND_RARP: self._send_rarp,
            R.NET_SET_MTU: self._net_set_mtu,
            R.RESET_DEVICE: self._reset_device,
            R.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            R.ADD_MEM_REG: self._add_mem_reg,
            R.REM_MEM_REG: self._rem_mem_reg,
            R.SET_STATUS: self._set_status,
            R.GET_STATUS: self._get_status,
        }
        assert set(self._handlers) == set(SPECS)
        handler.set_memory(self.memory)

    # ------------------------------------------------------------ I/O surface
    def bytes_wanted(self) -> int:
        """The most bytes the runtime may read for the next chunk (never 0)."""
        return self.framer.bytes_wanted()

    def receive_data(self, data: bytes, fds: list[int]) -> None:
        """Feed one chunk (at most :meth:`bytes_wanted` bytes) and its fds; b"" = EOF.

        Raises:
            RemoteProtocolError: the stream cannot be framed (oversized payload,
                overlong chunk); the connection is closed already.
        """
        if self.state is ConnState.CLOSED:
            for fd in fds:
                close_quietly(fd)
            return
        if not data:
            for fd in fds:
                close_quietly(fd)
            self.close("front-end closed the connection")
            return
        try:
            self.framer.feed(data, fds)  # closes the fds of an overlong chunk
        except RemoteProtocolError:
            self.close("reader fed more than one message")
            raise RemoteProtocolError(f"{self.name}: chunk larger than the message") from None
        msg = self.framer.next_frame()  # a chunk completes at most one request
        if msg is None:
            return
        if msg.oversized:
            msg.close_fds()
            size, request = msg.header.size, msg.header.request
            self.close(f"{_name(request)} payload of {size} bytes exceeds {vw.MAX_PAYLOAD}")
            raise RemoteProtocolError(f"{self.name}: {self.close_reason}")
        self._messages.append(msg)

    def process(self) -> None:
        """Dispatch every complete request; replies go to :meth:`data_to_send`."""
        while self._messages:
            msg = self._messages.popleft()
            if self.state is ConnState.CLOSED:
                msg.close_fds()
                continue
            self._dispatch(msg)

    def data_to_send(self) -> list[bytes]:
        """Replies to write, in order (the back-end never sends fds)."""
        out, self._out = self._out, []
        return out

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED

    def close(self, reason: str = "closed") -> None:
        """End the connection: the device stops its rings, memory is unmapped, fds closed."""
        if self.state is ConnState.CLOSED:
            return
        self._transition("close")
        self.close_reason = reason
        self.framer.close()
        while self._messages:
            self._messages.popleft().close_fds()
        self.handler.disconnect()
        self.memory.unmap_all()
        self._drop_log()

    # ------------------------------------------------------------ live handoff
    def handoff_blocker(self) -> str:
        """Why this connection cannot move to another process faithfully ("" if it can)."""
        if self.state is ConnState.CLOSED:
            return f"the connection is closed ({self.close_reason})"
        if self.log_mm is not None:
            return "dirty logging is active (SET_LOG_BASE: the front-end is live-migrating)"
        if self._messages or self._out:
            return "requests or replies are still queued"
        return ""

    def handoff_state(self) -> NegotiatedState:
        """What was negotiated, as a value; a destination restores it by
        replaying the requests that set it (appliance.runtime.handoff.net)."""
        return NegotiatedState(self.state.value, self.features, self.protocol_features,
                               self.protocol_negotiated, dict(self.counters),
                               tuple((r.address, r.size, r.user_address or 0, r.fd_offset)
                                     for r in self.memory.regions))

    def pending_input(self) -> tuple[bytes, list[int]]:
        """The bytes and fds of a request not yet complete (read so far, kept here)."""
        return self.framer.pending()

    def replay(self, request: R, payload: bytes, fds: list[int]) -> None:
        """Apply one request as if a front-end had sent it, without replying.

        A handoff rebuilds a connection this way, so a state another process
        sends passes the checks and handlers a live request does.  ``fds``
        belong to the request: a handler keeps some, the rest are closed.

        Raises:
            LocalProtocolError: the request is refused (its fds are closed).
        """
        msg = Message(vw.Header(request=int(request), flags=vw.VERSION, size=len(payload)),
                      payload, list(fds))
        try:
            require(self.state is not ConnState.CLOSED, errno.EINVAL, "the connection is closed")
            checked, _ = self._check(msg)
            self._handlers[checked](msg)
        finally:
            msg.close_fds()

    def restore_input(self, data: bytes, fds: list[int]) -> None:
        """Take over the start of a request another process had read (handoff).

        The fds are owned here from now on (closed with the connection).

        Raises:
            LocalProtocolError: the bytes complete a request or cannot be framed.
        """
        if not data:
            for fd in fds:
                close_quietly(fd)
            require(not fds, errno.EINVAL, "fds of a partial request without its bytes")
            return
        try:
            while data:
                n = min(len(data), self.bytes_wanted())
                chunk_fds, fds = fds, []  # receive_data owns them from here
                self.receive_data(data[:n], chunk_fds)
                data = data[n:]
        except RemoteProtocolError as exc:
            raise Reject(f"partial request: {exc}") from None
        if self._messages:
            while self._messages:
                self._messages.popleft().close_fds()
            raise Reject("the partial request is complete")
        require(self.state is not ConnState.CLOSED, errno.EINVAL,
                f"partial request: {self.close_reason}")

    # ------------------------------------------------------------ dispatch
    def _transition(self, event: str) -> None:
        self.state = step(TRANSITIONS, self.state, event, Reject)

    def _acked(self, feature: PF) -> bool:
        return bool(self.protocol_features & feature)

    def _dispatch(self, msg: Message) -> None:
        hdr = msg.header
        self.counters["messages"] += 1
        need_reply = bool(hdr.flags & vw.FLAG_NEED_REPLY)
        can_nack = need_reply and hdr.request not in REPLY_BODY
        try:
            if (vw.HEADER_FLAGS.get(hdr.flags, "version") != vw.VERSION
                    or hdr.flags & vw.FLAG_REPLY or hdr.flags & vw.HEADER_FLAGS.reserved_mask):
                self.close(f"{_name(hdr.request)}: bad header flags {hdr.flags:#x}")
                log.warning("%s: %s; closing", self.name, self.close_reason)
                return
            request, spec = self._check(msg)
            payload = self._handlers[request](msg)
            if spec.reply:
                assert payload is not None
                self._reply(hdr.request, payload)
            elif need_reply and self._acked(PF.REPLY_ACK):
                self._reply(hdr.request, vw.U64(value=0).pack())
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s size=%d -> ok", self.name, _name(hdr.request), hdr.size)
        except LocalProtocolError as exc:
            self.counters["rejected"] += 1
            msg.close_fds()
            err = exc.errno or errno.EINVAL
            if can_nack and self._acked(PF.REPLY_ACK):
                self.counters["nacks"] += 1
                log.warning("%s: %s rejected: %s (NACK %d)", self.name, _name(hdr.request), exc, err)
                self._reply(hdr.request, vw.U64(value=err).pack())
            else:
                self.close(f"{_name(hdr.request)} rejected: {exc}")
                log.warning("%s: %s; closing", self.name, self.close_reason)
        finally:
            msg.close_fds()

    def _check(self, msg: Message) -> tuple[R, Spec]:
        hdr = msg.header
        try:
            request = R(hdr.request)
        except ValueError:
            raise Reject(f"unknown request {hdr.request}") from None
        spec = SPECS.get(request)
        require(spec is not None, errno.ENOTSUP, f"{request.name} is not supported")
        assert spec is not None
        require(request in ALLOWED[self.state], errno.EINVAL,
                f"{request.name} not allowed in state {self.state.value}")
        require(spec.gate is None or self._acked(spec.gate), errno.ENOTSUP,
                f"{request.name} needs protocol feature {spec.gate!r}")
        require(spec.sizes is None or hdr.size in spec.sizes, errno.EINVAL,
                f"{request.name} payload is {hdr.size} bytes, expected {spec.sizes}")
        n = len(msg.fds)
        if spec.fds is Fds.NONE:
            require(n == 0, errno.EINVAL, f"{request.name} takes no fds, got {n}")
        elif spec.fds is Fds.ONE:
            require(n == 1, errno.EINVAL, f"{request.name} takes one fd, got {n}")
        elif spec.fds is Fds.OPTIONAL_ONE:
            require(n <= 1, errno.EINVAL, f"{request.name} takes at most one fd, got {n}")
        elif spec.fds is Fds.VRING:
            value = vw.U64.unpack(msg.payload).value
            want = 0 if value & vw.VRING_NOFD else 1
            require(n == want, errno.EINVAL,
                    f"{request.name} with nofd={int(not want)} takes {want} fd, got {n}")
        # PER_REGION: checked against the region count by the handler.
        return request, spec

    def _reply(self, request: int, payload: bytes) -> None:
        header = vw.Header(request=request, flags=vw.REPLY_FLAGS, size=len(payload))
        self._out.append(header.pack() + payload)

    def _vring_index(self, index: int) -> int:
        require(index < self.handler.num_vrings, errno.EINVAL,
                f"vring index {index} out of range (the device has {self.handler.num_vrings})")
        return index

    # ------------------------------------------------------------ negotiation
    def _get_features(self, msg: Message) -> bytes:
        return vw.U64(value=self.handler.device_features()).pack()

    def _set_features(self, msg: Message) -> None:
        value = vw.U64.unpack(msg.payload).value
        offered = self.handler.device_features()
        require(not value & ~offered, errno.EINVAL,
                f"features {value & ~offered:#x} were not offered")
        self.handler.set_features(value)
        self.features = value

    def _get_protocol_features(self, msg: Message) -> bytes:
        return vw.U64(value=OFFERED_PROTOCOL_FEATURES).pack()

    def _set_protocol_features(self, msg: Message) -> None:
        value = vw.U64.unpack(msg.payload).value
        require(not value & ~OFFERED_PROTOCOL_FEATURES, errno.EINVAL,
                f"protocol features {value & ~OFFERED_PROTOCOL_FEATURES:#x} were not offered")
        self.handler.set_protocol_features(value)
        self.protocol_features = value
        self.protocol_negotiated = True

    def _set_owner(self, msg: Message) -> None:
        self._transition("set_owner")

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated: "back-ends either ignore this message, or use it to disable
        # all rings".  We stop and forget every ring; memory and features stay.
        self._transition("reset_owner")
        self.handler.reset()

    def _reset_device(self, msg: Message) -> None:
        self._transition("reset_device")
        self.handler.reset()
        self.features = 0
        self.handler.set_features(0)

    def _get_queue_num(self, msg: Message) -> bytes:
        return vw.U64(value=self.handler.max_queue_pairs()).pack()

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return vw.U64(value=self.max_mem_slots).pack()

    def _set_status(self, msg: Message) -> None:
        value = vw.U64.unpack(msg.payload).value
        require(value <= 0xFF, errno.EINVAL, f"device status {value:#x} does not fit a byte")
        self.handler.set_status(value)

    def _get_status(self, msg: Message) -> bytes:
        return vw.U64(value=self.handler.get_status()).pack()

    def _net_set_mtu(self, msg: Message) -> None:
        self.handler.set_mtu(vw.U64.unpack(msg.payload).value)

    def _send_rarp(self, msg: Message) -> None:
        mac = msg.payload[:6]
        require(not mac[0] & 1, errno.EINVAL, "SEND_RARP with a multicast MAC")
        self.handler.send_rarp(mac)

    # ------------------------------------------------------------ rings
    def _set_vring_num(self, msg: Message) -> None:
        state = vw.VringState.unpack(msg.payload)
        self.handler.set_vring_num(self._vring_index(state.index), state.num)

    def _set_vring_base(self, msg: Message) -> None:
        state = vw.VringState.unpack(msg.payload)
        self.handler.set_vring_base(self._vring_index(state.index), state.num)

    def _get_vring_base(self, msg: Message) -> bytes:
        state = vw.VringState.unpack(msg.payload)
        index = self._vring_index(state.index)
        return vw.VringState(index=index, num=self.handler.get_vring_base(index)).pack()

    def _set_vring_addr(self, msg: Message) -> None:
        addr = vw.VringAddr.unpack(msg.payload)
        self._vring_index(addr.index)
        require(not addr.flags & vw.VRING_ADDR_RESERVED, errno.EINVAL,
                f"reserved vring flags {addr.flags:#x}")
        self.handler.set_vring_addr(addr)

    def _set_vring_fd(self, msg: Message) -> None:
        value = vw.U64.unpack(msg.payload).value
        require(not value & vw.VRING_FILE.reserved_mask, errno.EINVAL,
                f"reserved bits in {value:#x}")
        index = self._vring_index(vw.VRING_FILE.get(value, "index"))
        fd = None if value & vw.VRING_NOFD else msg.fds[0]
        # Kick fds are read 8 bytes per kick and call/err fds signalled with a
        # counter write: only an eventfd behaves (a pipe at EOF stays readable).
        require(fd is None or self.is_eventfd is None or self.is_eventfd(fd), errno.EBADF,
                f"vring {index}: the fd is not an eventfd")
        setter = {R.SET_VRING_KICK: self.handler.set_vring_kick,
                  R.SET_VRING_CALL: self.handler.set_vring_call,
                  R.SET_VRING_ERR: self.handler.set_vring_err}[R(msg.header.request)]
        setter(index, fd)
        if fd is not None:
            msg.take_fd(fd)

    def _set_vring_enable(self, msg: Message) -> None:
        require(self.protocol_negotiated or bool(self.features & vw.Feature.PROTOCOL_FEATURES), errno.EINVAL,
                "SET_VRING_ENABLE before VHOST_USER_F_PROTOCOL_FEATURES was negotiated")
        state = vw.VringState.unpack(msg.payload)
        index = self._vring_index(state.index)
        require(state.num in (0, 1), errno.EINVAL, f"vring enable value {state.num}")
        self.handler.set_vring_enable(index, bool(state.num))

    # ------------------------------------------------------------ memory
    @staticmethod
    def _check_region(r: vw.MemoryRegion | vw.SingleMemoryRegion) -> None:
        require(r.memory_size > 0, errno.EINVAL, "memory region of size 0")
        for what, base in (("guest", r.guest_phys_addr), ("user", r.userspace_addr),
                           ("mmap offset", r.mmap_offset)):
            require(base + r.memory_size <= ADDRESS_LIMIT, errno.EINVAL,
                    f"memory region {what} {base:#x}+{r.memory_size:#x} overflows 64 bits")

    def _swap_memory(self, build: ClientMemory) -> None:
        self.handler.set_memory(None)  # rings let go of their views
        old, self.memory = self.memory, build
        if old is not build:
            old.unmap_all()
        self.handler.set_memory(build)

    def _map_region(self, memory: ClientMemory, r: vw.MemoryRegion | vw.SingleMemoryRegion,
                    fd: int) -> None:
        try:
            memory.map(r.guest_phys_addr, r.memory_size, fd=fd, fd_offset=r.mmap_offset,
                       user_address=r.userspace_addr)
        except MapError as exc:
            raise Reject(f"cannot map region: {exc}", exc.errno) from None

    def _set_mem_table(self, msg: Message) -> None:
        body = msg.payload
        require(len(body) >= vw.MemoryHeader.SIZE, errno.EINVAL,
                f"SET_MEM_TABLE payload of {len(body)} bytes")
        n = vw.MemoryHeader.unpack(body).nregions
        require(1 <= n <= vw.MAX_MEM_REGIONS, errno.EINVAL,
                f"{n} memory regions (1..{vw.MAX_MEM_REGIONS})")
        # QEMU and DPDK send exactly n regions; the full 8-region struct is accepted too.
        full = vw.MemoryHeader.SIZE + vw.MemoryRegion.SIZE * vw.MAX_MEM_REGIONS
        require(len(body) in (vw.MemoryHeader.SIZE + vw.MemoryRegion.SIZE * n, full), errno.EINVAL,
                f"SET_MEM_TABLE payload of {len(body)} bytes for {n} regions")
        require(len(msg.fds) == n, errno.EINVAL,
                f"SET_MEM_TABLE with {n} regions carries {len(msg.fds)} fds")
        regions = [vw.MemoryRegion.unpack(body, vw.MemoryHeader.SIZE + vw.MemoryRegion.SIZE * i)
                   for i in range(n)]
        for r in regions:
            self._check_region(r)
        for key in ("guest_phys_addr", "userspace_addr"):
            spans = sorted((getattr(r, key), getattr(r, key) + r.memory_size) for r in regions)
            for (_, end), (start, _) in itertools.pairwise(spans):
                require(start >= end, errno.EINVAL, f"memory regions overlap ({key} {start:#x})")
        build = ClientMemory(max_regions=self.max_mem_slots, map_unsealed=self.map_unsealed,
                             guard_unsealed=True)
        try:
            for r, fd in zip(regions, list(msg.fds)):
                self._map_region(build, r, msg.take_fd(fd))
        except Reject:
            build.unmap_all()
            raise
        self._swap_memory(build)

    def _add_mem_reg(self, msg: Message) -> None:
        r = vw.SingleMemoryRegion.unpack(msg.payload)
        self._check_region(r)
        for region in self.memory.regions:
            ua = region.user_address or 0
            require(r.userspace_addr + r.memory_size <= ua or ua + region.size <= r.userspace_addr, errno.EINVAL,
                    f"region user address {r.userspace_addr:#x} overlaps a mapped one")
        self.handler.set_memory(None)
        try:
            self._map_region(self.memory, r, msg.take_fd(msg.fds[0]))
        finally:
            self.handler.set_memory(self.memory)

    def _rem_mem_reg(self, msg: Message) -> None:
        r = vw.SingleMemoryRegion.unpack(msg.payload)
        match = [g for g in self.memory.regions
                 if g.address == r.guest_phys_addr and g.size == r.memory_size
                 and g.user_address == r.userspace_addr]
        require(bool(match), errno.ENOENT,
                f"no region {r.guest_phys_addr:#x}+{r.memory_size:#x} is mapped")
        self.handler.set_memory(None)
        try:
            self.memory.unmap(r.guest_phys_addr, r.memory_size)
        finally:
            self.handler.set_memory(self.memory)
        # A stray fd (older front-ends send one) is closed with the message.

    # ------------------------------------------------------------ dirty log
    def _set_log_base(self, msg: Message) -> bytes:
        desc = vw.LogDescription.unpack(msg.payload)
        require(desc.mmap_size > 0, errno.EINVAL, "log of size 0")
        require(desc.mmap_offset % mmap.ALLOCATIONGRANULARITY == 0, errno.EINVAL,
                f"log offset {desc.mmap_offset:#x} not page aligned")
        try:  # we write into it: a file the front-end could shrink would be a SIGBUS
            mm = mmap_unshrinkable(msg.fds[0], desc.mmap_size, desc.mmap_offset)
        except MapError as exc:
            raise Reject(f"cannot map the dirty log: {exc}", exc.errno) from None
        old, self.log_mm = self.log_mm, mm  # the fd itself is closed with the message
        self.handler.set_log(mm)  # marks go to the new log before we reply
        if old is not None:
            old.close()
        return vw.U64(value=0).pack()

    def _set_log_fd(self, msg: Message) -> None:
        if self.log_fd is not None:
            close_quietly(self.log_fd)
        self.log_fd = msg.take_fd(msg.fds[0])

    def _drop_log(self) -> None:
        if self.log_mm is not None:
            self.handler.set_log(None)
            self.log_mm.close()
            self.log_mm = None
        if self.log_fd is not None:
            close_quietly(self.log_fd)
            self.log_fd = None
