"""The socket-path lock moves with a vhost-user port's listener in a handoff
(NetService export/import in one process, two loops, fds through SCM_RIGHTS)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from test_vhost_handoff import adopt, close_all, hand_over, loops, services, transfer

from appliance.errors import ApplianceError
from appliance.runtime.loop import EventLoop

__all__ = ["loops"]  # the fixture, used by name


def locked(path: str) -> bool:
    """Whether some open file holds the lock on ``path``'s lock file."""
    fd = os.open(path + ".lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_the_lock_moves_with_the_listener(tmp_path: Path, loops: tuple[EventLoop, EventLoop]) -> None:
    a, b = services(tmp_path, loops)
    path_a, path_b = str(tmp_path / "a" / "p0.sock"), str(tmp_path / "b" / "p0.sock")
    try:
        state = hand_over(a, b)
        assert isinstance(state["ports"][0]["lock"], int)
        assert locked(path_a)  # held by b's copy: a let go of its own
        assert not os.path.exists(path_b) and not os.path.exists(path_b + ".lock")  # b's own
        a.close()  # a handed off: removes nothing
        assert os.path.exists(path_a) and locked(path_a)
    finally:
        a.close()
        b.close()
    assert not os.path.exists(path_a) and not os.path.exists(path_a + ".lock")


def test_a_listener_without_its_lock_is_refused(tmp_path: Path,
                                                loops: tuple[EventLoop, EventLoop]) -> None:
    a, b = services(tmp_path, loops)
    path_b = str(tmp_path / "b" / "p0.sock")
    try:
        a.handoff_quiesce()
        fds: list[int] = []
        state, received = transfer(a.handoff_export(fds), fds)
        state["ports"][0]["lock"] = None
        with pytest.raises(ApplianceError, match=r"a listener comes with its lock file"):
            adopt(b, state, received)
        close_all(received)
        a.handoff_resume()
        assert os.path.exists(path_b) and locked(path_b)  # b is as it was
    finally:
        a.close()
        b.close()
