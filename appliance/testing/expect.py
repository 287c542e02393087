"""A subprocess driven through its output, for tests and benchmarks (runtime layer).

Used with DPDK testpmd (interactive prompt on stdin) and ``appliance run``:
every wait is bounded and reads output as it arrives; nothing sleeps.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from appliance.runtime.unix import wait_readable


class ExpectProcess:
    """A subprocess (optionally pinned to a CPU) whose merged output is searched with
    bounded waits: :meth:`expect` moves a cursor past each match, like ``expect(1)``."""

    def __init__(self, name: str, args: list[str], log: Path, cpu: int | None = None,
                 stdin: bool = False) -> None:
        self.name = name
        self.log_path = log
        self.text = ""
        self.cursor = 0
        stdbuf, taskset = shutil.which("stdbuf"), shutil.which("taskset")
        if stdbuf:
            args = [stdbuf, "-oL", "-eL", *args]
        if cpu is not None and taskset:
            args = [taskset, "-c", str(cpu), *args]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)

    def _read(self, timeout: float) -> bool:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        if not wait_readable(fd, timeout):
            return False
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            return False
        self.text += chunk.decode(errors="replace")
        with open(self.log_path, "a") as f:
            f.write(chunk.decode(errors="replace"))
        return True

    def expect(self, pattern: str, timeout: float = 20.0, fail: str | None = None) -> re.Match[str]:
        """The next match of ``pattern`` after the previous one; fails on ``fail``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text, self.cursor)
            if m:
                self.cursor = m.end()
                return m
            if fail and re.search(fail, self.text[self.cursor:]):
                raise AssertionError(f"{self.name}: {fail!r} in output:\n{self.tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no {pattern!r} within {timeout}s:\n{self.tail()}")
            if not self._read(min(left, 0.5)) and self.proc.poll() is not None:
                while self._read(0):
                    pass
                if not rx.search(self.text, self.cursor):
                    raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before "
                                         f"{pattern!r}:\n{self.tail()}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, n: int = 3000) -> str:
        return self.text[-n:]

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        while self._read(0):
            pass
        if self.proc.poll() is None:
            raise AssertionError(f"{self.name} did not exit within {timeout}s:\n{self.tail()}")
        return self.proc.returncode

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
