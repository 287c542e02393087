"""vhost-user-net figures (prints, never asserts).

    python benchmarks/net.py [--quick | --soak [FRAMES]]

Every figure is printed next to the anchor, DPDK's own vhost-user backend
(``net_vhost`` vdevs in a second testpmd), measured in the same run.  The
front-end is always DPDK 22.11 testpmd with ``net_virtio_user`` vdevs
(``--no-huge -m 512``: one memfd region) pinned to CPU 1; the backend under
test (the appliance, or the anchor testpmd) is pinned to CPU 0.

1. ``txonly -> port``: testpmd txonly on one port; frames per second the
   backend took off the virtio transmit ring (testpmd's TX-packets only counts
   what the ring accepted), 64 B and 1500 B frames.
2. ``port -> rxonly``: frames per second testpmd *received* from the backend.
   The appliance has no traffic generator of its own, so frames come from a
   loop: one testpmd with two ports in io mode, ``start tx_first 4`` (128
   frames per port), every received frame sent out of the other port; the
   backend moves them port to port (the appliance through its switch, the
   anchor by io forwarding between its two net_vhost ports).  The figure is the
   sum of both ports' RX rates (the loop's throughput).
Each appliance figure is taken on its data paths: testpmd's memory as by default
("fd I/O": it cannot be sealed, so Python reaches it through its fd and the native
fast path through a mapping under its SIGBUS guard), and
mapped (``net.map_unsealed_memory``) once on the pure-Python path (``fastpath:
false``) and once on the native fast path (``appliance._fastpath``), side by side
with the anchor and their ratios to it.

3. ``--soak``: the same loop on the appliance for 10 million frames (default)
   with each hop's counters compared at the end (so a leak or a stall shows as a mismatch).

The measurement pins each side to a core, warms up, then reads counters over
a window, with the anchor in the complementary mode.  The machine has 2 cores and is shared: the figures are
indicative only.  ``--quick`` (what scripts/test runs) uses 2-second windows
and stays under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's appliance
from appliance.testing.expect import ExpectProcess

REPO = Path(__file__).resolve().parent.parent
TESTPMD = shutil.which("dpdk-testpmd")
BACKEND_CPU, FRONTEND_CPU = 0, min(1, (os.cpu_count() or 1) - 1)
INJECT_BURSTS = 4
# the appliance's columns: name -> (net.map_unsealed_memory, fastpath)
BACKENDS = {"fd I/O": (False, True), "mapped, Python": (True, False),
            "mapped, native": (True, True)}


class Proc(ExpectProcess):
    """testpmd and the appliance, stopped with SIGINT so testpmd closes its ports."""

    def stop(self, sig: int = signal.SIGINT) -> None:
        super().stop(sig)


def testpmd_args(prefix: str, cpu: int, vdevs: list[str], app: list[str]) -> list[str]:
    assert TESTPMD is not None
    args = [TESTPMD, "--no-huge", "-m", "512", "--no-pci", "--no-shconf", f"--file-prefix={prefix}",
            "--lcores", f"0@{cpu},1@{cpu}"]
    for v in vdevs:
        args += ["--vdev", v]
    return [*args, "--", "--total-num-mbufs=16384", *app]


def start_appliance(tmp: Path, nports: int, mapped: bool = False,
                    native: bool = True) -> tuple[Proc, list[str]]:
    """``mapped``: net.map_unsealed_memory (testpmd's memfd cannot be sealed: by
    default the appliance reaches it through its fd, safe from a shrink).
    ``native``: the config's ``fastpath`` (False: the pure-Python data path)."""
    run = tmp / "run"
    socks = [str(run / f"net{i}.sock") for i in range(nports)]
    cfg = {
        "data_dir": str(tmp / "data"), "run_dir": str(run),
        "storage": {"socket": str(run / "nvme.sock"),
                    "namespaces": [{"image": str(tmp / "data" / "disk0.img"), "size": "16M"}]},
        "net": {"ports": [{"socket": s, "mac": f"52:54:00:12:34:{i + 0x56:02x}"}
                          for i, s in enumerate(socks)],
                "map_unsealed_memory": mapped},
        "control": {"socket": str(run / "control.sock")},
        "fastpath": native,
    }
    path = tmp / "appliance.yaml"
    path.write_text(yaml.safe_dump(cfg))
    app = Proc("appliance", [sys.executable, "-m", "appliance", "run", "-c", str(path), "-v"],
               tmp / "appliance.log", BACKEND_CPU)
    path_line = app.expect(r"appliance: data path: ([^\n]*)", 30).group(1)
    if native and not path_line.startswith("native"):
        raise RuntimeError(f"the appliance did not take the native fast path: {path_line}")
    app.expect("appliance: ready", 30)
    return app, socks


def start_anchor(tmp: Path, nports: int, mode: str, size: int) -> tuple[Proc, list[str]]:
    socks = [str(tmp / f"vhost{i}.sock") for i in range(nports)]
    vdevs = [f"net_vhost{i},iface={s},queues=1" for i, s in enumerate(socks)]
    args = testpmd_args(f"nb{os.getpid()}a", BACKEND_CPU, vdevs,
                        ["--auto-start", f"--forward-mode={mode}", f"--txpkts={size}"])
    anchor = Proc("anchor", args, tmp / "anchor.log", BACKEND_CPU, stdin=True)
    anchor.expect(r"Start automatic packet forwarding|Press enter to exit", 30)
    return anchor, socks


def start_frontend(tmp: Path, socks: list[str], mode: str, size: int) -> Proc:
    vdevs = [f"net_virtio_user{i},path={s},mac=02:00:00:00:00:{i:02x}" for i, s in enumerate(socks)]
    app = ["-i", f"--forward-mode={mode}", f"--txpkts={size}"]
    if len(socks) == 2:
        app += ["--eth-peer=0,02:00:00:00:00:01", "--eth-peer=1,02:00:00:00:00:00"]
    pmd = Proc("frontend", testpmd_args(f"nb{os.getpid()}f", FRONTEND_CPU, vdevs, app),
               tmp / "frontend.log", FRONTEND_CPU, stdin=True)
    pmd.expect(r"testpmd> ", 30)
    return pmd


def counters(pmd: Proc, nports: int) -> list[tuple[int, int]]:
    """(RX-packets, TX-packets) per port from ``show port stats``."""
    out = []
    for i in range(nports):
        pmd.send(f"show port stats {i}")
        rx = int(pmd.expect(r"RX-packets:\s+(\d+)", 10).group(1))
        tx = int(pmd.expect(r"TX-packets:\s+(\d+)", 10).group(1))
        pmd.expect(r"testpmd> ", 10)
        out.append((rx, tx))
    return out


def measure(kind: str, backend: str, size: int, window: float, warm: float) -> dict[str, float]:
    """One figure: frames/s (and CPU use) for ``kind`` in (txonly, loop) on ``backend``."""
    nports = 1 if kind == "txonly" else 2
    with tempfile.TemporaryDirectory(prefix="netbench-", dir="/tmp") as d:
        tmp = Path(d)
        procs: list[Proc] = []
        try:
            if backend in BACKENDS:
                mapped, native = BACKENDS[backend]
                be, socks = start_appliance(tmp, nports, mapped, native)
            else:
                be, socks = start_anchor(tmp, nports, "rxonly" if kind == "txonly" else "io", size)
            procs.append(be)
            fe = start_frontend(tmp, socks, "txonly" if kind == "txonly" else "io", size)
            procs.append(fe)
            fe.send("start" if kind == "txonly" else f"start tx_first {INJECT_BURSTS}")
            fe.expect(r"packet forwarding", 10)
            fe.expect(r"testpmd> ", 10)
            idx = 1 if kind == "txonly" else 0  # count TX for txonly, RX for the loop

            def total() -> int:
                return sum(c[idx] for c in counters(fe, nports))

            deadline = time.monotonic() + 30
            first = total()
            while total() == first:  # bounded wait for traffic to flow
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no traffic with {backend}:\n{fe.text[-2000:]}")
            time.sleep(warm)  # warm-up, then a counter window (as dpdk-pps.sh)
            n0, t0, c0 = total(), time.monotonic(), be.cpu_seconds()
            time.sleep(window)
            n1, t1, c1 = total(), time.monotonic(), be.cpu_seconds()
            fe.send("stop")
            fe.expect(r"Done\.", 20)
            fe.send("quit")
            fe.proc.wait(30)
        finally:
            for p in reversed(procs):
                p.stop(signal.SIGINT)
            for tag in ("a", "f"):
                shutil.rmtree(f"/var/run/dpdk/nb{os.getpid()}{tag}", ignore_errors=True)
    pps = (n1 - n0) / (t1 - t0)
    return {"pps": pps, "gbps": pps * size * 8 / 1e9, "cpu": (c1 - c0) / (t1 - t0)}


def soak(frames: int) -> int:
    """The appliance loop for ``frames`` received frames; each hop's counters compared."""
    with tempfile.TemporaryDirectory(prefix="netsoak-", dir="/tmp") as d:
        tmp = Path(d)
        procs: list[Proc] = []
        try:
            app, socks = start_appliance(tmp, 2, mapped=True)
            procs.append(app)
            fe = start_frontend(tmp, socks, "io", 64)
            procs.append(fe)
            fe.send(f"start tx_first {INJECT_BURSTS}")
            fe.expect(r"testpmd> ", 10)
            start = last_t = time.monotonic()
            last = 0
            while (got := sum(c[0] for c in counters(fe, 2))) < frames:
                now = time.monotonic()
                if got > last:
                    last, last_t = got, now
                elif now - last_t > 5:
                    print(f"  STALL at {got} frames")
                    return 1
                time.sleep(1.0)  # progress report interval
                print(f"  {got:>12,} frames  {got / (now - start):>10,.0f} frames/s", flush=True)
            elapsed = time.monotonic() - start
            fe.send("stop")
            stats = []
            for i in range(2):
                fe.expect(rf"Forward statistics for port {i}", 20)
                rx = int(fe.expect(r"RX-packets:\s+(\d+)", 10).group(1))
                tx = int(fe.expect(r"TX-packets:\s+(\d+)", 10).group(1))
                stats.append((rx, tx))
            fe.expect(r"Done\.", 20)
            fe.send("quit")
            fe.proc.wait(30)
            ports = []
            for i in range(2):
                m = app.expect(rf"net{i}: front-end disconnected [^\n]*counters (\{{[^\n]*\}})", 20)
                ports.append(json.loads(m.group(1)))
        finally:
            for p in reversed(procs):
                p.stop(signal.SIGINT)
            shutil.rmtree(f"/var/run/dpdk/nb{os.getpid()}f", ignore_errors=True)
    rx = stats[0][0] + stats[1][0]
    inflight = sum(p["tx_packets"] for p in ports) - rx
    print(f"soak: {rx:,} frames received by testpmd in {elapsed:.1f} s ({rx / elapsed:,.0f} frames/s)")
    for i, (p, (r, t)) in enumerate(zip(ports, stats, strict=True)):
        print(f"  port {i}: testpmd rx {r:,} tx {t:,}; appliance net{i} rx_packets {p['rx_packets']:,} "
              f"tx_packets {p['tx_packets']:,} dropped {p['rx_dropped']}/{p['tx_dropped']} "
              f"malformed {p['malformed_chains']}")
    print(f"  frames in flight at stop: {inflight} (injected {2 * 32 * INJECT_BURSTS})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-second windows, under a minute")
    ap.add_argument("--soak", nargs="?", const=10_000_000, type=int, metavar="FRAMES",
                    help="the appliance loop for FRAMES frames (10 million) with counters compared")
    ap.add_argument("--window", type=float, help="measuring window in seconds (2 quick, 10)")
    args = ap.parse_args()
    if TESTPMD is None:
        print("benchmarks/net.py: dpdk-testpmd is not installed (apt-get install dpdk-dev); skipped")
        return 0
    if args.soak:
        return soak(args.soak)
    window = args.window or (2.0 if args.quick else 10.0)
    warm = 0.5 if args.quick else 2.0
    print(f"vhost-user-net, testpmd front-end on CPU {FRONTEND_CPU}, backend on CPU {BACKEND_CPU}, "
          f"{window:g} s windows (indicative: 2 shared cores)")
    print("appliance: fd I/O: testpmd's memory as by default (it cannot be sealed: Python "
          "reaches it through its fd, the native fast path through a guarded mapping); mapped: "
          "net.map_unsealed_memory, on the pure-Python path (fastpath: false) and the native one")
    backends = (*BACKENDS, "anchor")
    print(f"{'case':<22}{'frame':>6}  " + "  ".join(f"{be:>17}" for be in BACKENDS)
          + f"  {'DPDK net_vhost':>17}  ratios to DPDK ({', '.join(BACKENDS)}); "
          "native / Python")
    cases = [("txonly", 64), ("txonly", 1500), ("loop", 64), ("loop", 1500)]
    for kind, size in cases:
        r = {be: measure(kind, be, size, window, warm) for be in backends}
        label = "txonly -> port" if kind == "txonly" else "port -> rxonly (loop)"
        anchor = r["anchor"]["pps"]
        ratios = " / ".join(f"{r[be]['pps'] / anchor:.4f}" if anchor else "-" for be in BACKENDS)
        python = r["mapped, Python"]["pps"]
        speedup = f"{r['mapped, native']['pps'] / python:.2f}x" if python else "-"
        cpu = " / ".join(f"{r[be]['cpu']:.2f}" for be in backends)
        print(f"{label:<22}{size:>5}B  " + "  ".join(f"{r[be]['pps']:>13,.0f} pps" for be in backends)
              + f"  {ratios}; {speedup}   (backend CPU {cpu})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
