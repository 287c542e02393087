"""PRP walking: a command's data pointer to a list of client memory segments (NVMe 1.4 4.3).

Theory of operation
-------------------
A transfer of ``length`` bytes is described by PRP1 and PRP2 (section 4.3,
figure 108):

* PRP1 points at the first byte; its offset into the memory page may be
  non-zero but must be DWORD aligned.
* If the data fits in PRP1's page, PRP2 is unused.  If it fits in one more
  page, PRP2 is that page's address (offset 0).  Otherwise PRP2 points at a
  PRP list (QWORD aligned, any offset): one page-aligned entry per further
  page.  When a list page has fewer slots left than entries needed, its last
  slot points to the next list page (page aligned).

Every entry after PRP1 must have offset 0; violations are "Invalid PRP
Offset" with DNR.  The walk reads list pages through
:class:`~appliance.memory.ClientMemory`; an unreachable list raises
:class:`~appliance.memory.GuestMemoryError`, which the controller reports as
"Data Transfer Error".  The walk reads exactly the entries the length needs,
so its cost is bounded by the length, itself bounded by MDTS.
"""

from __future__ import annotations

import struct

from appliance.memory import ClientMemory
from appliance.storage.spec import PAGE_SIZE, CommandError, Status

Segments = list[tuple[int, int]]


def _page_aligned(address: int, what: str) -> int:
    if address % PAGE_SIZE:
        raise CommandError(Status.INVALID_PRP_OFFSET, f"{what} {address:#x} has an offset")
    return address


def _list_entries(memory: ClientMemory, address: int, count: int) -> list[int]:
    """``count`` data-page entries of the PRP list starting at ``address``."""
    if address % 8:
        raise CommandError(Status.INVALID_PRP_OFFSET, f"PRP list {address:#x} not QWORD aligned")
    entries: list[int] = []
    while True:
        slots = (PAGE_SIZE - address % PAGE_SIZE) // 8
        need = count - len(entries)
        if need <= slots:
            entries += struct.unpack(f"<{need}Q", memory.read(address, need * 8))
            return entries
        page = struct.unpack(f"<{slots}Q", memory.read(address, slots * 8))
        entries += page[:-1]
        address = _page_aligned(page[-1], "PRP list chain pointer")


def prp_segments(memory: ClientMemory, prp1: int, prp2: int, length: int,
                 limit: int) -> Segments:
    """The client memory segments of a ``length``-byte transfer, adjacent ones merged.

    Returns:
        ``(client address, bytes)`` pairs in transfer order.

    Raises:
        CommandError: INVALID_FIELD past ``limit`` bytes (MDTS, section 5.15.2.1);
            INVALID_PRP_OFFSET for a misaligned entry.
        GuestMemoryError: a PRP list is not in reachable client memory.
    """
    if length > limit:
        raise CommandError(Status.INVALID_FIELD, f"transfer of {length} bytes exceeds {limit}")
    if length <= 0:
        return []
    if prp1 % 4:
        raise CommandError(Status.INVALID_PRP_OFFSET, f"PRP1 {prp1:#x} not DWORD aligned")
    first = min(length, PAGE_SIZE - prp1 % PAGE_SIZE)
    rest = length - first
    if rest == 0:
        return [(prp1, first)]
    if rest <= PAGE_SIZE:
        pages = [_page_aligned(prp2, "PRP2")]
    else:
        pages = [_page_aligned(p, "PRP list entry")
                 for p in _list_entries(memory, prp2, -(-rest // PAGE_SIZE))]
    segments: Segments = [(prp1, first)]
    for page in pages:
        n = min(PAGE_SIZE, rest)
        rest -= n
        address, size = segments[-1]
        if address + size == page:
            segments[-1] = (address, size + n)
        else:
            segments.append((page, n))
    return segments


def read_segments(memory: ClientMemory, segments: Segments) -> bytes:
    """Gather the bytes of ``segments`` from client memory (GuestMemoryError)."""
    return b"".join(memory.read(address, size) for address, size in segments)


def write_segments(memory: ClientMemory, segments: Segments, data: bytes) -> None:
    """Scatter ``data`` (as long as the segments) into client memory (GuestMemoryError)."""
    done = 0
    for address, size in segments:
        memory.write(address, data[done:done + size])
        done += size
