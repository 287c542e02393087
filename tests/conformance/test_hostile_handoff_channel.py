"""A handoff peer that stalls holds up nothing but its own handoff.

The channel of a live handoff and the question before it run in the event
loop of each process, never blocking it: a destination that stops reading
(during pre-copy, or before its verdict) and a source that stops sending leave
the control socket answering within 100 ms and the devices serving, until the
handoff's no-progress timeout (``timeout`` of ``handoff``, passed on to the
destination) fails it.  Then the source serves on with every block its driver
wrote, the destination is idle again, and a real handoff still works.  While
a handoff runs, commands that would change a device are refused
(``unavailable``), status is answered.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile import SERVED_WITHIN, wait_until
from test_handoff_faults import Rig, ctl, finish_with_real_handoff, status

from appliance.control.protocol import UNAVAILABLE
from appliance.runtime.control import ControlClient
from appliance.runtime.handoff.frames import MAGIC
from appliance.testing.process import ApplianceProcess

STALL = 1.0  # the handoff's no-progress timeout in these cases, seconds


@pytest.fixture
def full(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path / "rig", shared=False)
    yield made
    made.close()  # (asserts that no log holds a traceback)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path / "rig", shared=True)
    yield made
    made.close()


class StalledDestination:
    """A fake destination: answers ``handoff.accept`` (``shared`` as told), takes the
    channel's connection and never reads it; or, with ``refuse``, refuses.  Keeps
    the accept request it got."""

    def __init__(self, tmp: Path, shared: bool, refuse: bool = False) -> None:
        self.ctl_path, self.chan_path = tmp / "fake-ctl.sock", tmp / "fake-chan.sock"
        self.shared = shared
        self.refuse = refuse
        self.request: dict[str, Any] = {}
        self.channel: socket.socket | None = None
        self._ctl = self._listen(self.ctl_path)
        self._chan = self._listen(self.chan_path)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(1)
        sock.settimeout(30)
        return sock

    def _serve(self) -> None:
        conn, _ = self._ctl.accept()
        with conn:
            line = conn.makefile("rb").readline()
            self.request = json.loads(line)
            result = {"socket": str(self.chan_path), "shared": self.shared}
            answer = ({"ok": False, "error": {"code": "failed", "message": "not now"}}
                      if self.refuse else {"ok": True, "result": result})
            conn.sendall(json.dumps({"id": self.request["id"], **answer}).encode() + b"\n")
        if not self.refuse:
            self.channel, _ = self._chan.accept()  # and never read

    def close(self) -> None:
        self._thread.join(30)
        for sock in (self._ctl, self._chan, self.channel):
            if sock is not None:
                sock.close()


def start_handoff(src: ApplianceProcess, to: Path, timeout: float = STALL) -> socket.socket:
    """Send ``handoff`` on a control connection of its own; the reply comes later."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(ctl(src))
    sock.settimeout(30)
    greeting = b""
    while not greeting.endswith(b"\n"):  # the QMP greeting comes first
        greeting += sock.recv(1)
    assert b'"QMP"' in greeting, greeting
    sock.sendall(json.dumps({"id": 7, "cmd": "handoff",
                             "args": {"to": str(to), "timeout": timeout}}).encode() + b"\n")
    return sock


def reply_of(sock: socket.socket, within: float = 30.0) -> dict[str, Any]:
    sock.settimeout(within)
    with sock:
        reply: dict[str, Any] = json.loads(sock.makefile("rb").readline())
    return reply


def served_quickly(p: ApplianceProcess) -> dict[str, Any]:
    """``status`` answered within SERVED_WITHIN, and a command that changes a device
    refused as unavailable while the handoff runs."""
    with ControlClient(ctl(p)) as c:
        started = time.monotonic()
        st: dict[str, Any] = c("status")
        took = time.monotonic() - started
        refused = c.request("fault.clear", id=1)
    assert took < SERVED_WITHIN, took
    assert refused["error"]["__appliance_code"] == UNAVAILABLE, refused
    assert "handoff" in refused["error"]["desc"], refused
    return st


def log_since(p: ApplianceProcess, offset: int) -> str:
    return p.log_path.read_bytes()[offset:].decode(errors="replace")


def test_a_destination_that_stops_reading_during_precopy(full: Rig, tmp_path: Path) -> None:
    """Pre-copy fills the channel (the source's image has MiBs of data) and the
    destination reads none of it: the source's devices and control socket serve on,
    then the handoff fails by its timeout and nothing is lost."""
    src, _, writer = full.ready()
    fake = StalledDestination(tmp_path, shared=False)
    pending = start_handoff(src, fake.ctl_path)
    try:
        assert wait_until(lambda: fake.channel is not None)
        served_quickly(src)
        writer.step(10)  # the NVMe device serves during pre-copy
        assert writer.verify_all() == len(full.written)
        reply = reply_of(pending)
    finally:
        fake.close()
    assert reply["ok"] is False and "no progress for 1 s" in reply["error"]["message"], reply
    assert fake.request["args"]["timeout"] == STALL  # the destination is told the timeout
    st = status(src)
    assert st["nvme"]["state"] == "ready" and st["nvme"]["attached"], st
    writer.step(10)
    assert writer.verify_all() == len(full.written)
    assert "failed (pre-copy, " in src.log_text(), src.log_text()


def test_a_destination_that_never_gives_its_verdict(shared: Rig, tmp_path: Path) -> None:
    """Shared storage: the whole stream fits in the socket, the source pauses its
    devices and waits for a verdict that never comes.  Its control socket answers
    meanwhile; at the timeout it resumes, and the driver's I/O goes on."""
    src, _, writer = shared.ready()
    fake = StalledDestination(tmp_path, shared=True)
    pending = start_handoff(src, fake.ctl_path)
    try:
        assert wait_until(lambda: fake.channel is not None)
        served_quickly(src)
        reply = reply_of(pending)
    finally:
        fake.close()
    assert reply["ok"] is False and "no progress for 1 s" in reply["error"]["message"], reply
    writer.step(10)
    assert writer.verify_all() == len(shared.written)
    finish_with_real_handoff(shared)  # and the same source hands off for real


def test_a_source_that_stops_sending(shared: Rig, tmp_path: Path) -> None:
    """The destination gets half a frame head and then nothing: it answers its
    control socket meanwhile, refuses at the timeout (closing every fd) and is
    idle again: a real handoff to it works."""
    src, dst, _ = shared.ready()
    # What the source would ask (its fingerprint, its images): a fake destination
    # takes the question and gives no channel that works; the source serves on.
    fake = StalledDestination(tmp_path, shared=True, refuse=True)
    reply = reply_of(start_handoff(src, fake.ctl_path))
    fake.close()
    assert reply["ok"] is False and "refused the handoff: not now" in reply["error"]["message"]
    offset = dst.log_path.stat().st_size
    before = len(list(Path(f"/proc/{dst.proc.pid}/fd").iterdir())) if dst.proc else 0
    with ControlClient(ctl(dst)) as c:
        accepted = c("handoff.accept", **fake.request["args"])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as chan:
        chan.connect(accepted["socket"])
        chan.sendall(MAGIC + b"\x02")  # 5 of a frame head's 12 bytes
        served_quickly(dst)
        chan.settimeout(30)
        verdict = json.loads(chan.makefile("rb").readline())
    assert verdict["ok"] is False and "no progress for 1 s" in verdict["error"], verdict
    assert "handoff refused: handoff channel: " in log_since(dst, offset)
    assert wait_until(lambda: dst.proc is not None and len(list(
        Path(f"/proc/{dst.proc.pid}/fd").iterdir())) == before)
    assert status(dst)["nvme"]["attached"] is False
    finish_with_real_handoff(shared)
