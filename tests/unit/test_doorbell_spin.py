"""The adaptive polling of an mmap'd doorbell page: spin a measured while after
activity, then let the loop block (its timer backs off)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastpath_support import require_native

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.runtime.doorbell_spin import SPIN_MAX, SPIN_MIN, DoorbellSpin
from appliance.testing.process import ApplianceProcess, make_config


class Script:
    """A controller whose poll() answers from a list, and a clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0
        self.answers: list[bool] = []

    def poll(self) -> bool:
        return self.answers.pop(0) if self.answers else False

    def clock(self) -> float:
        return self.now


def test_quiet_before_any_activity_never_spins() -> None:
    s = Script()
    spin = DoorbellSpin(s, clock=s.clock)
    assert not spin.poll() and spin.spun == 0


def test_it_spins_within_the_window_and_stops_past_it() -> None:
    s = Script()
    spin = DoorbellSpin(s, clock=s.clock)
    s.answers = [True]
    assert spin.poll()  # activity: busy
    s.now += SPIN_MIN / 2
    assert spin.poll() and spin.spun == 1  # quiet, inside the window: keep the loop awake
    s.now += SPIN_MIN
    assert not spin.poll() and spin.spun == 1  # past it: the loop may block


def test_the_window_follows_the_drivers_think_time() -> None:
    s = Script()
    spin = DoorbellSpin(s, clock=s.clock)
    assert spin.window == SPIN_MIN
    for _ in range(64):  # a driver that rings again 300 us after each completion
        s.answers = [True]
        assert spin.poll()
        s.now += 300e-6
    assert spin.window == pytest.approx(4 * 300e-6, rel=0.05)
    s.answers = [True]
    spin.poll()
    s.now += 1e-3
    assert spin.poll()  # its next ring comes inside the window
    for _ in range(64):  # long pauses: the window grows to its bound, no further
        s.answers = [True]
        spin.poll()
        s.now += 1.0
    assert spin.window == SPIN_MAX
    for _ in range(64):  # back to back: down to the floor
        s.answers = [True]
        spin.poll()
        s.now += 1e-6
    assert spin.window == SPIN_MIN


@pytest.mark.parametrize("path", ["python", "native"])
def test_a_polling_driver_on_mmap_doorbells_through_the_appliance(tmp_path: Path,
                                                                  path: str) -> None:
    """``appliance run`` with mmap doorbells on each data path: a driver that only
    writes the doorbell page and polls its CQ gets every I/O done, data intact."""
    if path == "native":
        require_native()
    cfg = make_config(tmp_path, storage={"doorbells": "mmap"}, fastpath=path == "native")
    with ApplianceProcess(cfg, tmp_path / "w") as app, \
            VfioUserClient.connect(app.config.storage.socket) as client:
        d = NvmeDriver(client, doorbells="mmap")
        d.setup(io_queues=1, depth=64)
        blocks = [os.urandom(4096) for _ in range(32)]
        for i, data in enumerate(blocks):  # QD1: each waits for its completion
            d.write(1, 8 * i, data)
        assert all(d.read(1, 8 * i, 8) == data for i, data in enumerate(blocks))
        d.close()
