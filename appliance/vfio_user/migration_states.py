"""The vfio-user device migration state machine (two tables: arcs and next hop).

Theory of operation
-------------------
qemu/qemu docs/interop/vfio-user.rst, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
defines a Mealy machine over ``enum vfio_device_mig_state``: actions happen on
the *arcs* between states.  Two tables describe it here:

* :data:`ARCS` is the literal table of the direct arcs a server must support
  ("Direct State Transitions"), PRE_COPY arcs included.  The P2P states are
  "not used in vfio-user" and have no arcs; ERROR has none either (it is left
  only by VFIO_USER_DEVICE_RESET, which is not an arc of this machine).
* :data:`NEXT_HOP` maps ``(current, target)`` to the first arc to take.  It is
  computed once, at import, from :data:`ARCS` by a breadth-first search that
  follows the spec's rules for complex transitions: "Select the shortest
  path" and "The path cannot have saving group states as interior arcs, only
  start/end states".  On top of the search, :data:`REFUSED` removes what the
  spec forbids outright: "The STOP_COPY -> PRE_COPY transition is explicitly
  not allowed", and "ERROR cannot be specified as a device state".  A pair
  missing from :data:`NEXT_HOP` is refused (the server answers EINVAL, as
  <linux/vfio.h> drivers and libvfio-user do).

A SET of the device state walks :func:`path` one arc at a time and notifies
the device on every hop (one arc at a time, never a jump to the target), so
a device only ever implements the direct arcs.

Each state has a command allow-list (:data:`ALLOWED`), asked before any
command is dispatched (a refusal is an EBUSY error reply).

:func:`diagram` renders the arcs table as Mermaid or Graphviz text for
docs/migration.md ("generate doc diagrams from the tables").
"""

from __future__ import annotations

import enum
import errno
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType

from appliance.errors import LocalProtocolError
from appliance.vfio_user import wire as w


class MigState(enum.IntEnum):
    """``enum vfio_device_mig_state`` (the spec's device_state values)."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5  # not used in vfio-user
    PRE_COPY = 6
    PRE_COPY_P2P = 7  # not used in vfio-user


class MigrationFlag(enum.IntFlag):
    """``vfio_device_feature_migration.flags`` (u64)."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


S = MigState

# Direct arcs (vfio-user.rst "Direct State Transitions"), state -> reachable states.
ARCS: Mapping[MigState, frozenset[MigState]] = MappingProxyType({
    S.ERROR: frozenset(),
    S.STOP: frozenset({S.RUNNING, S.STOP_COPY, S.RESUMING}),
    S.RUNNING: frozenset({S.STOP, S.PRE_COPY}),
    S.STOP_COPY: frozenset({S.STOP}),
    S.RESUMING: frozenset({S.STOP}),
    S.RUNNING_P2P: frozenset(),
    S.PRE_COPY: frozenset({S.RUNNING, S.STOP_COPY}),
    S.PRE_COPY_P2P: frozenset(),
})

# "PRE_COPY and STOP_COPY are referred to as the saving group of states."
SAVING_GROUP = frozenset({S.PRE_COPY, S.STOP_COPY})

# States a client may ask for (P2P: not used in vfio-user; ERROR: cannot be specified).
SETTABLE = frozenset({S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.PRE_COPY})

# Pairs refused even though the arcs would connect them.
REFUSED = frozenset({(S.STOP_COPY, S.PRE_COPY)})

# What VFIO_DEVICE_FEATURE_MIGRATION reports: the states beyond RUNNING/ERROR we support.
SUPPORTED_FLAGS = MigrationFlag.STOP_COPY | MigrationFlag.PRE_COPY


class TransitionError(LocalProtocolError):
    """A requested device state cannot be reached from the current one."""


def _shortest_path(arcs: Mapping[MigState, frozenset[MigState]], start: MigState,
                   target: MigState) -> tuple[MigState, ...] | None:
    """BFS from ``start`` to ``target`` whose interior avoids the saving group.

    Returns:
        The states after ``start`` up to and including ``target``, or None.
    """
    if start == target:
        return ()
    parents: dict[MigState, MigState] = {start: start}
    queue: deque[MigState] = deque([start])
    while queue:
        here = queue.popleft()
        if here != start and here in SAVING_GROUP:
            continue  # a saving state may end the path, never carry it on
        for nxt in sorted(arcs[here]):  # sorted: a deterministic tie-break
            if nxt in parents:
                continue
            parents[nxt] = here
            if nxt == target:
                hops = [nxt]
                while parents[hops[-1]] != start:
                    hops.append(parents[hops[-1]])
                return tuple(reversed(hops))
            queue.append(nxt)
    return None


def _next_hop_table() -> Mapping[tuple[MigState, MigState], MigState]:
    table: dict[tuple[MigState, MigState], MigState] = {}
    for current in MigState:
        if current not in SETTABLE:
            continue  # ERROR (sticky) and the P2P states are never left by a SET
        for target in SETTABLE:
            if current == target or (current, target) in REFUSED:
                continue
            hops = _shortest_path(ARCS, current, target)
            if hops:
                table[(current, target)] = hops[0]
    return MappingProxyType(table)


# Next hop per (current, target); absent pairs (other than current == target) are refused.
NEXT_HOP: Mapping[tuple[MigState, MigState], MigState] = _next_hop_table()


def path(current: MigState, target: int) -> tuple[MigState, ...]:
    """The arcs to walk from ``current`` to ``target``, as the states visited.

    Returns:
        The states after ``current`` up to ``target``; empty when they are equal
        (a SET of the current state is a successful no-op, as in the kernel),
        except that nothing is reachable from ERROR.

    Raises:
        TransitionError: EINVAL when ``target`` is not a state, cannot be
            specified (ERROR, the P2P states), or is not reachable from
            ``current`` (STOP_COPY -> PRE_COPY, anything from ERROR).
    """
    try:
        goal = MigState(target)
    except ValueError:
        raise TransitionError(f"device_state {target} is not a migration state",
                              errno.EINVAL) from None
    if current == S.ERROR:
        raise TransitionError("device is in ERROR: only DEVICE_RESET leaves it", errno.EINVAL)
    if goal not in SETTABLE:
        raise TransitionError(f"device_state {goal.name} cannot be requested in vfio-user",
                              errno.EINVAL)
    hops: list[MigState] = []
    here: MigState = current
    while here != goal:
        nxt = NEXT_HOP.get((here, goal))
        if nxt is None:
            raise TransitionError(f"no transition {current.name} -> {goal.name}", errno.EINVAL)
        hops.append(nxt)
        here = nxt
    return tuple(hops)


def diagram(kind: str = "mermaid") -> str:
    """Render :data:`ARCS` (and the settable states) as diagram source text.

    Args:
        kind: ``"mermaid"`` (a ``stateDiagram-v2``) or ``"dot"`` (Graphviz).

    Returns:
        The diagram text; arcs into a saving-group state are labelled
        "save", the arc out of RESUMING "load".

    Raises:
        ValueError: an unknown ``kind``.
    """
    arcs = sorted((a, b) for a, targets in ARCS.items() for b in targets)

    def label(a: MigState, b: MigState) -> str:
        if b in SAVING_GROUP and a not in SAVING_GROUP:
            return "start saving"
        if a == S.RESUMING:
            return "load + commit"
        if a in SAVING_GROUP and b not in SAVING_GROUP:
            return "end saving"
        if a == S.PRE_COPY and b == S.STOP_COPY:
            return "stop device"
        return {S.STOP: "stop", S.RUNNING: "run", S.RESUMING: "start loading"}.get(b, "")

    if kind == "mermaid":
        lines = ["stateDiagram-v2", "    [*] --> RUNNING"]
        lines += [f"    {a.name} --> {b.name}: {label(a, b)}" for a, b in arcs]
        lines.append("    ERROR --> RUNNING: DEVICE_RESET (not an arc)")
        return "\n".join(lines) + "\n"
    if kind == "dot":
        lines = ["digraph migration {", "    rankdir=LR;"]
        for state in sorted(SETTABLE | {S.ERROR}):
            shape = "doublecircle" if state in SAVING_GROUP else "ellipse"
            lines.append(f"    {state.name} [shape={shape}];")
        lines += [f'    {a.name} -> {b.name} [label="{label(a, b)}"];' for a, b in arcs]
        lines.append('    ERROR -> RUNNING [style=dashed, label="DEVICE_RESET"];')
        return "\n".join(lines) + "\n}\n"
    raise ValueError(f"unknown diagram kind {kind!r}")


def next_hop_markdown() -> str:
    """:data:`NEXT_HOP` as a Markdown matrix (rows: current state, columns: target).

    A cell holds the full path walked ("STOP → RESUMING"), "·" for the
    current state itself and "refused" for a refused pair.
    """
    order = [S.RUNNING, S.STOP, S.PRE_COPY, S.STOP_COPY, S.RESUMING]
    lines = ["| from \\ to | " + " | ".join(t.name for t in order) + " |",
             "|---|" + "---|" * len(order)]
    for current in [*order, S.ERROR]:
        cells = []
        for target in order:
            if current == target:
                cells.append("·")
                continue
            try:
                cells.append(" → ".join(h.name for h in path(current, target)))
            except TransitionError:
                cells.append("refused")
        lines.append(f"| **{current.name}** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


C = w.Command

# Commands that never change the device: allowed in every migration state.  The
# migration commands themselves are always dispatched and refuse wrong states
# with EINVAL (MIG_DATA_READ outside the saving group, MIG_DATA_WRITE outside
# RESUMING), as libvfio-user does.
ALWAYS = frozenset({
    C.VERSION, C.DMA_MAP, C.DMA_UNMAP, C.DEVICE_GET_INFO, C.DEVICE_GET_REGION_INFO,
    C.DEVICE_GET_REGION_IO_FDS, C.DEVICE_GET_IRQ_INFO, C.DEVICE_RESET, C.DEVICE_FEATURE,
    C.MIG_DATA_READ, C.MIG_DATA_WRITE,
})
ALLOWED: dict[MigState, frozenset[w.Command]] = {
    # The device runs normally: everything.
    MigState.RUNNING: frozenset(w.Command),
    MigState.PRE_COPY: frozenset(w.Command),
    # "The device does not change the internal or external state": no region
    # writes.  Reads have no side effects; interrupt wiring is the client's.
    MigState.STOP: ALWAYS | {C.REGION_READ, C.DEVICE_SET_IRQS},
    # The saved state must stay what the reads return: no SET_IRQS either
    # (an unmask would deliver and clear pending bits).
    MigState.STOP_COPY: ALWAYS | {C.REGION_READ},
    # The device is being loaded: no region access; the destination's client
    # may wire its interrupts.
    MigState.RESUMING: ALWAYS | {C.DEVICE_SET_IRQS},
    # "The device has failed and must be reset."
    MigState.ERROR: ALWAYS,
}


def allow_list_markdown() -> str:
    """:data:`ALLOWED` as a Markdown table (for docs/migration.md)."""
    extra = sorted(set(w.Command) - ALWAYS - w.SERVER_TO_CLIENT, key=int)
    lines = ["| state | " + " | ".join(c.name for c in extra) + " |",
             "|---|" + "---|" * len(extra)]
    for state, allowed in ALLOWED.items():
        cells = ["yes" if c in allowed else "EBUSY" for c in extra]
        lines.append(f"| {state.name} | " + " | ".join(cells) + " |")
    always = ", ".join(c.name for c in sorted(ALWAYS, key=int))
    return "\n".join(lines) + f"\n\nAllowed in every state: {always}.\n"
