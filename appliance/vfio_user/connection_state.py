"""The vfio-user server connection's states, command tables and limits, and
what it asks of a migration handler (:mod:`appliance.vfio_user.server`).

The connection's state machine is a literal table (:data:`TRANSITIONS`,
stepped with :func:`appliance.protocol_common.step`); each state has a command
allow-list (:data:`ALLOWED`) checked before dispatch.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

from appliance.memory import ClientMemory
from appliance.vfio_user import wire as w

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
# DEVICE_FEATURE: only the APPLIANCE_MIG_CHANNEL SET keeps one (the migration
# handler refuses any other count there); the connection closes the rest.
TAKES_FDS = frozenset({w.Command.DMA_MAP, w.Command.DEVICE_SET_IRQS, w.Command.DEVICE_FEATURE})


class NotYet(Exception):
    """Raised by a migration handler that cannot answer a command yet and has
    changed nothing: the connection keeps the message and stops dispatching
    until the handler's ``wake`` runs it again (the data channel's progress)."""


class MigrationHandler(Protocol):
    """Commands 16-18 for one connection (see appliance.vfio_user.migration)."""

    #: set by the runtime: re-run a message the handler answered with NotYet
    wake: Callable[[], None] | None

    def handle(self, command: w.Command, payload: bytes, fds: list[int] | None = None) -> bytes:
        """Answer DEVICE_FEATURE / MIG_DATA_READ / MIG_DATA_WRITE; raise Reject(errno),
        or NotYet (nothing changed).  An fd the handler keeps it removes from ``fds``;
        the connection closes the others."""

    def handle_parts(self, command: w.Command, payload: bytes) -> list[bytes | memoryview]:
        """:meth:`handle`'s reply payload as pieces in order (a MIG_DATA_READ's data
        as views of the stream: the connection sends them gathered, never joined)."""

    def allows(self, command: w.Command) -> bool:
        """Whether ``command`` may run in the current migration state."""

    def device_reset(self) -> None:
        """DEVICE_RESET: back to RUNNING (also from ERROR); called before the device resets."""

    def close(self) -> None:
        """The connection closes: drop sessions, stop dirty logging, un-quiesce the device."""

    def handoff_blocker(self) -> str:
        """Why the device cannot be handed off now ("" when it can)."""



#: Builds a connection's migration handler from that connection's client memory.
MigrationFactory = Callable[[ClientMemory], MigrationHandler]
