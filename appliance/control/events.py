"""The QMP events the control socket sends (control plane).

Each name below is one kind of event; its ``data`` members are listed with it
(docs/control.md shows them).  Whoever sees the event happen calls an
:data:`Emit` (the runtime's control service hands one to every source), which
queues the event for every QMP client in command mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: emit(name, data): one event, now
Emit = Callable[[str, dict[str, Any]], None]

CLIENT_CONNECTED = "CLIENT_CONNECTED"  # device, protocol ("vfio-user" | "vhost-user")
CLIENT_DISCONNECTED = "CLIENT_DISCONNECTED"  # device, protocol
FAULT_FIRED = "FAULT_FIRED"  # id, target, action, hits
NAMESPACE_CHANGED = "NAMESPACE_CHANGED"  # nsid
AER_POSTED = "AER_POSTED"  # cid, dw0 (a held Asynchronous Event Request completed)
LINK_STATE = "LINK_STATE"  # port, link ("up" | "down")
CONTROLLER_FATAL = "CONTROLLER_FATAL"  # reason, csts (CSTS.CFS is set)
HANDOFF_PROGRESS = "HANDOFF_PROGRESS"  # phase, round, pending_bytes, sent_bytes
HANDOFF_COMPLETED = "HANDOFF_COMPLETED"  # the handoff command's result
HANDOFF_FAILED = "HANDOFF_FAILED"  # error
MIGRATION_STATE = "MIGRATION_STATE"  # device, from, to (vfio-user migration v2 states)

#: every event name, with what its data carries (for x-query-appliance-schema)
EVENTS: dict[str, tuple[str, ...]] = {
    CLIENT_CONNECTED: ("device", "protocol"),
    CLIENT_DISCONNECTED: ("device", "protocol"),
    FAULT_FIRED: ("id", "target", "action", "hits"),
    NAMESPACE_CHANGED: ("nsid",),
    AER_POSTED: ("cid", "dw0"),
    LINK_STATE: ("port", "link"),
    CONTROLLER_FATAL: ("reason", "csts"),
    HANDOFF_PROGRESS: ("phase", "round", "pending_bytes", "sent_bytes"),
    HANDOFF_COMPLETED: ("mode", "pause_ms", "rounds", "fds", "stream_bytes"),
    HANDOFF_FAILED: ("error",),
    MIGRATION_STATE: ("device", "from", "to"),
}


def ignore(name: str, data: dict[str, Any]) -> None:
    """The :data:`Emit` of a process without a control socket: drops the event."""
