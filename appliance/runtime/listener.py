"""Listening unix sockets that one process owns (runtime layer).

Every listener of the appliance (vfio-user, vhost-user server ports, control,
the live-handoff channel) binds through :func:`listen`, which first *claims*
the socket path:

* an exclusive, non-blocking ``flock`` on the lock file ``<socket>.lock``
  beside it (as SPDK does), with our pid written into it, held for the
  listener's life.  A path whose lock another process holds is refused,
  naming that process's pid;
* a path left behind by a process that died (its lock is free) is removed
  only if it is a socket nobody listens on (a process that takes no lock
  may); a regular file, a directory, a symlink or anything
  else at the socket path (or at the lock path) is refused, never removed.

On close the socket and the lock file are removed only if they are still
ours (the lock file at the path is the one we hold, the socket is the inode
we bound).

Live handoff moves a listener to another process with SCM_RIGHTS; its lock
fd travels beside it (:attr:`Claim.fd`).  A ``flock`` belongs to the open
file description, so the destination's copy holds the same lock: there is
never a moment when the path is unclaimed.  The source lets go of its copy
with :meth:`Claim.release` (nothing is removed); the destination writes its
own pid into the lock file once it serves (:meth:`Claim.write_pid`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat

from appliance.errors import ApplianceError

LOCK_SUFFIX = ".lock"
MAX_PATH = 107  # bytes of a unix socket path (sun_path holds 108 with the NUL)
_LOCK_ATTEMPTS = 5  # the lock file can be replaced under us by an exiting owner


class ListenerError(ApplianceError):
    """A socket path cannot be claimed or bound; the message names the path.

    The caller prefixes the config key (``storage.socket: ...``).
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "not a socket"


def check_parent(path: str) -> None:
    """Refuse a path below something that is not a directory (a missing parent is fine).

    Raises:
        ListenerError: the nearest existing ancestor of ``path`` is not a directory.
    """
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            st = os.stat(parent)
        except (FileNotFoundError, NotADirectoryError):  # missing, or below a file
            parent = os.path.dirname(parent)
            continue
        except OSError as exc:
            raise ListenerError(path, f"parent {parent}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ListenerError(path, f"parent {parent} is not a directory")
        return


def check_socket_path(path: str) -> None:
    """What :func:`listen` checks before it claims ``path``, without claiming it.

    Nothing is created or removed: start-up runs this for every socket first,
    so that a bad path is refused before anything else exists.

    Raises:
        ListenerError: a bad parent, something other than a socket at the path
            or at its lock path, or a lock another process holds.
    """
    if len(os.fsencode(path)) > MAX_PATH:
        raise ListenerError(path, f"{path} is too long for a unix socket "
                                  f"({len(os.fsencode(path))} bytes, at most {MAX_PATH})")
    check_parent(path)
    for where in (path, path + LOCK_SUFFIX):
        try:
            st = os.lstat(where)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ListenerError(path, f"{where}: {exc.strerror}") from None
        if where == path and not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(path, f"{path} is {_kind(st.st_mode)}, not a socket: "
                                      "refusing to replace it")
        if where != path and not stat.S_ISREG(st.st_mode):
            raise ListenerError(path, f"{where} is {_kind(st.st_mode)}, not a lock file: "
                                      "refusing to replace it")
    try:
        fd = os.open(path + LOCK_SUFFIX, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = -1
    except OSError as exc:
        raise ListenerError(path, f"{path}{LOCK_SUFFIX}: {exc.strerror}") from None
    if fd >= 0:
        try:
            _try_lock(path, fd)
        finally:
            os.close(fd)  # releases the probe's lock, if it took one
    if os.path.lexists(path):
        _refuse_if_listening(path)


def _try_lock(path: str, fd: int) -> None:
    """Take the exclusive lock on ``fd`` without waiting.

    Raises:
        ListenerError: another process holds it (named by the pid in the file).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
        who = f"appliance pid {owner}" if owner.isdigit() else "another appliance (pid unknown)"
        raise ListenerError(path, f"{path} is in use by {who} "
                                  f"(lock {path}{LOCK_SUFFIX})") from None


class Claim:
    """Ownership of one socket path: the held lock file and the bound socket's identity."""

    def __init__(self, path: str, fd: int, socket_id: tuple[int, int] | None) -> None:
        self.path = path
        self.fd = fd  #: the lock file, locked; -1 once closed or released
        self.socket_id = socket_id  #: (st_dev, st_ino) of the socket we bound or adopted

    @property
    def lock_path(self) -> str:
        return self.path + LOCK_SUFFIX

    @classmethod
    def take(cls, path: str) -> Claim:
        """Lock ``path``'s lock file and remove a stale socket at ``path``.

        Raises:
            ListenerError: as :func:`check_socket_path`; then nothing is left
                behind (a lock file we created is removed again).
        """
        check_socket_path(path)
        lock = path + LOCK_SUFFIX
        for _ in range(_LOCK_ATTEMPTS):
            created = True
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o600)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
                except FileNotFoundError:
                    continue  # its owner just removed it: try again
                except OSError as exc:
                    raise ListenerError(path, f"{lock}: {exc.strerror}") from None
            except OSError as exc:
                raise ListenerError(path, f"cannot create {lock}: {exc.strerror}") from None
            claim = cls(path, fd, None)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ListenerError(path, f"{lock} is not a regular file")
                _try_lock(path, fd)
                if not claim._lock_is_ours():
                    os.close(fd)  # the owner removed it between our open and our lock
                    continue
                claim._remove_stale_socket()
                claim.write_pid()
            except BaseException:
                if created and claim._lock_is_ours():
                    _unlink(lock)
                os.close(fd)
                raise
            return claim
        raise ListenerError(path, f"{lock} keeps being replaced by another process")

    @classmethod
    def adopt(cls, path: str, fd: int) -> Claim:
        """Our claim from another process's lock fd (live handoff); ``fd`` stays the caller's.

        Raises:
            ListenerError: ``fd`` is not the lock file at ``path``'s lock path,
                or ``path`` is not a socket.
        """
        own = os.dup(fd)
        claim = cls(path, own, None)
        try:
            if not claim._lock_is_ours():
                raise ListenerError(path, f"the lock fd handed over is not {claim.lock_path}")
            fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: the same open file
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise ListenerError(path, f"{path} is {_kind(st.st_mode)}, not a socket")
        except OSError as exc:
            os.close(own)
            raise ListenerError(path, f"cannot adopt the lock of {path}: "
                                      f"{exc.strerror or exc}") from None
        except BaseException:
            os.close(own)
            raise
        claim.socket_id = (st.st_dev, st.st_ino)
        return claim

    def write_pid(self) -> None:
        """Say in the lock file that this process owns the path now."""
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def _lock_is_ours(self) -> bool:
        try:
            st = os.lstat(self.lock_path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(self.path, f"{self.path} is {_kind(st.st_mode)}, not a socket: "
                                           "refusing to replace it")
        _refuse_if_listening(self.path)
        _unlink(self.path)  # stale: its owner died without removing it

    def bound(self) -> None:
        """Remember the socket we just bound at the path (what :meth:`close` may remove)."""
        st = os.lstat(self.path)
        self.socket_id = (st.st_dev, st.st_ino)

    def close(self) -> None:
        """Remove the socket and the lock file if they are still ours; drop the lock."""
        if self.fd < 0:
            return
        try:
            if self._lock_is_ours():
                try:
                    st = os.lstat(self.path)
                    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.socket_id:
                        _unlink(self.path)
                except FileNotFoundError:
                    pass
                _unlink(self.lock_path)
        finally:
            self.release()

    def release(self) -> None:
        """Let go of our copy of the lock fd, removing nothing (the path was handed over)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def listen(path: str, backlog: int) -> tuple[socket.socket, Claim]:
    """A non-blocking listener bound at ``path`` (mode 0600), with its claim.

    Raises:
        ListenerError: the path cannot be claimed (see :class:`Claim`) or bound.
    """
    claim = Claim.take(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # socket file mode 0600
    try:
        sock.bind(path)
        claim.bound()
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        claim.close()
        raise ListenerError(path, f"cannot listen on {path}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        claim.close()
        raise
    finally:
        os.umask(old)
    return sock, claim


def _refuse_if_listening(path: str) -> None:
    """Raises ListenerError when a process that takes no lock (not an appliance)
    listens on the socket at ``path``."""
    if _accepts(path):
        raise ListenerError(path, f"{path} is in use by a process that holds no lock on "
                                  f"{path}{LOCK_SUFFIX}: refusing to replace it")


def _accepts(path: str) -> bool:
    """Whether something listens on the unix socket at ``path`` (a connect is not refused)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True  # its backlog is full: alive
    except OSError:
        return False  # refused: nobody listens
    finally:
        probe.close()
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
