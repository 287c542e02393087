"""Adaptive polling of the mmap'd doorbell page (runtime layer).

With ``storage.doorbells: mmap`` the host's doorbell writes land in a page we
map, and nothing wakes the loop.  A timer alone (the controller's
``poll_interval``, half a millisecond at best) puts a timer tick into every
round trip of a driver that polls its completions and never sends a message.
So after activity the loop spins: :meth:`DoorbellSpin.poll`, the loop's idle
poller, keeps saying "busy" for a short window after the last doorbell or
completion, so the loop's passes do not block (its sockets and timers are
still served every pass) and each pass scans the page again.  Past the window
it says "idle" and the loop blocks until its next fd, or the timer, which
backs off as before (``NvmeController.poll_interval``).

The window is measured: it is four times a running average of the quiet time
that preceded each burst of activity (the driver's think time between reaping
a completion and ringing again), clamped to ``SPIN_MIN`` .. ``SPIN_MAX``, so a
driver that rings every 20 µs costs a 50 µs spin after its last command, and
one that rings every few hundred µs is still caught by the spin, not the timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

#: the spin window's bounds, seconds
SPIN_MIN, SPIN_MAX = 50e-6, 5e-3
#: weight of a new quiet time in the running average (1/8)
AVERAGE_SHIFT = 3


class Pollable(Protocol):
    def poll(self) -> bool:
        """Do pending work; True if anything happened."""
        ...


class DoorbellSpin:
    """The loop's idle poller of a controller whose doorbells are mmap'd."""

    def __init__(self, ctrl: Pollable, clock: Callable[[], float] = time.monotonic) -> None:
        self.ctrl, self.clock = ctrl, clock
        self.quiet = SPIN_MIN / 4  # running average of the quiet time before activity
        self.last: float | None = None  # when the controller last did something
        self.spun = 0  # passes the loop spun for us (not blocked): how much CPU it costs

    @property
    def window(self) -> float:
        """Seconds to spin after the last activity."""
        return min(SPIN_MAX, max(SPIN_MIN, 4 * self.quiet))

    def poll(self) -> bool:
        """Poll the controller; True (the loop must not block) while it did work
        or within the spin window after it did."""
        did = self.ctrl.poll()
        now = self.clock()
        if did:
            if self.last is not None:
                gap = min(now - self.last, SPIN_MAX)
                self.quiet += (gap - self.quiet) / (1 << AVERAGE_SHIFT)
            self.last = now
            return True
        if self.last is not None and now - self.last < self.window:
            self.spun += 1
            return True
        return False
