"""The NVMe host driver's commands of the Zoned Namespace command set (client
layer): Zone Management Send and Receive, a parsed zone report, Zone Append.
:class:`~appliance.client.nvme.NvmeDriver` has them as methods.
"""

from __future__ import annotations

from typing import Protocol

from appliance.client.nvme_queues import Completion
from appliance.storage import spec, zns_spec


class _Driver(Protocol):
    """What these commands use of the driver."""

    block_size: dict[int, int]

    def command(self, qid: int, cmd: spec.Command) -> Completion: ...
    def _buffer(self, nbytes: int, scatter: bool = False, sgl: bool = False
                ) -> tuple[int, int, list[int], list[int]]: ...
    def _release(self, *page_lists: list[int]) -> None: ...
    def gather(self, pages: list[int], nbytes: int) -> bytes: ...
    def _check(self, comp: Completion, opcode: int) -> Completion: ...
    def io(self, opcode: int, slba: int, nlb: int, nsid: int = 1, qid: int = 1,
           data: bytes | None = None, scatter: bool = False, sgl: bool = False, **fields: int
           ) -> tuple[Completion, bytes]: ...
    def zone_mgmt_recv(self, nsid: int, slba: int, nbytes: int, report_filter: int = 0,
                       partial: bool = False, qid: int = 1, **fields: int
                       ) -> tuple[Completion, bytes]: ...


class ZonedCommands:
    """The zoned commands of :class:`~appliance.client.nvme.NvmeDriver`."""

    def zone_mgmt_send(self: _Driver, nsid: int, slba: int, action: int, select_all: bool = False,
                       qid: int = 1, **fields: int) -> Completion:
        """Zone Management Send ``action`` (ZSA) on the zone starting at ``slba`` or,
        with ``select_all``, on every zone it applies to; returns its completion,
        failed or not."""
        cdw13 = fields.pop("cdw13", 0) | action | (zns_spec.ZMS_SELECT_ALL if select_all else 0)
        return self.command(qid, spec.Command(
            opcode=spec.IoOpcode.ZONE_MGMT_SEND, nsid=nsid, cdw10=slba & 0xFFFFFFFF,
            cdw11=slba >> 32, cdw13=cdw13, **fields))

    def zone_mgmt_recv(self: _Driver, nsid: int, slba: int, nbytes: int, report_filter: int = 0,
                       partial: bool = False, qid: int = 1, **fields: int
                       ) -> tuple[Completion, bytes]:
        """Zone Management Receive (Report Zones) into ``nbytes``: (its completion,
        failed or not; the bytes)."""
        prp1, prp2, pages, lists = self._buffer(nbytes)
        cdw13 = fields.pop("cdw13", 0) | report_filter << 8 | (
            zns_spec.ZMR_PARTIAL if partial else 0)
        try:
            done = self.command(qid, spec.Command(
                opcode=spec.IoOpcode.ZONE_MGMT_RECV, nsid=nsid, prp1=prp1, prp2=prp2,
                cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=nbytes // 4 - 1, cdw13=cdw13,
                **fields))
            return done, self.gather(pages, nbytes)
        finally:
            self._release(pages, lists)

    def report_zones(self: _Driver, nsid: int, slba: int = 0, count: int = 64, report_filter: int = 0,
                     partial: bool = True, qid: int = 1
                     ) -> tuple[int, list[zns_spec.ZoneDescriptor]]:
        """Up to ``count`` zone descriptors from the zone of ``slba``: (the header's
        zone count, the descriptors).

        Raises:
            NvmeError: the command failed.
        """
        size = zns_spec.ZoneReportHeader.SIZE + count * zns_spec.ZoneDescriptor.SIZE
        done, data = self.zone_mgmt_recv(nsid, slba, size, report_filter, partial, qid)
        self._check(done, spec.IoOpcode.ZONE_MGMT_RECV)
        total = zns_spec.ZoneReportHeader.unpack(data).nr_zones
        shown = min(total, count)
        return total, [zns_spec.ZoneDescriptor.unpack(data, 64 + 64 * i) for i in range(shown)]

    def zone_append(self: _Driver, nsid: int, zslba: int, data: bytes, qid: int = 1, cdw12: int = 0,
                    sgl: bool = False) -> Completion:
        """Zone Append of ``data`` (whole blocks) to the zone starting at ``zslba``
        (``cdw12``: flags such as FUA besides the block count); returns its
        completion, failed or not (``result``: the LBA it went to)."""
        nlb = len(data) // self.block_size.get(nsid, 512)
        done, _ = self.io(spec.IoOpcode.ZONE_APPEND, zslba, nlb, nsid=nsid, qid=qid, data=data,
                          sgl=sgl, cdw12=cdw12)
        return done

