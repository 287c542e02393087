"""The vhost-user back-end's tables: what a device offers its connection
(:class:`VhostUserBackend`), the connection's states and transitions, how each
request is framed (:data:`SPECS`: payload sizes, fds, reply body, protocol
feature gate) and which requests each state allows (:data:`ALLOWED`), and a
received request (:class:`Message`).  :mod:`appliance.net.vhost_protocol`
checks every request against them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.framing import Frame
from appliance.memory import ClientMemory
from appliance.net import vhost_wire as vw
from appliance.net.vhost_wire import ProtocolFeature as PF
from appliance.net.vhost_wire import Request as R

MAX_MEM_SLOTS = 32  # GET_MAX_MEM_SLOTS; also the ClientMemory region limit
# A plain int: ``~`` of an IntFlag only inverts within the flag's members.
OFFERED_PROTOCOL_FEATURES = int(PF.MQ | PF.LOG_SHMFD | PF.RARP | PF.REPLY_ACK | PF.MTU
                                | PF.RESET_DEVICE | PF.CONFIGURE_MEM_SLOTS | PF.STATUS)


class VhostUserBackend(Protocol):
    """What a vhost-user device offers its connection: one method per request.

    Methods that receive an fd own it only when they return normally; when
    they raise, the connection closes it.
    """

    name: str

    @property
    def num_vrings(self) -> int: ...

    def device_features(self) -> int: ...

    def max_queue_pairs(self) -> int: ...

    def set_features(self, features: int) -> None: ...

    def set_protocol_features(self, features: int) -> None: ...

    def set_memory(self, memory: ClientMemory | None) -> None:
        """None: drop every view of the current memory (it is about to change)."""

    def set_vring_num(self, index: int, num: int) -> None: ...

    def set_vring_addr(self, addr: vw.VringAddr) -> None: ...

    def set_vring_base(self, index: int, base: int) -> None: ...

    def get_vring_base(self, index: int) -> int: ...

    def set_vring_kick(self, index: int, fd: int | None) -> None: ...

    def set_vring_call(self, index: int, fd: int | None) -> None: ...

    def set_vring_err(self, index: int, fd: int | None) -> None: ...

    def set_vring_enable(self, index: int, enable: bool) -> None: ...

    def set_status(self, status: int) -> None: ...

    def get_status(self) -> int: ...

    def set_mtu(self, mtu: int) -> None: ...

    def set_log(self, bitmap: Any) -> None:
        """The shared dirty log (an mmap) from SET_LOG_BASE; None when it goes away."""

    def send_rarp(self, mac: bytes) -> None: ...

    def reset(self) -> None: ...

    def disconnect(self) -> None: ...


class ConnState(enum.Enum):
    AWAIT_OWNER = "await-owner"
    OWNED = "owned"
    CLOSED = "closed"


# Connection state machine: state -> {event: next state}.
TRANSITIONS: dict[ConnState, dict[str, ConnState]] = {
    ConnState.AWAIT_OWNER: {"set_owner": ConnState.OWNED, "close": ConnState.CLOSED},
    ConnState.OWNED: {"reset_owner": ConnState.OWNED, "reset_device": ConnState.OWNED,
                      "close": ConnState.CLOSED},
    ConnState.CLOSED: {"close": ConnState.CLOSED},
}


class Fds(enum.Enum):
    NONE = "none"
    ONE = "one"
    OPTIONAL_ONE = "zero or one"  # REM_MEM_REG: "MAY accept ... one file descriptor"
    PER_REGION = "one per region"
    VRING = "one unless bit 8 (no fd) is set"


@dataclass(frozen=True)
class Spec:
    """How a request is framed: payload sizes, fds, reply body, protocol-feature gate."""

    sizes: tuple[int, ...] | None  # None: the handler checks (SET_MEM_TABLE)
    fds: Fds = Fds.NONE
    reply: bool = False
    gate: PF | None = None


SPECS: dict[R, Spec] = {
    R.GET_FEATURES: Spec((0,), reply=True),
    R.SET_FEATURES: Spec((8,)),
    R.SET_OWNER: Spec((0,)),
    R.RESET_OWNER: Spec((0,)),
    R.SET_MEM_TABLE: Spec(None, Fds.PER_REGION),
    R.SET_LOG_BASE: Spec((vw.LogDescription.SIZE,), Fds.ONE, reply=True, gate=PF.LOG_SHMFD),
    R.SET_LOG_FD: Spec((0, 8), Fds.ONE),
    R.SET_VRING_NUM: Spec((vw.VringState.SIZE,)),
    R.SET_VRING_ADDR: Spec((vw.VringAddr.SIZE,)),
    R.SET_VRING_BASE: Spec((vw.VringState.SIZE,)),
    R.GET_VRING_BASE: Spec((vw.VringState.SIZE,), reply=True),
    R.SET_VRING_KICK: Spec((8,), Fds.VRING),
    R.SET_VRING_CALL: Spec((8,), Fds.VRING),
    R.SET_VRING_ERR: Spec((8,), Fds.VRING),
    R.GET_PROTOCOL_FEATURES: Spec((0,), reply=True),
    R.SET_PROTOCOL_FEATURES: Spec((8,)),
    R.GET_QUEUE_NUM: Spec((0,), reply=True, gate=PF.MQ),
    R.SET_VRING_ENABLE: Spec((vw.VringState.SIZE,)),
    R.SEND_RARP: Spec((8,), gate=PF.RARP),
    R.NET_SET_MTU: Spec((8,), gate=PF.MTU),
    R.RESET_DEVICE: Spec((0,), gate=PF.RESET_DEVICE),
    R.GET_MAX_MEM_SLOTS: Spec((0,), reply=True, gate=PF.CONFIGURE_MEM_SLOTS),
    R.ADD_MEM_REG: Spec((vw.SingleMemoryRegion.SIZE,), Fds.ONE, gate=PF.CONFIGURE_MEM_SLOTS),
    R.REM_MEM_REG: Spec((vw.SingleMemoryRegion.SIZE,), Fds.OPTIONAL_ONE,
                        gate=PF.CONFIGURE_MEM_SLOTS),
    R.SET_STATUS: Spec((8,), gate=PF.STATUS),
    R.GET_STATUS: Spec((0,), reply=True, gate=PF.STATUS),
}

# Requests whose reply carries a body of its own: a rejection cannot be a NACK
# (the front-end waits for that body), so it closes the connection.
REPLY_BODY: frozenset[R] = frozenset({r for r, spec in SPECS.items() if spec.reply} | {
    R.IOTLB_MSG, R.GET_CONFIG, R.CREATE_CRYPTO_SESSION, R.POSTCOPY_ADVISE, R.POSTCOPY_END,
    R.GET_INFLIGHT_FD})

# Per-state allow-list, checked before dispatch.  QEMU negotiates protocol
# features (and asks queue and slot counts) before SET_OWNER; DPDK sends
# SET_OWNER first.
ALLOWED: dict[ConnState, frozenset[R]] = {
    ConnState.AWAIT_OWNER: frozenset({R.GET_FEATURES, R.GET_PROTOCOL_FEATURES,
                                      R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
                                      R.GET_MAX_MEM_SLOTS, R.SET_OWNER}),
    ConnState.OWNED: frozenset(SPECS) - {R.SET_OWNER},
    ConnState.CLOSED: frozenset(),
}


#: One complete request: header, payload and the fds not yet handed on.
Message = Frame[vw.Header]


@dataclass(frozen=True)
class NegotiatedState:
    """What a front-end negotiated on a connection, as a value
    (:meth:`~appliance.net.vhost_protocol.BackendConnection.handoff_state`);
    ``regions``: (guest_phys_addr, memory_size, userspace_addr, mmap_offset)
    in the order of the connection's memory regions, whose fds the runtime
    passes on."""

    state: str
    features: int
    protocol_features: int
    protocol_negotiated: bool
    counters: dict[str, int]
    regions: tuple[tuple[int, int, int, int], ...]
