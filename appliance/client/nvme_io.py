"""The NVMe host driver's data commands (client layer): Read, Write, Flush,
Compare and the other commands of a block range, with their data through PRPs
or an SGL and, for metadata, a separate buffer; Copy.
:class:`~appliance.client.nvme.NvmeDriver` has them as methods.
"""

from __future__ import annotations

from typing import Protocol

from appliance.client.nvme_queues import PAGE, Completion
from appliance.client.nvme_sgl import FLAGS_SGL
from appliance.storage import spec


class _Driver(Protocol):
    """What these commands use of the driver."""

    block_size: dict[int, int]

    def command(self, qid: int, cmd: spec.Command) -> Completion: ...
    def run(self, qid: int, cmd: spec.Command) -> Completion: ...
    def alloc(self, nbytes: int) -> int: ...
    def put(self, addr: int, data: bytes) -> None: ...
    def _buffer(self, nbytes: int, scatter: bool = False, sgl: bool = False
                ) -> tuple[int, int, list[int], list[int]]: ...
    def _release(self, *page_lists: list[int]) -> None: ...
    def scatter(self, pages: list[int], data: bytes) -> None: ...
    def gather(self, pages: list[int], nbytes: int) -> bytes: ...
    def rw_command(self, opcode: int, nsid: int, lba: int, nblocks: int, prp1: int, prp2: int,
                   fua: bool = False) -> spec.Command: ...
    def io(self, opcode: int, slba: int, nlb: int, nsid: int = 1, qid: int = 1,
           data: bytes | None = None, scatter: bool = False, sgl: bool = False,
           nbytes: int | None = None, **fields: int) -> tuple[Completion, bytes]: ...


class IoCommands:
    """The data commands of :class:`~appliance.client.nvme.NvmeDriver`."""

    def rw_command(self: _Driver, opcode: int, nsid: int, lba: int, nblocks: int, prp1: int,
                   prp2: int, fua: bool = False) -> spec.Command:
        return spec.Command(opcode=opcode, nsid=nsid, prp1=prp1, prp2=prp2,
                            cdw10=lba & 0xFFFFFFFF, cdw11=lba >> 32,
                            cdw12=(nblocks - 1) | ((1 << 30) if fua else 0))

    def io(self: _Driver, opcode: int, slba: int, nlb: int, nsid: int = 1, qid: int = 1,
           data: bytes | None = None, scatter: bool = False, sgl: bool = False,
           nbytes: int | None = None, **fields: int) -> tuple[Completion, bytes]:
        """One read/write/compare of ``nlb`` blocks (of the size Identify Namespace
        gave, else 512 bytes; ``nbytes`` overrides the buffer's size, e.g. for
        extended LBAs), its data through PRPs or (``sgl``) an SGL; returns
        (its completion, failed or not; the buffer after)."""
        if nbytes is None:
            nbytes = nlb * self.block_size.get(nsid, 512)
        prp1, prp2, pages, lists = self._buffer(nbytes, scatter, sgl)
        try:
            if data is not None:
                self.scatter(pages, data)
            cdw12 = fields.pop("cdw12", 0) | (nlb - 1)
            flags = fields.pop("flags", 0) | (FLAGS_SGL if sgl else 0)
            done = self.command(qid, spec.Command(opcode=opcode, nsid=nsid, prp1=prp1, prp2=prp2,
                                                  cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                                                  cdw12=cdw12, flags=flags, **fields))
            return done, self.gather(pages, nbytes)
        finally:
            self._release(pages, lists)

    def io_metadata(self: _Driver, opcode: int, slba: int, nlb: int, nsid: int = 1,
                    qid: int = 1, data: bytes | None = None, metadata: bytes = b"",
                    md_bytes: int = 0, cdw12: int = 0, cdw14: int = 0, cdw15: int = 0
                    ) -> tuple[Completion, bytes, bytes]:
        """:meth:`io` with a separate metadata buffer of ``md_bytes`` (contiguous,
        in MPTR) holding ``metadata``, and the PI fields (PRINFO in ``cdw12``,
        ILBRT in ``cdw14``, LBAT/LBATM in ``cdw15``); returns (completion, data,
        metadata after)."""
        md_bytes = max(md_bytes, len(metadata))
        base = self.alloc(md_bytes)
        pages = [base + i * PAGE for i in range(max(1, (md_bytes + PAGE - 1) // PAGE))]
        try:
            self.scatter(pages, metadata)
            done, out = self.io(opcode, slba, nlb, nsid, qid, data, mptr=base, cdw12=cdw12,
                                cdw14=cdw14, cdw15=cdw15)
            return done, out, self.gather(pages, md_bytes)
        finally:
            self._release(pages)

    def write(self: _Driver, nsid: int, lba: int, data: bytes, qid: int = 1,
              fua: bool = False) -> None:
        bs = self.block_size[nsid]
        prp1, prp2, pages, lists = self._buffer(len(data))
        self.scatter(pages, data)
        try:
            self.run(qid, self.rw_command(spec.IoOpcode.WRITE, nsid, lba, len(data) // bs, prp1, prp2, fua))
        finally:
            self._release(pages, lists)

    def read(self: _Driver, nsid: int, lba: int, nblocks: int, qid: int = 1) -> bytes:
        bs = self.block_size[nsid]
        prp1, prp2, pages, lists = self._buffer(nblocks * bs)
        try:
            self.run(qid, self.rw_command(spec.IoOpcode.READ, nsid, lba, nblocks, prp1, prp2))
            return self.gather(pages, nblocks * bs)
        finally:
            self._release(pages, lists)

    def flush(self: _Driver, nsid: int, qid: int = 1) -> None:
        self.run(qid, spec.Command(opcode=spec.IoOpcode.FLUSH, nsid=nsid))

    def blocks_command(self: _Driver, opcode: int, nsid: int, lba: int, nblocks: int,
                       qid: int = 1, **fields: int) -> Completion:
        """A command of ``nblocks`` from ``lba`` that moves no data (Write Uncorrectable,
        Verify, Write Zeroes); returns its completion, failed or not."""
        cdw12 = fields.pop("cdw12", 0) | (nblocks - 1)
        return self.command(qid, spec.Command(opcode=opcode, nsid=nsid, cdw10=lba & 0xFFFFFFFF,
                                              cdw11=lba >> 32, cdw12=cdw12, **fields))

    def copy(self: _Driver, nsid: int, sdlba: int, ranges: list[tuple[int, int]],
             qid: int = 1, sgl: bool = False, **fields: int) -> Completion:
        """Copy (descriptor format 0) of ``(slba, blocks)`` ``ranges`` to ``sdlba``;
        returns its completion, failed or not."""
        entries = b"".join(spec.SourceRange(slba=a, nlb=n - 1).pack() for a, n in ranges)
        dptr1, dptr2, pages, lists = self._buffer(len(entries), sgl=sgl)
        self.put(pages[0], entries)
        try:
            cdw12 = fields.pop("cdw12", 0) | (len(ranges) - 1)
            flags = fields.pop("flags", 0) | (FLAGS_SGL if sgl else 0)
            return self.command(qid, spec.Command(
                opcode=spec.IoOpcode.COPY, nsid=nsid, prp1=dptr1, prp2=dptr2, flags=flags,
                cdw10=sdlba & 0xFFFFFFFF, cdw11=sdlba >> 32, cdw12=cdw12, **fields))
        finally:
            self._release(pages, lists)
