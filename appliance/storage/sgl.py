"""SGL walking: a command's SGL to a list of client memory segments (NVMe 1.4 4.4).

Theory of operation
-------------------
With PSDT 01b a command's DWORDs 6-9 hold SGL1, one 16-byte descriptor
(:class:`~appliance.storage.spec.SglDescriptor`).  This controller takes the
unkeyed descriptors with the Address subtype (SGLS bits 1:0 = 01b, no
alignment rule; SGLS bit 16, Bit Bucket):

* **Data Block**: ``length`` bytes at ``address``.
* **Bit Bucket**: on a read, ``length`` bytes of the data are discarded; on
  a write it is ignored (it moves no data and counts for nothing).
* **Segment**: ``address`` points at the next SGL segment, ``length`` bytes
  (a non-zero multiple of 16) of descriptors; its last descriptor may point
  at another segment.
* **Last Segment**: the same, for the last segment, which holds data
  descriptors only.

SGL1 is a Data Block (the whole transfer), a Segment or a Last Segment.
The walk stops with the spec's status at the first violation, DNR set:
a Segment/Last Segment descriptor that is not the last of its segment is
Invalid Number of SGL Descriptors; one inside the last segment, or a
segment length of 0 or not a multiple of 16, is Invalid SGL Segment
Descriptor; Keyed / Transport Data Block, a reserved type or a non-zero
subtype (offsets are for fabrics) is SGL Descriptor Type Invalid; data
descriptors adding up to less or more than the command's data, or a range
past the end of the 64-bit address space, is Data SGL Length Invalid.  A
segment that is not reachable client memory raises
:class:`~appliance.memory.GuestMemoryError` (Data Transfer Error).

Bounds: the data is at most ``limit`` bytes (MDTS); the walk reads at most
:data:`MAX_DESCRIPTORS` descriptors, so a segment that points at itself (a
loop), a chain of empty descriptors or a segment longer than what is left of
that budget (refused before it is read) ends with Invalid Number of SGL
Descriptors after a bounded amount of work and memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.memory import ClientMemory
from appliance.storage.prp import Segments
from appliance.storage.spec import CommandError, SglDescriptor, SglType, Status

#: descriptors one command's SGL may have (segment descriptors included): a
#: page-sized segment of 256 descriptors per 4 KiB page of a 512 KiB transfer
MAX_DESCRIPTORS = 4096
ADDRESS_END = 1 << 64


@dataclass
class SglTransfer:
    """What a walked SGL describes, in transfer order."""

    #: (client address, bytes) of the data blocks, adjacent ones merged
    segments: Segments = field(default_factory=list)
    #: (offset into the data, bytes) a read discards (Bit Bucket descriptors)
    discard: list[tuple[int, int]] = field(default_factory=list)
    #: descriptors read (SGL1 included)
    descriptors: int = 0


def _refuse(status: Status, why: str) -> CommandError:
    return CommandError(status, f"SGL: {why}")


def _kind(desc: SglDescriptor) -> int:
    if desc.sgl_id & 0x0F:
        raise _refuse(Status.SGL_DESCRIPTOR_TYPE_INVALID,
                      f"subtype {desc.sgl_id & 0x0F:#x} (only Address)")
    kind = desc.sgl_id >> 4
    if kind not in (SglType.DATA_BLOCK, SglType.BIT_BUCKET, SglType.SEGMENT,
                    SglType.LAST_SEGMENT):
        raise _refuse(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"descriptor type {kind:#x}")
    return kind


def _segment(memory: ClientMemory, desc: SglDescriptor, budget: int) -> list[SglDescriptor]:
    """The descriptors of the segment ``desc`` (a Segment or Last Segment) points at;
    more than ``budget`` of them are refused before any is read."""
    if desc.length == 0 or desc.length % SglDescriptor.SIZE:
        raise _refuse(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, f"segment length {desc.length}")
    if desc.address + desc.length > ADDRESS_END:
        raise _refuse(Status.DATA_SGL_LENGTH_INVALID, f"segment {desc.address:#x} wraps")
    if desc.length // SglDescriptor.SIZE > budget:
        raise _refuse(Status.INVALID_SGL_DESCRIPTOR_COUNT,
                      f"more than {MAX_DESCRIPTORS} descriptors")
    raw = memory.read(desc.address, desc.length)
    return [SglDescriptor.unpack(raw, i) for i in range(0, len(raw), SglDescriptor.SIZE)]


def sgl_segments(memory: ClientMemory, sgl1: SglDescriptor, length: int, limit: int, *,
                 to_device: bool) -> SglTransfer:
    """Walk the SGL of a ``length``-byte transfer starting at ``sgl1``.

    ``to_device``: the data goes from the host to the controller (a write):
    Bit Bucket descriptors are then ignored.

    Returns:
        The data blocks and bit buckets, in transfer order.

    Raises:
        CommandError: INVALID_FIELD past ``limit`` bytes (MDTS); the SGL
            statuses of the module docstring for a malformed SGL.
        GuestMemoryError: a segment is not in reachable client memory.
    """
    if length > limit:
        raise CommandError(Status.INVALID_FIELD, f"transfer of {length} bytes exceeds {limit}")
    out = SglTransfer()
    if _kind(sgl1) == SglType.BIT_BUCKET:
        raise _refuse(Status.SGL_DESCRIPTOR_TYPE_INVALID, "SGL1 is a Bit Bucket")
    done, current, in_last = 0, [sgl1], False
    mergeable = False  # the last thing described was a data block
    while current:
        segment, current = current, []
        for i, desc in enumerate(segment):
            out.descriptors += 1
            if out.descriptors > MAX_DESCRIPTORS:
                raise _refuse(Status.INVALID_SGL_DESCRIPTOR_COUNT,
                              f"more than {MAX_DESCRIPTORS} descriptors")
            kind = _kind(desc)
            if kind in (SglType.SEGMENT, SglType.LAST_SEGMENT):
                if i != len(segment) - 1:
                    raise _refuse(Status.INVALID_SGL_DESCRIPTOR_COUNT,
                                  f"segment descriptor {i} is not the last of {len(segment)}")
                if in_last:
                    raise _refuse(Status.INVALID_SGL_SEGMENT_DESCRIPTOR,
                                  "segment descriptor inside the last segment")
                if done == length and length:
                    raise _refuse(Status.DATA_SGL_LENGTH_INVALID, "SGL longer than the data")
                current = _segment(memory, desc, MAX_DESCRIPTORS - out.descriptors)
                in_last = kind == SglType.LAST_SEGMENT
                continue
            if desc.length == 0 or (kind == SglType.BIT_BUCKET and to_device):
                continue
            if done + desc.length > length:
                raise _refuse(Status.DATA_SGL_LENGTH_INVALID,
                              f"{done + desc.length} bytes described, {length} transferred")
            if kind == SglType.BIT_BUCKET:
                out.discard.append((done, desc.length))
            elif desc.address + desc.length > ADDRESS_END:
                raise _refuse(Status.DATA_SGL_LENGTH_INVALID, f"data block {desc.address:#x} wraps")
            elif mergeable and sum(out.segments[-1]) == desc.address:
                address, size = out.segments[-1]
                out.segments[-1] = (address, size + desc.length)
            else:
                out.segments.append((desc.address, desc.length))
            mergeable = kind == SglType.DATA_BLOCK
            done += desc.length
    if done != length:
        raise _refuse(Status.DATA_SGL_LENGTH_INVALID, f"{done} bytes described, {length} needed")
    return out
