"""Classic pcap writer for a port's traffic (libpcap format, linktype 1 = Ethernet).

The writer encodes; the runtime owns the file (it opens it, hands the binary
sink in, flushes it from a timer and closes it) and the clock (wall time, as
pcap timestamps are seconds since the epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from appliance.wire import I32, U16, U32, Struct

PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535


class PcapGlobalHeader(Struct, size=24):
    magic: U32 = PCAP_MAGIC
    version_major: U16 = 2
    version_minor: U16 = 4
    thiszone: I32 = 0
    sigfigs: U32 = 0
    snaplen: U32 = SNAPLEN
    network: U32 = LINKTYPE_ETHERNET


class PcapRecordHeader(Struct, size=16):
    ts_sec: U32 = 0
    ts_usec: U32 = 0
    incl_len: U32 = 0
    orig_len: U32 = 0


class PcapWriter:
    """Appends one record per frame to ``sink``."""

    def __init__(self, sink: BinaryIO, clock: Callable[[], float], snaplen: int = SNAPLEN,
                 header: bool = True) -> None:
        """``header``: write the file header (not when continuing another
        writer's file, as a handoff destination does)."""
        self.sink = sink
        self.clock = clock
        self.snaplen = snaplen
        self.records = 0
        if header:
            sink.write(PcapGlobalHeader(snaplen=snaplen).pack())
            sink.flush()  # a reader (or a handoff destination) sees a pcap file at once

    def write(self, frame: bytes) -> None:
        ts = self.clock()
        sec = int(ts)
        usec = min(int((ts - sec) * 1_000_000), 999_999)
        incl = min(len(frame), self.snaplen)
        self.sink.write(PcapRecordHeader(ts_sec=sec, ts_usec=usec, incl_len=incl,
                                         orig_len=len(frame)).pack())
        self.sink.write(frame[:incl])
        self.records += 1

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        self.sink.close()
