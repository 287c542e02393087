"""Control socket: the sans-I/O protocol, the command table, the service on a real loop."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nvme_driver import make_controller

from appliance.control.commands import COMMANDS, QMP_NAMES, Target, dispatch
from appliance.control.events import EVENTS
from appliance.control.faults import FaultSet
from appliance.control.protocol import (
    MAX_DEPTH,
    ControlConnection,
    ControlError,
    Request,
    reply_error,
    reply_ok,
)
from appliance.runtime.control import ControlClient, ControlService
from appliance.runtime.loop import EventLoop
from appliance.storage.spec import AdminOpcode, Command, FeatureId
from appliance.testing.nvme import controller_driver
from appliance.vfio_user.wire import PciIrq


def events(conn: ControlConnection) -> list[Any]:
    out = []
    while (e := conn.next_event()) is not None:
        out.append(json.loads(e) if isinstance(e, bytes) else e)
    return out


# ---------------------------------------------------------------- protocol
def test_requests_split_anywhere_are_reassembled() -> None:
    conn = ControlConnection()
    wire = b'{"id": 1, "cmd": "status"}\n{"id": "x", "cmd": "link", "args": {"state": "up"}}\n'
    for i in range(len(wire)):
        conn.receive_data(wire[i:i + 1])
    assert events(conn) == [Request(1, "status", {}), Request("x", "link", {"state": "up"})]


@pytest.mark.parametrize("line, code", [
    (b"{not json", "bad_request"),
    (b"[1, 2]", "bad_request"),
    (b'{"id": 3}', "bad_request"),
    (b'{"id": 3, "cmd": 7}', "bad_request"),
    (b'{"id": 3, "cmd": "status", "args": [1]}', "bad_request"),
    (b'{"id": {"a": 1}, "cmd": "status"}', "bad_request"),
    (b"\xff\xfe", "bad_request"),
    (b'{"id": 3, "cmd": "status", "args": {"a": ' + b"[" * 33 + b"]" * 33 + b"}}", "bad_request"),
    (b"[" * 20000 + b"]" * 20000, "bad_request"),  # would exhaust the decoder's recursion
    (b"{" * 30000, "bad_request"),
    (b'{"id": 1e999, "cmd": "status"}', "bad_request"),
    (b'{"id": 3, "cmd": "status", "args": {"n": -1e999}}', "bad_request"),
    (b'{"id": NaN, "cmd": "status"}', "bad_request"),
    (b'{"id": 3, "cmd": "status", "args": {"n": Infinity}}', "bad_request"),
    (b'{"id": 3, "cmd": "status", "args": {"n": ' + b"7" * 5000 + b"}}", "bad_request"),
    (b'{"id": 3, "cmd": "status", "args": {"n": 18446744073709551616}}', "bad_request"),
])
def test_malformed_lines_get_error_replies_and_the_next_line_works(line: bytes, code: str) -> None:
    conn = ControlConnection()
    conn.receive_data(line + b'\n{"id": 9, "cmd": "status"}\n')
    got = events(conn)
    assert got[0]["ok"] is False and got[0]["error"]["code"] == code
    assert got[1] == Request(9, "status", {})


def test_nesting_up_to_the_limit_and_brackets_in_strings_are_fine() -> None:
    deep = b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2)  # inside the request and its args
    quoted = json.dumps("[{" * 5000 + '\\"[').encode()
    conn = ControlConnection()
    conn.receive_data(b'{"id": 1, "cmd": "status", "args": {"a": ' + deep + b"}}\n"
                      b'{"id": 2, "cmd": "status", "args": {"a": ' + quoted + b"}}\n"
                      b'{"id": 3, "cmd": "status", "args": {"n": -9223372036854775808}}\n')
    got = events(conn)
    assert [r.id for r in got] == [1, 2, 3], got


def test_oversized_line_is_refused_and_discarded() -> None:
    conn = ControlConnection(max_line=100)
    conn.receive_data(b"x" * 150)  # no newline yet: refused once the cap is passed
    conn.receive_data(b"y" * 500)
    conn.receive_data(b'zz\n{"id": 2, "cmd": "status"}\n')
    got = events(conn)
    assert len(got) == 2 and got[0]["error"]["code"] == "line_too_long"
    assert got[1] == Request(2, "status", {})
    conn.receive_data(b"q" * 101 + b"\n")  # whole oversized line in one read
    assert events(conn)[0]["error"]["code"] == "line_too_long"


def test_reply_encoding() -> None:
    assert json.loads(reply_ok(1, {"a": [1]})) == {"id": 1, "ok": True, "result": {"a": [1]}}
    assert json.loads(reply_error("z", "bad_args", "no")) == {
        "id": "z", "ok": False, "error": {"code": "bad_args", "message": "no"}}
    assert reply_ok(1, None).endswith(b"\n") and reply_ok(1, None).count(b"\n") == 1


# ---------------------------------------------------------------- commands
@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    ctrl = make_controller(tmp_path, io_queues=2, queue_entries=64)
    faults = FaultSet(clock=lambda: 0.0)
    ctrl.faults = faults
    yield Target(controller=ctrl, faults=faults)
    ctrl.close()


def run(target: Target, cmd: str, **args: Any) -> Any:
    return dispatch(target, Request(1, cmd, args))


@pytest.mark.parametrize("cmd, args, code", [
    ("frobnicate", {}, "unknown_command"),
    ("status", {"verbose": 1}, "bad_args"),
    ("trace", {}, "bad_args"),
    ("trace", {"on": "maybe"}, "bad_args"),
    ("fault.add", {"action": "nope"}, "bad_args"),
    ("fault.clear", {"id": "one"}, "bad_args"),
    ("link", {"state": "down"}, "unavailable"),
    ("namespace.resize", {"size": "1K"}, "bad_args"),
    ("namespace.resize", {"size": "2M", "nsid": 5}, "bad_args"),
    ("namespace.resize", {"size": "lots"}, "bad_args"),
])
def test_bad_commands_are_refused_with_codes(target: Target, cmd: str, args: dict[str, Any],
                                             code: str) -> None:
    with pytest.raises(ControlError) as info:
        run(target, cmd, **args)
    assert info.value.code == code


def test_status_reports_devices_queues_counters(target: Target) -> None:
    controller_driver(target.controller).ready()
    out = run(target, "status")
    nvme = out["nvme"]
    assert nvme["state"] == "ready" and nvme["attached"]
    assert set(nvme["queues"]["sq"]) == {0, 1} and nvme["namespaces"][1]["blocks"] == 2048
    assert nvme["counters"]["commands"]["admin.create_sq"] == 1
    assert "msix" in nvme["irq_stats"]
    assert out["faults"]["rules"] == []
    json.dumps(out)  # serialisable as is


def test_fault_add_list_clear(target: Target) -> None:
    rule = run(target, "fault.add", action="status", lba="8-15", status="0x281", count=2)
    assert rule["lba"] == [8, 15] and rule["status"] == "0x281" and rule["id"] == 1
    assert [r["id"] for r in run(target, "fault.list")["rules"]] == [1]
    assert run(target, "fault.clear", id=1) == {"cleared": 1}
    assert run(target, "fault.clear") == {"cleared": 0}


def test_fatal_now_and_removal(target: Target) -> None:
    d = controller_driver(target.controller).ready()
    assert run(target, "fault.add", action="fatal", now=True)["csts"] & 2
    assert d.csts & 2
    d.bus.interrupts.take()
    assert run(target, "fault.add", action="remove") == {"action": "remove", "signalled": True}
    assert (PciIrq.REQ, 0) in d.bus.interrupts.take()
    assert target.faults is not None and target.faults.counters["nvme.remove"] == 1


def test_namespace_resize_grows_image_and_raises_the_event(target: Target) -> None:
    d = controller_driver(target.controller).ready()
    d.admin_command(0x09, cdw10=FeatureId.ASYNC_EVENT_CONFIG, cdw11=1 << 8)  # NS attribute notices
    aer = d.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
    out = run(target, "namespace.resize", size="2M")
    assert out == {"nsid": 1, "old_size": 1 << 20, "size": 2 << 20, "blocks": 4096}
    assert os.path.getsize(target.controller.namespaces[1].image) == 2 << 20
    done = d.reap(0)
    assert [c.cid for c in done] == [aer]
    assert done[0].dw0 == 0x2 | 0x00 << 8 | 0x04 << 16  # notice, NS attribute, log page 04h
    _, ident = d.identify(0, nsid=1)
    assert int.from_bytes(ident[:8], "little") == 4096


def test_trace_toggles_appliance_loggers(target: Target) -> None:
    before = logging.getLogger("appliance").level
    try:
        assert run(target, "trace", on="on") == {"trace": True}
        assert logging.getLogger("appliance.storage").getEffectiveLevel() == logging.DEBUG
        assert run(target, "trace", on=False) == {"trace": False}
        assert logging.getLogger("appliance.storage").getEffectiveLevel() >= logging.INFO
    finally:
        logging.getLogger("appliance").setLevel(before)


def test_trace_off_puts_the_handlers_levels_back(target: Target) -> None:
    root = logging.getLogger()
    before = logging.getLogger("appliance").level
    quiet = logging.StreamHandler()
    quiet.setLevel(logging.WARNING)  # stderr beside a log file: warnings only
    saved = root.level
    root.addHandler(quiet)
    root.setLevel(logging.INFO)
    try:
        run(target, "trace", on=True)
        assert quiet.level == logging.NOTSET  # every record while tracing
        run(target, "trace", on=False)
        assert quiet.level == logging.WARNING
    finally:
        root.removeHandler(quiet)
        root.setLevel(saved)
        logging.getLogger("appliance").setLevel(before)


def test_every_command_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "control.md").read_text()
    for name in COMMANDS:
        assert f"`{name}`" in doc, name
    for name in QMP_NAMES:
        assert f"`{name}`" in doc, name
    for name in EVENTS:
        assert f"`{name}`" in doc, name


# ---------------------------------------------------------------- service on a real loop
@pytest.fixture
def service(tmp_path: Path, target: Target) -> Iterator[tuple[ControlService, str, EventLoop]]:
    loop = EventLoop()
    path = str(tmp_path / "control.sock")
    svc = ControlService(loop, path, controller=target.controller)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            loop.run_once(0.05)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield svc, path, loop
    stop.set()
    t.join()
    svc.close()
    loop.close()


def test_socket_is_private_and_keeps_serving_after_garbage(
        service: tuple[ControlService, str, EventLoop]) -> None:
    _, path, _ = service
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(path)
    raw.sendall(b"\x00garbage\n" + b"a" * (70 * 1024) + b"\n" + b'{"id":1,"cmd":"fault.list"}\n')
    buf = b""
    while buf.count(b"\n") < 4:  # the QMP greeting and three replies
        buf += raw.recv(65536)
    replies = [json.loads(line) for line in buf.splitlines()[1:]]
    assert [r["ok"] for r in replies] == [False, False, True]
    assert replies[1]["error"]["code"] == "line_too_long"
    raw.close()
    with ControlClient(path) as client:
        assert client("fault.add", action="hang", count=1)["action"] == "hang"
        with pytest.raises(ControlError, match="unknown command"):
            client("nope")
        assert client("status")["faults"]["rules"][0]["action"] == "hang"


def test_ctl_cli_prints_result_and_fails_with_one_line(
        service: tuple[ControlService, str, EventLoop], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import main

    _, path, _ = service
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"control: {{socket: {path}}}\nrun_dir: {tmp_path}\ndata_dir: {tmp_path}\n"
                   f"storage: {{socket: {tmp_path}/n.sock, namespaces: [{{image: {tmp_path}/x.img,"
                   f" size: 1M}}]}}\n")
    assert main(["ctl", "fault.add", "action=status", "lba=[1,2]", "-c", str(cfg)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lba"] == [1, 2]
    assert main(["ctl", "fault.add", "action=zap", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("appliance: error: fault.add: bad_args") and err.count("\n") == 1
    assert main(["ctl", "status", "junk", "-c", str(cfg)]) == 2
    capsys.readouterr()
    for value in ["[" * 100_000, "9" * 5000, "1e999", "²"]:  # one error line, exit status 2
        assert main(["ctl", "fault.clear", f"id={value}", "-c", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("appliance: error: fault.clear: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("reply", [
    b"[" * 100_000 + b"\n",
    b"[1, 2]\n",
    b"{not json\n",
    b"\xff\n",
])
def test_control_client_refuses_a_reply_that_is_no_json_object(tmp_path: Path,
                                                               reply: bytes) -> None:
    path = str(tmp_path / "fake.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with ControlClient(path, timeout=5.0) as client:
            peer, _ = server.accept()
            with peer:
                peer.sendall(reply)
                with pytest.raises(ConnectionError):
                    client.request("status")


class FakePort:
    def __init__(self, name: str) -> None:
        self.name = name
        self.delivered: list[bytes] = []
        self.sent: list[bytes] = []
        self.deliver = self.delivered.append
        self.uplink = lambda src, frame: self.sent.append(frame)


class FakeNet:
    def __init__(self) -> None:
        self.ports = [FakePort("net0"), FakePort("net1")]
        self.services = [type("Svc", (), {"port": p})() for p in self.ports]
        self.switch = type("Sw", (), {"flush": lambda self: None})()

    def stats(self) -> dict[str, Any]:
        return {"ports": {}}


def test_link_down_and_frame_faults_on_wrapped_ports(tmp_path: Path) -> None:
    loop, net, now = EventLoop(), FakeNet(), [0.0]
    svc = ControlService(loop, str(tmp_path / "c.sock"), net=net, clock=lambda: now[0])
    try:
        p0, p1 = net.ports
        t = svc.target
        p0.deliver(b"a" * 60)
        p0.uplink(p0, b"b" * 60)
        assert p0.delivered == [b"a" * 60] and p0.sent == [b"b" * 60]
        hooked = [p0.hooked, p1.hooked]  # type: ignore[attr-defined]  # set by the wrapping
        assert not any(h() for h in hooked)  # the native switch may bypass the wrappers
        assert run(t, "link", port="net0", state="down") == {"port": "net0", "link": "down"}
        assert [h() for h in hooked] == [True, False]  # net0's frames must be seen now
        p0.deliver(b"c" * 60)
        p0.uplink(p0, b"d" * 60)
        p1.deliver(b"e" * 60)
        assert len(p0.delivered) == 1 and len(p0.sent) == 1 and len(p1.delivered) == 1
        assert svc.faults.counters["net.link_down_drops"] == 2
        run(t, "link", port="net0", state="up")
        with pytest.raises(ControlError, match="port"):
            run(t, "link", port="net7", state="up")
        with pytest.raises(ControlError, match="port"):
            run(t, "fault.add", action="drop", port="net9")
        run(t, "fault.add", action="delay", port="net1", delay=0.5, count=1)
        assert all(h() for h in hooked)  # a rule: every port's frames go through the hooks
        p1.deliver(b"late")
        assert p1.delivered == [b"e" * 60]
        now[0] = 1.0
        loop.run_once(0.1)  # the release timer
        assert p1.delivered == [b"e" * 60, b"late"]
        assert run(t, "status")["net"]["links_down"] == []
    finally:
        svc.close()
        loop.close()
