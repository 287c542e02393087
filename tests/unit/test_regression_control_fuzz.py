"""Regressions found by fuzzing the control protocol (tests/fuzz/fuzz_control.py).

Every request line ends in a result or the protocol's own error reply
(ControlError); nothing else may escape ``parse_line`` or ``dispatch``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nvme_driver import make_controller

from appliance.control.commands import Target, dispatch
from appliance.control.protocol import ControlConnection, ControlError, Request, parse_line
from appliance.faults import FaultSet

CONTROL_BRANCH = pytest.mark.xfail(strict=True, reason="fixed in the control branch")


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    ctrl = make_controller(tmp_path)
    yield Target(controller=ctrl, faults=FaultSet(clock=lambda: 0.0))
    ctrl.close()


def refused(target: Target, cmd: str, args: dict[str, Any]) -> str:
    with pytest.raises(ControlError) as info:
        dispatch(target, Request(1, cmd, args))
    return info.value.code


# ------------------------------------------------------------ fixed here (the fault rules)
@pytest.mark.parametrize("args", [
    {"action": "status", "count": float("inf")},  # JSON 1e999
    {"action": "status", "status": [1]},  # a list where a status is expected
    {"action": "status", "lba": [0, float("inf")]},
    {"action": "status", "probability": 10 ** 400},
    {"action": "delay", "delay": 10 ** 400},
], ids=["count-1e999", "status-list", "lba-1e999", "probability-big", "delay-big"])
def test_bad_fault_arguments_are_bad_args(target: Target, args: dict[str, Any]) -> None:
    assert refused(target, "fault.add", args) == "bad_args"
    assert target.faults is not None and target.faults.rules == []


def test_json_1e999_line_is_answered(target: Target) -> None:
    conn = ControlConnection()
    conn.receive_data(b'{"id": 1, "cmd": "fault.add", "args": {"action": "status", "count": 1e999}}\n')
    request = conn.next_event()
    assert isinstance(request, Request)
    assert refused(target, request.cmd, request.args) == "bad_args"


# ------------------------------------------------------------ left to the control branch
@CONTROL_BRANCH
def test_deeply_nested_line_is_a_bad_request() -> None:
    with pytest.raises(ControlError) as info:
        parse_line(b'{"cmd": "status", "args": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert info.value.code == "bad_request"


@CONTROL_BRANCH
def test_superscript_digit_rule_id_is_bad_args(target: Target) -> None:
    assert refused(target, "fault.clear", {"id": "\u00b2"}) == "bad_args"


@CONTROL_BRANCH
def test_superscript_digit_nsid_is_bad_args(target: Target) -> None:
    assert refused(target, "namespace.resize", {"nsid": "\u00b2", "size": "2M"}) == "bad_args"


def test_replies_stay_json(target: Target) -> None:
    result = dispatch(target, Request(1, "fault.list", {}))
    assert json.loads(json.dumps(result)) == result
