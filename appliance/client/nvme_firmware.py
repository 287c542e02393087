"""The NVMe host driver's Firmware Image Download and Firmware Commit commands
and the Firmware Slot Information log (client layer).
:class:`~appliance.client.nvme.NvmeDriver` has them as methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from appliance.client.nvme_queues import PAGE, Completion
from appliance.storage import log_spec, spec


class _Driver(Protocol):
    """What these commands use of the driver."""

    def admin_command(self, opcode: int, **fields: int) -> Completion: ...
    def log_page(self, lid: int, nbytes: int, nsid: int = spec.NSID_ALL, offset: int = 0,
                 **fields: int) -> tuple[Completion, bytes]: ...
    def _buffer(self, nbytes: int, scatter: bool = False, sgl: bool = False
                ) -> tuple[int, int, list[int], list[int]]: ...
    def _release(self, *page_lists: list[int]) -> None: ...
    def scatter(self, pages: list[int], data: bytes) -> None: ...
    def chunks(self, total: int, size: int) -> Iterator[tuple[int, int]]: ...
    def _check(self, comp: Completion, opcode: int) -> Completion: ...


class FirmwareCommands:
    """Firmware Image Download / Commit of :class:`~appliance.client.nvme.NvmeDriver`."""

    def firmware_download(self: _Driver, image: bytes, offset: int = 0,
                          piece: int = PAGE) -> Completion:
        """Firmware Image Download of ``image`` at byte ``offset``, ``piece`` bytes per
        command (both DWORD multiples), as nvme-cli sends an image.

        Returns:
            The last command's completion (the first failed one, if one failed).
        """
        done = Completion(0, 0, False, 0)
        for off, size in self.chunks(len(image), piece):
            prp1, prp2, pages, lists = self._buffer(size)
            try:
                self.scatter(pages, image[off:off + size])
                done = self.admin_command(spec.AdminOpcode.FIRMWARE_DOWNLOAD, prp1=prp1,
                                          prp2=prp2, cdw10=size // 4 - 1,
                                          cdw11=(offset + off) // 4)
            finally:
                self._release(pages, lists)
            if done.status:
                break
        return done

    def firmware_commit(self: _Driver, slot: int, action: int) -> Completion:
        """Firmware Commit of ``slot`` with Commit Action ``action``: its completion,
        failed or not (an activation left for the next reset has a status of its own)."""
        return self.admin_command(spec.AdminOpcode.FIRMWARE_COMMIT, cdw10=action << 3 | slot)

    def firmware_log(self: _Driver) -> log_spec.FirmwareSlotLog:
        """The Firmware Slot Information log.

        Raises:
            NvmeError: Get Log Page failed.
        """
        done, data = self.log_page(spec.LogPage.FIRMWARE_SLOT, log_spec.FirmwareSlotLog.SIZE)
        self._check(done, spec.AdminOpcode.GET_LOG_PAGE)
        return log_spec.FirmwareSlotLog.unpack(data)
