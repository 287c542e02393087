"""Latency under attack (prints, never asserts).

    python benchmarks/hostile.py [--quick] [--flush-size SIZE] [--seconds S]

Against one real ``appliance run`` (NVMe with two namespaces, ports ``p0`` and
``p1``, control socket: the conformance harness's ``HostileTarget``), two
well-behaved peers are timed, one request at a time, taking turns:

* **ping**: a vhost-user front-end on ``p1`` (memfd guest memory, RX ring 0
  with 256 buffers, TX ring 1) puts an ICMP echo request to the built-in
  responder (``net.responder``) on its TX ring and kicks; the figure is the time
  from the kick until the echo reply is in the RX ring's used ring (frames for
  someone else that land there meanwhile are recycled and skipped);
* **nvme read**: the only vfio-user client (``VfioUserClient`` + ``NvmeDriver``,
  shared memory, MSI-X eventfds) reads 4 KiB at a random LBA of namespace 1,
  queue depth 1, on I/O queue 1.

Each case runs for a window and prints median and p99 of both, next to the
idle figure (and the ratio to it):

* **idle**: nothing else happens;
* **(a) pipelined, unread**: another process, a front-end on ``p0``, sends
  GET_FEATURES as fast as the socket takes them and never reads a reply; when
  the appliance disconnects it (``net.max_backlog``) it connects again at once;
* **(b) flush**: ``--flush-size`` bytes (default 1G) of namespace 2's image are
  dirtied in the page cache with ``pwrite`` by this process (the appliance's fd
  shares that cache; the data path itself is not what is measured), then one
  NVMe Flush for namespace 2 is submitted on I/O queue 2 and pings (during
  one flush) or reads (during the next) are timed back to back until it has
  completed: the appliance's ``fdatasync`` writes the dirty pages back.  Dirty
  + flush repeat until the window is over, at least twice (samples only count
  while a flush is outstanding; while the loop is blocked in the flush there
  is one sample per flush, the stall);
* **(c) ring flood, unknown MAC**: another process, a front-end on ``p0``,
  keeps its 256-entry TX ring full of 60-byte frames to a unicast MAC nobody
  has.  The switch floods them to ``p1`` too, so the pinger's RX ring fills
  with them and the echo reply can find it full: such a ping is counted lost
  (no reply within 0.5 s) and kept out of the median;
* **(c') ring flood, own MAC**: the same flood addressed to the flooder's own
  source MAC, which the switch learns behind ``p0`` and drops there: the ring
  work without the frames reaching ``p1``.

The attackers run in their own processes; the machine has 2 cores shared by
the appliance, the attacker and this process (and whatever else runs), so the
figures are indicative only.  ``--quick`` (what ``scripts/test`` runs): 3 s
windows and a 256M flush, under a minute.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import select
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "conformance"), str(ROOT / "tests" / "unit")]
os.environ["PYTHONPATH"] = os.pathsep.join(  # `python -m appliance` children use this tree
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

from hostile import HostileTarget, wait_until
from test_hostile_vhost import GET_FEATURES, Frontend
from test_vhost_frontend import DriverRing, GuestMemory

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient, eventfd_count
from appliance.config import size as parse_size
from appliance.net import vhost_wire as vw
from appliance.net.responder import (
    ETH_P_IP,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IPPROTO_ICMP,
    EthHeader,
    IcmpEcho,
    Ipv4Header,
    internet_checksum,
)
from appliance.net.vhost_wire import Feature as F
from appliance.net.vhost_wire import Request as R
from appliance.runtime.control import ControlClient
from appliance.storage import spec

MIB = 1 << 20
HDR = bytes(vw.NetHdr.SIZE)
PINGER_MAC = bytes.fromhex("525400000011")
PINGER_IP = bytes([10, 0, 2, 15])
NOBODY = bytes.fromhex("02000000dead")  # unicast, locally administered, never learned
FLOODER = bytes.fromhex("525400aa0001")
RX_SIZE, RX_BUF = 256, 2048
PING_TIMEOUT = 0.5  # then the ping counts as lost
STALL_TIMEOUT = 60.0  # the same during a flush (nothing floods p1 then)
FEATURES = int(F.VERSION_1 | F.PROTOCOL_FEATURES)


# ---------------------------------------------------------------- a front-end on any port
class PortFrontend(Frontend):
    """The conformance front-end, on the port socket ``path``."""

    def __init__(self, path: str) -> None:  # no super().__init__: that one connects to p0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        self.sock.connect(path)

    def start_ring(self, ring: DriverRing) -> None:
        self.send(R.SET_VRING_NUM, vw.VringState(index=ring.index, num=ring.size).pack())
        self.send(R.SET_VRING_BASE, vw.VringState(index=ring.index, num=0).pack())
        self.send(R.SET_VRING_ADDR, ring.addr_payload())
        self.u64(R.SET_VRING_CALL, ring.index, fds=[ring.call_fd])
        self.u64(R.SET_VRING_KICK, ring.index, fds=[ring.kick_fd])
        assert self.call(R.SET_VRING_ENABLE, vw.VringState(index=ring.index, num=1).pack(),
                         need_reply=True) == 0


class Pinger:
    """ICMP echo to the responder through port ``p1``; see the module docstring."""

    def __init__(self, path: str, responder_ip: bytes, responder_mac: bytes) -> None:
        self.ip, self.mac = responder_ip, responder_mac
        self.mem = GuestMemory(4 * MIB)
        self.rx = DriverRing(self.mem, 0, size=RX_SIZE)
        self.tx = DriverRing(self.mem, 1, size=16)
        self.fe = PortFrontend(path)
        self.fe.negotiate(FEATURES)
        body = vw.MemoryHeader(nregions=1).pack() + self.mem.region().pack()
        assert self.fe.call(R.SET_MEM_TABLE, body, fds=[self.mem.fd], need_reply=True) == 0
        self.rx_bufs = [self.mem.alloc(RX_BUF) for _ in range(RX_SIZE)]
        for i, buf in enumerate(self.rx_bufs):
            self.rx.set_desc(i, buf, RX_BUF, vw.DescFlag.WRITE)
            self.rx.make_available(i)
        self.tx_buf = self.mem.alloc(RX_BUF)
        self.fe.start_ring(self.rx)
        self.fe.start_ring(self.tx)
        self.seq = 0

    def close(self) -> None:
        self.fe.close()
        self.rx.close()
        self.tx.close()
        self.mem.close()

    def request(self, seq: int) -> bytes:
        echo = IcmpEcho(type=ICMP_ECHO_REQUEST, ident=0xBE, sequence=seq)
        data = b"appliance-bench!" * 2
        echo.checksum = internet_checksum(echo.pack() + data)
        icmp = echo.pack() + data
        ip = Ipv4Header(total_length=Ipv4Header.SIZE + len(icmp), protocol=IPPROTO_ICMP,
                        src=PINGER_IP, dst=self.ip)
        ip.checksum = internet_checksum(ip.pack())
        eth = EthHeader(dst=self.mac, src=PINGER_MAC, ethertype=ETH_P_IP)
        return HDR + eth.pack() + ip.pack() + icmp

    def is_reply(self, frame: bytes, seq: int) -> bool:
        off = EthHeader.SIZE + Ipv4Header.SIZE
        if len(frame) < off + IcmpEcho.SIZE:
            return False
        eth = EthHeader.unpack(frame)
        ip = Ipv4Header.unpack(frame, EthHeader.SIZE)
        echo = IcmpEcho.unpack(frame, off)
        return (eth.dst == PINGER_MAC and eth.ethertype == ETH_P_IP and ip.protocol == IPPROTO_ICMP
                and echo.type == ICMP_ECHO_REPLY and echo.sequence == seq)

    def _recycle(self, seq: int) -> bool:
        """Give used RX buffers back (kicking); True if one held the reply to ``seq``."""
        found = False
        used = self.rx.take_used()
        for head, length in used:
            if not found and length > len(HDR) + 60:  # flooded 60-byte frames are not it
                frame = self.mem.read(self.rx_bufs[head] + len(HDR), min(length - len(HDR), 64))
                found = self.is_reply(frame, seq)
            self.rx.make_available(head)
        if used:
            os.eventfd_write(self.rx.kick_fd, 1)
        return found

    def ping(self, timeout: float = PING_TIMEOUT) -> float | None:
        """One echo round trip in seconds; None if no reply came within ``timeout``."""
        self.seq = seq = (self.seq + 1) & 0xFFFF
        self._recycle(-1)
        self.tx.take_used()
        frame = self.request(seq)
        self.mem.write(self.tx_buf, frame)
        self.tx.set_desc(0, self.tx_buf, len(frame))
        self.tx.make_available(0)
        t0 = time.perf_counter()
        os.eventfd_write(self.tx.kick_fd, 1)
        deadline = t0 + timeout
        while not self._recycle(seq):
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            if select.select([self.rx.call_fd], [], [], min(left, 0.01))[0]:
                eventfd_count(self.rx.call_fd)
        return time.perf_counter() - t0


class Reader:
    """QD1 4 KiB reads on namespace 1, I/O queue 1; namespace 2 flushed on queue 2."""

    def __init__(self, path: str) -> None:
        self.client = VfioUserClient.connect(path, timeout=30.0)
        self.driver = NvmeDriver(self.client, timeout=120.0)
        self.driver.setup(io_queues=2, depth=16)
        self.rng = random.Random(1)
        self.blocks = self.driver.ns_blocks[1] // 8
        self.flush_cid: int | None = None

    def close(self) -> None:
        self.driver.close()
        self.client.close()

    def read(self) -> float:
        lba = self.rng.randrange(self.blocks) * 8
        t0 = time.perf_counter()
        self.driver.read(1, lba, 8, qid=1)
        return time.perf_counter() - t0

    def start_flush(self) -> None:
        self.flush_cid = self.driver.submit(2, spec.Command(opcode=spec.IoOpcode.FLUSH, nsid=2))

    def flush_done(self) -> bool:
        for comp in self.driver.reap(2):
            if comp.cid == self.flush_cid:
                assert comp.status == 0, f"flush failed: status {comp.status:#x}"
                self.flush_cid = None
        return self.flush_cid is None


# ---------------------------------------------------------------- attackers (own processes)
def pipeline_attack(path: str, stop: Event, reconnects: Synchronized[int]) -> None:
    """GET_FEATURES as fast as the socket takes them, replies never read; reconnect when cut."""
    stream = memoryview(GET_FEATURES * 4096)
    while not stop.is_set():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.setblocking(False)
            off = 0
            while not stop.is_set():
                try:
                    off = (off + s.send(stream[off:])) % len(stream)
                except BlockingIOError:
                    select.select([], [s], [], 0.05)
                except OSError:  # the appliance cut us off: come back
                    with reconnects.get_lock():
                        reconnects.value += 1
                    break


def flood_attack(path: str, stop: Event, frames: Synchronized[int], dst: bytes = NOBODY) -> None:
    """Keep a 256-entry TX ring full of 60-byte frames to ``dst`` (from FLOODER)."""
    frame = HDR + dst + FLOODER + b"\x88\xb5" + bytes(46)
    mem = GuestMemory(MIB)
    tx = DriverRing(mem, 1, size=256)
    fe = PortFrontend(path)
    fe.negotiate(FEATURES)
    fe.start_tx(mem, tx)
    buf = mem.alloc(len(frame))
    mem.write(buf, frame)
    for i in range(tx.size):
        tx.set_desc(i, buf, len(frame))
        tx.make_available(i)
    os.eventfd_write(tx.kick_fd, 1)
    while not stop.is_set():
        if select.select([tx.call_fd], [], [], 0.05)[0]:
            eventfd_count(tx.call_fd)
        used = tx.take_used()
        for head, _ in used:
            tx.make_available(head)
        if used:
            os.eventfd_write(tx.kick_fd, 1)
            with frames.get_lock():
                frames.value += len(used)
    fe.close()
    tx.close()
    mem.close()


class Attacker:
    """One attack function in a child process, stopped by an event."""

    def __init__(self, fn: Callable[..., None], path: str, *extra: object) -> None:
        ctx = mp.get_context("fork")
        self.stop = ctx.Event()
        self.count = ctx.Value("q", 0)
        self.proc = ctx.Process(target=fn, args=(path, self.stop, self.count, *extra), daemon=True)

    def __enter__(self) -> Attacker:  # noqa: PYI034
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# ---------------------------------------------------------------- measuring
class Samples:
    def __init__(self) -> None:
        self.ping: list[float] = []
        self.read: list[float] = []
        self.lost = 0
        self.turn = 0

    def take(self, pinger: Pinger, reader: Reader) -> None:
        """One ping and one read, in turns first (a stall hits whichever is in flight)."""
        self.turn ^= 1
        if self.turn:
            self.read.append(reader.read())
        self.take_ping(pinger)
        if not self.turn:
            self.read.append(reader.read())

    def take_ping(self, pinger: Pinger, timeout: float = PING_TIMEOUT) -> None:
        rtt = pinger.ping(timeout)
        if rtt is None:
            self.lost += 1
        else:
            self.ping.append(rtt)


def window(pinger: Pinger, reader: Reader, seconds: float) -> Samples:
    out = Samples()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.take(pinger, reader)
    return out


def dirty(image: Path, nbytes: int, round_: int) -> None:
    """Dirty ``nbytes`` of ``image`` in the page cache (no sync)."""
    block = bytes([round_ & 0xFF]) * (4 * MIB)
    fd = os.open(image, os.O_WRONLY)
    try:
        for off in range(0, nbytes, len(block)):
            os.pwrite(fd, block[:min(len(block), nbytes - off)], off)
    finally:
        os.close(fd)


def flush_window(pinger: Pinger, reader: Reader, seconds: float, image: Path,
                 nbytes: int) -> tuple[Samples, list[float]]:
    out = Samples()
    took = []
    end = time.monotonic() + seconds
    while len(took) < 2 or time.monotonic() < end:
        dirty(image, nbytes, len(took) + 1)
        t0 = time.monotonic()
        reader.start_flush()
        while not reader.flush_done():  # pings during one flush, reads during the next
            if len(took) % 2:
                out.read.append(reader.read())
            else:
                out.take_ping(pinger, STALL_TIMEOUT)  # a stall is measured, not lost
        took.append(time.monotonic() - t0)
    return out, took


def p1_dropped(target: HostileTarget) -> int:
    """Frames for p1's front-end dropped for want of an RX buffer (its ``tx_dropped``)."""
    with ControlClient(target.control_sock, timeout=5.0) as ctl:
        return int(ctl("status")["net"]["ports"]["net1"]["tx_dropped"])


def quantiles(values: list[float]) -> tuple[float, float]:
    """(median, p99) in milliseconds."""
    if not values:
        return float("nan"), float("nan")
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p99 * 1e3


def row(case: str, s: Samples, idle: Samples | None, note: str = "") -> None:
    cells = []
    for now, base in ((s.ping, idle.ping if idle else None), (s.read, idle.read if idle else None)):
        med, p99 = quantiles(now)
        ratio = ""
        if base:
            ratio = f"x{med / quantiles(base)[0]:.1f}"
        cells.append(f"{med:8.3f} {p99:9.3f} {ratio:>7} {len(now):6d}")
    lost = f", pings lost {s.lost}/{s.lost + len(s.ping)}" if s.lost else ""
    print(f"{case:<28} {cells[0]}   {cells[1]}  {note}{lost}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s windows, 256M flush (scripts/test)")
    ap.add_argument("--flush-size", help="bytes dirtied then flushed in case (b) (default 1G)")
    ap.add_argument("--seconds", type=float, help="window per case (default 10, quick 3)")
    args = ap.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    flush_bytes = parse_size("--flush-size", args.flush_size or ("256M" if args.quick else "1G"))
    with tempfile.TemporaryDirectory(prefix="bench-hostile-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        ns2 = work / "data" / "flush.img"
        namespaces = [{"image": str(work / "data" / "disk0.img"), "size": "64M"},
                      {"image": str(ns2), "size": flush_bytes}]
        with HostileTarget(work, storage={"namespaces": namespaces}) as target:
            responder = target.proc.config.net.responder
            pinger = Pinger(target.port_sock("p1"), bytes(int(x) for x in
                            responder.ip.split("/")[0].split(".")),
                            bytes.fromhex(responder.mac.replace(":", "")))
            reader = Reader(target.nvme_sock)
            try:
                run(target, pinger, reader, seconds, ns2, flush_bytes)
            finally:
                reader.close()
                pinger.close()
            alive = target.proc.alive
        print(f"appliance alive at the end: {alive}", flush=True)
    return 0 if alive else 1


def run(target: HostileTarget, pinger: Pinger, reader: Reader, seconds: float, ns2: Path,
        flush_bytes: int) -> None:
    print(f"latency under attack: {seconds:g} s per case, flush {flush_bytes >> 20} MiB; "
          "ms (median, p99, x idle median, samples)", flush=True)
    print(f"{'case':<28} {'ping: median':>12} {'p99':>9} {'':>7} {'n':>6}   "
          f"{'nvme read: median':>17} {'p99':>4} {'':>7} {'n':>6}", flush=True)
    window(pinger, reader, 0.5)  # warm-up
    idle = window(pinger, reader, seconds)
    row("idle", idle, None)
    with Attacker(pipeline_attack, target.port_sock("p0")) as a:
        s = window(pinger, reader, seconds)
    row("(a) pipelined, unread", s, idle, f"disconnects {a.count.value}")
    s, took = flush_window(pinger, reader, seconds, ns2, flush_bytes)
    row(f"(b) flush {flush_bytes >> 20} MiB", s, idle,
        f"flushes {len(took)}, each {statistics.median(took):.2f} s")
    dropped = p1_dropped(target)
    with Attacker(flood_attack, target.port_sock("p0")) as a:
        assert wait_until(lambda: a.count.value > 0, 10), "the flood did not start"
        s = window(pinger, reader, seconds)
    row("(c) ring flood, unknown MAC", s, idle,
        f"frames {a.count.value}, p1 RX-ring drops {p1_dropped(target) - dropped}")
    with Attacker(flood_attack, target.port_sock("p0"), FLOODER) as a:
        assert wait_until(lambda: a.count.value > 0, 10), "the flood did not start"
        s = window(pinger, reader, seconds)
    row("(c') ring flood, own MAC", s, idle, f"frames {a.count.value}")


if __name__ == "__main__":
    sys.exit(main())
