"""The NVMe host driver's Namespace Management and Namespace Attachment commands
(client layer), and the Identify lists they go with (allocated NSIDs,
controller lists).  :class:`~appliance.client.nvme.NvmeDriver` has them as
methods.
"""

from __future__ import annotations

import struct
from typing import Protocol

from appliance.client.nvme_queues import Completion
from appliance.storage import identify_spec, nsmgmt, spec


class _Driver(Protocol):
    """What these commands use of the driver."""

    def admin_command(self, opcode: int, **fields: int) -> Completion: ...
    def identify(self, cns: int, nsid: int = 0, **fields: int) -> tuple[Completion, bytes]: ...
    def _buffer(self, nbytes: int, scatter: bool = False, sgl: bool = False
                ) -> tuple[int, int, list[int], list[int]]: ...
    def _release(self, *page_lists: list[int]) -> None: ...
    def scatter(self, pages: list[int], data: bytes) -> None: ...
    def _check(self, comp: Completion, opcode: int) -> Completion: ...
    def _send_page(self, opcode: int, data: bytes, **fields: int) -> Completion: ...


class NamespaceCommands:
    """Namespace Management and Attachment of :class:`~appliance.client.nvme.NvmeDriver`."""

    def _send_page(self: _Driver, opcode: int, data: bytes, **fields: int) -> Completion:
        prp1, prp2, pages, lists = self._buffer(spec.IDENTIFY_SIZE)
        try:
            self.scatter(pages, data.ljust(spec.IDENTIFY_SIZE, b"\0"))
            return self.admin_command(opcode, prp1=prp1, prp2=prp2, **fields)
        finally:
            self._release(pages, lists)

    def create_namespace(self: _Driver, nsze: int, ncap: int | None = None, flbas: int = 0,
                         dps: int = 0, nmic: int = 0, csi: int = spec.CSI_NVM,
                         **fields: int) -> Completion:
        """Namespace Management create of ``nsze`` blocks: its completion, failed or
        not (DW0: the new NSID)."""
        data = identify_spec.IdentifyNamespace(nsze=nsze, ncap=nsze if ncap is None else ncap,
                                               flbas=flbas, dps=dps, nmic=nmic).pack()
        return self._send_page(spec.AdminOpcode.NAMESPACE_MANAGEMENT, data,
                               cdw10=fields.pop("cdw10", nsmgmt.SEL_CREATE),
                               cdw11=csi << 24, **fields)

    def delete_namespace(self: _Driver, nsid: int, **fields: int) -> Completion:
        """Namespace Management delete of ``nsid``: its completion, failed or not."""
        return self.admin_command(spec.AdminOpcode.NAMESPACE_MANAGEMENT, nsid=nsid,
                                  cdw10=fields.pop("cdw10", nsmgmt.SEL_DELETE), **fields)

    def attach_namespace(self: _Driver, nsid: int, controllers: tuple[int, ...] = (1,),
                         detach: bool = False, count: int | None = None,
                         **fields: int) -> Completion:
        """Namespace Attachment (``detach``: detach) of ``nsid`` for ``controllers``
        (``count`` overrides the list's count): its completion, failed or not."""
        data = struct.pack(f"<H{len(controllers)}H",
                           len(controllers) if count is None else count, *controllers)
        sel = nsmgmt.SEL_DETACH if detach else nsmgmt.SEL_ATTACH
        return self._send_page(spec.AdminOpcode.NAMESPACE_ATTACHMENT, data, nsid=nsid,
                               cdw10=fields.pop("cdw10", sel), **fields)

    def allocated_namespaces(self: _Driver, after: int = 0) -> list[int]:
        """Identify CNS 10h: the allocated NSIDs above ``after``."""
        done, raw = self.identify(nsmgmt.CNS_ALLOCATED_NS_LIST, after)
        self._check(done, spec.AdminOpcode.IDENTIFY)
        return [n for n in struct.unpack("<1024I", raw) if n]

    def controller_list(self: _Driver, cns: int, nsid: int = 0, cntid: int = 0) -> list[int]:
        """Identify CNS 12h (controllers attached to ``nsid``) or 13h (all of the
        subsystem's), from controller ``cntid`` on."""
        done, raw = self.identify(cns, nsid, cdw10=cns | cntid << 16)
        self._check(done, spec.AdminOpcode.IDENTIFY)
        count = struct.unpack_from("<H", raw)[0]
        return list(struct.unpack_from(f"<{count}H", raw, 2))
