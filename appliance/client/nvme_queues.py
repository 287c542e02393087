"""The NVMe host driver's bookkeeping (client layer): the queue pairs as the
host tracks them, the completions it reads, the pages it hands out, its error.
:mod:`appliance.client.nvme` re-exports every name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.storage import spec

PAGE = spec.PAGE_SIZE


class NvmeError(Exception):
    """A command completed with a non-zero status."""

    def __init__(self, status: int, dnr: bool, what: str) -> None:
        name = spec.Status(status).name if status in spec.Status._value2member_map_ else hex(status)
        super().__init__(f"{what}: status {name}{' (DNR)' if dnr else ''}")
        self.status = status
        self.dnr = dnr


class PageAllocator:
    """Bump allocator of 4 KiB pages with a free list, in client memory."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.size = base, size
        self.next = base
        self.free: list[int] = []

    def alloc(self, pages: int = 1) -> int:
        """Allocate ``pages`` contiguous pages (the caller zeroes them).

        Raises:
            MemoryError: the driver's memory is used up.
        """
        if pages == 1 and self.free:
            return self.free.pop()
        addr = self.next
        if addr + pages * PAGE > self.base + self.size:
            raise MemoryError("driver memory exhausted")
        self.next += pages * PAGE
        return addr

    def release(self, addr: int) -> None:
        self.free.append(addr)

    def reset(self) -> None:
        """Forget every allocation: the next one starts at the base again."""
        self.next = self.base
        self.free.clear()


@dataclass
class Completion:
    """One CQ entry as the driver read it: ``status`` is SCT << 8 | SC."""

    cid: int
    status: int
    dnr: bool
    dw0: int
    context: Any = None
    dw1: int = 0  # Zone Append: the assigned LBA's upper half

    @property
    def result(self) -> int:
        """DWORDs 0 and 1 as one 64-bit value (Zone Append's assigned LBA)."""
        return self.dw0 | self.dw1 << 32


@dataclass
class QueuePair:
    """An SQ and the CQ its completions go to, as the host tracks them."""

    qid: int
    depth: int
    sq_addr: int
    cq_addr: int
    vector: int
    eventfd: int | None
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1
    next_cid: int = 0
    sq_rung: int = 0  # the SQ tail the controller was last told (doorbell or shadow)
    outstanding: dict[int, Any] = field(default_factory=dict)
    unclaimed: list[Completion] = field(default_factory=list)  # seen while waiting for another


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Linux ``nvme_dbbuf_need_event``: must the MMIO doorbell ring (the
    controller's EventIdx lies between the old and the new value)?"""
    return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF
