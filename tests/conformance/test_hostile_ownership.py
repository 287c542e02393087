"""Who owns a socket path, against real ``appliance run`` processes: a file at a socket
path survives, a second instance never takes a live one's sockets, a dead one's
sockets are taken over, and a live handoff moves the ownership with the listeners.
Each case ends with :meth:`hostile.HostileTarget.assert_healthy`."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from hostile import HostileTarget, wait_until


def run(config: Path) -> subprocess.CompletedProcess[str]:
    """``appliance run -c config`` that is expected to refuse to start."""
    return subprocess.run([sys.executable, "-m", "appliance", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def lock_pid(socket_path: str) -> int:
    return int(Path(socket_path + ".lock").read_text())


def test_a_file_at_the_nvme_socket_path_survives(tmp_path: Path) -> None:
    target = HostileTarget(tmp_path)
    sock = Path(target.nvme_sock)
    sock.parent.mkdir(parents=True)
    sock.write_bytes(b"a file someone configured by mistake\n")
    result = run(target.proc.config_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"appliance: error: storage.socket: {sock} is a regular file, not a socket: refusing "
        + "to replace it"]
    assert sock.read_bytes() == b"a file someone configured by mistake\n"
    assert not Path(f"{sock}.lock").exists()
    sock.unlink()  # the operator fixes the path: it starts and serves
    with target:
        target.assert_healthy()


def test_a_second_instance_is_refused_and_the_first_is_still_served(tmp_path: Path) -> None:
    with HostileTarget(tmp_path) as first:
        result = run(first.proc.config_path)  # the very same configuration
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"appliance: error: storage.socket: {first.nvme_sock} is in use by appliance pid "
            + f"{first.pid} (lock {first.nvme_sock}.lock)"]
        assert "Traceback" not in result.stderr
        for path in (first.nvme_sock, first.control_sock, first.port_sock("p0"),
                     first.port_sock("p1")):
            assert lock_pid(path) == first.pid
        first.assert_healthy()


def test_the_sockets_of_a_killed_instance_are_taken_over(tmp_path: Path) -> None:
    killed = HostileTarget(tmp_path).start()
    os.kill(killed.pid, signal.SIGKILL)
    killed.stop()
    paths = [killed.nvme_sock, killed.control_sock, killed.port_sock("p0"), killed.port_sock("p1")]
    for path in paths:  # left behind: the stale sockets and their (free) locks
        assert os.path.exists(path) and lock_pid(path) == killed.pid
    with HostileTarget(tmp_path) as again:
        for path in paths:
            assert lock_pid(path) == again.pid
        again.assert_healthy()
    for path in paths:  # a clean exit removes its sockets and locks
        assert not os.path.exists(path) and not os.path.exists(path + ".lock")


def handoff(src: HostileTarget, dst: HostileTarget) -> subprocess.CompletedProcess[str]:
    """``appliance handoff``, again while the destination still sees the client its
    health check closed (it must be idle)."""
    result: list[subprocess.CompletedProcess[str]] = []

    def attempt() -> bool:
        result[:] = [subprocess.run(
            [sys.executable, "-m", "appliance", "handoff", "--from", src.control_sock,
             "--to", dst.control_sock], capture_output=True, text=True, timeout=120, check=False)]
        return result[0].returncode == 0 or "not idle" not in result[0].stderr

    wait_until(attempt, timeout=10.0)
    return result[0]


def test_a_handoff_moves_the_ownership(tmp_path: Path) -> None:
    src = HostileTarget(tmp_path / "src").start()
    shared: Any = {"namespaces": [{"image": src.config.storage.namespaces[0].image,
                                   "size": "64M"}]}
    dst = HostileTarget(tmp_path / "dst", storage=shared).start()
    try:
        moved = [src.nvme_sock, src.port_sock("p0"), src.port_sock("p1")]
        result = handoff(src, dst)
        assert result.returncode == 0, result.stderr
        assert src.proc.proc is not None and src.proc.proc.wait(10) == 0
        for path in moved:  # served by dst now, under dst's pid
            assert os.path.exists(path) and lock_pid(path) == dst.pid
        assert not os.path.exists(src.control_sock + ".lock")  # the source's own: gone
        for path in (dst.nvme_sock, dst.port_sock("p0"), dst.port_sock("p1")):
            assert not os.path.exists(path) and not os.path.exists(path + ".lock")
        again = run(src.proc.config_path)  # the source's configuration, restarted
        assert again.returncode == 2
        assert again.stderr.splitlines() == [
            f"appliance: error: storage.socket: {src.nvme_sock} is in use by appliance pid "
            + f"{dst.pid} (lock {src.nvme_sock}.lock)"]
        # dst is checked where it serves now: src's device and port paths, its own control.
        dst.config = dataclasses.replace(src.config, control=dst.config.control)
        dst.baseline()
        dst.assert_healthy()
    finally:
        dst.stop()
        src.stop()
    for path in moved:  # dst owned them: its exit removed them
        assert not os.path.exists(path) and not os.path.exists(path + ".lock")
