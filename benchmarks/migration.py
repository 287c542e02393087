"""Migration figures (prints, never asserts).

    python benchmarks/migration.py [--quick] [--tmpfs] [--throughput-only]
                                    [--size MIB] [--repeat N]

1. MIG_DATA throughput: a namespace full of random data migrated between two
   appliance processes (no load), stream bytes / wall time, printed next to a
   raw unix-socket copy of the same size measured in the same run (the anchor:
   what Python moves through a socket on this machine) and next to a raw
   image copy (the source image read, sent through a socket, written into a
   fresh file on the same disk: the work the destination cannot skip).
2. Downtime: a 1 GiB namespace migrated while the Python NVMe driver issues
   about 1,000 write IOPS (4 KiB random writes, interleaved between
   MIG_DATA_READs, read back and verified at the end on the destination), on a
   sparse image (1 MiB of random data every 16 MiB, a mostly empty disk) and on
   an image full of random data (every byte has to travel in round 0, so the
   load dirties the most while it runs), on the standard path (the load's I/O
   shares the source's socket with the reads; on the data channel it could
   run only once per round).

3. Data channel: the same full copy (no load) on the standard MIG_DATA path
   and on the data channel (``migrate(data_channel=ChannelPlan())``: sendfile
   on the source, splice on the destination), next to three anchors, with the
   images on disk and on tmpfs (/dev/shm), all in the same run: the raw
   socket copy, the raw image copy, and a kernel-only copy (the channel's
   own syscalls, sendfile into a socket and splice into a fresh file, without
   protocol or checksum: what any path that writes a fresh staging image can
   reach here).

``--tmpfs`` runs the throughput case twice, images on the disk and on
tmpfs (/dev/shm, removed afterwards), and prints both rows side by side
with their anchors, so the disk's share of the time is visible.
``--throughput-only`` skips the downtime cases; ``--repeat N`` runs the
throughput cases and anchors N times and prints the best of each (the
machine is shared: single runs vary by 2x and more).  With
``APPLIANCE_PROFILE_DIR=DIR`` in the environment the three processes of the
throughput case write cProfile files there (both appliances, through
:func:`appliance.testing.process.profile_args`, and the client, this
process: ``client-<medium>.prof``).

The machine is shared and small: the figures are indicative only.
``--quick`` (what scripts/test runs) uses a 64 MiB namespace for throughput
and at most 2 pre-copy rounds; the downtime cases stay at 1 GiB (the issue's
figure: the sparse one moves 64 MiB of data, the full one 1 GiB).
The raw socket anchor is the best of three runs.
"""

from __future__ import annotations

import argparse
import cProfile
import fcntl
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.client import migrate as orch
from appliance.client.datachannel import ChannelPlan
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.runtime.allocator import keep_large_buffers
from appliance.runtime.migration_channel import F_SETPIPE_SZ
from appliance.storage.fileops import start_writeback
from appliance.testing.process import PROFILE_ENV, ApplianceProcess
from appliance.testing.workload import (
    VerifiedWriter,
    file_hash,
    move_driver,
    pair_configs,
    prepare_destination,
)

MiB = 1 << 20
BURST = 64  # writes at most between two MIG_DATA_READs


def raw_socket_copy(nbytes: int, chunk: int = MiB) -> float:
    """Bytes/s through a unix stream socketpair, one sender thread (the anchor)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    block = os.urandom(chunk)

    def send() -> None:
        left = nbytes
        while left > 0:
            a.sendall(block[:min(chunk, left)])
            left -= chunk
        a.close()

    t = threading.Thread(target=send)
    start = time.perf_counter()
    t.start()
    got = 0
    buf = bytearray(chunk)
    while got < nbytes:
        n = b.recv_into(buf)
        if not n:
            break
        got += n
    t.join()
    b.close()
    return got / (time.perf_counter() - start)


def timed_file_copy(src: Path, dst: Path, send: Callable[[socket.socket, int, int], None],
                    receive: Callable[[socket.socket, int, int], int]) -> float:
    """Bytes/s of ``src`` through a unix socketpair into ``dst``, a fresh sparse
    file of the same size, synced at the end: ``send(sock, src_fd, size)`` runs
    in a thread (the socket is closed after it), ``receive(sock, dst_fd, size)``
    here and returns the bytes it wrote."""
    size = src.stat().st_size
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def sender() -> None:
        with src.open("rb", buffering=0) as f:
            send(a, f.fileno(), size)
        a.close()

    t = threading.Thread(target=sender)
    start = time.perf_counter()
    t.start()
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        got = receive(b, fd, size)
        os.fdatasync(fd)
        rate = got / (time.perf_counter() - start)
    finally:
        os.close(fd)
        t.join()
        b.close()
        dst.unlink()
    return rate


def raw_image_copy(src: Path, dst: Path, chunk: int = MiB) -> float:
    """Bytes/s of the same data path without the protocol (the second anchor):
    ``src`` read in chunks, through a unix socketpair (a sender thread), written
    into ``dst``, a fresh sparse file on the same disk, its writeback started
    every 16 MiB and synced at the end, as the destination's staging image is."""
    def send(sock: socket.socket, fd: int, size: int) -> None:
        while block := os.read(fd, chunk):
            sock.sendall(block)

    def receive(sock: socket.socket, fd: int, size: int) -> int:
        buf = bytearray(chunk)
        view = memoryview(buf)
        got = unsynced = 0
        while got < size and (n := sock.recv_into(buf)):
            os.pwrite(fd, view[:n], got)
            got += n
            unsynced += n
            if unsynced >= 16 * MiB:
                start_writeback(fd)
                unsynced = 0
        return got

    return timed_file_copy(src, dst, send, receive)


def kernel_copy(src: Path, dst: Path, chunk: int = MiB) -> float:
    """Bytes/s of the data channel's own syscalls and nothing else (the third
    anchor: the most any path that writes a fresh staging image can do here):
    ``sendfile`` from ``src`` into a unix socketpair (a sender thread),
    ``splice`` through a pipe into ``dst``, a fresh sparse file on the same
    medium, synced at the end; no protocol, no checksum."""
    def send(sock: socket.socket, fd: int, size: int) -> None:
        off = 0
        # (0 bytes sent: the file ended early; the receiver sees the short copy)
        while off < size and (sent := os.sendfile(sock.fileno(), fd, off,
                                                   min(chunk, size - off))):
            off += sent

    def receive(sock: socket.socket, fd: int, size: int) -> int:
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, chunk)
            got = 0
            while got < size and (n := os.splice(sock.fileno(), w, min(chunk, size - got))):
                while n:
                    k = os.splice(r, fd, n, offset_dst=got)
                    got += k
                    n -= k
            return got
        finally:
            os.close(r)
            os.close(w)

    return timed_file_copy(src, dst, send, receive)


def random_image(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))


def start_pair(tmp: Path, size: int, fill: bool) -> tuple[ApplianceProcess, ApplianceProcess]:
    """A source (random image: full with ``fill``, else sparse) and a destination."""
    src_cfg, dst_cfg = pair_configs(tmp, size)
    src_img = tmp / "src" / "data" / "disk0.img"
    if fill:
        random_image(src_img, size)
    else:
        src_img.parent.mkdir(parents=True, exist_ok=True)
        with src_img.open("wb") as f:  # sparse, with random data every 16 MiB
            f.truncate(size)
            for off in range(0, size, 16 * MiB):
                f.seek(off)
                f.write(os.urandom(MiB))
    return (ApplianceProcess(src_cfg, tmp / "src" / "proc").start(),
            ApplianceProcess(dst_cfg, tmp / "dst" / "proc").start())


def sock(p: ApplianceProcess) -> str:
    return p.config.storage.socket


def image(p: ApplianceProcess) -> str:
    return p.config.storage.namespaces[0].image


@dataclass
class Throughput:
    """One throughput run: where the images were and what it measured."""

    medium: str
    seconds: float
    stream: int  # bytes of the migration stream
    downtime: float
    same: bool  # images equal after it
    image_copy: float  # bytes/s of the raw image copy on the same medium

    @property
    def rate(self) -> float:
        return self.stream / self.seconds


def bench_throughput(tmp: Path, size: int, medium: str) -> Throughput:
    src_p, dst_p = start_pair(tmp, size, fill=True)
    profile = os.environ.get(PROFILE_ENV)
    try:
        with VfioUserClient.connect(sock(src_p)) as src, VfioUserClient.connect(sock(dst_p)) as dst:
            prof = cProfile.Profile() if profile else None
            if prof is not None:
                prof.enable()
            s = orch.migrate(src, dst, converge_bytes=size, max_rounds=0)
            if prof is not None:
                prof.disable()
                prof.dump_stats(str(Path(profile) / f"client-{medium}.prof"))
        same = file_hash(image(src_p)) == file_hash(image(dst_p))
        copy = raw_image_copy(Path(image(src_p)), Path(image(dst_p)).with_name("raw-copy.img"))
    finally:
        src_p.stop()
        dst_p.stop()
    return Throughput(medium, s.seconds, s.bytes, s.downtime, same, copy)


def print_throughput(size: int, anchor: float, runs: list[Throughput]) -> None:
    print(f"MIG_DATA throughput, {size // MiB} MiB random namespace, no load:")
    print(f"  raw unix socket    {size / MiB:8.1f} MiB             = {anchor / MiB:7.1f} MiB/s"
          f"  (anchor, same run)")
    for r in runs:
        print(f"  [{r.medium:5}] stream   {r.stream / MiB:8.1f} MiB in {r.seconds:6.2f} s = "
              f"{r.rate / MiB:7.1f} MiB/s  (images equal: {r.same}; "
              f"downtime {r.downtime * 1000:.0f} ms)")
        print(f"  [{r.medium:5}] raw image copy                = {r.image_copy / MiB:7.1f} MiB/s"
              f"  (image -> socket -> fresh file, same medium, same run)")
        print(f"  [{r.medium:5}] ratio    {r.rate / anchor:6.3f}x the raw socket copy, "
              f"{r.rate / r.image_copy:6.3f}x the raw image copy")


def bench_channel(bases: list[tuple[str, Path]], size: int, anchor: float) -> None:
    """Standard path and data channel, one full copy each, per place the images are on."""
    print(f"Data channel vs MIG_DATA, {size // MiB} MiB random namespace, no load "
          f"(raw unix socket anchor {anchor / MiB:.0f} MiB/s, same run):")
    for label, base in bases:
        rates = {}
        for name, plan in (("MIG_DATA stream", None), ("data channel", ChannelPlan())):
            tmp = Path(tempfile.mkdtemp(prefix="mig-chan-", dir=base))
            try:
                src_p, dst_p = start_pair(tmp, size, fill=True)
                try:
                    with VfioUserClient.connect(sock(src_p)) as src, \
                            VfioUserClient.connect(sock(dst_p)) as dst:
                        s = orch.migrate(src, dst, converge_bytes=size, max_rounds=0,
                                         data_channel=plan)
                    same = file_hash(image(src_p)) == file_hash(image(dst_p))
                    if name == "data channel":
                        disk = raw_image_copy(Path(image(src_p)),
                                              Path(image(dst_p)).with_name("raw-copy.img"))
                        bound = kernel_copy(Path(image(src_p)),
                                            Path(image(dst_p)).with_name("kernel-copy.img"))
                finally:
                    src_p.stop()
                    dst_p.stop()
            finally:
                shutil.rmtree(tmp)
            moved = s.bytes + s.channel_bytes
            rates[name] = moved / s.seconds
            print(f"  {label:<6} {name:<16} {moved / MiB:8.1f} MiB in {s.seconds:6.2f} s = "
                  f"{rates[name] / MiB:7.1f} MiB/s  ({rates[name] / anchor:.2f}x raw socket; "
                  f"images equal: {same}; {s.data_channel or 'standard path'})")
        print(f"  {label:<6} raw image copy   {size / MiB:8.1f} MiB             = "
              f"{disk / MiB:7.1f} MiB/s  ({disk / anchor:.2f}x raw socket; data channel "
              f"{rates['data channel'] / disk:.2f}x of it)")
        print(f"  {label:<6} kernel-only copy {size / MiB:8.1f} MiB             = "
              f"{bound / MiB:7.1f} MiB/s  ({bound / anchor:.2f}x raw socket: sendfile -> "
              f"socket -> splice into a fresh file, no protocol, no checksum; data channel "
              f"{rates['data channel'] / bound:.2f}x of it)")


def bench_downtime(tmp: Path, size: int, iops: int, max_rounds: int, fill: bool,
                   anchor: float) -> None:
    src_p, dst_p = start_pair(tmp, size, fill=fill)
    try:
        src = VfioUserClient.connect(sock(src_p))
        driver = NvmeDriver(src, mem_size=16 * MiB)
        driver.setup(io_queues=1, depth=32)
        writer = VerifiedWriter(driver, blocks=8, seed=3)  # 4 KiB writes
        dst = VfioUserClient.connect(sock(dst_p))
        prepare_destination(driver, dst)
        started = time.perf_counter()
        writes = [0]
        slots = [0]  # writes the pacing allowed (issued or skipped)

        def load() -> None:
            # Paced at `iops`, never catching up more than a burst: a load that
            # cannot keep up is skipped, not queued, so it cannot starve the copy.
            due = int((time.perf_counter() - started) * iops) - slots[0]
            slots[0] += max(0, due)
            for _ in range(min(max(0, due), BURST)):
                lba = writer.rng.randrange(writer.slots) * writer.blocks
                data = writer.rng.randbytes(writer.blocks * writer.block_size)
                driver.write(writer.nsid, lba, data)
                writer.written[lba] = data
                writes[0] += 1

        s = orch.migrate(src, dst, converge_bytes=MiB, max_rounds=max_rounds, between_reads=load)
        elapsed = time.perf_counter() - started
        same = file_hash(image(src_p)) == file_hash(image(dst_p))
        move_driver(driver, dst)
        # Read back a sample of the slots written (all of them would take as long
        # as the load itself): the newest and a random choice of the others.
        slots = list(writer.written)
        sample = slots[-500:] + writer.rng.sample(slots, min(500, len(slots)))
        writer.written = {lba: writer.written[lba] for lba in sample}
        checked = writer.verify_all()
        driver.close()
        src.close()
        dst.close()
    finally:
        src_p.stop()
        dst_p.stop()
    kind = "full of random data" if fill else "sparse, 1 MiB of data every 16 MiB"
    print(f"Downtime, {size // MiB} MiB namespace ({kind}), target {iops} random 4 KiB write "
          f"IOPS (interleaved), at most {max_rounds} pre-copy rounds, converge at 1 MiB:")
    print(f"  achieved load      {writes[0] / s.seconds:7.0f} IOPS over {s.seconds:.2f} s "
          f"({writes[0]} writes)")
    print(f"  pre-copy           {s.rounds} rounds, {s.precopy_bytes / MiB:.1f} MiB; "
          f"{s.pending_at_stop / 1024:.0f} KiB dirty at stop")
    print(f"  downtime           {s.downtime * 1000:7.1f} ms   (total {s.bytes / MiB:.1f} MiB, "
          f"{elapsed:.2f} s; stream {s.bytes / MiB / s.seconds:.1f} MiB/s, raw socket anchor "
          f"{anchor / MiB:.0f} MiB/s)")
    print(f"  after switchover   images equal: {same}; {checked} written slots (a sample) "
          f"verified on the destination")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (what scripts/test runs)")
    ap.add_argument("--iops", type=int, default=1000, help="write load during pre-copy")
    ap.add_argument("--max-rounds", type=int, help="pre-copy rounds at most (2 quick, 8)")
    ap.add_argument("--channel-only", action="store_true",
                    help="only the data channel comparison (section 3)")
    ap.add_argument("--tmpfs", action="store_true",
                    help="throughput on the disk and on tmpfs (/dev/shm), side by side")
    ap.add_argument("--throughput-only", action="store_true", help="skip the downtime cases")
    ap.add_argument("--size", type=int, help="throughput namespace, MiB (64 quick, 1024)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="throughput runs per medium (and anchors): the best of each is printed")
    args = ap.parse_args()
    keep_large_buffers()  # this process is the migration client: as `appliance migrate`
    tput = args.size * MiB if args.size else 64 * MiB if args.quick else 1024 * MiB
    flags = "".join(f" --{name}" for name in ("quick", "tmpfs", "throughput-only")
                    if getattr(args, name.replace("-", "_")))
    flags += f" --size {args.size}" if args.size else ""
    flags += f" --repeat {args.repeat}" if args.repeat > 1 else ""
    print(f"benchmarks/migration.py{flags} (2-core shared machine: indicative only)")
    with tempfile.TemporaryDirectory(prefix="mig-bench-") as tmp:
        # (best of three: one run of the anchor on a busy machine can be 5x low)
        anchor = max(raw_socket_copy(tput) for _ in range(3))
        bench_channel([("disk", Path(tmp)), ("tmpfs", Path("/dev/shm"))], tput, anchor)
        if args.channel_only:
            return 0
        best: dict[str, Throughput] = {}
        for i in range(max(1, args.repeat)):
            if i:
                anchor = max(anchor, raw_socket_copy(tput))
            # (the directory names tell the processes' profiles apart)
            runs = [bench_throughput(Path(tmp) / "tput-disk", tput, "disk")]
            shutil.rmtree(Path(tmp) / "tput-disk")
            if args.tmpfs:
                with tempfile.TemporaryDirectory(prefix="mig-bench-", dir="/dev/shm") as shm:
                    runs.append(bench_throughput(Path(shm) / "tput-tmpfs", tput, "tmpfs"))
            for run in runs:
                old = best.get(run.medium)
                best[run.medium] = run if old is None else Throughput(
                    run.medium, min(old.seconds, run.seconds), run.stream,
                    min(old.downtime, run.downtime), old.same and run.same,
                    max(old.image_copy, run.image_copy))
        print_throughput(tput, anchor, list(best.values()))
        if args.throughput_only:
            return 0
        rounds = args.max_rounds if args.max_rounds is not None else 2 if args.quick else 8
        for fill in (False, True):
            where = Path(tmp) / f"down-{int(fill)}"
            bench_downtime(where, 1024 * MiB, iops=args.iops, max_rounds=rounds, fill=fill,
                           anchor=anchor)
            shutil.rmtree(where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
