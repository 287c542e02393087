"""QEMU guest harness: boot the test guest under TCG and talk to it (product code:
the pytest plugin's ``appliance_guest`` fixture and ``appliance boot`` use it;
``tests/integration/qemu.py`` re-exports it).

Theory of operation
-------------------
``images/qemu-env.sh`` (run by ``scripts/provision``) builds a Debian-sid chroot with
QEMU 11.1 (it has the ``vfio-user-pci`` client) and a busybox guest whose ``/init``
prints markers on the serial console (see ``images/README.md``).
:mod:`appliance.testing.qemu_environment` finds that environment; :class:`Guest`
starts QEMU in its own process group with the serial console on stdio and a QMP
socket.

A reader thread copies QEMU's stdout+stderr to ``<workdir>/<name>.log``, splits it into
lines (``\\r`` dropped) and notifies a condition variable; :meth:`Guest.wait_for` waits
on that condition, never by sleeping and polling. Waits consume console lines like
``expect`` does: each match moves a cursor past the matched line, and the next wait
starts there unless ``start=`` says otherwise.

With ``qe.shell`` on the kernel command line the guest runs an interactive shell on
the console (echo off, no prompt), and :meth:`Guest.run` sends commands through
QEMU's stdin and collects their output and exit status between token markers.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from appliance.config import Config, PortMode
from appliance.testing.qemu_environment import QemuEnv

#: Console lines quoted in timeout messages.
TAIL_LINES = 60

_PCI_RE = re.compile(
    r"PCI (?P<bdf>\S+) vendor=(?P<vendor>0x[0-9a-f]+) device=(?P<device>0x[0-9a-f]+)"
    r" class=(?P<cls>0x[0-9a-f]+) driver=(?P<driver>\S+)(?P<bars>.*)$"
)
_BAR_RE = re.compile(r"bar(\d)=(0x[0-9a-f]+)\+(0x[0-9a-f]+):(\S+)")
_CAPS_RE = re.compile(r"PCICAPS (?P<bdf>\S+)(?P<ids>(?: [0-9a-f]{2})*)\s*$")


class QMPError(Exception):
    """QEMU answered a QMP command with an error."""

    def __init__(self, cmd: str, error: Mapping[str, Any]) -> None:
        self.cmd = cmd
        self.error = dict(error)
        super().__init__(f"QMP {cmd}: {error.get('class')}: {error.get('desc')}")


@dataclass(frozen=True)
class PciFunction:
    """One PCI function as listed by the guest's /init."""

    bdf: str
    vendor: int
    device: int
    cls: int
    driver: str | None
    bars: dict[int, tuple[int, int, str]]  #: index -> (start, size, type)
    caps: tuple[int, ...] = ()  #: capability ids in chain order


def parse_pci(lines: Sequence[str]) -> dict[str, PciFunction]:
    """Parse the ``PCI``/``PCICAPS`` lines printed by the guest's /init.

    Returns:
        PCI functions by BDF (``0000:00:02.0``).
    """
    funcs: dict[str, PciFunction] = {}
    for line in lines:
        if m := _PCI_RE.search(line):
            bars = {
                int(b[0]): (int(b[1], 16), int(b[2], 16), b[3]) for b in _BAR_RE.findall(m["bars"])
            }
            drv = None if m["driver"] == "-" else m["driver"]
            funcs[m["bdf"]] = PciFunction(
                m["bdf"],
                int(m["vendor"], 16),
                int(m["device"], 16),
                int(m["cls"], 16),
                drv,
                bars,
            )
        elif (m := _CAPS_RE.search(line)) and m["bdf"] in funcs:
            f = funcs[m["bdf"]]
            caps = tuple(int(x, 16) for x in m["ids"].split())
            funcs[m["bdf"]] = PciFunction(f.bdf, f.vendor, f.device, f.cls, f.driver, f.bars, caps)
    return funcs


class Guest:
    """A QEMU process running the test guest.

    Args:
        env: from :func:`~appliance.testing.qemu_environment.qemu_env`.
        workdir: where the console log goes (``<workdir>/<name>.log``); usually tmp_path.
        args: extra QEMU arguments (``-device ...``), appended last.
        append: extra kernel command line (``qe.shell``, ``qe.nvmetest``, ``qe.hold``).
        smp: number of vCPUs.
        mem_mb: guest RAM in MiB, one memfd backend.
        share: shared memfd guest memory (False: plain anonymous RAM,
            ``memory-backend-ram``, which QEMU cannot pass by fd, so devices reach
            guest memory with DMA_READ/DMA_WRITE messages; a memfd with share=off
            would pass an fd whose mapping is private, and the device would not
            see the guest's writes).
        accel: QEMU accelerator (tcg).
        name: names the log file.
        qemu: another QEMU binary to run instead of the environment's 11.1 (e.g. the
            host's /usr/bin/qemu-system-x86_64, bookworm's 7.2, which has no vfio-user).
        initrd: another initramfs than the busybox guest's (the Debian guest's,
            :mod:`appliance.testing.debian`).

    QEMU starts on :meth:`start` (or entering the ``with`` block) and is killed by
    :meth:`kill` / leaving the block, whatever happened.
    """

    def __init__(
        self,
        env: QemuEnv,
        workdir: Path,
        *,
        args: Sequence[str] = (),
        append: str = "",
        smp: int = 1,
        mem_mb: int = 512,
        share: bool = True,
        accel: str = "tcg",
        name: str = "guest",
        qemu: str | Path | None = None,
        initrd: Path | None = None,
    ) -> None:
        self.env = env
        self.workdir = Path(workdir)
        self.name = name
        self.log_path = self.workdir / f"{name}.log"
        # Unix socket paths are limited to 107 bytes: keep sockets in a short directory.
        self._sockdir = Path(tempfile.mkdtemp(prefix="qe-", dir="/tmp"))
        self.qmp_path = self._sockdir / "qmp.sock"
        kernel_cmdline = f"console=ttyS0 panic=-1 quiet {append}".strip()
        # fmt: off
        self.argv: list[str] = [
            str(qemu or env.qemu),
            "-machine", "q35", "-accel", accel,
            "-m", f"{mem_mb}M", "-smp", str(smp),
            "-object",
            f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on" if share
            else f"memory-backend-ram,id=mem,size={mem_mb}M",
            "-numa", "node,memdev=mem",
            "-nographic", "-no-reboot", "-nic", "none", "-vga", "none",
            "-kernel", str(env.vmlinux), "-initrd", str(initrd or env.initrd),
            "-append", kernel_cmdline,
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *args,
        ]
        # fmt: on
        self.proc: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition()
        self._lines: list[str] = []
        self._eof = False
        self._cursor = 0
        self._shell_ready = False
        self._log: IO[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._qmp_sock: socket.socket | None = None
        self._qmp_file: IO[bytes] | None = None
        #: QMP events received so far (dicts as QEMU sent them).
        self.events: list[dict[str, Any]] = []
        self.started_at = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Start QEMU. Returns self."""
        if self.proc is not None:
            raise RuntimeError("guest already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by kill())
        self._log.write(("$ " + " ".join(self.argv) + "\n").encode())
        self._log.flush()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._read_console, name=f"qemu-console-{self.name}", daemon=True
        )
        self._reader.start()
        return self

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        """QEMU's PID (the wrappers exec all the way down)."""
        assert self.proc is not None, "guest not started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        """SIGKILL QEMU's process group, reap it, close the QMP socket, log and stdin.

        Safe to call more than once, and before :meth:`start`.
        """
        self._qmp_close()
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
            if self.proc.stdin is not None:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
        if self._reader is not None:
            self._reader.join(timeout=10)
            self._reader = None
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._sockdir, ignore_errors=True)

    close = kill

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for QEMU to exit on its own (e.g. after GUEST-POWEROFF).

        Returns:
            QEMU's exit status.
        Raises:
            AssertionError: still running after ``timeout`` seconds (QEMU is left
            running; :meth:`kill` or the context manager ends it).
        """
        assert self.proc is not None, "guest not started"
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(self._explain(f"QEMU still running after {timeout:g} s")) from None
        if self._reader is not None:
            self._reader.join(timeout=10)
        return rc

    # ------------------------------------------------------------------ console
    def _read_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        partial = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            log = self._log
            if log is not None and data:
                try:
                    log.write(data)
                    log.flush()
                except ValueError:  # closed under us by kill()
                    pass
            with self._cond:
                if not data:
                    if partial:
                        self._lines.append(partial.decode(errors="replace").rstrip("\r"))
                    self._eof = True
                    self._cond.notify_all()
                    return
                *complete, partial = (partial + data).split(b"\n")
                for raw in complete:
                    self._lines.append(raw.decode(errors="replace").replace("\r", ""))
                self._cond.notify_all()

    def lines(self) -> list[str]:
        """A copy of all complete console lines so far (plus the last partial at exit)."""
        with self._cond:
            return list(self._lines)

    def mark(self) -> int:
        """The number of console lines so far: pass it as ``start=`` to wait_for."""
        with self._cond:
            return len(self._lines)

    def tail(self, n: int = TAIL_LINES) -> str:
        """The last ``n`` console lines, one string."""
        with self._cond:
            return "\n".join(self._lines[-n:])

    def _explain(self, what: str) -> str:
        rc = self.returncode
        state = "running" if rc is None else f"exited rc={rc}"
        return (
            f"{what} (QEMU {state}; log {self.log_path}); "
            f"last {TAIL_LINES} console lines:\n{self.tail()}"
        )

    def _wait(
        self, pattern: str | re.Pattern[str], timeout: float, start: int | None
    ) -> tuple[int, re.Match[str]]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            i = self._cursor if start is None else start
            while True:
                while i < len(self._lines):
                    m = rx.search(self._lines[i])
                    if m is not None:
                        self._cursor = i + 1
                        return i, m
                    i += 1
                if self._eof:
                    raise AssertionError(self._explain(f"QEMU output ended without /{rx.pattern}/"))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        self._explain(f"timed out after {timeout:g} s waiting for /{rx.pattern}/")
                    )
                self._cond.wait(left)

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = 60.0, *, start: int | None = None
    ) -> re.Match[str]:
        """Wait for a console line matching ``pattern`` (``re.search``).

        Searches from ``start`` (a line index, see :meth:`mark`) or else from just
        after the previous match; a match moves that cursor past the matched line.

        Returns:
            The match.
        Raises:
            AssertionError: on timeout or when QEMU's output ends first; the message
            quotes the last 60 console lines.
        """
        return self._wait(pattern, timeout, start)[1]

    def send(self, text: str) -> None:
        """Write ``text`` to QEMU's stdin, i.e. type it on the guest's serial console.

        Never send Ctrl-A (0x01): it is the escape of QEMU's stdio multiplexer.
        """
        assert self.proc is not None and self.proc.stdin is not None, "guest not started"
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def run(self, cmd: str, timeout: float = 60.0) -> tuple[str, int]:
        """Run a shell command in a ``qe.shell`` guest.

        Waits for GUEST-SHELL first (from the start of the console). Kernel messages
        printed meanwhile end up in the output too.

        Returns:
            (output without a trailing newline, exit status).
        Raises:
            AssertionError: on timeout or QEMU exit, with the console tail.
        """
        if not self._shell_ready:
            self._wait(r"GUEST-SHELL$", timeout, 0)
            self._shell_ready = True
        tok = secrets.token_hex(6)
        # The quotes split the begin marker in the command text, so only the
        # output of echo matches; $? is not expanded in the command text either.
        begin_rx = re.compile(rf"__QE_BEGIN_{tok}__$")
        end_rx = re.compile(rf"^(?P<pre>.*)__QE_RC=(?P<rc>\d+)_{tok}__$")
        start = self.mark()
        self.send(f"echo __QE_BEG''IN_{tok}__; {cmd}\necho __QE_RC=$?_{tok}__\n")
        b, _ = self._wait(begin_rx, timeout, start)
        e, m = self._wait(end_rx, timeout, b + 1)
        with self._cond:
            out = self._lines[b + 1 : e]
        if m["pre"]:
            out = [*out, m["pre"]]
        return "\n".join(out), int(m["rc"])

    # ------------------------------------------------------------------ QMP
    def _qmp_recv(self) -> dict[str, Any]:
        assert self._qmp_file is not None
        line = self._qmp_file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def _qmp_send(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        assert self._qmp_sock is not None
        self._qmp_sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._qmp_recv()
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply

    def _qmp_connect(self, timeout: float) -> None:
        """Connect and negotiate capabilities. QEMU creates the socket at start-up,
        before the guest runs; until then, retry whenever QEMU prints or exits."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.qmp_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
            with self._cond:
                if self._eof or self.returncode is not None:
                    raise AssertionError(self._explain("QEMU exited before QMP was up"))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(self._explain("QMP socket did not appear"))
                self._cond.wait(min(left, 0.05))
        s.settimeout(timeout)
        self._qmp_sock = s
        self._qmp_file = s.makefile("rb")
        greeting = self._qmp_recv()
        if "QMP" not in greeting:
            raise ConnectionError(f"unexpected QMP greeting {greeting!r}")
        reply = self._qmp_send({"execute": "qmp_capabilities"})
        if "error" in reply:
            raise QMPError("qmp_capabilities", reply["error"])

    def _qmp_close(self) -> None:
        if self._qmp_file is not None:
            self._qmp_file.close()
            self._qmp_file = None
        if self._qmp_sock is not None:
            self._qmp_sock.close()
            self._qmp_sock = None

    def qmp(
        self,
        cmd: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float = 30.0,
        **args: Any,
    ) -> Any:
        """Execute a QMP command (connecting on first use) and return its ``return``.

        Arguments come as keywords, or as a mapping for names that are not Python
        identifiers (``guest.qmp("device_del", {"id": "nvme0"})``). Events received
        meanwhile are appended to :attr:`events`.

        Raises:
            QMPError: QEMU answered with an error.
            AssertionError: QEMU exited or the socket never appeared.
        """
        assert self.proc is not None, "guest not started"
        if self._qmp_sock is None:
            self._qmp_connect(timeout)
        assert self._qmp_sock is not None
        self._qmp_sock.settimeout(timeout)
        msg: dict[str, Any] = {"execute": cmd}
        merged = {**(arguments or {}), **args}
        if merged:
            msg["arguments"] = merged
        reply = self._qmp_send(msg)
        if "error" in reply:
            raise QMPError(cmd, reply["error"])
        return reply.get("return")


#: Type of the ``guest_factory`` fixture: ``guest_factory(**Guest kwargs) -> Guest``.
GuestFactory = Callable[..., Guest]


def qemu_args(cfg: Config, *, net: bool = True) -> list[str]:
    """The QEMU options that attach a guest to this appliance's devices."""
    args = [
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-numa", "node,memdev=mem",
        "-device",
        json.dumps({"driver": "vfio-user-pci",
                    "socket": {"path": cfg.storage.socket, "type": "unix"}},
                   separators=(",", ":")),
    ]
    if net:
        for i, p in enumerate(cfg.net.ports):
            server = ",server=on,wait=off" if p.mode is PortMode.CLIENT else ""  # we connect to QEMU
            args += ["-chardev", f"socket,id=net{i}c,path={p.socket}{server}",
                     "-netdev", f"vhost-user,id=net{i},chardev=net{i}c,queues={p.queues}",
                     "-device", f"virtio-net-pci,netdev=net{i},mac={p.mac}"
                     + (",mq=on" if p.queues > 1 else "")
                     + (f",host_mtu={p.mtu}" if p.mtu != 1500 else "")]
    return args
