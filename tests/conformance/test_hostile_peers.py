"""Hostile peers against a real ``appliance run``: each case ends with
:meth:`hostile.HostileTarget.assert_healthy` (alive, no traceback, fds and RSS
back to baseline, well-behaved peers served within 100 ms)."""

from __future__ import annotations

from hostile import HostileTarget


def test_baseline_is_healthy(target: HostileTarget) -> None:
    """The check itself passes on an appliance nobody attacked, twice in a row."""
    target.assert_healthy()
    target.assert_healthy()
