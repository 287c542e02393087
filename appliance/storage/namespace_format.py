"""A namespace's LBA format as the host sees and changes it (device layer):
Format NVM's checks and reformat, Identify Namespace (CNS 00h) and the
Namespace Identification Descriptor list (CNS 03h).

:class:`NamespaceFormat` is a part of :class:`~appliance.storage.namespace.Namespace`
(its base class), kept apart because it is a concern of its own: which LBA
format (block size, metadata size, where metadata travels) and which
protection information the namespace has, and how Identify reports them.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from appliance.storage.formats import LBA_FORMATS, flbas, lbaf_fields
from appliance.storage.identify_spec import (
    DLFEAT_READS_ZERO,
    DLFEAT_WZ_DEALLOCATE,
    NIDT_CSI,
    NIDT_UUID,
    NSATTR_WRITE_PROTECTED,
    IdentifyNamespace,
    NsIdDescriptor,
)
from appliance.storage.metadata import MetadataFile, side_file
from appliance.storage.protection import PiType, Protection
from appliance.storage.spec import CSI_NVM, CommandError, Status

if TYPE_CHECKING:
    from appliance.storage.namespace import BlockExport

MC_EXTENDED, MC_SEPARATE = 0x1, 0x2  # Identify Namespace MC: where metadata may travel
DPC_ALL = 0x1F  # DPC: PI types 1, 2 and 3, the tuple first or last in the metadata


class NamespaceFormat:
    """The LBA format methods of :class:`~appliance.storage.namespace.Namespace`."""

    # Set by Namespace.__init__.
    nsid: int
    image: str
    size: int
    block_size: int
    lba_shift: int
    nlbas: int
    read_only: bool
    format_index: int
    protection: Protection
    extended: bool
    fixed_format: bool
    md: MetadataFile | None
    export: BlockExport | None

    def format(self) -> None:
        raise NotImplementedError  # Namespace's

    def check_format(self, index: int, pi: int) -> None:
        """Raises:
            CommandError: INVALID_FORMAT for a format this namespace cannot take:
                an index past NLBAF, a size that is not a multiple of the block
                size, PI without 8 bytes of metadata, metadata on an export,
                another format for a zoned namespace.
        """
        if not 0 <= index < len(LBA_FORMATS) or not 0 <= pi <= 3:
            raise CommandError(Status.INVALID_FORMAT, f"LBA format {index} PI {pi}")
        fmt = LBA_FORMATS[index]
        if (self.size % fmt.block_size or (pi and fmt.metadata < 8)
                or (fmt.metadata and self.export is not None)
                or (self.fixed_format and index != self.format_index)):
            raise CommandError(Status.INVALID_FORMAT, f"nsid {self.nsid}: LBA format {index} "
                               f"({fmt.block_size}+{fmt.metadata}) with PI {pi}")

    def reformat(self, index: int, pi: int, pi_first: bool, extended: bool) -> None:
        """Format NVM to LBA format ``index`` with PI type ``pi`` (the tuple first
        or last in the metadata) and the metadata ``extended`` or separate: every
        block and its metadata erased, the block count follows the block size.

        Raises:
            CommandError: INVALID_FORMAT (:meth:`check_format`); WRITE_FAULT when
                the image or side file cannot be erased or opened.
        """
        self.check_format(index, pi)
        fmt = LBA_FORMATS[index]
        self.format()
        if self.md is not None:
            md, self.md = self.md, None
            md.drop()
        self.block_size, self.lba_shift = fmt.block_size, fmt.lbads
        self.nlbas, self.format_index = self.size // fmt.block_size, index
        self.protection = Protection(PiType(pi), fmt.metadata, pi_first)
        self.extended = extended and fmt.metadata > 0
        if fmt.metadata:
            try:
                self.md = MetadataFile(side_file(self.image), self.nlbas, fmt.metadata)
                self.md.erase()
            except OSError as exc:
                raise CommandError(Status.WRITE_FAULT, str(exc), dnr=False) from None

    # ------------------------------------------------------------ identify
    def identify(self) -> bytes:
        """The Identify Namespace data structure (CNS 00h)."""
        nlbaf, lbaf0, lbaf1_15 = lbaf_fields()
        index = self.format_index
        if self.fixed_format:
            nlbaf, lbaf0, lbaf1_15, index = 0, LBA_FORMATS[index].encode(), b"", 0
        return IdentifyNamespace(
            nsze=self.nlbas, ncap=self.nlbas, nuse=self.nlbas, nlbaf=nlbaf,
            flbas=flbas(index, self.extended), mc=MC_EXTENDED | MC_SEPARATE,
            dpc=DPC_ALL, dps=self.protection.dps,
            dlfeat=DLFEAT_READS_ZERO | DLFEAT_WZ_DEALLOCATE,
            nsattr=NSATTR_WRITE_PROTECTED if self.read_only else 0,
            lbaf0=lbaf0, lbaf1_15=lbaf1_15,
        ).pack()

    def descriptors(self, serial: str, csi: int = CSI_NVM) -> bytes:
        """The Namespace Identification Descriptor list (CNS 03h): one UUID, the
        Command Set Identifier ``csi`` (00h: NVM, 02h: zoned; Linux needs it once
        CC.CSS selects I/O command sets)."""
        nid = uuid.uuid5(uuid.NAMESPACE_OID, f"appliance-nvme:{serial}:{self.nsid}").bytes
        data = NsIdDescriptor(nidt=NIDT_UUID, nidl=len(nid)).pack() + nid
        data += NsIdDescriptor(nidt=NIDT_CSI, nidl=1).pack() + bytes([csi])
        return data.ljust(4096, b"\0")
