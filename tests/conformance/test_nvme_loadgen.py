"""The native load generator (benchmarks' NVMe host) against a running appliance:
both doorbell modes, Reads and Writes, the controller's own counters as the proof,
the Python driver going on with the queue afterwards; its argument checks."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import _fastpath
from appliance.client.nvme import NvmeDriver
from appliance.client.nvme_loadgen import native_load
from appliance.client.vfio_user import VfioUserClient
from appliance.storage import log_spec, spec
from appliance.testing.process import ApplianceProcess, make_config


@pytest.fixture(params=["message", "mmap"])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NvmeDriver]:
    mode = request.param
    with ApplianceProcess(make_config(tmp_path, storage={"doorbells": mode}), tmp_path) as proc, \
            VfioUserClient.connect(proc.config.storage.socket) as c:
        d = NvmeDriver(c, doorbells=mode)
        d.setup(io_queues=1, depth=16)
        yield d
        d.close()


def host_commands(d: NvmeDriver) -> tuple[int, int]:
    """SMART's Host Read and Host Write Commands: what the controller ran."""
    _, data = d.log_page(spec.LogPage.SMART, log_spec.SmartLog.SIZE)
    log = log_spec.SmartLog.unpack(data)
    return (int.from_bytes(log.host_reads, "little"), int.from_bytes(log.host_writes, "little"))


@pytest.mark.parametrize("poll", [False, True], ids=["irq", "poll"])
def test_runs_counted_io_and_leaves_the_queue_usable(driver: NvmeDriver, poll: bool) -> None:
    reads0, writes0 = host_commands(driver)
    # 40 on a 16-entry queue at QD 7: the SQ tail, CQ head and phase wrap
    out = native_load(driver, 1, spec.IoOpcode.WRITE, 7, count=40, poll=poll)
    assert (out.done, out.errors) == (40, 0)
    assert 0 < out.lat_min <= out.lat_p50 <= out.lat_p99 <= out.lat_max
    out = native_load(driver, 1, spec.IoOpcode.READ, 1, count=25, poll=poll)
    assert (out.done, out.errors) == (25, 0) and out.iops > 0
    assert host_commands(driver) == (reads0 + 25, writes0 + 40)
    driver.write(1, 8, b"\xa5" * 4096, qid=1)  # the driver carries on from where it stopped
    assert driver.read(1, 8, 8, qid=1) == b"\xa5" * 4096


def test_gives_every_buffer_page_back(driver: NvmeDriver) -> None:
    """The qd pages it ran on go back to the driver's allocator, each of them."""
    first = driver.pages.next  # where a run of pages is carved from
    native_load(driver, 1, spec.IoOpcode.READ, 7, count=7)
    assert {first + i * 4096 for i in range(7)} <= set(driver.pages.free)


def test_percentiles_lie_between_the_extremes(driver: NvmeDriver) -> None:
    """The percentiles come from a histogram (16 buckets per power of two): one I/O's
    latency is its minimum, median, 99th percentile and maximum alike, not the
    floor of its bucket."""
    out = native_load(driver, 1, spec.IoOpcode.READ, 1, count=1)
    assert out.done == 1 and 0 < out.lat_min == out.lat_p50 == out.lat_p99 == out.lat_max


def test_a_time_limit_stops_it(driver: NvmeDriver) -> None:
    out = native_load(driver, 1, spec.IoOpcode.READ, 4, seconds=0.2)
    assert out.done > 0 and out.errors == 0 and 0.15 < out.seconds < 5
    # a time limit past what 64-bit nanoseconds hold is no limit: the count stops it
    out = native_load(driver, 1, spec.IoOpcode.READ, 1, seconds=1e300, count=5)
    assert (out.done, out.errors) == (5, 0)


def test_refuses_a_queue_with_commands_outstanding(driver: NvmeDriver) -> None:
    driver.submit(1, driver.rw_command(spec.IoOpcode.READ, 1, 0, 8, driver.pages.alloc(), 0))
    with pytest.raises(ValueError, match="outstanding"):
        native_load(driver, 1, spec.IoOpcode.READ, 1, count=1)
    driver.wait(1, 1)


def test_touches_only_the_buffers_it_is_given() -> None:
    """Every address is checked against its buffer before anything runs."""
    mem = mmap.mmap(-1, 16 * 4096)
    view = memoryview(mem)
    base = 0x10000
    ok_queue = (1, 16, base, base + 4096, 0, 0, 1)
    ok_io = (2, 1, 8, 1024, base + 2 * 4096, 4096, 4, 1)
    bad = [
        ((1, 16, base - 64, base + 4096, 0, 0, 1), ok_io),             # SQ below the memory
        ((1, 16, base + 16 * 4096 - 512, base + 4096, 0, 0, 1), ok_io),  # SQ past its end
        ((1, 16, base, base + 16 * 4096 - 128, 0, 0, 1), ok_io),       # CQ past its end
        ((1, 16, base + 8, base + 4096, 0, 0, 1), ok_io),              # SQ misaligned
        ((1, 16, base, base + 4096, 16, 0, 1), ok_io),                 # tail past the queue
        ((1, 16, base, base + 4096, 0, 0, 2), ok_io),                  # no such phase
        (ok_queue, (2, 1, 8, 1024, base + 14 * 4096, 4096, 4, 1)),     # buffers past the end
        (ok_queue, (2, 1, 8, 1024, base + 2 * 4096 + 8, 4096, 4, 1)),  # buffers off a page
        (ok_queue, (2, 1, 8, 1024, base + 2 * 4096, 4096, 16, 1)),     # QD = the queue size
        (ok_queue, (2, 1, 8, 1024, base + 2 * 4096, 8192, 4, 1)),      # more than a page
        (ok_queue, (9, 1, 8, 1024, base + 2 * 4096, 4096, 4, 1)),      # not a Read or Write
        (ok_queue, (2, 1, 8, 4, base + 2 * 4096, 4096, 4, 1)),         # namespace too small
    ]
    for queue, io in bad:
        with pytest.raises(ValueError, match="bad queue"):
            _fastpath.nvme_loadgen(view, base, queue, None, 0, 0, -1, io, (1, 0.0))
    # memory at a guest address off a page: the CQ's phase tags would be loaded misaligned
    odd = base + 1
    with pytest.raises(ValueError, match="bad queue"):
        _fastpath.nvme_loadgen(view, odd, (1, 16, odd + 63, odd + 4095, 0, 0, 1),
                               bytearray(4096), -1, 0, -1,
                               (2, 1, 8, 1024, odd + 2 * 4096 - 1, 4096, 4, 1), (1, 0.0))
    doorbells = bytearray(8)  # queue 1's slots need 16 bytes
    with pytest.raises(ValueError, match="too short"):
        _fastpath.nvme_loadgen(view, base, ok_queue, memoryview(doorbells), -1, 0, -1, ok_io,
                               (1, 0.0))
    with pytest.raises(ValueError, match="neither"):
        _fastpath.nvme_loadgen(view, base, ok_queue, None, -1, 0, -1, ok_io, (1, 0.0))
    with pytest.raises(ValueError, match="bad queue"):  # no limit at all
        _fastpath.nvme_loadgen(view, base, ok_queue, None, 0, 0, -1, ok_io, (0, 0.0))
    for seconds in (float("inf"), float("nan"), -1.0):  # not a time limit
        with pytest.raises(ValueError, match="bad queue"):
            _fastpath.nvme_loadgen(view, base, ok_queue, None, 0, 0, -1, ok_io, (1, seconds))
    assert not any(mem[:])  # nothing was written
    view.release()
    mem.close()
