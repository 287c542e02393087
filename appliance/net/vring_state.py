"""A split virtqueue's lifecycle table, its error, its state as a value and its
counters (device layer).

Ring lifecycle is a table (:data:`RING_TRANSITIONS`): a ring starts when its
kick fd is set and stops on GET_VRING_BASE, reset or disconnect.  Size and base
can change only while stopped (:data:`RING_ALLOWED`); addresses may change
while started (the front-end toggles VHOST_VRING_F_LOG that way).  The queue
that steps through them is :class:`~appliance.net.virtqueue.SplitQueue`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from appliance.errors import LocalProtocolError


class RingState(enum.Enum):
    STOPPED = "stopped"
    STARTED = "started"


# Ring lifecycle: state -> {event: next state}.
RING_TRANSITIONS: dict[RingState, dict[str, RingState]] = {
    RingState.STOPPED: {"start": RingState.STARTED, "stop": RingState.STOPPED,
                        "reset": RingState.STOPPED},
    RingState.STARTED: {"start": RingState.STARTED, "stop": RingState.STOPPED,
                        "reset": RingState.STOPPED},
}

# Configuration allowed per ring state.
RING_ALLOWED: dict[RingState, frozenset[str]] = {
    RingState.STOPPED: frozenset({"set_num", "set_base", "set_addr"}),
    RingState.STARTED: frozenset({"set_addr"}),
}


class RingError(LocalProtocolError):
    """A ring configuration request is invalid (the wire answers with a NACK)."""


@dataclass(frozen=True)
class VringState:
    """A ring as a value (:meth:`SplitQueue.handoff_state
    <appliance.net.virtqueue.SplitQueue.handoff_state>`): what SET_VRING_NUM,
    _BASE and _ADDR set, the indices reached, whether it runs.  A destination
    restores it through those requests and :meth:`SplitQueue.restore_indices
    <appliance.net.virtqueue.SplitQueue.restore_indices>`."""

    num: int
    desc: int | None
    avail: int | None
    used: int | None
    log: int
    flags: int
    last_avail_idx: int
    used_idx: int
    sync_used: bool
    started: bool


@dataclass
class QueueCounters:
    packets: int = 0
    bytes: int = 0
    dropped: int = 0
    malformed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"packets": self.packets, "bytes": self.bytes, "dropped": self.dropped,
                "malformed": self.malformed}
