"""Wire struct codec figures (prints, never asserts).

    python benchmarks/struct_codec.py [--count N] [--repeat R]

Packs and unpacks N NVMe submission queue entries (``storage.spec.Command``, 64
bytes, 15 fields) and N vhost-user headers (``net.vhost_wire.Header``, 12 bytes,
3 fields): the two structs decoded on every NVMe command and every vhost-user
message.  Prints the best of R runs per operation, in nanoseconds per struct.

The machine is shared and small: compare figures from the same run or from
back-to-back runs only.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.net.vhost_wire import Header
from appliance.storage.spec import Command


def best_ns(fn: Callable[[], object], count: int, repeat: int) -> float:
    """Best-of-``repeat`` time of ``fn`` (which handles ``count`` structs), per struct."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        best = min(best, time.perf_counter_ns() - start)
    return best / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n = args.count

    cmd = Command(opcode=1, cid=7, nsid=1, prp1=0x1000, cdw10=8, cdw12=7)
    cmd_raw = cmd.pack()
    hdr = Header(request=2, size=8)
    hdr_raw = hdr.pack()

    def pack_cmd() -> None:
        for _ in range(n):
            cmd.pack()

    def unpack_cmd() -> None:
        for _ in range(n):
            Command.unpack(cmd_raw)

    def build_cmd() -> None:
        for i in range(n):
            Command(opcode=1, cid=i & 0xFFFF, nsid=1, cdw10=i)

    def pack_hdr() -> None:
        for _ in range(n):
            hdr.pack()

    def unpack_hdr() -> None:
        for _ in range(n):
            Header.unpack(hdr_raw)

    def build_hdr() -> None:
        for i in range(n):
            Header(request=2, size=i)

    print(f"{n} structs, best of {args.repeat}, ns per struct")
    for name, fn in (("Command.pack", pack_cmd), ("Command.unpack", unpack_cmd),
                     ("Command(...)", build_cmd), ("Header.pack", pack_hdr),
                     ("Header.unpack", unpack_hdr), ("Header(...)", build_hdr)):
        print(f"  {name:16} {best_ns(fn, n, args.repeat):8.1f}")


if __name__ == "__main__":
    main()
