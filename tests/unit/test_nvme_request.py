"""The life of an NVMe request: its state table."""

from __future__ import annotations

import pytest

from appliance.storage.queues import SubmissionQueue
from appliance.storage.request import (
    TRANSITIONS,
    NvmeRequest,
    RequestState,
    RequestStateError,
)
from appliance.storage.spec import Command

S = RequestState


def request() -> NvmeRequest:
    return NvmeRequest(SubmissionQueue(1, 0x1000, 16, cqid=1), Command(cid=7))


def test_every_state_has_a_row_and_the_ends_are_final() -> None:
    assert set(TRANSITIONS) == set(RequestState)
    assert TRANSITIONS[S.COMPLETED] == TRANSITIONS[S.DROPPED] == frozenset()


@pytest.mark.parametrize("path", [
    [S.EXECUTING, S.COMPLETED],
    [S.EXECUTING, S.HELD, S.COMPLETED],
    [S.HELD, S.DROPPED],
    [S.COMPLETED],
])
def test_allowed_paths(path: list[RequestState]) -> None:
    req = request()
    for state in path:
        req.to(state)
    assert req.state is path[-1] and req.done is (path[-1] in (S.COMPLETED, S.DROPPED))
    assert req.key == (1, 7)


@pytest.mark.parametrize("path", [
    [S.EXECUTING, S.COMPLETED, S.COMPLETED],  # completed twice
    [S.HELD, S.DROPPED, S.COMPLETED],  # completed after its queue went
    [S.HELD, S.EXECUTING],  # run again
])
def test_missing_edges_raise(path: list[RequestState]) -> None:
    req = request()
    for state in path[:-1]:
        req.to(state)
    with pytest.raises(RequestStateError, match=path[-1].value):
        req.to(path[-1])
