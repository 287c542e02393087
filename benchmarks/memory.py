"""Client memory access modes side by side (prints, never asserts).

    python benchmarks/memory.py [--quick]

The same operations on one region of client memory, once mmap'd (a memfd that
allows sealing: what QEMU's memory-backend-memfd and our own client share) and
once reached through its fd with pread/pwrite (a memfd without
MFD_ALLOW_SEALING: what DPDK testpmd ``--no-huge`` shares):

1. ``ClientMemory.read``/``write`` of 64 B, 4 KiB and 64 KiB; ``write_uint``.
2. ``ClientMemory.buffers`` of 4 KiB (zero-copy views; None through the fd).
3. One transmit-ring frame as the vhost-user port handles it: ``pop`` a
   one-descriptor chain, read its 64-byte buffer, ``push``, ``publish``.

Microseconds per operation, best of five runs, in this process; the machine is
small and shared, so the figures are indicative only.
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_vhost_frontend import DriverRing, GuestMemory

from appliance.memory import ClientMemory
from appliance.net.virtqueue import SplitQueue

SIZE = 1 << 20


def per_op(fn: Callable[[], object], number: int) -> float:
    """Best of five runs of ``number`` calls, in microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def region(sealable: bool) -> tuple[GuestMemory, ClientMemory]:
    mem = GuestMemory(SIZE, sealable=sealable)
    cm = ClientMemory()
    cm.map(mem.gpa, SIZE, fd=os.dup(mem.fd), user_address=mem.uva)
    assert cm.regions[0].access == ("mmap" if sealable else "fd")
    return mem, cm


def accessor_ops(cm: ClientMemory, base: int, number: int) -> dict[str, float]:
    out = {}
    for size in (64, 4096, 65536):
        data = bytes(size)
        n = max(100, number // (1 + size // 4096))
        out[f"read {size} B"] = per_op(lambda s=size: cm.read(base, s), n)
        out[f"write {size} B"] = per_op(lambda d=data: cm.write(base, d), n)
    out["write_uint 2 B"] = per_op(lambda: cm.write_uint(base + 14, 1, 2), number)
    out["buffers 4 KiB"] = per_op(lambda: cm.buffers(base, 4096, False), number)
    return out


def ring_frame(mem: GuestMemory, cm: ClientMemory, number: int) -> float:
    drv = DriverRing(mem, 1, 256)
    q = SplitQueue(1)
    q.set_num(256)
    q.set_base(0)
    q.attach(cm)
    q.set_addr(mem.uva_of(drv.desc), mem.uva_of(drv.used), mem.uva_of(drv.avail), 0, 0)
    q.start()
    buf = drv.mem.alloc(64)

    def frame() -> None:
        drv.set_desc(0, buf, 64)
        drv.make_available(0)
        chain = q.pop()
        assert chain is not None
        cm.read(chain.segments[0][0], chain.segments[0][1])
        q.push(chain.head, 0)
        q.publish()
        drv.take_used()

    took = per_op(frame, number)
    q.reset()
    drv.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    number = 2000 if parser.parse_args().quick else 20000
    rows: dict[str, dict[str, float]] = {}
    for name, sealable in (("mmap (sealed memfd)", True), ("fd I/O (unsealable)", False)):
        mem, cm = region(sealable)
        rows[name] = accessor_ops(cm, mem.gpa + 0x80000, number)
        rows[name]["vring frame (pop, read, push, publish)"] = ring_frame(mem, cm, number // 4)
        cm.unmap_all()
        mem.close()
    names = list(rows)
    print(f"{'operation (us/op)':42} " + " ".join(f"{n:>20}" for n in names) + f" {'ratio':>7}")
    for op in rows[names[0]]:
        a, b = rows[names[0]][op], rows[names[1]][op]
        print(f"{op:42} {a:20.2f} {b:20.2f} {b / a:7.1f}")


if __name__ == "__main__":
    main()
