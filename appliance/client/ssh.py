"""An appliance on another host, reached over OpenSSH (client layer: it blocks).

``ssh://[USER@]HOST[:PORT]/PATH/TO/nvme.sock`` names a vfio-user socket on
another host.  :class:`SshForward` makes it a local Unix socket with ssh's
stream-local forwarding (``ssh -L LOCAL.sock:REMOTE.sock``): a master
connection (``-M -S CONTROL``) that goes to the background once it is
authenticated and its forward listens (``-f`` with
``ExitOnForwardFailure=yes``), and ``ssh -O exit`` ends it.  Keys, host-key
checking and every other choice are ssh's (``~/.ssh/config``, or ``-o``
options passed on); ``BatchMode=yes`` so that nothing ever prompts, and
``ServerAliveInterval`` so that a link that goes dead ends the forward (and so
the migration's connection) within seconds instead of hanging.

No listener on a network address is opened: the local end is a Unix socket
in a private (0700) directory.

Once connected, one session runs ``true`` over the master connection (see
:meth:`SshForward.nodelay`): OpenSSH's server turns Nagle's algorithm off on a
connection when its first session starts, and a forwarding-only connection
(``-N``) never starts one.  Without it each small reply the server sends
behind an unacknowledged segment waits for the client's delayed ACK (about
40 ms): once per MIG_DATA_WRITE, and in the downtime.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from appliance.errors import ApplianceError

CONNECT_TIMEOUT = 30  # seconds for ssh to connect, authenticate and forward
ALIVE_INTERVAL = 2  # ServerAliveInterval; the link is dead after 3 unanswered probes
SESSION_TIMEOUT = 5  # seconds for the session that turns Nagle off (nodelay)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SshTarget:
    """A socket path on another host."""

    host: str
    path: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        """``[user@]host`` for ssh."""
        return f"{self.user}@{self.host}" if self.user else self.host


def parse_target(text: str) -> SshTarget | None:
    """The :class:`SshTarget` of an ``ssh://`` URI; None for anything else (a path).

    Raises:
        ApplianceError: an ``ssh://`` URI without a host or an absolute path,
            a host or user starting with '-', a password, or a path ssh cannot
            forward (:func:`check_forwardable`).
    """
    if not text.startswith("ssh://"):
        return None
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ApplianceError(f"{text}: {exc}") from None
    path = urllib.parse.unquote(parts.path)
    if not parts.hostname or not path.startswith("/") or parts.query or parts.fragment:
        raise ApplianceError(f"{text}: expected ssh://[USER@]HOST[:PORT]/PATH/TO/SOCKET")
    if parts.hostname.startswith("-") or (parts.username or "").startswith("-"):
        raise ApplianceError(f"{text}: a host or user may not start with '-'")
    if parts.password is not None:
        raise ApplianceError(f"{text}: ssh takes no password here (use a key)")
    check_forwardable(path)
    return SshTarget(host=parts.hostname, path=path, user=parts.username, port=port)


def check_forwardable(path: str) -> None:
    """Whether ssh's ``-L LOCAL:REMOTE`` can name ``path`` as a Unix socket.

    Raises:
        ApplianceError: it contains ':' (ssh has no way to quote it: "/run/x:22"
            would be a TCP forward to a host named "/run/x") or a NUL.
    """
    if ":" in path or "\0" in path:
        raise ApplianceError(f"{path!r}: ssh cannot forward a socket path with ':' in it")


class SshForward:
    """A local Unix socket forwarded to a socket on another host, while open."""

    def __init__(self, target: SshTarget, options: Sequence[str] = (),
                 ssh: Sequence[str] = ("ssh",), timeout: float = CONNECT_TIMEOUT,
                 session: bool = True) -> None:
        """``options``: ssh ``-o`` options (``IdentityFile=...``, ...); ``ssh``: the
        command that runs ssh (a test prefixes ``ip netns exec NAME``);
        ``session``: run :meth:`nodelay` once connected."""
        self.target, self.options, self.ssh, self.timeout = target, tuple(options), ssh, timeout
        self.session = session
        self.dir: str | None = None
        self.local = ""
        self.extra = 0  # forwards added with forward()

    def _base(self) -> list[str]:
        cmd = [*self.ssh, "-S", os.path.join(self.dir or "", "control")]
        if self.target.port is not None:
            cmd += ["-p", str(self.target.port)]
        for opt in self.options:
            cmd += ["-o", opt]
        return cmd

    def open(self) -> str:
        """Connect and forward; returns the local socket's path.

        Raises:
            ApplianceError: ssh failed (its last line of complaint is in the
                message: a refused key, an unknown host, no route).
        """
        check_forwardable(self.target.path)
        self.dir = tempfile.mkdtemp(prefix="appliance-ssh-")
        self.local = os.path.join(self.dir, "fwd.sock")
        try:
            check_forwardable(self.local)  # (a TMPDIR with ':' in it)
        except ApplianceError:
            self.close()
            raise
        cmd = self._base() + [
            "-M", "-f", "-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
            "-o", f"ConnectTimeout={int(self.timeout)}",
            "-o", f"ServerAliveInterval={ALIVE_INTERVAL}", "-o", "ServerAliveCountMax=3",
            "-L", f"{self.local}:{self.target.path}", "--", self.target.destination]
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=self.timeout + 5, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.close()
            raise ApplianceError(f"ssh to {self.target.destination}: {exc}") from None
        if done.returncode != 0 or not os.path.exists(self.local):
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            self.close()
            why = lines[-1] if lines else f"exit status {done.returncode}"
            raise ApplianceError(f"ssh to {self.target.destination}: {why}")
        if self.session:
            self.nodelay()
        return self.local

    def nodelay(self) -> bool:
        """Run one session, ``true``, over the master connection, so that the
        server sets TCP_NODELAY on it (OpenSSH's sshd does when a connection's
        first session starts, for the rest of the connection).  What runs is
        the account's shell with ``-c true``, or the key's forced command if
        it has one.  A server that refuses the session, or a command that does
        not end within :data:`SESSION_TIMEOUT` seconds, costs only the delay:
        logged, not an error.

        Returns:
            Whether the session ran and ended with status 0 (False, running
            nothing, before :meth:`open`).
        """
        if self.dir is None:
            return False
        # ControlMaster=no: a user's "ControlMaster yes" would make this a second
        # master on its own connection, which would get the session instead.
        cmd = self._base() + ["-o", "BatchMode=yes", "-o", "ControlMaster=no", "--",
                              self.target.destination, "true"]
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=SESSION_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.info("ssh to %s: no session (%s): small replies may wait for delayed ACKs",
                     self.target.destination, exc)
            return False
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            log.info("ssh to %s: the session failed (%s): small replies may wait for delayed "
                     "ACKs", self.target.destination,
                     lines[-1] if lines else f"exit status {done.returncode}")
            return False
        return True

    def forward(self, remote: str) -> str:
        """Forward one more socket over the open master connection (``ssh -S CONTROL
        -O forward -L``); returns the local path (in the same private directory).

        Raises:
            ApplianceError: the master connection is gone or refused the forward,
                or ``remote`` has ':' in it (:func:`check_forwardable`).
        """
        if self.dir is None:
            raise ApplianceError(f"ssh to {self.target.destination}: not connected")
        check_forwardable(remote)
        self.extra += 1
        local = os.path.join(self.dir, f"fwd{self.extra}.sock")
        cmd = self._base() + ["-O", "forward", "-L", f"{local}:{remote}", "--",
                              self.target.destination]
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ApplianceError(f"ssh forward to {self.target.destination}: {exc}") from None
        if done.returncode != 0 or not os.path.exists(local):
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit status {done.returncode}"
            raise ApplianceError(f"ssh forward to {self.target.destination}: {why}")
        return local

    def close(self) -> None:
        """End the master connection and remove the local socket (idempotent)."""
        if self.dir is None:
            return
        if os.path.exists(os.path.join(self.dir, "control")):
            subprocess.run(self._base() + ["-O", "exit", "--", self.target.destination],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=self.timeout, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
