"""Simulated hosts for tests that cross a network: network namespaces the test
makes, joined by veth pairs to a bridge namespace, with addresses that exist
only inside them (needs root and iproute2); an sshd on one of them.

:class:`Hosts` makes ``PREFIX-a`` (10.88.0.1), ``PREFIX-b`` (10.88.0.2),
``PREFIX-c`` (10.88.0.3) bridged in ``PREFIX-br``; :meth:`Hosts.run` runs a
command inside one (``ip netns exec``), :meth:`Hosts.link` brings a host's
link down or up (a cut cable).  :class:`Sshd` starts OpenSSH's sshd on a
host with a generated host key and client key, and writes the client's
``known_hosts``, so the client checks the host key for real.  Nothing here
sleeps: ``ip`` commands are synchronous and sshd listens before it detaches.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

NAMES = ("a", "b", "c")
SUBNET = "10.88.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Hosts:
    """Three hosts a, b, c in network namespaces (made on enter, removed on exit)."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"ap{os.getpid() % 100000}"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        """The network namespace of ``host`` (``a``, ``b``, ``c`` or ``br``)."""
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        """``host``'s address (only inside the namespaces)."""
        return f"{SUBNET}.{NAMES.index(host) + 1}"

    def wrapper(self, host: str) -> tuple[str, ...]:
        """The command prefix that runs a command on ``host``."""
        return ("ip", "netns", "exec", self.ns(host))

    def run(self, host: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on ``host``; raises CalledProcessError when it fails."""
        return subprocess.run([*self.wrapper(host), *cmd], check=True, capture_output=True,
                              text=True, timeout=60)

    def link(self, host: str, up: bool) -> None:
        """Bring ``host``'s link to the bridge up or down."""
        _ip("-n", self.ns(host), "link", "set", self.ns(host), "up" if up else "down")

    def up(self) -> None:
        """Make the namespaces and links.

        Raises:
            subprocess.CalledProcessError: ``ip`` failed (not root?).
        """
        br = self.ns("br")
        _ip("netns", "add", br)
        self.made.append(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for host in NAMES:
            name = self.ns(host)
            _ip("netns", "add", name)
            self.made.append(name)
            _ip("link", "add", name, "type", "veth", "peer", "name", f"{name}-p")
            _ip("link", "set", name, "netns", name)
            _ip("link", "set", f"{name}-p", "netns", br)
            _ip("-n", br, "link", "set", f"{name}-p", "master", "br0")
            _ip("-n", br, "link", "set", f"{name}-p", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{self.address(host)}/24", "dev", name)
            _ip("-n", name, "link", "set", name, "up")

    def down(self) -> None:
        """Kill what still runs inside the namespaces (the test started it) and
        remove them."""
        for name in reversed(self.made):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                                  check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.made = []

    def __enter__(self) -> Self:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()


class Sshd:
    """OpenSSH's sshd on one host, for root, with keys generated under ``workdir``."""

    def __init__(self, hosts: Hosts, host: str, workdir: Path) -> None:
        self.hosts, self.host, self.dir = hosts, host, workdir
        self.key = workdir / "client_key"
        self.other_key = workdir / "wrong_key"  # a key sshd does not know
        self.known_hosts = workdir / "known_hosts"
        self.pidfile = workdir / "sshd.pid"

    def ssh_options(self, key: Path | None = None) -> list[str]:
        """ssh ``-o`` options: our key, our known_hosts, strict host-key checking."""
        return [f"IdentityFile={key or self.key}", f"UserKnownHostsFile={self.known_hosts}",
                "StrictHostKeyChecking=yes", "IdentitiesOnly=yes", "LogLevel=ERROR"]

    def start(self) -> None:
        """Generate the keys and start sshd; returns once it listens.

        Raises:
            subprocess.CalledProcessError: ssh-keygen or sshd failed.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        for key in (self.dir / "host_key", self.key, self.other_key):
            key.unlink(missing_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True, capture_output=True, timeout=30)
        (self.dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        (self.dir / "authorized_keys").chmod(0o600)
        host_pub = Path(self.dir / "host_key.pub").read_text().split()
        address = self.hosts.address(self.host)
        self.known_hosts.write_text(f"{address} {host_pub[0]} {host_pub[1]}\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.hosts.run(self.host, "/usr/sbin/sshd", "-f", "/dev/null",
                       "-h", str(self.dir / "host_key"), "-o", f"ListenAddress={address}",
                       "-o", f"PidFile={self.pidfile}",
                       "-o", f"AuthorizedKeysFile={self.dir / 'authorized_keys'}",
                       "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
                       "-o", "StrictModes=no", "-o", "AllowStreamLocalForwarding=yes",
                       "-o", "PermitRootLogin=prohibit-password",
                       "-o", "ClientAliveInterval=1", "-o", "ClientAliveCountMax=3")

    def stop(self) -> None:
        """SIGTERM sshd (its sessions end with the namespace)."""
        try:
            os.kill(int(self.pidfile.read_text().split()[0]), signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass
