"""SGL building for the NVMe host driver (client layer): what Linux's
``nvme_pci_setup_sgls`` puts in a command, for pages the driver allocated.

One data run is SGL1 itself (a Data Block descriptor); more runs go into
segments of up to :data:`PER_SEGMENT` descriptors, SGL1 pointing at the
first: a Last Segment descriptor when one segment holds them all, else
Segment descriptors chaining full pages whose last slot points on (the last
one through a Last Segment descriptor), as Linux chains its SGL pages.
"""

from __future__ import annotations

from collections.abc import Callable

from appliance.storage.spec import PAGE_SIZE, Psdt, SglDescriptor, SglType

PER_SEGMENT = PAGE_SIZE // SglDescriptor.SIZE  # 256 descriptors per segment page
FLAGS_SGL = Psdt.SGL_MPTR_BUFFER << 6  # PSDT 01b: the data pointer is SGL1


def descriptor(kind: SglType, address: int = 0, length: int = 0) -> SglDescriptor:
    """One unkeyed SGL descriptor (subtype Address)."""
    return SglDescriptor(address=address, length=length, sgl_id=int(kind) << 4)


def data_runs(pages: list[int], nbytes: int) -> list[tuple[int, int]]:
    """(address, length) runs of ``nbytes`` in ``pages`` (a page each), adjacent merged."""
    runs: list[tuple[int, int]] = []
    for i, page in enumerate(pages):
        n = min(PAGE_SIZE, nbytes - i * PAGE_SIZE)
        if n <= 0:
            break
        if runs and sum(runs[-1]) == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((page, n))
    return runs


def build_sgl(runs: list[tuple[int, int]], alloc: Callable[[], int],
              put: Callable[[int, bytes], None]) -> tuple[SglDescriptor, list[int]]:
    """SGL1 for data in ``runs``; segment pages come from ``alloc`` (one page each)
    and are written with ``put``.

    Returns:
        (SGL1, the segment pages allocated).
    """
    descs = [descriptor(SglType.DATA_BLOCK, a, n) for a, n in runs]
    if len(descs) == 1:
        return descs[0], []
    pages: list[int] = []
    first = alloc()
    pages.append(first)
    here, rest = first, descs
    while len(rest) > PER_SEGMENT:  # a full page: 255 data descriptors, then the pointer
        nxt = alloc()
        pages.append(nxt)
        chunk, rest = rest[:PER_SEGMENT - 1], rest[PER_SEGMENT - 1:]
        kind = SglType.LAST_SEGMENT if len(rest) <= PER_SEGMENT else SglType.SEGMENT
        length = min(len(rest), PER_SEGMENT) * SglDescriptor.SIZE
        put(here, b"".join(d.pack() for d in [*chunk, descriptor(kind, nxt, length)]))
        here = nxt
    put(here, b"".join(d.pack() for d in rest))
    if len(pages) == 1:
        return descriptor(SglType.LAST_SEGMENT, first, len(descs) * SglDescriptor.SIZE), pages
    return descriptor(SglType.SEGMENT, first, PAGE_SIZE), pages
