"""NVMe figures (prints, never asserts).

    python benchmarks/nvme.py [--quick]

1. In the guest (QEMU 11.1, TCG, smp 2, one boot): the appliance with
   ``storage.doorbells: message``, the appliance with ``doorbells: mmap`` and,
   as the anchor in the same run, QEMU's built-in NVMe
   (``-device nvme -drive ...,cache=none,format=raw``) on a copy of the same
   image, all three attached to the same guest.  For each: a direct 1 MiB-block
   write and read of N MiB and N*64 direct 4 KiB reads (dd), timed inside the
   guest from /proc/uptime (10 ms resolution).
2. Two hosts against ``appliance run`` (each doorbell mode, each data path:
   pure Python with ``fastpath: false`` and the native fast path, side by
   side): the Python NVMe driver, and the native load generator
   (``appliance._fastpath.nvme_loadgen`` through
   ``appliance.client.nvme_loadgen``: C, no Python object per I/O, on the queue
   pair the driver created, sleeping on the CQ's interrupt eventfd between
   polls; at QD1 also polling without sleeping, ``[C gen, polling]``) whose own
   cost stays about a microsecond per I/O at QD32, so the appliance's shows.  4 KiB random reads and writes at QD1 and QD32 for a fixed time;
   IOPS, the appliance process's CPU time (utime + stime from /proc/PID/stat)
   per I/O, the client's CPU time per I/O, and for the generator its median
   and p99 latency.  In mmap mode the loop spins a while after activity
   (appliance/runtime/doorbell_spin.py): its CPU counts.

With ``APPLIANCE_BENCH_PROFILE=DIR`` each appliance of part 2 runs under
cProfile (benchmarks/profile_run.py) and leaves ``DIR/MODE-PATH.prof``
(``python -m pstats``): where its time per I/O goes (docs/latency.md).

The machine is small and shared (other tests may run): the figures are
indicative only.  ``--quick`` (what scripts/test runs) uses 16 MiB, 1024
reads and 1 s per driver measurement.  Without a provisioned QEMU environment
part 1 is skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(  # `python -m appliance` children use this tree
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

from appliance.client.nvme import NvmeDriver
from appliance.client.nvme_loadgen import available as loadgen_available
from appliance.client.nvme_loadgen import native_load
from appliance.client.vfio_user import VfioUserClient
from appliance.storage import spec
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.qemu import qemu_args

MIB = 1 << 20
MODES = ("message", "mmap")
PATHS = ("python", "native")  # the data path: `fastpath: false` / the native fast path
Row = tuple[str, str, str, str]  # (part, target, measurement, figure)
rows: list[Row] = []


def report(part: str, target: str, what: str, figure: str) -> None:
    rows.append((part, target, what, figure))
    print(f"  {target:<22} {what:<34} {figure}", flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- 1. in the guest
def guest_part(work: Path, mib: int, reads: int) -> None:
    print(f"[guest] QEMU TCG smp 2: {mib} MiB direct write/read, {reads} x 4 KiB direct reads",
          flush=True)
    try:
        from appliance.testing.qemu import Guest
        from appliance.testing.qemu_environment import QemuUnavailable, locate_env
        env = locate_env()
    except (ImportError, QemuUnavailable) as exc:
        print(f"  skipped: QEMU environment unavailable ({exc})", flush=True)
        return
    size = f"{max(2 * mib, 64)}M"
    procs, devices = [], []
    try:
        for mode in MODES:
            root = work / f"guest-{mode}"
            cfg = make_config(root, storage={
                "doorbells": mode, "io_queues": 2, "serial": f"BENCH-{mode.upper()}",
                "namespaces": [{"image": str(root / "data" / "disk0.img"), "size": size}]})
            proc = ApplianceProcess(cfg, root).start()
            procs.append(proc)
            args = qemu_args(proc.config, net=False)
            i = args.index("-device")
            devices += args[i:i + 2]
        image = Path(procs[0].config.storage.namespaces[0].image)
        copy = work / "builtin.img"
        shutil.copyfile(image, copy)
        devices += ["-device", "nvme,drive=d,serial=BENCH-BUILTIN",
                    "-drive", f"file={copy},if=none,id=d,cache=none,format=raw"]
        g = Guest(env, work, args=devices, append="qe.shell", smp=2, name="bench-guest").start()
        try:
            _run_guest(g, mib, reads)
            g.send("exit\n")
            g.wait_for(r"GUEST-POWEROFF", timeout=60)
        finally:
            g.kill()
    finally:
        for proc in procs:
            proc.stop()


def _run_guest(g: Any, mib: int, reads: int) -> None:
    wait = ("for i in $(seq 300); do [ $(ls /sys/block | grep -c nvme) -ge 3 ] && break; "
            "sleep 0.1; done; for d in /sys/block/nvme*; do echo $(basename $d) "
            "$(cat $d/device/serial); done")
    out, _ = g.run(wait, timeout=240)
    names = {serial: dev for dev, serial in (line.split() for line in out.splitlines()
                                               if line.startswith("nvme"))}
    targets = [("appliance (message)", "BENCH-MESSAGE"), ("appliance (mmap)", "BENCH-MMAP"),
               ("QEMU built-in nvme", "BENCH-BUILTIN")]
    steps = [(f"{mib} MiB write, 1 MiB direct",
              f"dd if=/dev/zero of=/dev/{{dev}} bs=1M count={mib} oflag=direct"),
             (f"{mib} MiB read, 1 MiB direct",
              f"dd if=/dev/{{dev}} of=/dev/null bs=1M count={mib} iflag=direct"),
             (f"{reads} x 4 KiB direct reads",
              f"dd if=/dev/{{dev}} of=/dev/null bs=4k count={reads} iflag=direct")]
    for target, serial in targets:
        dev = names.get(serial)
        if dev is None:
            report("guest", target, "missing", f"no device (saw {names})")
            continue
        for what, cmd in steps:
            timed = ("a=$(cut -d' ' -f1 /proc/uptime); " + cmd.format(dev=dev)
                     + " >/dev/null 2>&1; r=$?; b=$(cut -d' ' -f1 /proc/uptime); "
                     "echo T $a $b $r")
            out, _ = g.run(timed, timeout=300)
            m = re.search(r"T (\S+) (\S+) (\d+)", out)
            if m is None or m[3] != "0":
                report("guest", target, what, f"failed: {out[-200:]!r}")
                continue
            report("guest", target, what, f"{float(m[2]) - float(m[1]):.2f} s")


# ---------------------------------------------------------------- 2. the Python driver
def driver_part(work: Path, seconds: float) -> None:
    generator = loadgen_available()
    print(f"[driver] Python NVMe driver{' and the native generator' if generator else ''}, "
          f"4 KiB random I/O, {seconds:g} s each; appliance CPU per I/O from /proc/PID/stat, "
          "client CPU per I/O", flush=True)
    if not generator:
        print("  (the native generator is not built: its rows are left out)", flush=True)
    for mode, path in [(mode, path) for mode in MODES for path in PATHS]:
        root = work / f"driver-{mode}-{path}"
        cfg = make_config(root, storage={"doorbells": mode}, fastpath=path == "native")
        with ApplianceProcess(cfg, root, wrapper=_profiler(mode, path)) as proc:
            assert proc.proc is not None
            pid = proc.proc.pid
            with VfioUserClient.connect(proc.config.storage.socket) as c:
                d = NvmeDriver(c, doorbells=mode)
                d.setup(io_queues=1, depth=64)
                for opcode, name in ((spec.IoOpcode.READ, "read"), (spec.IoOpcode.WRITE, "write")):
                    for qd in (1, 32):
                        cpu0, client0 = cpu_seconds(pid), time.process_time()
                        done, elapsed = _load(d, opcode, qd, seconds)
                        cpu, client = cpu_seconds(pid) - cpu0, time.process_time() - client0
                        report("driver", f"appliance ({mode}, {path})",
                               f"4 KiB random {name} QD{qd}",
                               f"{done / elapsed:,.0f} IOPS, {cpu / done * 1e6:,.1f} us "
                               f"server CPU/IO, {client / done * 1e6:,.1f} us client CPU/IO")
                        if generator:
                            _generator_row(d, pid, mode, path, opcode, name, qd, seconds)
                        if generator and qd == 1:  # no wakeup in the client's turnaround
                            _generator_row(d, pid, mode, path, opcode, name, qd, seconds,
                                           poll=True)
                d.close()


def _profiler(mode: str, path: str) -> tuple[str, ...]:
    """The wrapper that runs an appliance under cProfile (APPLIANCE_BENCH_PROFILE), or none."""
    out = os.environ.get("APPLIANCE_BENCH_PROFILE")
    if not out:
        return ()
    Path(out).mkdir(parents=True, exist_ok=True)
    return (sys.executable, str(ROOT / "benchmarks" / "profile_run.py"),
            str(Path(out) / f"{mode}-{path}.prof"))


def _generator_row(d: NvmeDriver, pid: int, mode: str, path: str, opcode: int, name: str,
                   qd: int, seconds: float, poll: bool = False) -> None:
    """The same load from the native generator, on the driver's queue 1; ``poll``:
    it polls the CQ instead of sleeping on the interrupt (a core's worth of client CPU)."""
    cpu0 = cpu_seconds(pid)
    out = native_load(d, 1, opcode, qd, seconds=seconds, poll=poll)
    cpu = cpu_seconds(pid) - cpu0
    if out.errors:
        raise RuntimeError(f"native generator: {out.errors} I/Os failed")
    tag = "C gen, polling" if poll else "C gen"
    report("driver", f"appliance ({mode}, {path})", f"4 KiB random {name} QD{qd} [{tag}]",
           f"{out.iops:,.0f} IOPS, {cpu / out.done * 1e6:,.1f} us server CPU/IO, "
           f"{out.client_cpu / out.done * 1e6:,.1f} us client CPU/IO, "
           f"p50 {out.lat_p50 * 1e6:,.0f} us, p99 {out.lat_p99 * 1e6:,.0f} us")


def _load(d: NvmeDriver, opcode: int, qd: int, seconds: float) -> tuple[int, float]:
    """Keep ``qd`` 4 KiB commands in flight on queue 1 for ``seconds``."""
    rng = random.Random(1)
    blocks = d.ns_blocks[1] // 8
    base = d.pages.alloc(qd)
    payload = os.urandom(4096)
    for i in range(qd):
        d.put(base + i * 4096, payload)

    def submit(slot: int) -> None:
        lba = rng.randrange(blocks) * 8
        d.submit(1, d.rw_command(opcode, 1, lba, 8, base + slot * 4096, 0), context=slot,
                 ring=False)

    for slot in range(qd):
        submit(slot)
    d.ring(1)
    done, start = 0, time.monotonic()
    end = start + seconds
    while True:
        completions = d.wait(1, 1)
        done += len(completions)
        if time.monotonic() >= end:
            break
        for comp in completions:
            if comp.status:
                raise RuntimeError(f"I/O failed: status {comp.status:#x}")
            submit(comp.context)
        d.ring(1)
    elapsed = time.monotonic() - start
    while d.queues[1].outstanding:  # drain before the next measurement
        d.wait(1, 1)
    return done, elapsed


def summary() -> None:
    print("\nSummary (indicative: a 2-core machine shared with other work)")
    width = max(len(r[1]) for r in rows) if rows else 10
    what_w = max(len(r[2]) for r in rows) if rows else 10
    print(f"| part   | {'target':<{width}} | {'measurement':<{what_w}} | figure")
    print(f"|--------|{'-' * (width + 2)}|{'-' * (what_w + 2)}|-------")
    for part, target, what, figure in rows:
        print(f"| {part:<6} | {target:<{width}} | {what:<{what_w}} | {figure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (scripts/test)")
    args = parser.parse_args(argv)
    mib, reads, seconds = (16, 1024, 1.0) if args.quick else (64, 4096, 5.0)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-nvme-", dir="/tmp") as tmp:
        work = Path(tmp)
        steps: list[Callable[[], None]] = [lambda: driver_part(work, seconds),
                                           lambda: guest_part(work, mib, reads)]
        for step in steps:
            step()
    summary()
    print(f"(benchmarks/nvme.py{' --quick' if args.quick else ''}: "
          f"{time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
