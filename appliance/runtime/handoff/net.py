"""The vhost-user-net half of a live handoff: state out, state checked, state in (runtime layer).

:class:`~appliance.runtime.vhost_user.NetService` moves its connected
front-ends to another appliance process with these helpers
(:mod:`appliance.runtime.handoff.channel` carries the state and the fds):

* :func:`export_net` describes every port (its listener, its connection: the
  negotiated features, memory regions, vrings with their indices and kick,
  call and err eventfds, a request read only in part), the switch's MAC table
  and counters, the responder's and the TAP port's counters, as a frozen
  :class:`NetState` composed of the ``handoff_state()`` values of the
  connection, the port, its rings and the switch.  Each fd is appended to the caller's list and named by
  its index there.
* :meth:`NetState.from_json` checks a received state completely (types,
  ranges, fd indices, lengths: :mod:`appliance.json_fields`) before anything
  is touched, :meth:`NetState.to_json` is what the manifest carries;
  :func:`check_fit` compares it with this process's configuration.
* :func:`replay_requests` turns one connection's state back into the
  vhost-user requests a front-end would have sent (SET_PROTOCOL_FEATURES,
  SET_OWNER, SET_FEATURES, SET_MEM_TABLE, SET_VRING_NUM/BASE/ADDR/CALL/ERR/
  KICK/ENABLE, SET_STATUS, NET_SET_MTU); :func:`build_connection` replays them
  into a fresh :class:`~appliance.net.vhost_protocol.BackendConnection`, so a
  corrupt state is refused by the same checks as a bad request.

A request the source had read only in part (its front-end was mid-send) is
carried as its bytes and fds and fed to the new connection, which reads the
rest from the same socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError, LocalProtocolError
from appliance.json_fields import U16, U32, Field, Fields
from appliance.net import vhost_wire as vw
from appliance.net.port import DEFAULT_MTU, VirtioNetPort
from appliance.net.vhost_protocol import BackendConnection, ConnState
from appliance.net.vhost_wire import Request as R
from appliance.net.vring_state import VringState
from appliance.protocol_common import close_quietly, dup_all
from appliance.runtime import unix

if TYPE_CHECKING:
    from appliance.runtime.vhost_user import NetService

STATE_VERSION = 1
CONN_COUNTERS = ("messages", "rejected", "nacks")
PORT_COUNTERS = ("connections", "rarps", "tx_no_queue")
RING_COUNTERS = ("packets", "bytes", "dropped", "malformed")


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# ---------------------------------------------------------------- export
def handoff_blocker(net: NetService) -> str:
    """Why the ports cannot be handed off faithfully now ("" when they can)."""
    for svc in net.services:
        if svc.session is not None:
            conn = svc.session.conn
            why = conn.handoff_blocker() or svc.port.handoff_blocker()
            if svc.session.out:  # bytes in flight cannot move: wait until it has read them
                why = f"{len(svc.session.out)} bytes of replies not yet read by the front-end"
            unmapped = [r.address for r in conn.memory.regions if r.fd is None]
            if unmapped:
                why = f"memory region {unmapped[0]:#x} has no fd"
            if why:
                return f"{svc.port.name}: {why}"
        elif svc.mode == "server" and svc.listener is None:
            return f"{svc.port.name}: not listening on {svc.path}"
    if net.tap is not None and net.tap.fd is None:
        return f"{net.tap.port.name}: no TAP fd"
    return ""


def export_net(net: NetService, fds: list[int]) -> NetState:
    """The state of every port, composed of its objects' ``handoff_state()``
    values; fds are appended to ``fds`` (not dup'd) and named by their index.

    Raises:
        ApplianceError: the handoff could not be faithful (:func:`handoff_blocker`).
    """
    why = handoff_blocker(net)
    if why:
        raise ApplianceError(f"net: cannot hand off: {why}")

    def ref(fd: int | None) -> int | None:
        if fd is None:
            return None
        fds.append(fd)
        return len(fds) - 1

    def put(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    ports = []
    for svc in net.services:
        port = svc.port
        listener = ref(svc.listener.fileno()) if svc.listener is not None else None
        lock = ref(svc.claim.fd) if svc.claim is not None else None  # moves with the listener
        session = None
        if svc.session is not None:
            conn = svc.session.conn
            negotiated, device = conn.handoff_state(), port.handoff_state()
            regions = []
            for desc, region in zip(negotiated.regions, conn.memory.regions, strict=True):
                if region.fd is None:  # handoff_blocker() refused that already
                    raise ApplianceError(f"net: memory region {region.address:#x} has no fd")
                regions.append(RegionState(*desc, fd=put(region.fd)))
            vrings = tuple(RingState(**asdict(r.ring), enable=r.enable, polled=r.polled,
                                     kick=ref(port.kick[i]), call=ref(port.call[i]),
                                     err=ref(port.err[i])) for i, r in enumerate(device.vrings))
            partial, partial_fds = conn.pending_input()
            session = SessionState(
                socket=put(svc.session.sock.fileno()), state=negotiated.state,
                features=negotiated.features, protocol_features=negotiated.protocol_features,
                protocol_negotiated=negotiated.protocol_negotiated, counters=negotiated.counters,
                regions=tuple(regions), log_fd=ref(conn.log_fd), partial=partial,
                partial_fds=tuple(put(fd) for fd in partial_fds), status=device.status,
                mtu=device.mtu, mtu_told=device.mtu_told, vrings=vrings)
        ports.append(PortState(port.name, mac_text(port.mac), port.queue_pairs, svc.mode, svc.path,
                               listener, lock, port.counters_state(), session))
    resp = net.responder
    tap = None
    if net.tap is not None:
        tap = {"interface": net.tap.port.ifname, "fd": ref(net.tap.fd),
               "counters": dict(net.tap.port.counters)}
    switch_counters, table = net.switch.handoff_state()
    return NetState(tuple(ports), switch_counters, table,
                    {"ip": ".".join(str(b) for b in resp.ip), "mac": mac_text(resp.mac),
                     "ident": resp._ident, "counters": dict(resp.counters)}, tap)


# ---------------------------------------------------------------- the state as a value
def _error(what: str) -> ApplianceError:
    return ApplianceError(f"net handoff state: {what}")


@dataclass(frozen=True)
class RingState(VringState):
    """A ring's :class:`VringState` and the port's own per-ring state: whether it was
    enabled explicitly, whether its kick fd is polled, and its fds by index."""

    enable: bool | None
    polled: bool
    kick: int | None
    call: int | None
    err: int | None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, f: Fields) -> RingState:
        """Raises: ApplianceError naming the bad field."""
        def addr(key: str) -> int | None:
            return f.maybe(key, Field.uint)

        return cls(num=f["num"].uint(U16), desc=addr("desc"), avail=addr("avail"),
                   used=addr("used"), log=f["log"].uint(), flags=f["flags"].uint(U32),
                   last_avail_idx=f["last_avail_idx"].uint(U16), used_idx=f["used_idx"].uint(U16),
                   sync_used=f["sync_used"].flag(), started=f["started"].flag(),
                   enable=f.maybe("enable", Field.flag), polled=f["polled"].flag(),
                   kick=f.maybe("kick", Field.fd), call=f.maybe("call", Field.fd),
                   err=f.maybe("err", Field.fd))


@dataclass(frozen=True)
class RegionState:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, f: Fields) -> RegionState:
        """Raises: ApplianceError naming the bad field."""
        return cls(f["guest_phys_addr"].uint(), f["memory_size"].uint(),
                   f["userspace_addr"].uint(), f["mmap_offset"].uint(), f["fd"].fd())


@dataclass(frozen=True)
class SessionState:
    """A connected front-end: the negotiated state, its memory and rings (fds by index)."""

    socket: int
    state: str
    features: int
    protocol_features: int
    protocol_negotiated: bool
    counters: dict[str, int]
    regions: tuple[RegionState, ...]
    log_fd: int | None
    partial: bytes
    partial_fds: tuple[int, ...]
    status: int
    mtu: int
    mtu_told: bool
    vrings: tuple[RingState, ...]

    def to_json(self) -> dict[str, Any]:
        return {"socket": self.socket, "state": self.state, "features": self.features,
                "protocol_features": self.protocol_features,
                "protocol_negotiated": self.protocol_negotiated, "counters": dict(self.counters),
                "regions": [r.to_json() for r in self.regions], "log_fd": self.log_fd,
                "partial": self.partial.hex(), "partial_fds": list(self.partial_fds),
                "status": self.status, "mtu": self.mtu, "mtu_told": self.mtu_told,
                "vrings": [r.to_json() for r in self.vrings]}

    @classmethod
    def from_json(cls, f: Fields, nrings: int) -> SessionState:
        """Raises: ApplianceError naming the bad field."""
        live = (ConnState.AWAIT_OWNER.value, ConnState.OWNED.value)
        return cls(
            socket=f["socket"].fd(), state=f["state"].text(live), features=f["features"].uint(),
            protocol_features=f["protocol_features"].uint(),
            protocol_negotiated=f["protocol_negotiated"].flag(),
            counters=f["counters"].counters(CONN_COUNTERS),
            regions=tuple(RegionState.from_json(r.obj()) for r in f["regions"].items()),
            log_fd=f.maybe("log_fd", Field.fd),
            partial=f["partial"].hex(vw.HEADER_SIZE + vw.MAX_PAYLOAD),
            partial_fds=tuple(x.fd() for x in f["partial_fds"].items()),
            status=f["status"].uint(0xFF), mtu=f["mtu"].uint(U32), mtu_told=f["mtu_told"].flag(),
            vrings=tuple(RingState.from_json(r.obj()) for r in f["vrings"].items(nrings)))


@dataclass(frozen=True)
class PortState:
    name: str
    mac: str
    queues: int
    mode: str
    socket: str
    listener: int | None
    lock: int | None  # the socket path's lock file (docs/handoff.md)
    counters: dict[str, Any]
    session: SessionState | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "mac": self.mac, "queues": self.queues, "mode": self.mode,
                "socket": self.socket, "listener": self.listener, "lock": self.lock,
                "counters": self.counters,
                "session": None if self.session is None else self.session.to_json()}

    @classmethod
    def from_json(cls, f: Fields) -> PortState:
        """Raises: ApplianceError naming the bad field."""
        queues = f["queues"].uint(255)
        counters = f["counters"].obj()
        rings = [r.counters(RING_COUNTERS) for r in counters["vrings"].items(2 * queues)]
        return cls(
            name=f["name"].text(), mac=f["mac"].text(), queues=queues, mode=f["mode"].text(),
            socket=f["socket"].text(), listener=f.maybe("listener", Field.fd),
            lock=f.maybe("lock", Field.fd),
            counters={**{k: counters[k].uint() for k in PORT_COUNTERS}, "vrings": rings},
            session=f.maybe("session", lambda s: SessionState.from_json(s.obj(), 2 * queues)))


@dataclass(frozen=True)
class NetState:
    """Every port, the switch's counters and MAC table, the responder and the TAP."""

    ports: tuple[PortState, ...]
    switch_counters: dict[str, int]
    table: tuple[tuple[bytes, str, float], ...]  # (MAC, port name, age in seconds)
    responder: dict[str, Any]  # ip, mac, ident, counters
    tap: dict[str, Any] | None  # interface, fd, counters

    def to_json(self) -> dict[str, Any]:
        """What the manifest carries (:meth:`from_json` reads it back)."""
        return {"version": STATE_VERSION, "ports": [p.to_json() for p in self.ports],
                "switch": {"counters": dict(self.switch_counters),
                           "table": [[mac.hex(), name, age] for mac, name, age in self.table]},
                "responder": dict(self.responder), "tap": None if self.tap is None else dict(self.tap)}

    @classmethod
    def from_json(cls, obj: Any, nfds: int) -> NetState:
        """Check a received state completely; ``nfds``: how many fds came.

        Raises:
            ApplianceError: one line naming the first bad field.
        """
        f = Fields(obj, "net", nfds, _error)
        version = f.data.get("version")
        if version != STATE_VERSION:
            raise ApplianceError(f"net handoff state version {version!r}, this side reads "
                                 f"{STATE_VERSION}")
        ports = tuple(PortState.from_json(p.obj()) for p in f["ports"].items())
        sw = f["switch"].obj()
        table = []
        for row in sw["table"].items():
            mac, name, age = row.items(3)
            raw = mac.hex(6)
            if len(raw) != 6:
                raise mac.fail(f"bad MAC {mac.value!r}")
            table.append((raw, name.text(), age.number()))
        resp = f["responder"].obj()
        responder = {"ip": resp["ip"].text(), "mac": resp["mac"].text(),
                     "ident": resp["ident"].uint(U16), "counters": resp["counters"].counters()}
        tap = f.maybe("tap", lambda t: {"interface": t.obj()["interface"].text(),
                                        "fd": t.obj()["fd"].fd(),
                                        "counters": t.obj()["counters"].counters()})
        return cls(ports, sw["counters"].counters(), tuple(table), responder, tap)


def check_fit(net: NetService, state: NetState) -> None:
    """Refuse a state that does not fit this process's net configuration.

    Raises:
        ApplianceError: one line naming the mismatch.
    """
    if net.handed_off:
        raise ApplianceError("net: this process handed its ports off already")
    if len(state.ports) != len(net.services):
        raise ApplianceError(f"net.ports: the source has {len(state.ports)} ports, this "
                             f"process {len(net.services)}")
    for i, (svc, p) in enumerate(zip(net.services, state.ports, strict=True)):
        port, where = svc.port, f"net.ports[{i}]"
        for what, ours, theirs in (("name", port.name, p.name), ("mac", mac_text(port.mac), p.mac),
                                   ("queues", port.queue_pairs, p.queues),
                                   ("mode", svc.mode, p.mode)):
            if ours != theirs:
                raise ApplianceError(f"{where}.{what} differs: {theirs} on the source, {ours} here")
        if svc.session is not None:
            raise ApplianceError(f"{where} ({port.name}): a front-end is connected here already")
        if p.mode == "server" and p.listener is None:
            raise ApplianceError(f"{where} ({port.name}): the source is not listening")
        if (p.listener is None) != (p.lock is None):
            raise ApplianceError(f"{where} ({port.name}): a listener comes with its lock "
                                 "file, or neither comes")
        if p.session is not None and p.session.features & vw.Feature.LOG_ALL:
            raise ApplianceError(f"{where} ({port.name}): dirty logging (LOG_ALL) is active")
    resp = net.responder
    for what, ours, theirs in (("ip", ".".join(str(b) for b in resp.ip), state.responder["ip"]),
                               ("mac", mac_text(resp.mac), state.responder["mac"])):
        if ours != theirs:
            raise ApplianceError(f"net.responder.{what} differs: {theirs} on the source, "
                                 f"{ours} here")
    if (state.tap is None) != (net.tap is None):
        side = "the source" if state.tap is not None else "this process"
        raise ApplianceError(f"net.tap: only {side} has a TAP interface")
    if state.tap is not None and net.tap is not None \
            and state.tap["interface"] != net.tap.port.ifname:
        raise ApplianceError(f"net.tap.name differs: {state.tap['interface']} on the source, "
                             f"{net.tap.port.ifname} here")
    counted: list[tuple[str, dict[str, Any], dict[str, int]]] = [
        ("net.switch.counters", net.switch.counters, state.switch_counters),
        ("net.responder.counters", net.responder.counters, state.responder["counters"])]
    if state.tap is not None and net.tap is not None:
        counted.append(("net.tap.counters", net.tap.port.counters, state.tap["counters"]))
    for label, mine, got in counted:
        if set(mine) != set(got):
            raise ApplianceError(f"{label}: the source counts {sorted(got)}, this process "
                                 f"{sorted(mine)}")
    names = {getattr(p, "name", "?") for p in net.switch.ports}
    if len(state.table) > net.switch.max_entries:
        raise ApplianceError(f"net.switch: the source's MAC table has {len(state.table)} "
                             f"entries, this switch holds {net.switch.max_entries}")
    for _, name, age in state.table:
        if name not in names:
            raise ApplianceError(f"net.switch: the source's MAC table names port {name!r}, "
                                 "which this process does not have")
        if age < 0:
            raise ApplianceError(f"net.switch: a MAC table entry of age {age} s")


# ---------------------------------------------------------------- import
def replay_requests(s: SessionState) -> Iterator[tuple[R, bytes, list[int]]]:
    """The requests that rebuild connection ``s``: (request, payload, fd indices)."""
    def u64(value: int) -> bytes:
        return vw.U64(value=value).pack()

    def vring(request: R, index: int, num: int) -> tuple[R, bytes, list[int]]:
        return request, vw.VringState(index=index, num=num).pack(), []

    if s.protocol_negotiated:
        yield R.SET_PROTOCOL_FEATURES, u64(s.protocol_features), []
    owned = s.state == ConnState.OWNED.value
    if owned:
        yield R.SET_OWNER, b"", []
    if owned or s.features:
        yield R.SET_FEATURES, u64(s.features), []
    if 0 < len(s.regions) <= vw.MAX_MEM_REGIONS:
        body = vw.MemoryHeader(nregions=len(s.regions)).pack() + b"".join(
            vw.MemoryRegion(guest_phys_addr=r.guest_phys_addr, memory_size=r.memory_size,
                            userspace_addr=r.userspace_addr, mmap_offset=r.mmap_offset).pack()
            for r in s.regions)
        yield R.SET_MEM_TABLE, body, [r.fd for r in s.regions]
    else:
        for r in s.regions:  # more than SET_MEM_TABLE carries: CONFIGURE_MEM_SLOTS was used
            yield R.ADD_MEM_REG, vw.SingleMemoryRegion(
                guest_phys_addr=r.guest_phys_addr, memory_size=r.memory_size,
                userspace_addr=r.userspace_addr, mmap_offset=r.mmap_offset).pack(), [r.fd]
    if s.log_fd is not None:
        yield R.SET_LOG_FD, b"", [s.log_fd]
    for i, q in enumerate(s.vrings):
        if q.num:
            yield vring(R.SET_VRING_NUM, i, q.num)
        if q.num or q.last_avail_idx:
            yield vring(R.SET_VRING_BASE, i, q.last_avail_idx)
        if q.desc is not None or q.avail is not None or q.used is not None:
            yield R.SET_VRING_ADDR, vw.VringAddr(
                index=i, flags=q.flags, desc_user_addr=q.desc or 0, used_user_addr=q.used or 0,
                avail_user_addr=q.avail or 0, log_guest_addr=q.log).pack(), []
        for request, fd in ((R.SET_VRING_CALL, q.call), (R.SET_VRING_ERR, q.err)):
            if fd is not None:
                yield request, u64(i), [fd]
        if q.started:
            if q.kick is None:
                yield R.SET_VRING_KICK, u64(i | vw.VRING_NOFD), []
            else:
                yield R.SET_VRING_KICK, u64(i), [q.kick]
        if q.enable is not None:
            yield vring(R.SET_VRING_ENABLE, i, int(q.enable))
    if s.status:
        yield R.SET_STATUS, u64(s.status), []
    if s.mtu_told or s.mtu != DEFAULT_MTU:  # told: it bounds transmit chains (max_frame)
        yield R.NET_SET_MTU, u64(s.mtu), []


def build_connection(port: VirtioNetPort, s: SessionState, fds: list[int]) -> BackendConnection:
    """A connection on ``port`` in the state ``s`` describes, through replayed requests.

    Raises:
        ApplianceError: a request was refused or an fd could not be duplicated;
            the port is back as it was (unconnected) and every copy is closed.
    """
    port.notify = lambda fd: None
    port.retire_fd = close_quietly
    conn = BackendConnection(port, name=port.name, is_eventfd=unix.is_eventfd,
                             map_unsealed=port.map_unsealed_memory)
    try:
        for request, payload, refs in replay_requests(s):
            try:
                conn.replay(request, payload, dup_all(fds, refs))
            except (LocalProtocolError, OSError) as exc:
                raise ApplianceError(f"{port.name}: {request.name} refused: {exc}") from None
        for ring, r in zip(port.rings, s.vrings, strict=True):
            try:
                ring.restore_indices(r.last_avail_idx, r.used_idx, r.sync_used)
            except LocalProtocolError as exc:
                raise ApplianceError(f"{port.name}: {exc}") from None
        try:
            conn.restore_input(s.partial, dup_all(fds, s.partial_fds))
        except (LocalProtocolError, OSError) as exc:
            raise ApplianceError(f"{port.name}: {exc}") from None
        conn.counters = dict(s.counters)
    except BaseException:
        conn.close("handoff refused")
        raise
    return conn
