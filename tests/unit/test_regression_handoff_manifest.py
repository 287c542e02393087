"""Regressions found by fuzzing the live-handoff manifest (tests/fuzz/fuzz_handoff.py).

Every malformed value is refused with the handoff's own error before anything
is adopted, and nothing the check touched stays open.
"""

from __future__ import annotations

import gc
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nvme_driver import make_controller

from appliance.control.fault_rules import FaultError, FaultRule
from appliance.control.faults import FaultSet
from appliance.errors import ApplianceError, LocalProtocolError
from appliance.runtime.handoff import frames as ho
from appliance.runtime.handoff.manifest import VfioUserState
from appliance.runtime.loop import EventLoop
from appliance.runtime.vfio_user import VfioUserService
from appliance.storage import NvmeController
from appliance.vfio_user.handoff_state import ConnectionState
from appliance.vfio_user.migration_stream import Record, RecordType
from appliance.vfio_user.server import ServerConnection, check_handoff_state


def fds_open() -> set[int]:
    """This process's open fds, once garbage that earlier tests left is collected
    (a socket object in a reference cycle closes its fd whenever gc runs)."""
    gc.collect()
    return set(map(int, os.listdir("/proc/self/fd")))


@pytest.fixture
def ctrl(tmp_path: Path) -> Any:
    c = make_controller(tmp_path)
    yield c
    c.close()


# ------------------------------------------------------------ the manifest's JSON
@pytest.mark.parametrize("payload", [
    b'{"version": 2, "fds": 0, "x": ' + b"9" * 5000 + b"}",  # past Python's digit limit
    b'{"version": 2, "fds": 0, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # too deep
])
def test_unparseable_manifest_is_a_handoff_error(payload: bytes) -> None:
    with pytest.raises(ho.HandoffError, match="handoff manifest"):
        ho.parse_handoff(Record(RecordType.HANDOFF, payload), 0)


# ------------------------------------------------------------ the fault state
def fault_state(**rule: Any) -> dict[str, Any]:
    faults = FaultSet(clock=lambda: 0.0)
    faults.add({"action": "status", "count": 1})
    state = json.loads(json.dumps(faults.export_state()))
    state["rules"][0].update(rule)
    return state


@pytest.mark.parametrize("state", [
    fault_state(count=float("inf")),
    fault_state(hits=float("inf")),
    fault_state(probability=10 ** 400),
    fault_state(delay=10 ** 400),
    fault_state(status=[1, 2]),
    fault_state(lba=[0, float("inf")]),
], ids=["count-inf", "hits-inf", "probability-big-int", "delay-big-int", "status-list", "lba-inf"])
def test_bad_fault_rule_state_is_refused(state: dict[str, Any], ctrl: NvmeController) -> None:
    target = FaultSet(clock=lambda: 0.0)
    with pytest.raises(FaultError):
        target.import_state(state)
    with pytest.raises(FaultError):
        target.import_state(state, ctrl)
    assert target.rules == []


@pytest.mark.parametrize("word", [2 ** 64, -1])
def test_rng_word_out_of_range_is_refused(word: int, ctrl: NvmeController) -> None:
    state = fault_state()
    state["rng"][1][0] = word
    with pytest.raises(FaultError, match="fault state"):
        FaultSet(clock=lambda: 0.0).import_state(state, ctrl)


@pytest.mark.parametrize("args", [{"action": "status", "count": float("inf")},
                                  {"action": "status", "status": [1]},
                                  {"action": "status", "probability": 10 ** 400},
                                  {"action": "delay", "delay": 10 ** 400}])
def test_bad_rule_arguments_are_fault_errors(args: dict[str, Any]) -> None:
    with pytest.raises(FaultError):
        FaultRule.build(1, args)


# ------------------------------------------------------------ the vfio-user client state
def client_state() -> dict[str, Any]:
    return {"caps": {"max_msg_fds": 8, "max_data_xfer_size": 65536, "write_multiple": False},
            "next_id": 1,
            "regions": [{"address": 0x10000, "size": 0x4000, "fd_offset": 0,
                         "readable": True, "writable": True, "fd": 0}],
            "irq_fds": [], "irq_mask_fds": [], "irq_enabled": [], "pending": "",
            "pending_fds": [], "counters": {}}


@pytest.mark.parametrize(("change", "why"), [
    (lambda s: s["regions"][0].pop("size"), "size"),
    (lambda s: s["regions"][0].update(address=float("inf")), "not an integer"),
    (lambda s: s.update(next_id="\u00b2"), "not an integer"),
    (lambda s: s.update(next_id=True), "not an integer"),
    (lambda s: s["regions"][0].update(fd_offset=100), "DMA_MAP offset 0x64"),
    (lambda s: s["regions"].append(dict(s["regions"][0])), "overlaps"),
    (lambda s: s.update(pending="0000000008000000" + "00" * 8), "below the header size"),
    (lambda s: s.update(caps=[1]), "bad handoff state"),
    (lambda s: s.update(pending_fds=[0]), "pending fds without a pending message"),
])
def test_bad_client_state_is_refused_by_the_check_and_leaks_nothing(
        change: Any, why: str, ctrl: NvmeController) -> None:
    state = client_state()
    change(state)
    memfd = os.memfd_create("guest")
    os.ftruncate(memfd, 0x4000)
    before = fds_open()
    with pytest.raises(LocalProtocolError, match=why):
        check_handoff_state(ctrl, ConnectionState.from_json(state, 1), [memfd], None)
    conn = ServerConnection(ctrl, notify=lambda fd: None)
    with pytest.raises(LocalProtocolError):
        conn.handoff_adopt(ConnectionState.from_json(state, 1), [memfd])
    assert not conn.memory.regions and conn.state.value == "await-version"
    conn.close()
    assert fds_open() == before
    os.close(memfd)


@pytest.fixture
def destination(ctrl: NvmeController, tmp_path: Path) -> Iterator[tuple[VfioUserService, list[int]]]:
    """A destination's vfio-user service, and what a source hands over: its
    listening socket (fd 0), the lock file beside it (fd 1) and a client socket (fd 2)."""
    loop = EventLoop()
    service = VfioUserService(loop, str(tmp_path / "nvme.sock"), ctrl)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "src.sock"))
    listener.listen(1)
    a, b = socket.socketpair()
    fds = [os.dup(listener.fileno()),
           os.open(tmp_path / "src.sock.lock", os.O_RDWR | os.O_CREAT, 0o600),
           os.dup(a.fileno())]
    for sock in (listener, a, b):
        sock.close()
    yield service, fds
    service.close()
    loop.close()
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("connections", ["\u00b2", float("inf"), [1], True, -1])
def test_service_check_refuses_a_bad_connection_count(
        connections: Any, destination: tuple[VfioUserService, list[int]], tmp_path: Path) -> None:
    service, fds = destination
    state = {"path": str(tmp_path / "src.sock"), "listener": 0, "lock": 1, "client": None,
             "connections": connections}
    with pytest.raises(ApplianceError, match="connections"):
        service.handoff_check(VfioUserState.from_json(state, len(fds)), fds)
    state["connections"] = 3
    service.handoff_check(VfioUserState.from_json(state, len(fds)), fds)


def test_service_check_refuses_a_bad_client_state_before_adopting(
        destination: tuple[VfioUserService, list[int]], tmp_path: Path) -> None:
    service, fds = destination
    conn = client_state()
    conn["regions"][0]["size"] = "16K"
    state = {"path": str(tmp_path / "src.sock"), "listener": 0, "lock": 1, "connections": 1,
             "client": {"socket": 2, "conn": conn}}
    with pytest.raises(ApplianceError, match="bad handoff state"):
        service.handoff_check(VfioUserState.from_json(state, len(fds)), fds)
