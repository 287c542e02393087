"""Manifests the fuzzer broke (tests/fuzz/fuzz_handoff.py), re-signed into a real handoff.

Between two real processes (the rig and proxy of test_handoff_faults.py): the
stream's checksums, sequence and END are fixed up, only the manifest is wrong.
Each must be refused by the destination's check, before it adopts anything:
the CLI says why, the source serves on with its data intact, the destination
stays idle with every fd it was sent closed, and no log holds a traceback (the
rig checks that when it closes).  Before the fixes these went past the refusal
path: a traceback, or a destination that adopted half and exited.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_handoff_faults import Fault, Rig, attempt, edit, manifest_edit

from appliance.vfio_user.migration_stream import RecordType as T


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A source with a driver doing verified I/O, an idle destination, shared storage."""
    made = Rig(tmp_path_factory.mktemp("ho-manifest"), shared=True)
    yield made
    made.close()  # (asserts that no log holds a traceback)


def client_conn(m: dict[str, Any]) -> dict[str, Any]:
    conn: dict[str, Any] = m["vfio_user"]["client"]["conn"]
    return conn


def fault_rule(m: dict[str, Any], **values: Any) -> None:
    rule = {"id": 1, "target": "nvme", "action": "status", "count": 1, "hits": 0, "seen": 0}
    m["control"]["faults"]["rules"] = [{**rule, **values}]


def rng_word(m: dict[str, Any]) -> None:
    m["control"]["faults"]["rng"][1][0] = 2 ** 64


def digits(payload: bytes) -> bytes:
    return payload.replace(b'"next_id":', b'"x":' + b"9" * 5000 + b',"next_id":', 1)


CASES: list[tuple[Callable[[], Any], str]] = [
    (lambda: edit(T.HANDOFF, manifest_edit(lambda m: fault_rule(m, count=float("inf")))),
     "count"),
    (lambda: edit(T.HANDOFF, manifest_edit(rng_word)), "fault state"),
    (lambda: edit(T.HANDOFF, manifest_edit(lambda m: client_conn(m)["regions"][0].pop("size"))),
     "bad handoff state"),
    (lambda: edit(T.HANDOFF, manifest_edit(lambda m: m["vfio_user"].update(connections="\u00b2"))),
     "connections"),
    (lambda: edit(T.HANDOFF, digits), "handoff manifest"),
]


@pytest.mark.parametrize(("make", "why"), CASES,
                         ids=["fault-count-infinite", "rng-word-2-pow-64", "region-without-size",
                              "connections-superscript-two", "integer-of-5000-digits"])
def test_a_broken_manifest_is_refused_before_adoption(rig: Rig, make: Callable[[], Any],
                                                      why: str) -> None:
    attempt(rig, Fault(make(), resign=True, cli=why, log=why))
