"""QEMU's own QMP tools against a real ``appliance run``: the ``qemu.qmp`` library
connects, negotiates, lists the commands, injects a fault and receives the
event when an NVMe command hits it; ``qmp-shell`` runs a command in tmux;
``appliance ctl wait-event`` prints the event it waited for."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile import wait_until
from qemu.qmp import QMPClient

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.storage.spec import IoOpcode
from appliance.testing.process import ApplianceProcess


@pytest.fixture
def driver(appliance: ApplianceProcess) -> Iterator[NvmeDriver]:
    with VfioUserClient.connect(appliance.config.storage.socket) as client:
        nvme = NvmeDriver(client)
        nvme.setup(io_queues=1, depth=16)
        try:
            yield nvme
        finally:
            nvme.close()


def test_qemu_qmp_lists_commands_injects_a_fault_and_gets_its_event(
        appliance: ApplianceProcess, driver: NvmeDriver) -> None:
    async def session() -> tuple[set[str], dict[str, Any], int, dict[str, Any]]:
        qmp = QMPClient("appliance-test")
        await qmp.connect(appliance.config.control.socket)  # greeting + qmp_capabilities
        try:
            names = {c["name"] for c in await qmp.execute("query-commands")}
            with qmp.listener("FAULT_FIRED") as listener:
                rule = await qmp.execute("fault-add", {"action": "status", "count": 1})
                done, _ = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: driver.io(IoOpcode.READ, 0, 1))
                event = await asyncio.wait_for(listener.get(), 10.0)
            return names, rule, done.status, dict(event)
        finally:
            await qmp.disconnect()

    names, rule, status, event = asyncio.run(session())
    assert {"qmp_capabilities", "query-commands", "fault-add", "status", "handoff"} <= names
    assert status >> 1 != 0  # the command completed with the injected error
    assert event["event"] == "FAULT_FIRED"
    assert event["data"] == {"id": rule["id"], "target": "nvme", "action": "status", "hits": 1}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}


def test_qmp_shell_runs_a_command_in_tmux(appliance: ApplianceProcess, tmp_path: Path) -> None:
    shell = shutil.which("qmp-shell")
    assert shell is not None, "qmp-shell (pip package qemu.qmp) is not installed"
    session = f"appliance-qmp-{tmp_path.name}"
    tmux = ["tmux", "-L", session]  # a server of its own: nothing shared with the user's
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "50",
                    shell, appliance.config.control.socket], check=True)
    try:
        def pane() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", session, "-S", "-200"],
                                  check=True, capture_output=True, text=True).stdout

        assert wait_until(lambda: "(QEMU)" in pane(), 20.0), pane()
        subprocess.run([*tmux, "send-keys", "-t", session,
                        "fault-add action=status count=1 qid=1", "Enter"], check=True)
        assert wait_until(lambda: '"action": "status"' in pane(), 20.0), pane()
        subprocess.run([*tmux, "send-keys", "-t", session, "fault-list", "Enter"], check=True)
        assert wait_until(lambda: '"rules"' in pane(), 20.0), pane()
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    assert appliance.alive


def test_ctl_wait_event_prints_the_event(appliance: ApplianceProcess) -> None:
    sock = appliance.config.control.socket
    waiter = subprocess.Popen([sys.executable, "-m", "appliance", "ctl", "wait-event",
                               "NAMESPACE_CHANGED", "-s", sock, "--timeout", "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert waiter.stderr is not None
        assert waiter.stderr.readline().startswith("appliance: waiting for NAMESPACE_CHANGED")
        size = appliance.config.storage.namespaces[0].size + (1 << 20)
        ctl = subprocess.run([sys.executable, "-m", "appliance", "ctl", "namespace-resize",
                              f"size={size}", "-s", sock], capture_output=True, text=True,
                             check=False, timeout=30)
        assert ctl.returncode == 0, ctl.stderr
        out, err = waiter.communicate(timeout=30)
    finally:
        waiter.kill()
        waiter.wait()
    assert waiter.returncode == 0, err
    event = json.loads(out)
    assert event["event"] == "NAMESPACE_CHANGED" and event["data"] == {"nsid": 1}
    late = subprocess.run([sys.executable, "-m", "appliance", "ctl", "wait-event", "LINK_STATE",
                           "-s", sock, "--timeout", "0.3"], capture_output=True, text=True,
                          check=False, timeout=30)
    assert late.returncode == 2
    assert late.stderr.splitlines()[-1] == "appliance: error: wait-event: no LINK_STATE event within 0.3 s"


def test_the_fixture_client_waits_for_an_event(appliance: ApplianceProcess,
                                               appliance_ctl: Any) -> None:
    size = appliance_ctl("status")["nvme"]["namespaces"]["1"]["size"] + (1 << 20)
    appliance_ctl("namespace-resize", size=size)
    event = appliance_ctl.wait_event("NAMESPACE_CHANGED", timeout=10.0)
    assert event["data"] == {"nsid": 1}
    with pytest.raises(TimeoutError):
        appliance_ctl.wait_event("NAMESPACE_CHANGED", timeout=0.2)


def test_vfio_user_and_vhost_user_clients_coming_and_going_are_events(tmp_path: Path) -> None:
    from hostile import HostileTarget

    from appliance.runtime.control_client import ControlClient

    with HostileTarget(tmp_path) as target:
        with ControlClient(target.control_sock) as ctl:
            ctl.negotiate()
            for path, device, protocol in [(target.nvme_sock, "nvme", "vfio-user"),
                                           (target.port_sock("p0"), "net0", "vhost-user")]:
                peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                peer.connect(path)
                came = ctl.wait_event("CLIENT_CONNECTED", timeout=10.0)
                peer.close()
                went = ctl.wait_event("CLIENT_DISCONNECTED", timeout=10.0)
                assert came["data"] == went["data"] == {"device": device, "protocol": protocol}
        target.assert_healthy()


def test_migration_state_changes_are_events(appliance: ApplianceProcess, appliance_ctl: Any) -> None:
    """A vfio-user client walks the device to STOP and back: each state the device
    enters is a MIGRATION_STATE event (what an orchestrator or a test waits on)."""
    from appliance.client.migrate import set_state
    from appliance.client.vfio_user import VfioUserClient
    from appliance.vfio_user.migration_states import MigState

    appliance_ctl.negotiate()  # in command mode: events are sent from now on
    with VfioUserClient.connect(str(appliance.config.storage.socket)) as client:
        assert set_state(client, MigState.STOP) is MigState.STOP
        assert set_state(client, MigState.RUNNING) is MigState.RUNNING
    seen = [appliance_ctl.wait_event("MIGRATION_STATE", timeout=10.0)["data"] for _ in range(2)]
    assert seen == [{"device": "nvme", "from": "RUNNING", "to": "STOP"},
                    {"device": "nvme", "from": "STOP", "to": "RUNNING"}]
