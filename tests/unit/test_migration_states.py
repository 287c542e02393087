"""The migration state tables against an independent reading of the spec.

The oracle below is written from qemu/qemu docs/interop/vfio-user.rst alone
(not from appliance.vfio_user.migration_states): the direct arcs of "Direct State
Transitions", and "Complex State Transitions": shortest path, no saving-group
state as an interior state, STOP_COPY -> PRE_COPY refused, ERROR never a
target and never left by a SET, P2P states "not used in vfio-user".
"""

from __future__ import annotations

import errno
import itertools
from pathlib import Path

import pytest

from appliance.vfio_user import migration_states as states
from appliance.vfio_user.migration_states import MigState, TransitionError, path

ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P = range(8)

SPEC_ARCS = {
    (RUNNING, STOP), (STOP_COPY, STOP),  # "Stop the operation of the device"
    (RESUMING, STOP),  # "Terminate the data transfer session. Complete processing"
    (PRE_COPY, RUNNING),  # "Terminate the data transfer session"
    (STOP, RUNNING),  # "Start the operation of the device"
    (RUNNING, PRE_COPY), (STOP, STOP_COPY),  # "Begin the process of saving"
    (PRE_COPY, STOP_COPY),  # "Continue to transfer migration data, but stop"
    (STOP, RESUMING),  # "Start the process of restoring the device state"
}
SAVING = {PRE_COPY, STOP_COPY}
NOT_USED = {RUNNING_P2P, PRE_COPY_P2P}


def oracle_paths(start: int, target: int) -> list[tuple[int, ...]]:
    """Every shortest allowed path (list of states after ``start``), [] if refused."""
    if start == ERROR or target in (ERROR, *NOT_USED) or start in NOT_USED:
        return []
    if (start, target) == (STOP_COPY, PRE_COPY):
        return []
    if start == target:
        return [()]
    frontier: list[tuple[int, ...]] = [(start,)]
    for _ in range(8):
        found, nxt = [], []
        for walk in frontier:
            here = walk[-1]
            if len(walk) > 1 and here in SAVING:
                continue  # a saving state may only be a start or an end
            for a, b in sorted(SPEC_ARCS):
                if a == here and b not in walk:
                    (found if b == target else nxt).append(walk + (b,))
        if found:
            return [w[1:] for w in found]
        frontier = nxt
    return []


ALL_PAIRS = list(itertools.product(range(8), range(8)))


@pytest.mark.parametrize(("start", "target"), ALL_PAIRS)
def test_every_pair_against_independent_bfs(start: int, target: int) -> None:
    expected = oracle_paths(start, target)
    if not expected:
        with pytest.raises(TransitionError) as info:
            path(MigState(start), target)
        assert info.value.errno == errno.EINVAL
        return
    got = tuple(int(s) for s in path(MigState(start), target))
    assert got in expected, f"{start}->{target}: {got} not among {expected}"


def test_arcs_table_is_exactly_the_spec_arcs() -> None:
    table = {(int(a), int(b)) for a, targets in states.ARCS.items() for b in targets}
    assert table == SPEC_ARCS


def test_next_hop_is_the_first_state_of_each_path() -> None:
    for start, target in ALL_PAIRS:
        expected = oracle_paths(start, target)
        hop = states.NEXT_HOP.get((MigState(start), MigState(target)))
        if not expected or start == target:
            assert hop is None, (start, target)
        else:
            assert hop is not None and int(hop) in {p[0] for p in expected}, (start, target)


def test_next_hop_matches_libvfio_user_next_state() -> None:
    # nutanix/libvfio-user lib/migration.c next_state[][] (ERROR entries = refused).
    lvu = {
        STOP: {STOP: STOP, RUNNING: RUNNING, STOP_COPY: STOP_COPY, RESUMING: RESUMING,
               PRE_COPY: RUNNING},
        RUNNING: {STOP: STOP, RUNNING: RUNNING, STOP_COPY: STOP, RESUMING: STOP,
                  PRE_COPY: PRE_COPY},
        STOP_COPY: {STOP: STOP, RUNNING: STOP, STOP_COPY: STOP_COPY, RESUMING: STOP},
        RESUMING: {STOP: STOP, RUNNING: STOP, STOP_COPY: STOP, RESUMING: RESUMING,
                   PRE_COPY: STOP},
        PRE_COPY: {STOP: RUNNING, RUNNING: RUNNING, STOP_COPY: STOP_COPY, RESUMING: RUNNING,
                   PRE_COPY: PRE_COPY},
    }
    for start, row in lvu.items():
        for target, hop in row.items():
            if start != target:
                assert states.NEXT_HOP[(MigState(start), MigState(target))] == hop


@pytest.mark.parametrize("target", [ERROR, RUNNING_P2P, PRE_COPY_P2P, 8, 0xFFFFFFFF])
def test_refused_targets(target: int) -> None:
    for start in (STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY):
        with pytest.raises(TransitionError):
            path(MigState(start), target)


def test_stop_copy_to_pre_copy_refused_though_arcs_connect_them() -> None:
    assert oracle_paths(STOP_COPY, PRE_COPY) == []
    with pytest.raises(TransitionError, match="STOP_COPY -> PRE_COPY"):
        path(MigState.STOP_COPY, MigState.PRE_COPY)


def test_error_is_sticky() -> None:
    for target in range(8):
        with pytest.raises(TransitionError):
            path(MigState.ERROR, target)


def test_same_state_is_an_empty_path() -> None:
    for state in (STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY):
        assert path(MigState(state), state) == ()


def test_paths_never_cross_a_saving_state() -> None:
    for start, target in ALL_PAIRS:
        try:
            hops = path(MigState(start), target)
        except TransitionError:
            continue
        assert not set(hops[:-1]) & states.SAVING_GROUP, (start, target, hops)


@pytest.mark.parametrize("kind", ["mermaid", "dot"])
def test_diagram_is_generated_from_the_table(kind: str) -> None:
    text = states.diagram(kind)
    for a, b in SPEC_ARCS:
        arrow = "-->" if kind == "mermaid" else "->"
        assert f"{MigState(a).name} {arrow} {MigState(b).name}" in text
    assert "P2P" not in text


def test_diagram_unknown_kind() -> None:
    with pytest.raises(ValueError):
        states.diagram("svg")


def test_docs_carry_the_generated_diagram_and_paths() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "migration.md").read_text()
    assert "```mermaid\n" + states.diagram("mermaid") + "```" in doc
    assert states.next_hop_markdown() in doc
