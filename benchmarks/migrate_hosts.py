"""Migration across simulated hosts (prints, never asserts; needs root).

    python benchmarks/migrate_hosts.py [--size MIB]

Hosts a, b, c are network namespaces made here (appliance.testing.hosts), an sshd
runs on b.  Printed, from the same run:

1. raw ssh throughput: a Unix socket on b streams ``--size`` MiB to a reader on a
   through ssh's forward (the same ``ssh -L`` the migration uses), the anchor;
2. a full-copy migration of a namespace of that size full of random data from
   a to b over ssh: stream bytes / wall time, and its downtime;
3. shared storage: both appliances on one qemu-storage-daemon export on host c
   (``nbd://10.88.0.3:10809/disk``), migrated a -> b over ssh: stream bytes and
   downtime.

The machine is shared and small: the figures are indicative only.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.client import migrate as orch
from appliance.client.datachannel import ChannelPlan
from appliance.client.ssh import SshForward, parse_target
from appliance.client.vfio_user import VfioUserClient
from appliance.testing.hosts import Hosts, Sshd
from appliance.testing.nbd import NbdServer
from appliance.testing.process import ApplianceProcess, make_config

MiB = 1 << 20


def forward(h: Hosts, sshd: Sshd, path: str) -> SshForward:
    target = parse_target(f"ssh://root@{h.address('b')}{path}")
    assert target is not None
    return SshForward(target, sshd.ssh_options(), ssh=(*h.wrapper("a"), "ssh"))


def raw_ssh(h: Hosts, sshd: Sshd, tmp: Path, size: int) -> float:
    """MiB/s of a Unix-socket stream from b to a through ssh's forward."""
    path = str(tmp / "raw.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    chunk = os.urandom(MiB)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(size // MiB):
                conn.sendall(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with forward(h, sshd, path) as fwd:
        s = socket.socket(socket.AF_UNIX)
        s.connect(fwd.local)
        got, buf, t0 = 0, bytearray(MiB), time.perf_counter()
        while got < size:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
        seconds = time.perf_counter() - t0
        s.close()
    thread.join()
    listener.close()
    return got / MiB / seconds


def appliance(h: Hosts, host: str, tmp: Path, image: str, **ns: object) -> ApplianceProcess:
    cfg = make_config(tmp / host, storage={"namespaces": [{"image": image, **ns}]})
    return ApplianceProcess(cfg, tmp / host / "proc", wrapper=h.wrapper(host)).start()


def migrate_over_ssh(h: Hosts, sshd: Sshd, src_p: ApplianceProcess, dst_p: ApplianceProcess,
                     shared: bool, channel: bool = False) -> orch.Summary:
    with forward(h, sshd, dst_p.config.storage.socket) as fwd:
        src = VfioUserClient.connect(src_p.config.storage.socket, timeout=120)
        dst = VfioUserClient.connect(fwd.local, timeout=120)
        try:
            plan = ChannelPlan(forward=fwd.forward) if channel else None
            return orch.migrate(src, dst, shared_storage=shared, data_channel=plan)
        finally:
            src.close()
            dst.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="MiB (default 256)")
    args = ap.parse_args()
    size = args.size * MiB
    with tempfile.TemporaryDirectory(prefix="mig-hosts-") as d, Hosts() as h:
        tmp = Path(d)
        sshd = Sshd(h, "b", tmp / "ssh")
        sshd.start()
        try:
            raw = raw_ssh(h, sshd, tmp, size)
            print(f"raw ssh forward a<-b: {raw:.1f} MiB/s ({args.size} MiB)")
            for host in ("a", "b"):
                img = tmp / host / "data" / "disk0.img"
                img.parent.mkdir(parents=True)
                with img.open("wb") as f:
                    for _ in range(size // MiB):
                        f.write(os.urandom(MiB))
            for channel in (False, True):
                src_p = appliance(h, "a", tmp, str(tmp / "a" / "data" / "disk0.img"),
                                  size=f"{args.size}M")
                dst_p = appliance(h, "b", tmp, str(tmp / "b" / "data" / "disk0.img"),
                                  size=f"{args.size}M")
                try:
                    s = migrate_over_ssh(h, sshd, src_p, dst_p, shared=False, channel=channel)
                finally:
                    src_p.stop()
                    dst_p.stop()
                moved = s.bytes + s.channel_bytes
                rate = moved / MiB / s.seconds
                how = "forwarded data channel" if s.data_channel else "MIG_DATA"
                print(f"full copy a->b over ssh ({how}): {moved / MiB:.1f} MiB in "
                      f"{s.seconds:.2f} s = {rate:.1f} MiB/s ({rate / raw:.2f}x raw ssh), "
                      f"downtime {s.downtime * 1000:.1f} ms")
            export = tmp / "export.img"
            with export.open("wb") as f:
                f.truncate(size)
            with NbdServer("qemu-storage-daemon", export, tmp / "nbd.sock", netns=h.ns("c"),
                           tcp=(h.address("c"), 10809)) as server:
                src_p = appliance(h, "a", tmp / "shared", server.uri)
                dst_p = appliance(h, "b", tmp / "shared", server.uri)
                try:
                    s = migrate_over_ssh(h, sshd, src_p, dst_p, shared=True)
                finally:
                    src_p.stop()
                    dst_p.stop()
            print(f"shared storage (NBD on host c) a->b over ssh: {s.bytes} bytes, "
                  f"{s.seconds * 1000:.1f} ms, downtime {s.downtime * 1000:.1f} ms")
        finally:
            sshd.stop()


if __name__ == "__main__":
    main()
