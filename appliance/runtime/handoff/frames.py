"""The live-handoff channel between two appliance processes (protocol layer, sans-I/O).

Theory of operation
-------------------
``appliance handoff`` moves every live device of one process (the source) to
another on the same host (the destination).  The source asks the
destination's control socket for ``handoff.accept``; the destination answers
with the path of a one-shot socket, and on that socket the source sends
*frames* (:class:`FrameHead`, 12 bytes, then ``length`` payload bytes):

* ``FDS``: no payload; ``nfds`` file descriptors ride on the head as
  SCM_RIGHTS (at most :data:`MAX_FDS_PER_FRAME` per frame).  Their order
  over all FDS frames is the index the manifest uses.
* ``DATA``: the next bytes of one migration stream
  (:mod:`appliance.vfio_user.migration_stream`): HEADER (the NVMe device's fingerprint,
  SHARED_STORAGE when both use the same image files), pre-copy
  NAMESPACE_BLOCKS rounds (otherwise), the device state, one HANDOFF record
  (:func:`handoff_record`: the JSON manifest of the sockets, memory regions
  and eventfds, by fd index) and END.  Every record carries its xxh64 and END
  the digest of the whole stream, so nothing unverified is applied.
* ``DONE``: no payload, no fds: the source has sent everything.  The
  destination reads frames until it, so a stream that ends short of its
  END record (a record whose length points past the end) is refused at once
  instead of waiting for bytes that will never come.

All FDS frames come before the END record.  Then the verdict, as JSON lines:
the destination says ``{"ok": true, ...}`` once it has adopted everything
(but serves nothing yet) or ``{"ok": false, "error": ...}`` having adopted
nothing; the source then says ``go`` (it has let go: the destination serves)
or ``abort`` (the destination drops what it adopted; the source serves on).
A source that vanishes after the destination's ``ok`` counts as ``go``: its
fds are closed, the destination holds the only copies.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated

from appliance.runtime.handoff.manifest import HANDOFF_VERSION, HandoffError, Manifest
from appliance.vfio_user.migration_stream import Record, RecordType
from appliance.wire import U16, U32, Struct

MAGIC = b"AHO1"
MAX_FDS_PER_FRAME = 250  # the kernel's SCM_MAX_FD is 253
MAX_FRAME = 16 << 20
GO = b"go\n"
ABORT = b"abort\n"
# HANDOFF_VERSION, HandoffError and Manifest are declared in .manifest, used from here too.
__all__ = ["ABORT", "GO", "HANDOFF_VERSION", "MAGIC", "MAX_FDS_PER_FRAME", "MAX_FRAME",
           "FrameHead", "FrameKind", "HandoffError", "Manifest", "frame", "handoff_record",
           "parse_handoff", "parse_head"]


class FrameKind(enum.IntEnum):
    FDS = 1
    DATA = 2
    DONE = 3


class FrameHead(Struct, size=12):
    magic: Annotated[bytes, "4s"] = MAGIC
    kind: U16 = 0
    nfds: U16 = 0
    length: U32 = 0


def frame(kind: FrameKind, payload: bytes = b"", nfds: int = 0) -> bytes:
    """One frame's bytes (the fds travel with them, attached by the runtime)."""
    return FrameHead(kind=kind, nfds=nfds, length=len(payload)).pack() + payload


def parse_head(raw: bytes, fds_received: int) -> FrameHead:
    """Check a frame head and the fds that came with it.

    Only DATA frames have a payload and only FDS frames carry fds.

    Raises:
        HandoffError: bad magic or kind, an oversized payload, or a fd count
            that differs from the head's.
    """
    head = FrameHead.unpack(raw)
    if head.magic != MAGIC:
        raise HandoffError(f"bad handoff frame magic {head.magic!r}")
    if head.kind not in FrameKind.__members__.values():
        raise HandoffError(f"unknown handoff frame kind {head.kind}")
    if head.length > MAX_FRAME or (head.kind != FrameKind.DATA and head.length):
        raise HandoffError(f"handoff frame of {head.length} bytes")
    if head.nfds != fds_received or (head.kind != FrameKind.FDS and head.nfds):
        raise HandoffError(f"handoff frame announced {head.nfds} fds, {fds_received} came")
    if head.nfds > MAX_FDS_PER_FRAME:
        raise HandoffError(f"{head.nfds} fds in one handoff frame")
    return head


def handoff_record(manifest: Manifest) -> Record:
    """The HANDOFF record: the manifest as compact JSON."""
    return Record(RecordType.HANDOFF,
                  json.dumps(manifest.to_json(), separators=(",", ":")).encode())


def parse_handoff(record: Record, fds_received: int) -> Manifest:
    """The manifest of a verified HANDOFF record, checked whole (:meth:`Manifest.from_json`).

    Raises:
        HandoffError: not JSON, not an object, another manifest version, another
            number of fds than were received, or any field that does not fit.
    """
    try:
        obj = json.loads(record.payload)
    except (ValueError, RecursionError) as exc:
        # ValueError: not UTF-8 or JSON, or an integer past Python's digit limit;
        # RecursionError: arrays or objects nested too deep to parse.
        raise HandoffError(f"handoff manifest: {type(exc).__name__}: {exc}") from None
    return Manifest.from_json(obj, fds_received)
