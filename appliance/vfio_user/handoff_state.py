"""A vfio-user connection's state as a value, checked whole before any of it is adopted
(protocol layer).

A live handoff moves a connection to another process: the negotiated
capabilities, every DMA region (with its fd), the irq eventfds, the message
half read.  :func:`parse_connection` turns the manifest's JSON into a frozen
:class:`ConnectionState` — every field typed, every range and fd index checked
as the equivalent command would check it (capabilities as in VERSION, irq
indexes and ranges as in SET_IRQS) — and :func:`check_fds` checks what the fds
are (irq fds must be eventfds, region fds regular files) and that every region
maps (:meth:`~appliance.memory.ClientMemory.map` on a scratch accessor, then
unmapped).  A destination runs both before it adopts anything, so the adopt
that follows cannot refuse half-way; nothing here keeps an fd.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.errors import LocalProtocolError, RemoteProtocolError
from appliance.memory import ClientMemory, MapError
from appliance.protocol_common import require
from appliance.vfio_user import wire as w
from appliance.vfio_user.connection_state import PGSIZE
from appliance.vfio_user.framing import Framer


@dataclass(frozen=True)
class ClientCaps:
    """What a client announced in VERSION (and a handoff carries on)."""

    max_msg_fds: int = w.DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = w.DEFAULT_MAX_DATA_XFER_SIZE
    write_multiple: bool = False


@dataclass(frozen=True)
class RegionState:
    address: int
    size: int
    fd: int | None  # an index into the handoff's fds
    fd_offset: int
    readable: bool
    writable: bool


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


def _bad(what: str) -> LocalProtocolError:
    return LocalProtocolError(f"bad handoff state: {what}", errno.EINVAL)


def _int(value: Any, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(f"{what}: {value!r} is not an integer in {lo}..{hi:#x}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"{what}: {value!r} is not a boolean")
    return value


def _list(value: Any, what: str, width: int | None = None) -> list[Any]:
    if not isinstance(value, list) or (
            width is not None and not all(isinstance(x, list) and len(x) == width for x in value)):
        raise _bad(f"{what}: not a list" + (f" of {width}-lists" if width else ""))
    return value


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


def parse_connection(state: Any, nfds: int, irq_count: Callable[[int], int],
                     max_pending: int, max_pending_fds: int) -> ConnectionState:
    """The connection state a manifest carries, checked whole (no fd is touched).

    ``irq_count(index)``: how many sub-indexes irq type ``index`` of this
    device has (0: absent).

    Raises:
        LocalProtocolError: EINVAL naming the first field that does not fit.
    """
    if not isinstance(state, dict):
        raise _bad("not an object")
    try:
        def fd(value: Any, what: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < nfds:
                raise _bad(f"{what}: fd index {value!r} of {nfds}")
            return value

        try:
            caps = parse_client_caps(state["caps"])
        except LocalProtocolError as exc:
            raise _bad(f"caps: {exc}") from None
        next_id = _int(state["next_id"], "next_id", 0, 0xFFFF)
        regions = []
        for i, r in enumerate(_list(state["regions"], "regions")):
            if not isinstance(r, dict):
                raise _bad(f"regions[{i}]: not an object")
            index = None if r["fd"] is None else fd(r["fd"], f"regions[{i}]")
            regions.append(RegionState(
                _int(r["address"], f"regions[{i}].address"), _int(r["size"], f"regions[{i}].size"),
                index, _int(r["fd_offset"], f"regions[{i}].fd_offset") if index is not None else 0,
                _bool(r["readable"], f"regions[{i}].readable"),
                _bool(r["writable"], f"regions[{i}].writable")))
        irqs = tuple((_int(i, "irq index"), _int(s, "irq sub-index"), fd(f, "irq"))
                     for i, s, f in _list(state["irq_fds"], "irq_fds", 3))
        masks = tuple((_int(k, "mask action"), _int(i, "irq index"), _int(s, "irq sub-index"),
                       fd(f, "irq mask")) for k, i, s, f in _list(state["irq_mask_fds"],
                                                               "irq_mask_fds", 4))
        enabled = tuple((_int(i, "irq index"), _int(n, "irq count"))
                        for i, n in _list(state["irq_enabled"], "irq_enabled", 2))
        pending_hex = state["pending"]
        if not isinstance(pending_hex, str) or len(pending_hex) > 2 * max_pending:
            raise _bad("pending: not a hex string of a message")
        try:
            pending = bytes.fromhex(pending_hex)
        except ValueError:
            raise _bad("pending: not hex") from None
        pending_fds = tuple(fd(f, "pending") for f in _list(state["pending_fds"], "pending_fds"))
        counters = state.get("counters", {})
        if not isinstance(counters, dict):
            raise _bad("counters: not an object")
        kept = tuple((str(k), v) for k, v in counters.items()
                     if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63)
    except KeyError as exc:
        raise _bad(f"{exc.args[0]!r} missing") from None
    mask_kinds = {int(w.IrqSetFlag.ACTION_MASK), int(w.IrqSetFlag.ACTION_UNMASK)}
    for index, count in enabled:
        require(index < w.PCI_NUM_IRQS and count <= irq_count(index), errno.EINVAL,
                 f"irq {index}: {count} enabled")
    for kind, index, sub in [(None, i, s) for i, s, _ in irqs] + [(k, i, s) for k, i, s, _ in masks]:
        require(index < w.PCI_NUM_IRQS and sub < irq_count(index)
                 and (kind is None or kind in mask_kinds), errno.EINVAL,
                 f"irq {index}.{sub} (action {kind}) out of range")
    require(len(pending) < max_pending and len(pending_fds) <= max_pending_fds, errno.EINVAL,
             "pending message too large")
    require(bool(pending) or not pending_fds, errno.EINVAL,
             "bad handoff state: pending fds without a pending message")
    _check_pending(pending, max_pending)
    return ConnectionState(caps, next_id, tuple(regions), irqs, masks, enabled, pending,
                           pending_fds, kept)


def _check_pending(pending: bytes, max_size: int) -> None:
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
        raise _bad(f"pending: {exc}") from None
    finally:
        framer.close()


def check_fds(s: ConnectionState, fds: list[int], is_eventfd: Callable[[int], bool] | None,
              max_regions: int) -> None:
    """What the fds are, and that every region maps as DMA_MAP would map it.

    Raises:
        LocalProtocolError: an irq fd that is not an eventfd, a region fd that
            is not a regular file, a region that does not map (its MapError's
            errno).  Nothing is kept.
    """
    if is_eventfd is not None:
        for index in [f for *_, f in s.irq_fds] + [f for *_, f in s.irq_mask_fds]:
            require(is_eventfd(fds[index]), errno.EINVAL, f"irq fd {index} is not an eventfd")
    scratch = ClientMemory(max_regions=max_regions)
    try:
        for r in s.regions:
            if r.fd is not None:
                try:
                    mode = os.fstat(fds[r.fd]).st_mode
                except OSError as exc:
                    raise _bad(f"region fd {r.fd}: {exc}") from None
                require(stat.S_ISREG(mode), errno.EINVAL, f"region fd {r.fd} is not a file")
            try:
                scratch.map(r.address, r.size, fd=None if r.fd is None else os.dup(fds[r.fd]),
                            fd_offset=r.fd_offset, readable=r.readable, writable=r.writable)
            except MapError as exc:
                raise LocalProtocolError(f"bad handoff state: {exc}", exc.errno) from None
    finally:
        scratch.unmap_all()
