"""One NVMe command in flight (device layer).

Theory of operation
-------------------
A command fetched from a submission queue becomes an :class:`NvmeRequest`
and lives until it is completed or dropped:

* ``FETCHED`` — read from its SQ, nothing done yet.
* ``EXECUTING`` — :meth:`NvmeController.execute` runs its handler.
* ``HELD`` — no completion yet: an Asynchronous Event Request waiting for an
  event, a command an injected fault hangs or delays.  The controller keeps
  every held request by (SQID, CID), so Abort finds it whoever held it.
* ``WAITING`` — it waits for something outside the loop: blocking file I/O
  handed to the controller's offload (an :class:`Offloaded` its handler
  returned: ``io_busy`` until the work is done, then the controller completes
  it), or client memory reached by DMA messages
  (:class:`~appliance.memory.DmaScope` ``dma``): a read the client has not
  answered yet (the handler runs again, from the start, once it has: handlers
  touch nothing before their reads) or writes not acknowledged yet (its
  ``result`` is decided; it completes once they are).  Meanwhile the device
  serves everything else; when it continues, the controller re-checks its
  queue, CC.EN and Bus Master first.
* ``COMPLETED`` — its completion entry was posted
  (:meth:`NvmeController.complete`, the one way a result reaches a CQ).
* ``DROPPED`` — its queue went away (controller reset, Delete I/O SQ) before
  it completed: no completion is ever posted (base spec 7.3.1, 5.6).

The transitions are the table :data:`TRANSITIONS`; any other step is a bug
and raises :class:`RequestStateError`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.memory import DmaScope
from appliance.storage.spec import Command, Status

if TYPE_CHECKING:
    from appliance.storage.queues import SubmissionQueue

#: What a finished command completes with: status, DNR, DWORD 0.
Result = tuple[Status | int, bool, int]


class RequestState(enum.Enum):
    FETCHED = "fetched"
    EXECUTING = "executing"
    WAITING = "waiting"
    HELD = "held"
    COMPLETED = "completed"
    DROPPED = "dropped"


S = RequestState
TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    S.FETCHED: frozenset({S.EXECUTING, S.HELD, S.COMPLETED, S.DROPPED}),
    S.EXECUTING: frozenset({S.WAITING, S.HELD, S.COMPLETED, S.DROPPED}),
    S.WAITING: frozenset({S.EXECUTING, S.COMPLETED, S.DROPPED}),
    S.HELD: frozenset({S.COMPLETED, S.DROPPED}),
    S.COMPLETED: frozenset(),
    S.DROPPED: frozenset(),
}


@dataclass(eq=False)
class Offloaded:
    """What an I/O handler returns for work that may block on the disk.

    ``work`` runs off the loop (the controller's offload: a worker thread) and
    touches only the namespace's image fd and ``views`` (zero-copy slices of
    mmap'd client memory, never the accessor itself); ``then`` runs on the
    loop once ``work`` succeeded and returns the completion's DWORD 0.  The
    views are released on the loop when the request ends, whatever the outcome.
    """

    work: Callable[[], object]
    then: Callable[[], int] = lambda: 0
    views: list[memoryview] = field(default_factory=list)
    #: guest ranges ``work`` writes: marked dirty again when it is done
    written: list[tuple[int, int]] = field(default_factory=list)

    def release(self) -> None:
        for view in self.views:
            view.release()
        self.views = []


class RequestStateError(RuntimeError):
    """A request was moved along an edge the table does not have (a bug)."""


@dataclass(eq=False)
class NvmeRequest:
    """A command from ``sq`` and where it is in its life."""

    sq: SubmissionQueue
    cmd: Command
    state: RequestState = RequestState.FETCHED
    #: a result decided but not posted yet (an injected delay, writes in flight)
    result: Result | None = field(default=None)
    #: its DMA messages, when it touched memory mapped without an fd
    dma: DmaScope | None = field(default=None)
    #: its blocking I/O is running off the loop (WAITING until it is done)
    io_busy: bool = False

    @property
    def qid(self) -> int:
        return self.sq.qid

    @property
    def cid(self) -> int:
        return int(self.cmd.cid)

    @property
    def key(self) -> tuple[int, int]:
        """(SQID, CID): what Abort names."""
        return self.sq.qid, self.cmd.cid

    @property
    def done(self) -> bool:
        return self.state in (RequestState.COMPLETED, RequestState.DROPPED)

    def to(self, state: RequestState) -> None:
        """Step to ``state``.

        Raises:
            RequestStateError: the table has no such edge.
        """
        if state not in TRANSITIONS[self.state]:
            raise RequestStateError(f"qid {self.qid} cid {self.cid}: {self.state.value} -> "
                                    f"{state.value}")
        self.state = state
