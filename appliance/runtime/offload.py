"""Blocking file I/O off the loop: worker threads that report back through an eventfd.

The NVMe controller hands its blocking namespace I/O (a Flush's fdatasync, a
read the page cache cannot serve, a write-through sync) to an :class:`Offload`
(:class:`~appliance.storage.controller.Offload`): ``work`` runs in a worker
thread — it touches the image fd and mmap'd guest memory only, never a
socket or the controller — and its ``done`` callback runs on the loop thread
when the eventfd says the work finished.  The GIL is released for the
duration of each system call, so a slow fdatasync holds no one up: the loop
serves pings, doorbells and the control socket meanwhile.

:meth:`Offload.drain` blocks the loop until every submitted work has finished
and its callback has run: a controller reset (no DMA after it), a pause
(migration, handoff: a quiesced device has nothing in flight) and closing the
images wait for it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from appliance.runtime.loop import EventLoop

log = logging.getLogger("appliance.runtime")

WORKERS = 2  # a Flush and a read need not wait for each other; the machine has 2 cores

Done = Callable[[BaseException | None], None]


class Offload:
    """A small thread pool whose results come back into the loop."""

    def __init__(self, loop: EventLoop, workers: int = WORKERS) -> None:
        self.loop = loop
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="appliance-io")
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._finished: deque[tuple[Done, BaseException | None]] = deque()  # workers append
        self._futures: set[Future[None]] = set()
        self.submitted = 0
        loop.add_reader(self._efd, self._wake)

    def submit(self, work: Callable[[], object], done: Done) -> None:
        """Run ``work`` in a worker; ``done(exception or None)`` later, on the loop."""

        def run() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - handed to ``done`` on the loop
                self._finished.append((done, exc))
            else:
                self._finished.append((done, None))
            os.eventfd_write(self._efd, 1)

        self.submitted += 1
        future = self._pool.submit(run)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    @property
    def busy(self) -> int:
        """Works submitted whose callback has not run yet."""
        return len(self._futures) + len(self._finished)

    def drain(self) -> None:
        """Block until every submitted work finished, then run their callbacks."""
        while self._futures or self._finished:
            wait(list(self._futures))
            self._deliver()

    def close(self) -> None:
        """Drain, stop the workers and close the eventfd."""
        self.drain()
        self._pool.shutdown(wait=True)
        self.loop.remove_reader(self._efd)
        os.close(self._efd)

    def _wake(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            return
        self._deliver()

    def _deliver(self) -> None:
        while self._finished:
            done, exc = self._finished.popleft()
            try:
                done(exc)
            except Exception:  # a bug in a callback must not stop the others
                log.exception("offloaded I/O: completion failed")
