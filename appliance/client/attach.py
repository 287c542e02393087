"""Move a client's wiring to the destination appliance (runtime layer: it blocks).

A VMM that migrates a vfio-user device keeps the guest: the same guest memory
and the same interrupt eventfds, now announced to the destination server.
:func:`attach_like` does that for a :class:`~appliance.client.vfio_user.VfioUserClient`
whose device is being migrated: every memory area the source connection
DMA-mapped is mapped into the destination connection at the same address,
with the same backing (the memfd, shared: both servers and the client see the
same pages), and the interrupt eventfds the client installed are installed
again.  Call it before the destination leaves RESUMING (SET_IRQS is allowed
in STOP and RESUMING, DMA_MAP in every state), so the restored queues (client
addresses) and vectors (eventfds) work from the first doorbell on.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping, Sequence

from appliance.client.vfio_user import MemoryArea, VfioUserClient


def attach_like(src: VfioUserClient, dst: VfioUserClient,
                irq_eventfds: Mapping[int, Sequence[int]] | None = None) -> None:
    """Replay ``src``'s DMA maps and the given irq eventfds on ``dst``.

    Args:
        src: the client connected to the source appliance.
        dst: the client connected to the destination appliance.
        irq_eventfds: irq index (e.g. ``PciIrq.MSIX``) -> the eventfds the
            client installed with SET_IRQS on the source (the same fds go
            to the destination; the caller keeps ownership).

    Raises:
        ValueError: a source area has no fd (memory the server reached only
            through DMA messages cannot be shared by fd; map it again instead).
        VfioUserError: the destination refused a DMA_MAP or SET_IRQS.
    """
    for area in src.areas:
        if area.fd is None:
            raise ValueError(f"memory at {area.address:#x} has no fd to share")
    for area in src.areas:
        fd = os.dup(area.fd)  # type: ignore[arg-type]  # checked above
        mm = mmap.mmap(fd, area.size, flags=mmap.MAP_SHARED)
        dst.areas.append(MemoryArea(area.address, area.size, mm, fd))
        dst.dma_map(area.address, area.size, fd)
    for index, fds in (irq_eventfds or {}).items():
        if fds:
            dst.set_irq_eventfds(index, list(fds))
