"""A command's data pointer to client memory: PRPs or SGLs, one interface (device layer).

Theory of operation
-------------------
:func:`command_transfer` reads PSDT (command DWORD 0 bits 15:14) and turns the
data pointer of a command into a :class:`Transfer`: PSDT 00b walks PRP1/PRP2
(:mod:`~appliance.storage.prp`), PSDT 01b walks SGL1
(:mod:`~appliance.storage.sgl`).  PSDT 10b (a metadata SGL in MPTR) is not
supported (metadata travels in MPTR's contiguous buffer or in extended LBAs)
and 11b is reserved: both are Invalid Field.  Handlers move data with :func:`gather` and :func:`scatter`, or
hand :attr:`Transfer.segments` to the namespace's zero-copy paths when
:attr:`Transfer.discard` is empty.

Admin commands use PRPs only (the controller checks PSDT before this runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.memory import ClientMemory
from appliance.storage.prp import Segments, prp_segments, read_segments, write_segments
from appliance.storage.sgl import sgl_segments
from appliance.storage.spec import Command, CommandError, Psdt, SglDescriptor, Status


@dataclass
class Transfer:
    """Where a command's data is in client memory, in transfer order."""

    segments: Segments
    #: (offset into the data, bytes) a read discards (SGL Bit Bucket descriptors)
    discard: list[tuple[int, int]] = field(default_factory=list)
    #: described by an SGL (PSDT 01b), not PRPs
    sgl: bool = False


def psdt(cmd: Command) -> int:
    """The command's PRP or SGL for Data Transfer field."""
    return cmd.flags >> 6


def sgl1(cmd: Command) -> SglDescriptor:
    """DWORDs 6-9 read as SGL1."""
    raw = cmd.prp1.to_bytes(8, "little") + cmd.prp2.to_bytes(8, "little")
    return SglDescriptor.unpack(raw)


def command_transfer(memory: ClientMemory, cmd: Command, length: int, limit: int, *,
                     to_device: bool) -> Transfer:
    """The client memory of ``cmd``'s ``length``-byte transfer.

    ``to_device``: host to controller (a write).

    Raises:
        CommandError: INVALID_FIELD past ``limit`` or for PSDT 10b/11b; the
            PRP and SGL statuses of :func:`prp_segments` and :func:`sgl_segments`.
        GuestMemoryError: a PRP list or SGL segment is not reachable client memory.
    """
    kind = psdt(cmd)
    if kind == Psdt.PRP:
        return Transfer(prp_segments(memory, cmd.prp1, cmd.prp2, length, limit))
    if kind == Psdt.SGL_MPTR_BUFFER:
        walked = sgl_segments(memory, sgl1(cmd), length, limit, to_device=to_device)
        return Transfer(walked.segments, walked.discard, sgl=True)
    raise CommandError(Status.INVALID_FIELD, f"PSDT {kind:#04b}")


def gather(memory: ClientMemory, transfer: Transfer) -> bytes:
    """The bytes of a host-to-controller transfer (GuestMemoryError)."""
    return read_segments(memory, transfer.segments)


def scatter(memory: ClientMemory, transfer: Transfer, data: bytes) -> None:
    """Put ``data`` (the whole transfer) into client memory, leaving out the bit
    buckets (GuestMemoryError)."""
    if transfer.discard:
        kept, start = [], 0
        for offset, size in transfer.discard:
            kept.append(data[start:offset])
            start = offset + size
        kept.append(data[start:])
        data = b"".join(kept)
    write_segments(memory, transfer.segments, data)
