"""The one event loop of the process (runtime layer).

A thin layer over :mod:`selectors`: callbacks per readable fd (and per
writable fd, for output that did not fit into a socket at once), one-shot and
periodic timers, and a stop flag.  Every socket, eventfd and timer of every
device is serviced here, on one thread.  Measured choice: a bare selectors
loop dispatches a callback in a few microseconds; asyncio's overhead per
readiness event is several times that, and we need no coroutines.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable

log = logging.getLogger("appliance.runtime.loop")

Callback = Callable[[], None]


class EventLoop:
    """Single-threaded readiness loop with timers."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callback]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._idle: list[Callable[[], object]] = []
        self._busy = False
        self._wakeup: tuple[int, int] | None = None  # the signal wake-up pipe (read, write)
        self._old_wakeup_fd = -1  # what set_wakeup_fd pointed at before this loop

    # The selector holds one key per fd; its data is the pair (reader, writer),
    # either of which may be None. A fd watched both ways is one key with both
    # events (``modify``), so adding or removing one side keeps the other.
    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback`` whenever ``fd`` is readable.

        Raises:
            KeyError: ``fd`` already has a reader.
        """
        self._watch(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` for reading (no-op if it is not watched)."""
        self._unwatch(fd, selectors.EVENT_READ)

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback`` whenever ``fd`` is writable (level-triggered: remove the
        writer once the output is gone, or the loop spins).

        Raises:
            KeyError: ``fd`` already has a writer.
        """
        self._watch(fd, selectors.EVENT_WRITE, callback)

    def remove_writer(self, fd: int) -> None:
        """Stop watching ``fd`` for writing (no-op if it is not watched)."""
        self._unwatch(fd, selectors.EVENT_WRITE)

    def _watch(self, fd: int, event: int, callback: Callback) -> None:
        try:
            key = self.selector.get_key(fd)
        except KeyError:
            pair = (callback, None) if event == selectors.EVENT_READ else (None, callback)
            self.selector.register(fd, event, pair)
            return
        if key.events & event:
            side = "reader" if event == selectors.EVENT_READ else "writer"
            raise KeyError(f"fd {fd} already has a {side}")
        reader, writer = key.data
        pair = (callback, writer) if event == selectors.EVENT_READ else (reader, callback)
        self.selector.modify(fd, key.events | event, pair)

    def _unwatch(self, fd: int, event: int) -> None:
        try:
            key = self.selector.get_key(fd)
        except (KeyError, ValueError):  # not watched / selector closed
            return
        rest = key.events & ~event
        if not rest:
            self.selector.unregister(fd)
            return
        if rest == key.events:
            return
        reader, writer = key.data
        pair = (None, writer) if event == selectors.EVENT_READ else (reader, None)
        self.selector.modify(fd, rest, pair)

    def call_later(self, delay: float, callback: Callback) -> None:
        """Run ``callback`` once, ``delay`` seconds from now."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), callback))

    def call_every(self, period: float, callback: Callable[[], bool]) -> None:
        """Run ``callback`` every ``period`` seconds while it returns True."""

        def tick() -> None:
            if callback():
                self.call_later(period, tick)

        self.call_later(period, tick)

    def add_idle(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` after every pass of the loop (cheap pollers).

        A truthy return means "did work": the next pass polls without blocking,
        so a poller with more to do is called again at once.
        """
        self._idle.append(callback)

    def stop(self) -> None:
        self._stopping = True

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop (the backend convention asks SIGTERM).

        A pipe wakes the selector when a signal arrives; :meth:`close` closes
        it and gives ``signal.set_wakeup_fd`` back its previous fd.  Calling
        this twice is a no-op.
        """
        if self._wakeup is not None:
            return
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup_fd = signal.set_wakeup_fd(wfd)
        self._wakeup = (rfd, wfd)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

        def drain() -> None:
            try:
                os.read(rfd, 512)
            except BlockingIOError:
                pass

        self.add_reader(rfd, drain)

    def run(self) -> None:
        """Serve until :meth:`stop`."""
        while not self._stopping:
            self.run_once()

    def run_once(self, max_wait: float | None = None) -> None:
        timeout = 0.0 if self._busy else max_wait
        if self._timers:
            due = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        for key, mask in self.selector.select(timeout):
            reader, writer = key.data
            if reader is not None and mask & selectors.EVENT_READ:
                try:
                    reader()
                except Exception:  # a bug in one handler must not take the process down
                    log.exception("handler for fd %s failed", key.fd)
                if writer is not None and mask & selectors.EVENT_WRITE:
                    writer = self._writer(key.fd)  # the reader may have removed it
            if writer is not None and mask & selectors.EVENT_WRITE:
                try:
                    writer()
                except Exception:
                    log.exception("write handler for fd %s failed", key.fd)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            try:
                callback()
            except Exception:
                log.exception("timer callback failed")
        busy = False
        for poller in self._idle:
            try:
                busy = bool(poller()) or busy
            except Exception:
                log.exception("idle poller failed")
        self._busy = busy

    def _writer(self, fd: int) -> Callback | None:
        try:
            writer: Callback | None = self.selector.get_key(fd).data[1]
        except (KeyError, ValueError):
            return None
        return writer

    def close(self) -> None:
        """Close the selector and the signal wake-up pipe (restoring the previous
        wake-up fd).  Signal handlers stay installed: they only set the stop flag."""
        self.selector.close()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
