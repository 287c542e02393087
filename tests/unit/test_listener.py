"""Socket-path ownership (appliance.runtime.listener): the lock beside each socket,
what a stale path may be, and what close and release remove."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.runtime.listener import Claim, ListenerError, check_socket_path, listen


def test_listen_locks_and_close_removes_both(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    sock, claim = listen(path, 4)
    try:
        assert os.path.exists(path) and os.stat(path).st_mode & 0o777 == 0o600
        assert Path(path + ".lock").read_text() == f"{os.getpid()}\n"
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
    finally:
        sock.close()
        claim.close()
    assert not os.path.exists(path) and not os.path.exists(path + ".lock")


def test_second_claim_is_refused_naming_the_pid(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    sock, claim = listen(path, 4)
    try:
        with pytest.raises(ListenerError, match=rf"in use by appliance pid {os.getpid()}"):
            listen(path, 4)
        with pytest.raises(ListenerError, match="in use"):
            check_socket_path(path)
        with socket.socket(socket.AF_UNIX) as c:  # the first one still serves there
            c.connect(path)
    finally:
        sock.close()
        claim.close()


def test_a_lock_held_by_another_process_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    script = ("import sys; from appliance.runtime.listener import listen; "
              f"s, c = listen({path!r}, 1); print('held', flush=True); sys.stdin.read(); "
              "s.close(); c.close()")
    holder = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(ListenerError, match=rf"in use by appliance pid {holder.pid} "):
            listen(path, 4)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert not os.path.exists(path) and not os.path.exists(path + ".lock")


@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo"])
def test_anything_but_a_socket_is_never_replaced(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "s.sock"
    if kind == "file":
        path.write_text("precious")
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ListenerError, match=r"not a socket: refusing to replace it"):
        listen(str(path), 4)
    assert sorted(os.listdir(tmp_path)) == before  # nothing removed, no lock file left
    if kind == "file":
        assert path.read_text() == "precious"


def test_a_lock_path_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.sock.lock").mkdir()
    with pytest.raises(ListenerError, match=r"s.sock.lock is a directory, not a lock file"):
        listen(str(tmp_path / "s.sock"), 4)


def test_a_stale_socket_and_lock_are_taken_over(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    Path(path + ".lock").write_text("999999\n")  # its owner died
    sock, claim = listen(path, 4)
    try:
        assert Path(path + ".lock").read_text() == f"{os.getpid()}\n"
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
    finally:
        sock.close()
        claim.close()


def test_close_leaves_what_is_no_longer_ours(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    sock, claim = listen(path, 4)
    sock.close()
    os.unlink(path)
    Path(path).write_text("someone else's")
    claim.close()
    assert Path(path).read_text() == "someone else's"
    assert not os.path.exists(path + ".lock")


def test_release_removes_nothing_and_an_adopted_copy_keeps_the_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    sock, claim = listen(path, 4)
    adopted = Claim.adopt(path, claim.fd)  # what a handoff destination does with the fd
    claim.release()
    try:
        assert os.path.exists(path) and os.path.exists(path + ".lock")
        probe = os.open(path + ".lock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # still locked: by the adopted copy
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        sock.close()
        adopted.close()
    assert not os.path.exists(path) and not os.path.exists(path + ".lock")


def test_adopt_refuses_a_foreign_fd(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    sock, claim = listen(path, 4)
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(ListenerError, match="is not .*s.sock.lock"):
            Claim.adopt(path, other)
    finally:
        os.close(other)
        sock.close()
        claim.close()


def test_a_parent_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ListenerError, match=r"parent .*/f is not a directory"):
        listen(str(tmp_path / "f" / "d" / "s.sock"), 4)


def test_a_socket_someone_listens_on_without_a_lock_is_not_taken(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    foreign = socket.socket(socket.AF_UNIX)
    foreign.bind(path)
    foreign.listen(1)
    try:
        with pytest.raises(ListenerError, match=r"in use by a process that holds no lock on "):
            listen(path, 4)
        assert os.path.exists(path) and not os.path.exists(path + ".lock")
    finally:
        foreign.close()
