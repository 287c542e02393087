"""QMP on the control socket: the greeting, capabilities negotiation, responses in
QMP's form, malformed QMP input, and events on a real loop."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nvme_driver import make_controller

from appliance.control.commands import QMP_NAMES, Target, dispatch
from appliance.control.fault_rules import Direction
from appliance.control.faults import FaultSet
from appliance.control.protocol import ControlConnection, Request, answer_ok, greeting
from appliance.runtime import control
from appliance.runtime.control import ControlClient, ControlService, version_triple
from appliance.runtime.loop import EventLoop
from appliance.storage.spec import AdminOpcode, Command, FeatureId
from appliance.testing.nvme import controller_driver


def lines(conn: ControlConnection, *requests: Any) -> list[Any]:
    """Feed ``requests`` (objects, or raw bytes) as lines; what comes out: replies as
    objects, requests as Request."""
    conn.receive_data(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                               for r in requests))
    out = []
    while (e := conn.next_event()) is not None:
        if isinstance(e, bytes):
            assert e.endswith(b"\r\n") or conn.dialect != conn.QMP, e
            out.append(json.loads(e))
        else:
            out.append(e)
    return out


CAPS = {"execute": "qmp_capabilities"}


# ---------------------------------------------------------------- sans-I/O
def test_greeting_is_one_crlf_line_in_the_spec_form() -> None:
    line = greeting((0, 1, 2), "appliance 0.1.2")
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 2},
                                                    "package": "appliance 0.1.2"},
                                        "capabilities": []}}
    assert version_triple("1.2.3") == (1, 2, 3) and version_triple("0+unknown") == (0, 0, 0)
    assert version_triple("2.0.1.dev3+g1") == (2, 0, 1)


def test_only_qmp_capabilities_runs_before_negotiation() -> None:
    conn = ControlConnection()
    got = lines(conn, {"execute": "status", "id": 1}, {**CAPS, "id": "c"},
                {"execute": "status", "id": 2}, {**CAPS, "id": "again"})
    assert got[0] == {"error": {"class": "CommandNotFound", "desc": got[0]["error"]["desc"],
                                "__appliance_code": "unknown_command"}, "id": 1}
    assert "qmp_capabilities" in got[0]["error"]["desc"]
    assert got[1] == {"return": {}, "id": "c"}
    assert got[2] == Request(2, "status", {}, qmp=True)
    assert got[3]["error"]["class"] == "CommandNotFound" and got[3]["id"] == "again"
    assert conn.wants_events


@pytest.mark.parametrize("arguments, ok", [
    ({}, True), ({"enable": []}, True), ({"enable": ["oob"]}, False), ({"enable": "oob"}, False),
    ({"x": 1}, False)])
def test_qmp_capabilities_offers_nothing(arguments: dict[str, Any], ok: bool) -> None:
    conn = ControlConnection()
    reply, = lines(conn, {**CAPS, "arguments": arguments})
    assert ("return" in reply) is ok and conn.negotiated is ok
    if not ok:
        assert reply["error"]["class"] == "GenericError" and "id" not in reply


def test_ids_come_back_as_sent_and_only_when_sent() -> None:
    conn = ControlConnection()
    lines(conn, CAPS)
    for request_id in [7, "x", [1, {"a": None}], {"n": 1.5}, None]:
        request, = lines(conn, {"execute": "status", "id": request_id})
        reply = json.loads(answer_ok(request, {"a": 1}))
        assert reply == {"return": {"a": 1}, "id": request_id}
    request, = lines(conn, {"execute": "status"})
    assert json.loads(answer_ok(request, None)) == {"return": {}}


@pytest.mark.parametrize("line, with_id", [
    (b"{not json", False),
    (b"[1, 2]", False),
    (b'"execute"', False),
    (b"\xff\xfe", False),
    (b'{"execute": "status", "id": 1e999}', False),
    (b"[" * 40 + b"]" * 40, False),
    (b'{"execute": 7, "id": 1}', True),
    (b'{"execute": "", "id": 1}', True),
    (b'{"id": 1}', True),
    (b'{"execute": "status", "arguments": [1], "id": 1}', True),
    (b'{"execute": "status", "arguments": null, "id": 1}', True),
    (b'{"execute": "status", "cmd": "status", "id": 1}', True),
    (b'{"exec-oob": "status", "id": 1}', True),
    (b'{"execute": "status", "control": {}, "id": 1}', True),
])
def test_malformed_qmp_input_gets_a_generic_error(line: bytes, with_id: bool) -> None:
    conn = ControlConnection()
    lines(conn, CAPS)
    reply, = lines(conn, line)
    assert set(reply) == ({"error", "id"} if with_id else {"error"}), reply
    assert reply["error"]["class"] == "GenericError" and reply["error"]["desc"]
    assert reply["error"]["__appliance_code"] == "bad_request"
    request, = lines(conn, {"execute": "status", "id": 2})  # and the next line is read
    assert request == Request(2, "status", {}, qmp=True)


def test_a_line_too_long_is_a_qmp_error_on_a_qmp_connection() -> None:
    conn = ControlConnection(max_line=100)
    lines(conn, CAPS)
    reply, = lines(conn, b'{"execute": "status", "id": "' + b"x" * 200 + b'"}')
    assert reply["error"]["__appliance_code"] == "line_too_long" and "id" not in reply


def test_the_first_request_picks_the_dialect_and_errors_before_it_are_both() -> None:
    conn = ControlConnection()
    first, = lines(conn, b"{garbage")
    assert first["ok"] is False and first["error"]["code"] == "bad_request"
    assert first["error"]["class"] == "GenericError" and first["error"]["desc"]
    assert conn.dialect is None
    lines(conn, {"id": 1, "cmd": "status"})
    assert conn.dialect == conn.LINES and not conn.wants_events
    request, = lines(conn, CAPS)  # JSON lines from now on: no "cmd", a bad request
    assert request["ok"] is False and "class" not in request["error"]


def test_commands_have_qmp_names_and_the_queries_describe_them(tmp_path: Path) -> None:
    target = Target(controller=make_controller(tmp_path), faults=FaultSet(clock=lambda: 0.0))
    try:
        assert QMP_NAMES["fault-add"] == "fault.add" and QMP_NAMES["status"] == "status"
        names = [c["name"] for c in dispatch(target, Request(1, "query-commands", {}, qmp=True))]
        assert "qmp_capabilities" in names and "namespace-resize" in names
        assert "fault.add" not in names
        rule = dispatch(target, Request(1, "fault-add", {"action": "status", "count": 1},
                                        qmp=True))
        assert rule["id"] == 1
        with pytest.raises(control.ControlError, match="unknown command") as exc:
            dispatch(target, Request(1, "fault.add", {}, qmp=True))  # a QMP name is wanted
        assert exc.value.code == "unknown_command" and "fault-add" in exc.value.message
        schema = dispatch(target, Request(1, "x-query-appliance-schema", {}, qmp=True))
        by_name = {c["name"]: c for c in schema["commands"]}
        assert set(by_name) == set(QMP_NAMES)
        resize = {a["name"]: a for a in by_name["namespace-resize"]["arguments"]}
        assert resize["size"]["required"] and not resize["nsid"]["required"]
        assert resize["nsid"]["type"] == "an integer from 1 to 4294967294"
        assert by_name["status"]["read-only"] and not by_name["link"]["read-only"]
        assert {e["name"] for e in schema["events"]} >= {"FAULT_FIRED", "CLIENT_CONNECTED"}
    finally:
        target.controller.close()


# ---------------------------------------------------------------- events on a real loop
@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ControlService, str]]:
    ctrl = make_controller(tmp_path)
    loop = EventLoop()
    path = str(tmp_path / "control.sock")
    svc = ControlService(loop, path, controller=ctrl)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            loop.run_once(0.05)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield svc, path
    stop.set()
    t.join()
    svc.close()
    loop.close()
    ctrl.close()


def test_events_reach_negotiated_qmp_clients_only(served: tuple[ControlService, str]) -> None:
    _svc, path = served
    legacy = socket.socket(socket.AF_UNIX)
    legacy.connect(path)
    legacy.settimeout(5.0)
    with ControlClient(path, timeout=5.0) as a, ControlClient(path, timeout=5.0) as b:
        a.negotiate()
        b.negotiate()
        legacy.sendall(b'{"id": 1, "cmd": "status"}\n')
        buf = b""
        while buf.count(b"\n") < 2:
            buf += legacy.recv(65536)
        assert a("namespace-resize", size="2M")["size"] == 2 << 20
        for client in (a, b):
            event = client.wait_event("NAMESPACE_CHANGED", timeout=5.0)
            assert event["data"] == {"nsid": 1}
            assert set(event["timestamp"]) == {"seconds", "microseconds"}
        a("fault.add", action="fatal", now=True)
        fatal = b.wait_event("CONTROLLER_FATAL", timeout=5.0)
        assert fatal["data"]["reason"] == "injected fault (now)" and "csts" in fatal["data"]
        with pytest.raises(TimeoutError):
            b.wait_event("LINK_STATE", timeout=0.2)
        legacy.sendall(b'{"id": 2, "cmd": "status"}\n')
        buf = b""
        while b"\n" not in buf:
            buf += legacy.recv(65536)
        assert json.loads(buf)["id"] == 2  # a reply; no event came before it
    legacy.close()


def test_a_fault_that_fires_is_an_event(tmp_path: Path) -> None:
    loop = EventLoop()
    svc = ControlService(loop, str(tmp_path / "c.sock"))
    try:
        client = socket.socket(socket.AF_UNIX)
        client.connect(svc.path)
        client.setblocking(False)
        client.sendall(json.dumps(CAPS).encode() + b"\n")
        spin(loop, lambda: bool(svc.clients) and svc.clients[0].conn.wants_events)
        rule = svc.faults.add({"target": "net", "action": "drop", "count": 1})
        assert svc.faults.frame("net0", Direction.RX, b"x" * 60, lambda f: None) == []
        buf = bytearray()

        def fired() -> bool:
            try:
                buf.extend(client.recv(65536))
            except BlockingIOError:
                pass
            return b"FAULT_FIRED" in buf

        spin(loop, fired)
        event = json.loads(bytes(buf).split(b"\r\n")[2])  # the greeting, the return, this
        assert event["data"] == {"id": rule.id, "target": "net", "action": "drop", "hits": 1}
        client.close()
    finally:
        svc.close()
        loop.close()


def test_a_client_that_never_reads_its_events_is_disconnected(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(control, "MAX_OUTPUT", 4096)
    loop = EventLoop()
    svc = ControlService(loop, str(tmp_path / "c.sock"))
    try:
        lazy = socket.socket(socket.AF_UNIX)
        lazy.connect(svc.path)
        lazy.sendall(json.dumps(CAPS).encode() + b"\n")
        spin(loop, lambda: bool(svc.clients) and svc.clients[0].conn.wants_events)
        svc.clients[0].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with caplog.at_level(logging.WARNING, logger="appliance.control"):
            for n in range(100000):
                svc.emit("LINK_STATE", {"port": "net0", "link": "down", "n": n})
                if not svc.clients:
                    break
        assert not svc.clients and "unread" in caplog.text
        lazy.close()
    finally:
        svc.close()
        loop.close()


def spin(loop: EventLoop, done: Callable[[], bool], passes: int = 200) -> None:
    for _ in range(passes):
        if done():
            return
        loop.run_once(0)
    assert done()


# ---------------------------------------------------------------- message ends
@pytest.mark.parametrize("wire, messages", [
    (b'{"execute":"status"}{"execute":"fault-list","id":2}',  # qemu.qmp: no newlines
     [b'{"execute":"status"}', b'{"execute":"fault-list","id":2}']),
    (b'{"a": "}{]["}{"b": "\\"}"}', [b'{"a": "}{]["}', b'{"b": "\\"}"}']),
    (b'{"a": "\\\\"}\n', [b'{"a": "\\\\"}']),
    (b"[[1], {}]\r\n{}", [b"[[1], {}]", b"{}"]),
    (b'{"a": 1}}} x\n{"b": 2}', [b'{"a": 1}', b"}} x", b'{"b": 2}']),
    (b"]]] garbage\n[1]", [b"]]] garbage", b"[1]"]),
    (b'{"a": "no end\n{"b": 1}', [b'{"a": "no end', b'{"b": 1}']),
    (b'{"a": {"b": [1, 2\n{}', [b'{"a": {"b": [1, 2', b"{}"]),
])
def test_a_message_ends_at_a_newline_or_where_its_object_closes(
        wire: bytes, messages: list[bytes]) -> None:
    for step in (len(wire), 1, 3):  # whole, byte by byte, cut anywhere
        conn = ControlConnection()
        for i in range(0, len(wire), step):
            conn.receive_data(wire[i:i + step])
        assert [m.strip() for m in conn._pending] == messages, step  # type: ignore[union-attr]


def test_qemu_qmp_style_input_without_newlines_is_answered() -> None:
    conn = ControlConnection()
    conn.receive_data(b'{"execute": "qmp_capabilities", "arguments": {}}')
    assert json.loads(conn.next_event()) == {"return": {}}  # type: ignore[arg-type]
    conn.receive_data(b'{"execute": "status", "id": "__qmp#00001"}')
    assert conn.next_event() == Request("__qmp#00001", "status", {}, qmp=True)


def test_the_controller_reports_changed_namespaces_posted_aers_and_cfs(tmp_path: Path) -> None:
    ctrl = make_controller(tmp_path)
    loop = EventLoop()
    svc = ControlService(loop, str(tmp_path / "c.sock"), controller=ctrl)
    got: list[tuple[str, dict[str, Any]]] = []
    svc.emit = lambda name, data: got.append((name, data))  # type: ignore[method-assign]
    try:
        d = controller_driver(ctrl).ready()
        d.admin_command(0x09, cdw10=FeatureId.ASYNC_EVENT_CONFIG, cdw11=1 << 8)
        aer = d.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
        dispatch(svc.target, Request(1, "namespace-resize", {"size": "2M"}, qmp=True))
        assert [c.cid for c in d.reap(0)] == [aer]
        dispatch(svc.target, Request(2, "fault-add", {"action": "fatal", "now": True}, qmp=True))
        assert [name for name, _ in got] == ["NAMESPACE_CHANGED", "AER_POSTED",
                                             "CONTROLLER_FATAL"]
        assert got[0][1] == {"nsid": 1}
        assert got[1][1] == {"cid": aer, "dw0": 0x2 | 0x04 << 16}
        assert got[2][1]["reason"] == "injected fault (now)" and got[2][1]["csts"] & 0x2
    finally:
        svc.close()
        loop.close()
        ctrl.close()


def test_link_reports_the_new_state() -> None:
    from test_control import FakeNet

    got: list[tuple[str, dict[str, Any]]] = []
    target = Target(net=FakeNet(), emit=lambda name, data: got.append((name, data)))
    dispatch(target, Request(1, "link", {"port": "net1", "state": "down"}, qmp=True))
    dispatch(target, Request(2, "link", {"port": "net1", "state": "up"}, qmp=True))
    assert got == [("LINK_STATE", {"port": "net1", "link": "down"}),
                   ("LINK_STATE", {"port": "net1", "link": "up"})]
