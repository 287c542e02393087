"""Live-handoff figures (prints, never asserts).

    python benchmarks/handoff.py [--quick]

A chain of appliance processes on one shared image: the Python NVMe driver
(over a vfio-user socket, the same one all along) does 4 KiB verified writes at
QD1 in a thread while `appliance handoff` moves the device from each process to
the next.  Per hop it prints the pause the source measured (devices stopped to
the destination's "adopted"), the destination's adopt time, and the longest
I/O the driver saw around the hop.  Anchors from the same run: the driver's
median I/O round trip (what "no pause" costs), and the downtime of a vfio-user
migration v2 of the same device between two processes
(``appliance migrate --shared-storage``'s path, with its own client).

The machine is shared and small: the figures are indicative only.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.client import migrate as orch
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.workload import VerifiedWriter, make_image, move_driver, prepare_destination

MiB = 1 << 20
SIZE = 64 * MiB


def start(tmp: Path, name: str, image: Path) -> ApplianceProcess:
    cfg = make_config(tmp / name, storage={"namespaces": [{"image": str(image), "size": "64M"}]})
    return ApplianceProcess(cfg, tmp / name / "proc").start()


def ctl(p: ApplianceProcess) -> str:
    return p.config.control.socket


def sock(p: ApplianceProcess) -> str:
    return p.config.storage.socket


def bench_handoff(tmp: Path, hops: int) -> list[float]:
    image = tmp / "disk0.img"
    make_image(image, SIZE, seed=1, random_mib=4)
    procs = [start(tmp, "p0", image)]
    driver = NvmeDriver(VfioUserClient.connect(sock(procs[0])), mem_size=8 * MiB)
    driver.setup(io_queues=1, depth=32)
    writer = VerifiedWriter(driver, blocks=8, seed=3)
    lat: list[tuple[float, float]] = []  # (end time, seconds) per verified write+read
    stop = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                writer.step(1)
                t1 = time.perf_counter()
                lat.append((t1, t1 - t0))
        except BaseException as exc:  # noqa: BLE001 - printed below
            errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    results: list[dict[str, Any]] = []
    try:
        for hop in range(1, hops + 1):
            procs.append(start(tmp, f"p{hop}", image))
            begin = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "appliance", "handoff", "--from",
                                   ctl(procs[-2]), "--to", ctl(procs[-1])], check=False,
                                  capture_output=True, text=True, timeout=120)
            end = time.perf_counter()
            if done.returncode:
                raise RuntimeError(done.stderr.strip())
            procs[-2].proc.wait(timeout=30)  # type: ignore[union-attr]
            line = done.stdout.strip()
            pause = float(line.split("pause ")[1].split(" ms")[0])
            results.append({"hop": hop, "pause_ms": pause, "begin": begin, "end": end})
    finally:
        stop.set()
        thread.join(60)
        checked = writer.verify_all() if not errors else 0
        driver.close()
        for p in procs:
            p.stop()
    for r in results:  # the longest I/O in flight at any point of the handoff command
        r["worst_io_ms"] = 1000 * max((s for t, s in lat if t >= r["begin"] and t - s <= r["end"]),
                                      default=0.0)
    median = statistics.median(s for _, s in lat) * 1000
    print(f"Live handoff, {SIZE // MiB} MiB shared image, QD1 verified 4 KiB writes throughout "
          f"({len(lat)} I/Os, {checked} slots verified at the end, errors: {errors or 'none'}):")
    for r in results:
        print(f"  hop {r['hop']}: pause {r['pause_ms']:6.1f} ms (source side); "
              f"longest I/O across it {r['worst_io_ms']:6.1f} ms")
    print(f"  median I/O round trip {median:6.2f} ms  (anchor, same run)")
    return [r["pause_ms"] for r in results]


def bench_migrate_anchor(tmp: Path) -> float:
    """Downtime of a shared-storage vfio-user migration v2 of the same device (the anchor)."""
    image = tmp / "disk0.img"
    make_image(image, SIZE, seed=2, random_mib=4)
    src_p, dst_p = start(tmp, "src", image), start(tmp, "dst", image)
    try:
        src = VfioUserClient.connect(sock(src_p))
        driver = NvmeDriver(src, mem_size=8 * MiB)
        driver.setup(io_queues=1, depth=32)
        writer = VerifiedWriter(driver, blocks=8, seed=4)
        writer.step(50)
        dst = VfioUserClient.connect(sock(dst_p))
        prepare_destination(driver, dst)
        s = orch.migrate(src, dst, shared_storage=True, between_reads=lambda: writer.step(1))
        move_driver(driver, dst)
        writer.verify_all()
        driver.close()
        src.close()
        dst.close()
    finally:
        src_p.stop()
        dst_p.stop()
    print(f"  vfio-user migration v2, same device, shared storage: downtime "
          f"{s.downtime * 1000:6.1f} ms  (anchor, same run)")
    return s.downtime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two hops")
    args = ap.parse_args()
    print(f"benchmarks/handoff.py{' --quick' if args.quick else ''} "
          "(2-core shared machine: indicative only)")
    with tempfile.TemporaryDirectory(prefix="handoff-bench-") as tmp:
        bench_handoff(Path(tmp) / "chain", 2 if args.quick else 5)
        bench_migrate_anchor(Path(tmp) / "anchor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
