"""NVMe IOPS through the Python driver (``NvmeDriver`` over vfio-user): 4 KiB
random reads and writes at QD1 and QD32 against ``appliance run``.

One benchmark round is a batch of :data:`BATCH` commands; ``extra_info``
carries the IOPS of the best round.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.storage import spec
from appliance.testing.process import ApplianceProcess

BATCH = 512


@pytest.fixture(scope="module", params=["message", "mmap"])
def driver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[NvmeDriver]:
    """A driver on an appliance in each doorbell mode (one appliance per mode)."""
    from appliance.testing.process import make_config

    root = tmp_path_factory.mktemp(f"nvme-{request.param}")
    with ApplianceProcess(make_config(root, storage={"doorbells": request.param}), root) as proc, \
            VfioUserClient.connect(proc.config.storage.socket) as client:
        d = NvmeDriver(client, doorbells=request.param)
        d.setup(io_queues=1, depth=64)
        try:
            yield d
        finally:
            d.close()


def io_batch(d: NvmeDriver, opcode: int, qd: int, count: int, rng: random.Random,
             base: int) -> int:
    """Run ``count`` 4 KiB commands on queue 1 with ``qd`` in flight, command
    ``i`` on the page ``base + slot * 4096`` (``qd`` pages from ``base``).

    Returns:
        The number completed (``count``).
    Raises:
        RuntimeError: a command failed.
    """
    blocks = d.ns_blocks[1] // 8
    sent = done = 0

    def submit(slot: int) -> None:
        nonlocal sent
        lba = rng.randrange(blocks) * 8
        d.submit(1, d.rw_command(opcode, 1, lba, 8, base + slot * 4096, 0), context=slot,
                 ring=False)
        sent += 1

    for slot in range(min(qd, count)):
        submit(slot)
    d.ring(1)
    while done < count:
        for comp in d.wait(1, 1):
            if comp.status:
                raise RuntimeError(f"I/O failed: status {comp.status:#x}")
            done += 1
            if sent < count:
                submit(comp.context)
        d.ring(1)
    return done


@pytest.mark.parametrize("qd", [1, 32])
@pytest.mark.parametrize("op", ["read", "write"])
def test_nvme_iops(benchmark: Any, driver: NvmeDriver, op: str, qd: int) -> None:
    opcode = spec.IoOpcode.READ if op == "read" else spec.IoOpcode.WRITE
    rng = random.Random(1)
    base = driver.pages.alloc(qd)  # one buffer per test: the driver's memory is a bump allocator
    driver.put(base, os.urandom(4096) * qd)
    done = benchmark.pedantic(io_batch, args=(driver, opcode, qd, BATCH, rng, base),
                              rounds=5, warmup_rounds=1)
    assert done == BATCH
    benchmark.extra_info["iops"] = round(BATCH / benchmark.stats.stats.min)
    benchmark.extra_info["qd"] = qd
