"""A native NVMe load generator on a queue pair of the Python driver (benchmarks only).

:class:`~appliance.client.nvme.NvmeDriver` brings the controller up and
creates the I/O queues; :func:`native_load` then hands one queue pair's
memory, its doorbells (the mmap'd page, or the vfio-user socket for posted
REGION_WRITE messages) and a page per slot to ``appliance._fastpath.nvme_loadgen``
(native/fastpath/nvme_loadgen.c), which keeps ``qd`` single-page Reads or
Writes in flight with no Python object per I/O and polls the CQ by its phase
tag.  Afterwards the driver's view of the queue (SQ tail, CQ head, phase) is
where the generator left it, so the driver goes on using it.

The Python driver costs tens of microseconds of client CPU per I/O, on the
same two cores as the appliance: this one costs about a microsecond, so the
appliance's own cost per I/O shows.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any

from appliance.client.nvme import NvmeDriver
from appliance.client.nvme_bus import VfioUserBus

PAGE = 4096


@dataclass(frozen=True)
class LoadResult:
    """What one run did: I/Os completed, those with an error status, wall
    seconds from the first submission to the last completion, the client's
    CPU seconds (the calling thread, polling included), latency in seconds."""

    done: int
    errors: int
    seconds: float
    client_cpu: float
    lat_min: float
    lat_mean: float
    lat_p50: float
    lat_p99: float
    lat_max: float

    @property
    def iops(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def available() -> bool:
    """Whether the extension (with the generator) is built."""
    try:
        return hasattr(importlib.import_module("appliance._fastpath"), "nvme_loadgen")
    except ImportError:
        return False


def native_load(d: NvmeDriver, qid: int, opcode: int, qd: int, *, seconds: float = 0.0,
                count: int = 0, nsid: int = 1, seed: int = 1, poll: bool = False) -> LoadResult:
    """Keep ``qd`` 4 KiB (one page) Reads or Writes at random LBAs of ``nsid``
    in flight on I/O queue ``qid`` for ``seconds`` or ``count`` I/Os (whichever
    is set; both: the first reached), then let what is in flight complete.
    Between looks at the CQ it sleeps on the queue's interrupt eventfd, as an
    interrupt-driven driver does; ``poll`` (or a queue without one): it polls
    on, a core's worth of client CPU.

    Raises:
        ValueError: the queue has commands outstanding, ``qd`` does not fit
            it, the doorbells are neither mmap'd nor a vfio-user socket, or a
            completion named a CID not in flight.
        TimeoutError: no completion for 10 s.
        OSError: a doorbell message could not be sent.
        ImportError: the extension is not built.
    """
    native: Any = importlib.import_module("appliance._fastpath")
    q = d.queues[qid]
    if q.outstanding or q.unclaimed:
        raise ValueError(f"queue {qid} has commands outstanding")
    if d.shadow_doorbells is not None:
        raise ValueError("shadow doorbells are configured: the generator rings the MMIO ones")
    nlb = PAGE // d.block_size[nsid]
    sock = -1
    if d.doorbell_words is None:
        if not isinstance(d.bus, VfioUserBus):
            raise ValueError("the doorbells are neither mmap'd nor on a vfio-user socket")
        sock = d.bus.client.sock.fileno()
    buffers = d.pages.alloc(qd)
    try:
        cpu0 = time.thread_time()
        out = native.nvme_loadgen(
            d.mem, d.area.address,
            (qid, q.depth, q.sq_addr, q.cq_addr, q.sq_tail, q.cq_head, q.phase),
            d.doorbell_words, sock, 0,
            -1 if poll or q.eventfd is None else q.eventfd,
            (opcode, nsid, nlb, d.ns_blocks[nsid], buffers, PAGE, qd, seed),
            (count, seconds))
        cpu = time.thread_time() - cpu0
    finally:
        for i in range(qd):  # the allocator takes pages back one by one
            d.pages.release(buffers + i * PAGE)
    q.sq_tail = q.sq_rung = out["sq_tail"]
    q.cq_head, q.phase = out["cq_head"], out["phase"]
    ns = 1e-9
    low, high = out["lat_min"], out["lat_max"]

    def within(value: int) -> float:  # a percentile is its bucket's floor: never below the minimum
        return min(max(value, low), high) * ns

    return LoadResult(out["done"], out["errors"], out["seconds"], cpu, low * ns,
                      out["lat_mean"] * ns, within(out["lat_p50"]), within(out["lat_p99"]),
                      high * ns)

