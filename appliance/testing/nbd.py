"""Real NBD servers for tests: qemu-storage-daemon and nbdkit exporting an image
file on a Unix socket.

Neither is polled for readiness: qemu-storage-daemon ``--daemonize`` returns
once its socket listens (its pid file names the daemon); nbdkit is handed a
socket that already listens (systemd socket activation: ``LISTEN_FDS=1``,
``LISTEN_PID``, the socket as fd 3) and runs in the foreground.  Stop sends
SIGTERM and waits until the server is gone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Self

from appliance.nbd.uri import NbdUri
from appliance.runtime.unix import wait_readable

SERVERS = ("qemu-storage-daemon", "nbdkit")
START_TIMEOUT = 30.0
STOP_GRACE = 10.0  # nbdkit's SIGTERM waits for its clients to leave
# Socket activation: the listener (argv[1]) becomes fd 3, LISTEN_PID is our pid,
# which exec keeps for the server.
ACTIVATE = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3, inheritable=True); "
            "fd != 3 and os.close(fd); os.environ.update(LISTEN_PID=str(os.getpid()), "
            "LISTEN_FDS='1'); os.execvp(sys.argv[2], sys.argv[2:])")


class NbdServer:
    """One NBD server exporting ``image`` as ``export`` on ``socket``."""

    def __init__(self, kind: str, image: Path, socket: Path, export: str = "disk",
                 read_only: bool = False, netns: str | None = None,
                 tcp: tuple[str, int] | None = None) -> None:
        """``kind``: one of :data:`SERVERS`; ``netns``: run it inside that network
        namespace (``ip netns exec``); ``tcp``: listen on that address and port
        instead of ``socket`` (qemu-storage-daemon only; ``socket`` then names
        its pid and log files).

        Raises:
            ValueError: an unknown kind, or TCP asked of nbdkit.
        """
        if kind not in SERVERS:
            raise ValueError(f"NBD server {kind!r} not one of {SERVERS}")
        if tcp is not None and kind != "qemu-storage-daemon":
            raise ValueError("a TCP listener is qemu-storage-daemon's here")
        self.tcp = tcp
        self.kind, self.image, self.socket, self.export = kind, image, socket, export
        self.read_only, self.netns = read_only, netns
        self.pidfile = socket.with_suffix(".pid")
        self.log = socket.with_suffix(".log")
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The export's URI (``nbd+unix://``, or ``nbd://`` for TCP)."""
        if self.tcp is not None:
            return str(NbdUri(export=self.export, host=self.tcp[0], port=self.tcp[1]))
        return str(NbdUri(export=self.export, socket=str(self.socket)))

    def command(self, listen_fd: int = 3) -> list[str]:
        """The server's command line (nbdkit's listening socket is ``listen_fd``)."""
        if self.kind == "qemu-storage-daemon":
            ro = "on" if self.read_only else "off"
            rw = "off" if self.read_only else "on"
            blockdev = f"driver=file,filename={self.image},node-name=disk0,read-only={ro}"
            export = f"type=nbd,id=e0,node-name=disk0,name={self.export},writable={rw}"
            cmd = ["qemu-storage-daemon", "--daemonize", "--pidfile", str(self.pidfile),
                   "--blockdev", blockdev,
                   "--nbd-server", (f"addr.type=inet,addr.host={self.tcp[0]},"
                                    f"addr.port={self.tcp[1]}" if self.tcp is not None
                                    else f"addr.type=unix,addr.path={self.socket}"),
                   "--export", export]
        else:  # socket activation: LISTEN_PID must be nbdkit's own pid, hence the exec
            nbdkit = ["nbdkit", "-f", "--filter=exportname",
                      *(["--readonly"] if self.read_only else []), "file", str(self.image),
                      f"exportname={self.export}", "exportname-strict=true"]
            cmd = [sys.executable, "-c", ACTIVATE, str(listen_fd), *nbdkit]
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def start(self) -> NbdServer:
        """Start the server; returns when it listens.

        Raises:
            RuntimeError: it did not start (its log is in the message).
        """
        self.socket.unlink(missing_ok=True)
        if self.kind == "nbdkit":
            return self._start_activated()
        with open(self.log, "wb") as log:
            done = subprocess.run(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=START_TIMEOUT, check=False)
        if done.returncode != 0 or not self.pidfile.exists():
            raise RuntimeError(f"{self.kind} did not start: {self.log.read_text()}")
        self.pid = int(self.pidfile.read_text().split()[0])
        return self

    def _start_activated(self) -> NbdServer:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket))
            listener.listen(16)
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    self.command(listener.fileno()), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, pass_fds=(listener.fileno(),))
            self.pid = self.proc.pid
        finally:
            listener.close()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the server (SIGKILL after :data:`STOP_GRACE` seconds)
        and wait until it is gone (idempotent)."""
        if self.proc is not None:
            proc, self.proc, self.pid = self.proc, None, None
            proc.send_signal(sig)
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            os.kill(pid, sig)
            if not wait_readable(pidfd, STOP_GRACE):
                os.kill(pid, signal.SIGKILL)
                wait_readable(pidfd, START_TIMEOUT)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
