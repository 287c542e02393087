"""The live-handoff manifest as a typed value (runtime layer).

The source's :meth:`~appliance.runtime.app.Appliance.handoff_export` returns a
frozen :class:`Manifest`: the vfio-user device (its listener, the lock of its
socket path, the connected client's :class:`ConnectionState`), the NVMe
doorbell page, the net ports (:class:`NetState`) and the control plane's
injected faults and link states; every fd is named by its index in the list
that travels beside the manifest as SCM_RIGHTS.  :meth:`Manifest.to_json` is
what the HANDOFF record carries; :meth:`Manifest.from_json` is the
destination's checker: every field of every part is read through
:mod:`appliance.json_fields` (type, range, length, fd index below the number
of fds that came), and a refusal is a :class:`HandoffError` naming the field
(``handoff manifest: vfio_user.client.socket: fd index 7 out of range (0..4)``).
What depends on this process (the configuration, what each fd is, whether a
region maps, irq counts) is checked next by ``Appliance.handoff_check``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from appliance.control.fault_rules import FaultError
from appliance.control.faults import FaultSet
from appliance.errors import ApplianceError, StreamRefused
from appliance.json_fields import Field, Fields
from appliance.runtime.handoff.net import NetState
from appliance.storage.doorbells import PAGE_SIZE
from appliance.vfio_user.handoff_state import ConnectionState

HANDOFF_VERSION = 2  # 2: the DONE frame
T = TypeVar("T")


class HandoffError(StreamRefused):
    """The handoff cannot go on (bad frame, bad manifest, refused by a side)."""


def _error(what: str) -> HandoffError:
    return HandoffError(f"handoff manifest: {what}")


def _part(field: Field, read: Callable[[Any, int], T]) -> T:
    """``read(value, nfds)`` of a part with a checker of its own, its refusal
    (the vfio-user protocol's, the net state's) as the manifest's."""
    try:
        return read(field.value, field.nfds)
    except HandoffError:
        raise
    except ApplianceError as exc:  # LocalProtocolError too
        raise _error(str(exc)) from None


@dataclass(frozen=True)
class ClientEntry:
    """The connected vfio-user client: its socket and its connection's state."""

    socket: int
    conn: ConnectionState

    def to_json(self) -> dict[str, Any]:
        return {"socket": self.socket, "conn": self.conn.to_json()}

    @classmethod
    def from_json(cls, f: Fields) -> ClientEntry:
        """Raises: HandoffError naming the bad field."""
        conn = f["conn"]
        return cls(f["socket"].fd(), _part(conn, lambda obj, nfds: ConnectionState.from_json(
            obj, nfds, where=conn.where)))


@dataclass(frozen=True)
class VfioUserState:
    """The vfio-user device's socket: the listener, its path's lock, the client."""

    path: str
    listener: int
    lock: int
    connections: int
    client: ClientEntry | None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "listener": self.listener, "lock": self.lock,
                "connections": self.connections,
                "client": None if self.client is None else self.client.to_json()}

    @classmethod
    def from_json(cls, obj: Any, nfds: int) -> VfioUserState:
        """Raises: HandoffError naming the bad field."""
        f = Fields(obj, "vfio_user", nfds, _error)
        return cls(f["path"].text(), f["listener"].fd(), f["lock"].fd(),
                   f["connections"].uint(), f.maybe("client", lambda c: ClientEntry.from_json(c.obj())))


@dataclass(frozen=True)
class DoorbellPageState:
    """The NVMe doorbell page's memfd and what the source had latched from it."""

    fd: int
    seen: bytes

    def to_json(self) -> dict[str, Any]:
        return {"fd": self.fd, "seen": self.seen.hex()}

    @classmethod
    def from_json(cls, f: Fields) -> DoorbellPageState:
        """Raises: HandoffError naming the bad field."""
        seen = f["seen"].hex(PAGE_SIZE)
        if len(seen) != PAGE_SIZE:
            raise f["seen"].fail(f"{len(seen)} bytes, not one page")
        return cls(f["fd"].fd(), seen)


@dataclass(frozen=True)
class ControlState:
    """The injected faults (:meth:`FaultSet.export_state`, checked by its own
    :meth:`FaultSet.import_state`) and the ports whose link is down."""

    faults: dict[str, Any]
    links_down: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"faults": self.faults, "links_down": list(self.links_down)}

    @classmethod
    def from_json(cls, f: Fields) -> ControlState:
        """Raises: HandoffError naming the bad field."""
        faults = f["faults"].obj().data
        try:
            FaultSet(clock=lambda: 0.0).import_state(faults)  # checks only
        except FaultError as exc:
            raise f["faults"].fail(str(exc)) from None
        return cls(faults, tuple(x.text() for x in f["links_down"].items()))


@dataclass(frozen=True)
class Manifest:
    """Everything a destination adopts besides the device state records (fds by index)."""

    version: int
    fds: int  # how many fds travel beside it
    vfio_user: VfioUserState
    doorbell_page: DoorbellPageState | None
    net: NetState | None
    control: ControlState | None

    def to_json(self) -> dict[str, Any]:
        """What the HANDOFF record carries (:meth:`from_json` reads it back)."""
        return {"version": self.version, "fds": self.fds, "vfio_user": self.vfio_user.to_json(),
                "doorbell_page": None if self.doorbell_page is None else self.doorbell_page.to_json(),
                "net": None if self.net is None else self.net.to_json(),
                "control": None if self.control is None else self.control.to_json()}

    @classmethod
    def from_json(cls, obj: Any, nfds: int) -> Manifest:
        """The manifest of a HANDOFF record, checked whole; ``nfds``: how many fds came.

        Raises:
            HandoffError: not an object, another version, another number of
                fds than came, or the first field of any part that does not fit.
        """
        if not isinstance(obj, dict):
            raise HandoffError("handoff manifest is not an object")
        version, count = obj.get("version"), obj.get("fds")
        if isinstance(version, bool) or version != HANDOFF_VERSION:
            raise HandoffError(f"handoff manifest version {version!r}, "
                               f"this side speaks {HANDOFF_VERSION}")
        if isinstance(count, bool) or count != nfds:
            raise HandoffError(f"the manifest names {count!r} fds, {nfds} came")
        f = Fields(obj, "", nfds, _error)
        return cls(HANDOFF_VERSION, nfds, _part(f["vfio_user"], VfioUserState.from_json),
                   f.maybe("doorbell_page", lambda d: DoorbellPageState.from_json(d.obj())),
                   f.maybe("net", lambda n: _part(n, NetState.from_json)),
                   f.maybe("control", lambda c: ControlState.from_json(c.obj())))
