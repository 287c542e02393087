"""A vfio-user connection's state as a value, checked whole before any of it is adopted
(protocol layer).

A live handoff moves a connection to another process: the negotiated
capabilities, every DMA region (with its fd), the irq eventfds, the message
half read.  :meth:`ConnectionState.from_json` turns the manifest's JSON into a
frozen :class:`ConnectionState`: every field typed, every range, length and fd
index checked (:mod:`appliance.json_fields`), the capabilities by VERSION's own
checker, the half-read message framed as the adopting connection will frame
it.  What depends on the device and on what each fd is (irq ranges, eventfds,
whether a region maps) is checked by the requests that rebuild the connection
(:func:`appliance.vfio_user.server_handoff.replay_requests`), which pass the
same dispatch as a live client's.  Nothing here keeps an fd.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from appliance.errors import LocalProtocolError, RemoteProtocolError
from appliance.json_fields import U16, U32, Field, Fields
from appliance.protocol_common import require
from appliance.vfio_user import wire as w
from appliance.vfio_user.connection_state import (
    MAX_DATA_XFER_SIZE,
    MAX_DMA_MAPS,
    MAX_MSG_FDS,
    PGSIZE,
)
from appliance.vfio_user.framing import Framer

#: The largest message a connection frames (its Framer's limit with our defaults).
MAX_PENDING = w.HEADER_SIZE + 16 + MAX_DATA_XFER_SIZE
MASK_ACTIONS = (int(w.IrqSetFlag.ACTION_MASK), int(w.IrqSetFlag.ACTION_UNMASK))


def _bad(what: str) -> LocalProtocolError:
    return LocalProtocolError(f"bad handoff state: {what}", errno.EINVAL)


@dataclass(frozen=True)
class ClientCaps:
    """What a client announced in VERSION (and a handoff carries on)."""

    max_msg_fds: int = w.DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = w.DEFAULT_MAX_DATA_XFER_SIZE
    write_multiple: bool = False

    def to_json(self) -> dict[str, Any]:
        """As in a VERSION request's capabilities."""
        return {"max_msg_fds": self.max_msg_fds, "max_data_xfer_size": self.max_data_xfer_size,
                "write_multiple": self.write_multiple}


@dataclass(frozen=True)
class RegionState:
    """One DMA region: what its DMA_MAP said (``fd``: an index into the handoff's fds)."""

    address: int
    size: int
    fd: int | None
    fd_offset: int
    readable: bool
    writable: bool

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "size": self.size, "fd_offset": self.fd_offset,
                "readable": self.readable, "writable": self.writable, "fd": self.fd}

    @classmethod
    def from_json(cls, f: Fields) -> RegionState:
        """Raises: LocalProtocolError (EINVAL) naming the bad field."""
        fd = f.maybe("fd", Field.fd)
        offset = f["fd_offset"].uint()
        return cls(f["address"].uint(), f["size"].uint(), fd, offset if fd is not None else 0,
                   f["readable"].flag(), f["writable"].flag())


def _irq_index(f: Field) -> int:
    return f.uint(w.PCI_NUM_IRQS - 1)


@dataclass(frozen=True)
class ConnectionState:
    """Everything :meth:`ServerConnection.handoff_adopt` installs (fds as indexes)."""

    caps: ClientCaps
    next_id: int
    regions: tuple[RegionState, ...]
    irq_fds: tuple[tuple[int, int, int], ...]  # (irq index, sub-index, fd)
    irq_mask_fds: tuple[tuple[int, int, int, int], ...]  # (action, index, sub-index, fd)
    irq_enabled: tuple[tuple[int, int], ...]  # (irq index, count)
    pending: bytes
    pending_fds: tuple[int, ...]
    counters: tuple[tuple[str, int], ...]

    def to_json(self) -> dict[str, Any]:
        """What the manifest carries (:meth:`from_json` reads it back)."""
        return {"caps": self.caps.to_json(), "next_id": self.next_id,
                "regions": [r.to_json() for r in self.regions],
                "irq_fds": [list(x) for x in self.irq_fds],
                "irq_mask_fds": [list(x) for x in self.irq_mask_fds],
                "irq_enabled": [list(x) for x in self.irq_enabled],
                "pending": self.pending.hex(), "pending_fds": list(self.pending_fds),
                "counters": dict(self.counters)}

    @classmethod
    def from_json(cls, obj: Any, nfds: int, max_pending: int = MAX_PENDING,
                  where: str = "conn") -> ConnectionState:
        """The connection state a manifest carries, checked whole (no fd is touched).

        ``nfds``: how many fds came; ``max_pending``: the adopting
        connection's message size limit; ``where``: its path in the manifest
        (for messages).

        Raises:
            LocalProtocolError: EINVAL naming the first field that does not fit.
        """
        f = Fields(obj, where, nfds, _bad)
        try:
            caps = parse_client_caps(f["caps"].value)
        except LocalProtocolError as exc:
            raise f["caps"].fail(str(exc)) from None
        regions = tuple(RegionState.from_json(r.obj()) for r in f["regions"].items(most=MAX_DMA_MAPS))
        enabled: dict[int, int] = {}
        for row in f["irq_enabled"].items():
            index, count = row.items(2)
            if _irq_index(index) in enabled:
                raise row.fail(f"irq {index.value} enabled twice")
            enabled[index.value] = count.uint(U32)
        irqs = []
        for row in f["irq_fds"].items():
            index, sub, fd = row.items(3)
            irqs.append((_irq_index(index), sub.uint(U32), fd.fd()))
            if irqs[-1][1] >= enabled.get(irqs[-1][0], 0):  # SET_IRQS sets fds where it enables
                raise row.fail(f"irq {irqs[-1][0]}.{irqs[-1][1]} out of range: "
                               f"{enabled.get(irqs[-1][0], 0)} enabled")
        masks = []
        for row in f["irq_mask_fds"].items():
            kind, index, sub, fd = row.items(4)
            if kind.uint() not in MASK_ACTIONS:
                raise kind.fail(f"mask action {kind.value} out of range")
            masks.append((kind.value, _irq_index(index), sub.uint(U32), fd.fd()))
        pending = f["pending"].hex(max_pending - 1)
        pending_fds = tuple(x.fd() for x in f["pending_fds"].items(most=MAX_MSG_FDS))
        if pending_fds and not pending:
            raise f["pending_fds"].fail("pending fds without a pending message")
        _check_pending(pending, max_pending, f"{where}.pending")
        return cls(caps, f["next_id"].uint(U16), regions, tuple(irqs), tuple(masks),
                   tuple(enabled.items()), pending, pending_fds,
                   tuple(f["counters"].counters().items()))


def parse_client_caps(caps: Any) -> ClientCaps:
    """The client's VERSION capabilities, each checked.

    Raises:
        LocalProtocolError: EINVAL for a value out of range or of the wrong type.
    """
    require(isinstance(caps, dict), errno.EINVAL, "capabilities are not an object")

    def number(key: str, default: int, lo: int, hi: int) -> int:
        value = caps.get(key, default)
        require(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
                 errno.EINVAL, f"capability {key}={value!r} out of range")
        return int(value)

    max_msg_fds = number("max_msg_fds", w.DEFAULT_MAX_MSG_FDS, 1, 253)
    max_xfer = number("max_data_xfer_size", w.DEFAULT_MAX_DATA_XFER_SIZE, 1, 1 << 30)
    number("max_dma_maps", w.DEFAULT_MAX_DMA_MAPS, 1, 1 << 31)
    pgsizes = number("pgsizes", w.DEFAULT_PGSIZES, 1, (1 << 63) - 1)
    require(bool(pgsizes & PGSIZE), errno.EINVAL, f"client pgsizes {pgsizes:#x} lack 4 KiB")
    wm = caps.get("write_multiple", False)
    require(isinstance(wm, bool), errno.EINVAL, "write_multiple is not a boolean")
    require(isinstance(caps.get("migration", {}), dict), errno.EINVAL,
             "migration capability is not an object")
    return ClientCaps(max_msg_fds, max_xfer, wm)


def _check_pending(pending: bytes, max_size: int, where: str) -> None:
    """The half-read message frames as it will when adopted (a size below the
    header's is refused now, not by the adopting connection)."""
    framer = Framer(max_size=max_size)
    try:
        rest = pending
        while rest:
            take = min(len(rest), framer.bytes_wanted())
            framer.feed(rest[:take], [])
            rest = rest[take:]
            while (frame := framer.next_frame()) is not None:
                frame.close_fds()
    except RemoteProtocolError as exc:
        raise _bad(f"{where}: {exc}") from None
    finally:
        framer.close()
