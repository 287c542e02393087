"""What every fuzz harness shares: instrumented imports, the crash rules, fds for messages.

A harness module (``fuzz_<name>.py``) defines ``one_input(data: bytes) -> None``,
which raises (an AssertionError or whatever the code under test let escape) for
a finding and returns for every input handled the protocol's own way.  Run as a
script it hands ``one_input`` to atheris; ``test_fuzz_seeds.py`` imports it and
replays the committed corpus and crash files through the same function.

Crash rules beyond "nothing escapes": the appliance turns bugs inside a command
into an error status and logs them with a traceback (``log.exception``), so a
log record that carries exception info is a finding too (:class:`TracebackTrap`);
and every fd an input created must be closed once the input is done
(:func:`open_fds`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
for _p in (str(HERE), str(ROOT / "tests" / "unit")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def instrumented(module_name: str) -> contextlib.AbstractContextManager[Any]:
    """``atheris.instrument_imports()`` when the harness runs as the fuzzer, else nothing.

    Coverage instrumentation is for the fuzzing run; the pytest replay of the
    corpus imports the same modules plain (and fast).
    """
    if module_name != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["appliance"])


class TracebackTrap(logging.Handler):
    """Remembers the first log record that carries an exception (a caught bug)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.record: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and self.record is None:
            self.record = record

    def check(self) -> None:
        """Raises AssertionError naming the logged exception, if one was logged."""
        record, self.record = self.record, None
        if record is not None:
            text = logging.Formatter().format(record)
            raise AssertionError(f"a bug was caught and logged:\n{text}")


TRAP = TracebackTrap()
logging.getLogger().addHandler(TRAP)


def open_fds() -> set[int]:
    """The fds open in this process now."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def checked(body: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """Wrap a harness body: no traceback logged, no fd left open by the input."""

    def one_input(data: bytes) -> None:
        before = open_fds()
        TRAP.record = None
        with quiet():
            body(data)
        TRAP.check()
        leaked = open_fds() - before
        if leaked:
            targets = {fd: _target(fd) for fd in sorted(leaked)}
            raise AssertionError(f"fds left open by the input: {targets}")

    one_input.__name__ = body.__name__
    return one_input


def _target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def new_fd(kind: int) -> int:
    """A fresh fd of one of three kinds a peer may send: memfd (64 KiB), eventfd, pipe end."""
    kind %= 3
    if kind == 0:
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, 64 << 10)
        return fd
    if kind == 1:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r)
    return w


class Chunks:
    """Splits a fuzz input into the chunks a socket reader would feed, each with its fds.

    Byte 0 says which of the first 8 chunks carry one fd (bit i: chunk i);
    bytes 1 and 2 give each such fd's kind (bit i of byte 1 plus twice bit i
    of byte 2: see :func:`new_fd`).  The rest is the byte stream, cut at
    ``wanted`` (what the connection asks the reader for) each time.
    """

    def __init__(self, data: bytes) -> None:
        head = data[:3].ljust(3, b"\0")
        self.fd_mask, self.kinds = head[0], head[1] | head[2] << 8
        self.rest = memoryview(data)[3:]
        self.index = 0

    @staticmethod
    def header(fds: dict[int, int]) -> bytes:
        """The 3 leading bytes that put an fd of kind ``fds[i]`` on chunk i (i < 8)."""
        mask = sum(1 << i for i in fds)
        kinds = sum((kind & 1) << i | (kind >> 1 & 1) << (i + 8) for i, kind in fds.items())
        return bytes([mask, kinds & 0xFF, kinds >> 8])

    def next(self, wanted: int) -> tuple[bytes, list[int]] | None:
        """The next chunk (at most ``wanted`` bytes) and its fds, None at the end."""
        if not self.rest:
            return None
        take = max(1, min(wanted, len(self.rest)))
        chunk, self.rest = bytes(self.rest[:take]), self.rest[take:]
        fds = []
        i = self.index
        if i < 8 and self.fd_mask >> i & 1:
            fds.append(new_fd((self.kinds >> i & 1) | (self.kinds >> (i + 8) & 1) << 1))
        self.index += 1
        return chunk, fds


def run_fuzzer(one_input: Callable[[bytes], None]) -> None:
    """atheris.Setup + atheris.Fuzz with this harness's ``one_input``."""
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the appliance's warnings for a block (rejections log one line each)."""
    logger = logging.getLogger("appliance")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
