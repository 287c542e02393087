"""vhost-user-net against a real front-end: DPDK testpmd with net_virtio_user.

The appliance runs as a subprocess (``python -m appliance run -c CFG -v``, or a
small launcher running NetService on its own EventLoop when the CLI is not
there), pinned to CPU 0; each testpmd is pinned to CPU 1 (``--lcores 0@1,1@1``)
and driven through its interactive prompt.  Readiness and results come from the
processes' output (bounded waits on patterns, never sleeps as synchronisation);
the appliance's per-port counters come from the line it logs when a front-end
disconnects: ``netN: front-end disconnected (...); counters {json}``.

Skipped when ``dpdk-testpmd`` is missing, unless APPLIANCE_REQUIRE_INTEGRATION=1
(then it fails).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.testing.expect import ExpectProcess

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TESTPMD = shutil.which("dpdk-testpmd")
APPLIANCE_CPU, TESTPMD_CPU = 0, min(1, (os.cpu_count() or 1) - 1)
LAUNCHER = """
import json, logging, sys
sys.path.insert(0, sys.argv[1])
import yaml
from appliance import config
from appliance.runtime.loop import EventLoop
from appliance.runtime.vhost_user import NetService
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")
cfg = config.load(sys.argv[2])
loop = EventLoop()
svc = NetService(loop, cfg.net)
loop.install_signal_handlers()
print("appliance: ready", flush=True)
try:
    loop.run()
finally:
    svc.close()
"""


@pytest.fixture(autouse=True)
def _need_testpmd() -> None:
    if TESTPMD is None:
        if os.environ.get("APPLIANCE_REQUIRE_INTEGRATION") == "1":
            pytest.fail("dpdk-testpmd is not installed (APPLIANCE_REQUIRE_INTEGRATION=1)")
        pytest.skip("dpdk-testpmd is not installed")


Proc = ExpectProcess


class Appliance(Proc):
    def counters(self, port: str, timeout: float = 20.0) -> dict[str, Any]:
        """The port's counters from its next "front-end disconnected" log line."""
        m = self.expect(rf"{port}: front-end disconnected \([^\n]*\); counters (\{{[^\n]*\}})",
                        timeout)
        return json.loads(m.group(1))


def start_appliance(tmp: Path, nports: int, map_unsealed: bool = False,
                    **port_opts: Any) -> tuple[Appliance, list[str]]:
    """``appliance run`` with ``nports`` ports (``port_opts``: more keys for every port,
    e.g. ``queues=2``, ``mode="client"``); waits until they listen (server mode).
    ``map_unsealed``: ``net.map_unsealed_memory`` (testpmd's memory cannot be sealed:
    by default Python reaches it through its fd, the native fast path through a
    mapping under its SIGBUS guard)."""
    run = tmp / "run"
    socks = [str(run / f"net{i}.sock") for i in range(nports)]
    cfg = {
        "data_dir": str(tmp / "data"),
        "run_dir": str(run),
        "storage": {"socket": str(run / "nvme.sock"),
                    "namespaces": [{"image": str(tmp / "data" / "disk0.img"), "size": "16M"}]},
        "net": {"ports": [{"socket": s, "mac": f"52:54:00:12:34:{i + 0x56:02x}", **port_opts}
                          for i, s in enumerate(socks)],
                "map_unsealed_memory": map_unsealed},
        "control": {"socket": str(run / "control.sock")},
    }
    path = tmp / "appliance.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if importlib.util.find_spec("appliance.__main__") is not None:
        args = [sys.executable, "-m", "appliance", "run", "-c", str(path), "-v"]
    else:
        run.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-c", LAUNCHER, str(REPO), str(path)]
    app = Appliance("appliance", args, tmp / "appliance.log", cpu=APPLIANCE_CPU)
    if port_opts.get("mode", "server") == "server":
        for i in range(nports):
            app.expect(rf"net{i}: listening on", 30)
    app.expect("appliance: ready", 30)
    return app, socks


def start_testpmd(tmp: Path, sock: str | list[str], mode: str, tag: str, vdev: str = "",
                  extra: tuple[str, ...] = ()) -> Proc:
    """testpmd on net_virtio_user ports, one per socket (``vdev``: more ``key=value,...``;
    port i gets MAC 02:00:00:00:00:0i when there are several)."""
    assert TESTPMD is not None
    prefix = f"apl{os.getpid()}{tag}"
    socks = [sock] if isinstance(sock, str) else sock
    vdevs: list[str] = []
    for i, path in enumerate(socks):
        opts = f"path={path}" + (f",mac=02:00:00:00:00:{i:02x}" if len(socks) > 1 else "")
        vdevs += ["--vdev", f"net_virtio_user{i},{opts}" + (f",{vdev}" if vdev else "")]
    args = [TESTPMD, "--no-huge", "-m", "512", "--no-pci", "--no-shconf", f"--file-prefix={prefix}",
            "--lcores", f"0@{TESTPMD_CPU},1@{TESTPMD_CPU}", *vdevs,
            "--", "-i", f"--forward-mode={mode}", "--total-num-mbufs=16384", *extra]
    stdbuf = shutil.which("stdbuf")
    if stdbuf:
        args = [stdbuf, "-oL", "-eL", *args]
    pmd = Proc(f"testpmd-{tag}", args, tmp / f"testpmd-{tag}.log", stdin=True)
    pmd.expect(r"testpmd> ", 30, fail=r"No probed ethernet devices|Cause:|Fail to")
    return pmd


def port_stats(pmd: Proc) -> tuple[int, int]:
    """(RX-packets, TX-packets) from ``show port stats 0``."""
    pmd.send("show port stats 0")
    rx = int(pmd.expect(r"RX-packets:\s+(\d+)", 10).group(1))
    tx = int(pmd.expect(r"TX-packets:\s+(\d+)", 10).group(1))
    pmd.expect(r"testpmd> ", 10)
    return rx, tx


def txonly_burst(app: Proc, pmd: Proc, frames: int = 20_000) -> int:
    """Once net0's driver is up: txonly until at least ``frames`` are sent (bounded
    wait), then ``stop``; returns testpmd's TX-packets for the run."""
    app.expect(r"net0: driver ok", 20)
    pmd.send("start")
    pmd.expect(r"txonly packet forwarding", 10)
    pmd.expect(r"testpmd> ", 10)
    deadline = time.monotonic() + 30
    while port_stats(pmd)[1] < frames:
        assert time.monotonic() < deadline, pmd.tail()
    return stop_forwarding(pmd)[1]


def stop_forwarding(pmd: Proc) -> tuple[int, int]:
    """``stop``; (RX-packets, TX-packets) of the run's forward statistics for port 0."""
    pmd.send("stop")
    pmd.expect(r"Forward statistics for port 0", 20)
    rx = int(pmd.expect(r"RX-packets:\s+(\d+)", 10).group(1))
    tx = int(pmd.expect(r"TX-packets:\s+(\d+)", 10).group(1))
    pmd.expect(r"Done\.", 20)
    return rx, tx


def quit_testpmd(pmd: Proc) -> None:
    pmd.send("quit")
    assert pmd.wait_exit(30) == 0, pmd.tail()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):  # testpmds first (SIGINT lets them close the port), then us
        p.stop(signal.SIGTERM if isinstance(p, Appliance) else signal.SIGINT)
    for p in started:
        if p.name.startswith("testpmd"):
            shutil.rmtree(f"/var/run/dpdk/apl{os.getpid()}{p.name[8:]}", ignore_errors=True)


@pytest.mark.parametrize("mapped", [False, True], ids=["fd-io", "mapped"])
def test_txonly_counts_match_and_pps(tmp_path: Path, procs: list[Proc],
                                     record_property: Any, mapped: bool) -> None:
    """The transmit ring runs on the native fast path when it is built (the data path
    line says which): over a guarded mapping by default, over the plain one mapped
    (net.map_unsealed_memory)."""
    app, (sock,) = start_appliance(tmp_path, 1, map_unsealed=mapped)
    procs.append(app)
    pmd = start_testpmd(tmp_path, sock, "txonly", "tx")
    procs.append(pmd)
    app.expect(r"net0: driver ok", 20)
    pmd.send("start")
    pmd.expect(r"txonly packet forwarding", 10)
    pmd.expect(r"testpmd> ", 10)
    _, t0 = port_stats(pmd)
    start = time.monotonic()
    time.sleep(3.0)  # the measuring window (not synchronisation)
    _, t1 = port_stats(pmd)
    pps = (t1 - t0) / (time.monotonic() - start)
    _, sent = stop_forwarding(pmd)
    quit_testpmd(pmd)
    counters = app.counters("net0")
    data_path = re.search(r"appliance: data path: ([^\n]*)", app.text)
    print(f"\ntestpmd txonly -> appliance ({data_path[1] if data_path else 'no data path line'}, "
          f"{'mapped' if mapped else 'fd I/O'}): {sent} frames, {pps:,.0f} pps; appliance {counters}")
    record_property(f"txonly_pps_{'mapped' if mapped else 'fd'}", round(pps))
    assert sent > 0
    assert counters["rx_packets"] == sent, (counters, sent)
    assert counters["rx_bytes"] == 64 * sent
    assert counters["malformed_chains"] == 0 and counters["rx_dropped"] == 0


def test_flood_reaches_rxonly_port(tmp_path: Path, procs: list[Proc]) -> None:
    app, (sock_a, sock_b) = start_appliance(tmp_path, 2)
    procs.append(app)
    rx_pmd = start_testpmd(tmp_path, sock_b, "rxonly", "rx")
    procs.append(rx_pmd)
    app.expect(r"net1: driver ok", 20)
    rx_pmd.send("start")
    rx_pmd.expect(r"rxonly packet forwarding", 10)
    tx_pmd = start_testpmd(tmp_path, sock_a, "txonly", "tx")
    procs.append(tx_pmd)
    app.expect(r"net0: driver ok", 20)
    tx_pmd.send("start")  # frames to 02:00:00:00:00:00, unknown: flooded to net1
    tx_pmd.expect(r"txonly packet forwarding", 10)
    tx_pmd.expect(r"testpmd> ", 10)
    deadline = time.monotonic() + 20
    while port_stats(rx_pmd)[0] < 2000:  # bounded wait for traffic to arrive
        assert time.monotonic() < deadline, rx_pmd.tail()
    _, sent = stop_forwarding(tx_pmd)
    quit_testpmd(tx_pmd)
    a = app.counters("net0")
    # the receiver has taken everything once its counter stands still
    last = -1
    deadline = time.monotonic() + 20
    while (now := port_stats(rx_pmd)[0]) != last:
        assert time.monotonic() < deadline, rx_pmd.tail()
        last = now
    received, _ = stop_forwarding(rx_pmd)
    quit_testpmd(rx_pmd)
    b = app.counters("net1")
    print(f"\ntxonly sent {sent}; net0 {a}; rxonly received {received}; net1 {b}")
    assert sent > 0 and a["rx_packets"] == sent
    assert received > 0
    assert b["tx_packets"] == received, (b, received)
    assert b["tx_packets"] + b["tx_dropped"] == a["rx_packets"]  # every frame was flooded to net1
    assert b["malformed_chains"] == 0


VIRTIO_NET_F_MRG_RXBUF, VIRTIO_F_RING_PACKED = 15, 34
TX_FIRST_BURSTS = int(os.environ.get("APPLIANCE_TX_FIRST", "4"))  # x 32 frames per port in flight


def driver_features(app: Appliance, port: str) -> int:
    return int(app.expect(rf"{port}: driver ok \(features (0x[0-9a-f]+)\)", 20).group(1), 16)


def forward_stats(pmd: Proc, ports: int) -> list[dict[str, int]]:
    """``stop``: the run's forward statistics per port (RX/TX packets, drops)."""
    pmd.send("stop")
    stats = []
    for i in range(ports):
        pmd.expect(rf"Forward statistics for port {i}", 20)
        m = pmd.expect(r"RX-packets:\s+(\d+)\s+RX-dropped:\s+(\d+)", 10)
        t = pmd.expect(r"TX-packets:\s+(\d+)\s+TX-dropped:\s+(\d+)", 10)
        stats.append({"rx": int(m.group(1)), "rx_dropped": int(m.group(2)),
                      "tx": int(t.group(1)), "tx_dropped": int(t.group(2))})
    pmd.expect(r"Done\.", 20)
    return stats


# Frames reaching port 0 (about as many again reach port 1).  The variants are kept
# small (well under a minute on a loaded 2-core machine) and reach testpmd's memory
# through its fd (it cannot be sealed: the safe default); the soak case carries 10
# million frames with net.map_unsealed_memory (mapped: ~6 min alone, ~30k frames/s
# through the switch; through the fd it would take about three times as long).
SOAK_FRAMES = 10_000_000  # the ">= 10 million packets without leaks or stalls"


@pytest.mark.parametrize(("vdev", "target", "limit"), [
    ("mrg_rxbuf=1", 300_000, 90),
    ("mrg_rxbuf=0", 100_000, 90),
    ("packed_vq=1", 100_000, 90),  # we do not offer RING_PACKED: split rings are negotiated
    # Both directions together carry >= 10M frames (~25k frames/s from Python: ~7 min).
    # Port 1 trails port 0 by up to ~0.6% (seen: 28k of 5M): aim port 0 3% past half.
    pytest.param("mrg_rxbuf=1", SOAK_FRAMES * 103 // 200, 1200, id="soak-10M"),
])
def test_io_round_trip(tmp_path: Path, procs: list[Proc], vdev: str, target: int,
                       limit: float) -> None:
    """One testpmd, two ports (net0, net1), io forwarding: frames circulate through the switch.

    ``start tx_first`` sends one burst on each port (port i: src its MAC, dst the
    other's); io forwarding sends what port 0 receives out of port 1 and back, so
    port 0's frames (02:..:00 -> 02:..:01) always enter the switch on net0 and
    leave on net1, and the reverse, until ``target`` frames have reached port 0.
    No stall: port 0's RX counter grows in every 5-second window.  No leak: each
    hop's counts agree exactly between testpmd and the appliance, nothing is
    dropped, and the appliance's anonymous RSS (its heap, not the mapped guest
    memory) does not grow with the traffic.
    """
    app, socks = start_appliance(tmp_path, 2, map_unsealed=target > SOAK_FRAMES // 2)
    procs.append(app)
    pmd = start_testpmd(tmp_path, socks, "io", "io", vdev,
                        ("--eth-peer=0,02:00:00:00:00:01", "--eth-peer=1,02:00:00:00:00:00"))
    procs.append(pmd)
    for port in ("net0", "net1"):
        f = driver_features(app, port)
        assert not f >> VIRTIO_F_RING_PACKED & 1, hex(f)  # split rings, whatever was asked
        assert (f >> VIRTIO_NET_F_MRG_RXBUF & 1) == (vdev != "mrg_rxbuf=0"), hex(f)
    injected = 32 * TX_FIRST_BURSTS  # per port (testpmd's default burst is 32)
    pmd.send(f"start tx_first {TX_FIRST_BURSTS}")
    pmd.expect(r"io packet forwarding", 10)
    pmd.expect(r"testpmd> ", 10)

    def rss() -> int:
        status = Path(f"/proc/{app.proc.pid}/status").read_text()
        m = re.search(r"RssAnon:\s+(\d+) kB", status)
        assert m, status
        return int(m.group(1))

    rss_start: int | None = None
    start = time.monotonic()
    last, last_t = 0, start
    while (received := port_stats(pmd)[0]) < target:
        now = time.monotonic()
        if received > last:
            last, last_t = received, now
        assert now - last_t < 5, f"stalled at {received} frames:\n{pmd.tail()}\n{app.tail()}"
        if rss_start is None and received >= target // 10:
            rss_start = rss()
        assert now - start < limit, f"only {received} of {target} frames in {limit} s"
    elapsed = time.monotonic() - start
    rss_end = rss()
    s0, s1 = forward_stats(pmd, 2)
    quit_testpmd(pmd)
    c = {p: app.counters(p) for p in sorted(("net0", "net1"))}  # in disconnect order
    c0, c1 = c["net0"], c["net1"]
    frames = s0["rx"] + s1["rx"]
    print(f"\n{vdev}: {frames} frames through the switch in {elapsed:.1f} s "
          f"(~{frames / elapsed:,.0f} frames/s); appliance RssAnon {rss_start} -> {rss_end} kB"
          f"\nport0 {s0}\nport1 {s1}\nnet0 {c0}\nnet1 {c1}")
    assert s0["rx"] >= target
    if target > SOAK_FRAMES // 2:  # the soak case
        assert frames >= SOAK_FRAMES, frames
    # every frame testpmd sent was received by the appliance, and delivered on the other port
    assert c0["rx_packets"] == s0["tx"] and c1["rx_packets"] == s1["tx"], (s0, s1, c0, c1)
    assert c1["tx_packets"] == c0["rx_packets"] and c0["tx_packets"] == c1["rx_packets"], (c0, c1)
    # io forwarding: each port sends its tx_first frames plus what the other received
    assert s0["tx"] == injected + s1["rx"] and s1["tx"] == injected + s0["rx"], (s0, s1)
    # so the injected frames still exist: at ``stop`` they sit in the two receive rings
    assert (c0["tx_packets"] - s0["rx"]) + (c1["tx_packets"] - s1["rx"]) == 2 * injected, (s0, s1, c0, c1)
    for st in (s0, s1):
        assert st["tx_dropped"] == 0 and st["rx_dropped"] == 0, st
    for ct in (c0, c1):
        assert ct["rx_dropped"] == ct["tx_dropped"] == ct["malformed_chains"] == 0, ct
    assert rss_start is not None and rss_end - rss_start < 8 * 1024, (rss_start, rss_end)


def net_status(tmp: Path) -> dict[str, Any]:
    """The ``net`` section of ``appliance ctl status`` (the control socket of start_appliance)."""
    from appliance.runtime.control import ControlClient

    with ControlClient(str(tmp / "run" / "control.sock")) as ctl:
        out: dict[str, Any] = ctl("status")["net"]
    return out


def wait_status(tmp: Path, port: str, until: Any, timeout: float = 20.0) -> dict[str, Any]:
    """The port's status once ``until(status)`` holds (polled on the control socket)."""
    deadline = time.monotonic() + timeout
    while True:
        st: dict[str, Any] = net_status(tmp)["ports"][port]
        if until(st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.05)  # polling interval of a bounded wait on the condition


def test_multiqueue_txonly_uses_both_queues(tmp_path: Path, procs: list[Proc]) -> None:
    """testpmd with ``queues=2`` and ``--rxq=2 --txq=2`` (one forwarding lcore, two
    streams): frames arrive on both transmit rings (virtqueues 1 and 3), and the
    per-ring counts add up to exactly testpmd's TX-packets."""
    app, (sock,) = start_appliance(tmp_path, 1, queues=2)
    procs.append(app)
    pmd = start_testpmd(tmp_path, sock, "txonly", "mq", "queues=2", ("--rxq=2", "--txq=2"))
    procs.append(pmd)
    sent = txonly_burst(app, pmd)
    st = wait_status(tmp_path, "net0", lambda s: s["rx_packets"] >= sent)
    rings = {q["index"]: q for q in st["queues"]}
    print(f"\nmultiqueue txonly: testpmd sent {sent}; appliance rx_packets {st['rx_packets']}; "
          f"per ring {[(i, q['kind'], q['packets'], q['enabled']) for i, q in sorted(rings.items())]}")
    assert sorted(rings) == [0, 1, 2, 3]
    assert all(rings[i]["enabled"] for i in (1, 3)), rings
    assert rings[1]["packets"] > 0 and rings[3]["packets"] > 0, rings  # both queues used
    assert rings[1]["packets"] + rings[3]["packets"] == st["rx_packets"] == sent, (rings, sent)
    assert rings[1]["bytes"] + rings[3]["bytes"] == st["rx_bytes"] == 64 * sent
    assert st["rx_dropped"] == 0 and st["malformed_chains"] == 0, st
    quit_testpmd(pmd)
    counters = app.counters("net0")
    assert counters["rx_packets"] == sent, (counters, sent)


def test_client_mode_reconnects_to_a_restarted_testpmd(tmp_path: Path, procs: list[Proc]) -> None:
    """``mode: client``: testpmd is the vhost-user server (``server=1``); the appliance
    connects, txonly frames are counted exactly; testpmd quits and a second one
    starts on the same path; the appliance's retry timer reconnects (its log line)
    and the second run's frames are counted exactly too."""
    app, (sock,) = start_appliance(tmp_path, 1, mode="client")
    procs.append(app)
    assert re.search(rf"net0: cannot connect to {re.escape(sock)} \(.*\); retrying every",
                     app.text), app.tail()  # logged before "appliance: ready"
    base = 0
    for run in (1, 2):
        pmd = start_testpmd(tmp_path, sock, "txonly", f"srv{run}", "server=1")
        procs.append(pmd)
        app.expect(rf"net0: connected to {re.escape(sock)}", 20)  # by the retry timer
        sent = txonly_burst(app, pmd)
        st = wait_status(tmp_path, "net0", lambda s, n=base + sent: s["rx_packets"] >= n)
        print(f"\nclient mode, run {run}: testpmd sent {sent}; appliance rx_packets "
              f"{st['rx_packets']} (before this run {base}); connections {st['connections']}")
        assert st["rx_packets"] - base == sent, (st, base, sent)
        assert st["connections"] == run and st["mode"] == "client", st
        assert st["rx_dropped"] == 0 and st["malformed_chains"] == 0, st
        quit_testpmd(pmd)
        counters = app.counters("net0")  # the disconnect: counters survive it
        assert counters["rx_packets"] == base + sent, (counters, base, sent)
        base = counters["rx_packets"]
