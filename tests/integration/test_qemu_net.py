"""Acceptance: Linux guests (virtio-net-pci over vhost-user) on the appliance's network.

Front-ends: QEMU 11.1 (the sid chroot of the harness) and, for the ping test,
bookworm's QEMU 7.2 (``/usr/bin/qemu-system-x86_64``, apt ``qemu-system-x86``).
Guest memory is a shared memfd (the harness's default).

The guest's busybox has no UDP client (its ``nc`` lacks ``-u``), so the UDP echo
test builds one: :data:`UDPECHO_C`, a freestanding program (raw syscalls, no
libc, ~1.5 KiB) compiled with the host's gcc and typed into the guest over the
console as gzip+base64.  It sends stdin in fixed-size datagrams to the
responder's ``udp_echo_port``, one at a time, and writes each echo to stdout;
the test compares md5sums of what went out and what came back.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from guests import Guest, GuestFactory

from appliance.testing.qemu import qemu_args

pytestmark = pytest.mark.integration

HOST_QEMU = "/usr/bin/qemu-system-x86_64"  # bookworm's QEMU 7.2
RESPONDER = "10.0.2.2"
VIRTIO_NET_F_MTU, VIRTIO_NET_F_MRG_RXBUF = 3, 15

UDPECHO_C = r"""
/* udpecho IP PORT SIZE: stdin in SIZE-byte datagrams to IP:PORT, one at a time;
   each echo to stdout.  Exit 2 when an echo does not come back within 2 s. */
typedef unsigned long u64;
static long sys(long n, long a, long b, long c, long d, long e, long f) {
    long r;
    register long r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8),
                     "r"(r9) : "rcx", "r11", "memory");
    return r;
}
static unsigned num(const char *s) {
    unsigned v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (unsigned)(*s++ - '0');
    return v;
}
static void out(const char *s) { volatile long n = 0; while (s[n]) n++; sys(1, 2, (long)s, n, 0, 0, 0); }
static void outn(u64 v) {
    char b[24]; int i = 23; b[i] = 0;
    do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    out(b + i);
}
static char buf[65536], echo[65536];
static long full(int fd, char *p, long n) {
    long k = 0;
    while (k < n) { long r = sys(0, fd, (long)p + k, n - k, 0, 0, 0); if (r <= 0) break; k += r; }
    return k;
}
static int body(int argc, char **argv) {
    if (argc != 4) { out("usage: udpecho IP PORT SIZE\n"); return 64; }
    unsigned ip = 0; const char *s = argv[1];
    for (int i = 0; i < 4; i++) { ip |= num(s) << (8 * i); while (*s && *s != '.') s++; if (*s) s++; }
    unsigned port = num(argv[2]), size = num(argv[3]);
    if (size == 0 || size > sizeof buf) return 64;
    struct { unsigned short fam, port; unsigned addr; char z[8]; } sa =
        {2, (unsigned short)((port >> 8) | (port << 8)), ip, {0}};
    int fd = (int)sys(41, 2, 2, 0, 0, 0, 0);                /* socket(AF_INET, SOCK_DGRAM) */
    struct { long sec, usec; } tv = {2, 0};
    sys(54, fd, 1, 20, (long)&tv, sizeof tv, 0);           /* SO_RCVTIMEO */
    if (fd < 0 || sys(42, fd, (long)&sa, sizeof sa, 0, 0, 0) < 0) { out("udpecho: connect failed\n"); return 1; }
    u64 dgrams = 0, bytes = 0;
    for (;;) {
        long n = full(0, buf, size);
        if (n <= 0) break;
        if (sys(1, fd, (long)buf, n, 0, 0, 0) != n) { out("udpecho: send failed\n"); return 1; }
        long r = sys(0, fd, (long)echo, sizeof echo, 0, 0, 0);
        if (r != n) { out("udpecho: no echo for datagram "); outn(dgrams); out("\n"); return 2; }
        if (sys(1, 1, (long)echo, r, 0, 0, 0) != r) return 1;
        dgrams++; bytes += (u64)r;
    }
    out("udpecho: "); outn(dgrams); out(" datagrams, "); outn(bytes); out(" bytes echoed\n");
    return 0;
}
__attribute__((used)) void cstart(long *sp) { sys(60, body((int)sp[0], (char **)(sp + 1)), 0, 0, 0, 0, 0); }
__asm__(".globl _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call cstart\n");
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("APPLIANCE_REQUIRE_INTEGRATION") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def udpecho_b64(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The guest's UDP echo client, gzip + base64 (one console line)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        _unavailable("gcc is not installed (it builds the guest's UDP echo client)")
    d = tmp_path_factory.mktemp("udpecho")
    (d / "udpecho.c").write_text(UDPECHO_C)
    subprocess.run([str(gcc), "-Os", "-static", "-nostdlib", "-fno-builtin", "-fno-stack-protector",
                    "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none,-n,--no-warn-rwx-segments",
                    "-s", "-o", str(d / "udpecho"), str(d / "udpecho.c")], check=True)
    return base64.b64encode(gzip.compress((d / "udpecho").read_bytes(), 9)).decode()


def net_args(appliance: Any) -> list[str]:
    args = qemu_args(appliance.config, net=True)
    i = args.index("-chardev")  # the harness brings its own memory/NUMA options
    return args[i:]


def boot_with_net(guest_factory: GuestFactory, appliance: Any, ip: str = "10.0.2.15/24",
                  qemu: str | None = None) -> Guest:
    args = net_args(appliance)
    if qemu == HOST_QEMU:
        # QEMU 7.2 under TCG (no irqfd) segfaults starting vhost-user net with MSI-X
        # (virtio_set_status -> vhost_net_start -> msix_set_vector_notifiers); QEMU
        # 11.1 does not.  Without MSI-X vectors the device uses INTx and works.
        args[-1] += ",vectors=0"
    g = guest_factory(args=args, append="qe.shell", qemu=qemu)
    out, rc = g.run(f"ip link set eth0 up && ip addr add {ip} dev eth0 && echo configured", timeout=120)
    assert rc == 0 and out.endswith("configured"), out
    return g


def guest_features(g: Guest) -> str:
    """The virtio-net device's negotiated feature bits ('0'/'1' per bit, bit 0 first)."""
    out, rc = g.run("cat /sys/class/net/eth0/device/features")
    assert rc == 0, out
    bits = out.strip().splitlines()[-1]
    assert re.fullmatch(r"[01]+", bits), out
    return bits


def ping(g: Guest, dst: str, count: int) -> None:
    out, rc = g.run(f"ping -c {count} -i 0.02 -W 2 {dst}", timeout=120)
    assert rc == 0, out
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    assert m and m.group(1) == m.group(2) == str(count), out


def shutdown(g: Guest) -> None:
    g.send("exit\n")
    g.wait_for(r"GUEST-POWEROFF", timeout=60)


def port_counters(appliance: Any, port: str) -> dict[str, Any]:
    """The port's counters from the line it logs when its front-end disconnects."""
    rx = re.compile(rf"{port}: front-end disconnected \([^\n]*\); counters (\{{[^\n]*\}})")
    deadline = time.monotonic() + 20
    while not (m := rx.search(appliance.log_path.read_text(errors="replace"))):
        assert time.monotonic() < deadline, f"no counters for {port}: {appliance.log_text()}"
        time.sleep(0.1)  # polling the log file for a condition, bounded by the deadline
    return dict(json.loads(m.group(1)))


@pytest.mark.parametrize("frontend", ["qemu-11.1", "qemu-7.2"])
def test_guest_pings_the_responder(guest_factory: GuestFactory, appliance_factory: Any, tmp_path: Any,
                                   frontend: str) -> None:
    qemu = None
    if frontend == "qemu-7.2":
        if not os.access(HOST_QEMU, os.X_OK):
            _unavailable(f"{HOST_QEMU} is missing (apt-get install qemu-system-x86)")
        qemu = HOST_QEMU
    pcap = tmp_path / "net0.pcap"
    appliance = appliance_factory(net={"ports": [{"socket": str(tmp_path / "n0.sock"), "mac": "52:54:00:12:34:56",
                                                  "pcap": str(pcap)}]})
    g = boot_with_net(guest_factory, appliance, qemu=qemu)
    if qemu is not None:
        out, _ = g.run("cat /proc/version")
        assert "Linux" in out
    ping(g, RESPONDER, 100)
    shutdown(g)
    assert appliance.alive
    appliance.stop()  # flushes and closes the capture
    # The capture opens in tcpdump with the expected packets.
    dump = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True, check=True)
    assert len(re.findall(r"10\.0\.2\.15 > 10\.0\.2\.2: ICMP echo request", dump.stdout)) == 100
    assert len(re.findall(r"10\.0\.2\.2 > 10\.0\.2\.15: ICMP echo reply", dump.stdout)) == 100
    assert re.search(r"ARP, Reply 10\.0\.2\.2 is-at 52:54:00:00:02:02", dump.stdout), dump.stdout[:2000]


@pytest.mark.parametrize("mtu", [1500, 9000])
def test_udp_echo_16mib(guest_factory: GuestFactory, appliance_factory: Any, tmp_path: Path,
                        udpecho_b64: str, mtu: int) -> None:
    """16 MiB through the responder's UDP echo, in MTU-sized datagrams, verified by md5."""
    appliance = appliance_factory(net={"ports": [{"socket": str(tmp_path / "n0.sock"),
                                                  "mac": "52:54:00:12:34:56", "mtu": mtu}]})
    port = appliance.config.net.responder.udp_echo_port
    g = boot_with_net(guest_factory, appliance)
    features = guest_features(g)
    assert features[VIRTIO_NET_F_MRG_RXBUF] == "1", features
    if mtu != 1500:
        assert features[VIRTIO_NET_F_MTU] == "1", features  # QEMU's host_mtu from net.ports[].mtu
        out, rc = g.run(f"ip link set eth0 mtu {mtu} && cat /sys/class/net/eth0/mtu")
        assert rc == 0 and out.strip().endswith(str(mtu)), out
    out, rc = g.run(f"echo {udpecho_b64} | base64 -d | gunzip > /udpecho && chmod +x /udpecho && echo ok")
    assert rc == 0 and out.endswith("ok"), out
    payload = mtu - 28  # IPv4 + UDP headers: one unfragmented datagram per frame
    out, rc = g.run("dd if=/dev/urandom of=/tmp/in bs=1M count=16 2>/dev/null && "
                    f"/udpecho {RESPONDER} {port} {payload} < /tmp/in > /tmp/out && "
                    "md5sum /tmp/in /tmp/out", timeout=180)
    assert rc == 0, out
    sums = re.findall(r"^([0-9a-f]{32})\s+/tmp/(in|out)$", out, re.MULTILINE)
    assert len(sums) == 2 and sums[0][0] == sums[1][0], out
    n = -(-16 * 2**20 // payload)
    assert f"udpecho: {n} datagrams, {16 * 2**20} bytes echoed" in out, out
    shutdown(g)
    c = port_counters(appliance, "net0")
    assert c["rx_packets"] >= n and c["tx_packets"] >= n, c
    assert c["rx_dropped"] == 0 and c["tx_dropped"] == 0 and c["malformed_chains"] == 0, c


def test_two_guests_ping_each_other(guest_factory: GuestFactory, appliance_factory: Any,
                                    tmp_path: Path) -> None:
    appliance = appliance_factory(net={"ports": [
        {"socket": str(tmp_path / "n0.sock"), "mac": "52:54:00:12:34:56"},
        {"socket": str(tmp_path / "n1.sock"), "mac": "52:54:00:12:34:57"}]})
    args = net_args(appliance)
    # one port per guest: split the chardev/netdev/device triples
    per_port = [args[i:i + 6] for i in range(0, len(args), 6)]
    assert len(per_port) == 2
    guests = []
    for i, (a, ip) in enumerate(zip(per_port, ("10.0.2.15/24", "10.0.2.16/24"), strict=True)):
        g = guest_factory(args=a, append="qe.shell", name=f"guest{i}")
        guests.append((g, ip))
    for g, ip in guests:
        out, rc = g.run(f"ip link set eth0 up && ip addr add {ip} dev eth0 && echo configured", timeout=120)
        assert rc == 0 and out.endswith("configured"), out
    a, b = guests[0][0], guests[1][0]
    ping(a, "10.0.2.16", 20)
    ping(b, "10.0.2.15", 20)
    out, rc = a.run("ip neigh show 10.0.2.16")
    assert "52:54:00:12:34:57" in out, out
    for g, _ in guests:
        shutdown(g)
    c0, c1 = port_counters(appliance, "net0"), port_counters(appliance, "net1")
    assert c0["rx_packets"] >= 40 and c1["rx_packets"] >= 40, (c0, c1)
    assert c0["malformed_chains"] == c1["malformed_chains"] == 0


def test_live_migration_keeps_pinging(guest_factory: GuestFactory, appliance_factory: Any,
                                      tmp_path: Path) -> None:
    """A guest on a port migrates (QEMU 11.1 -> QEMU 11.1 with ``-incoming``) between two
    appliances; a ping to the responder runs across the switch-over.

    QEMU refuses to migrate a vhost-user device without VHOST_F_LOG_ALL; with it,
    the source port logs its writes in QEMU's shared bitmap (SET_LOG_BASE), and
    after the switch QEMU asks the destination port to announce the guest's MAC
    (SEND_RARP).
    """
    def port(name: str) -> dict[str, Any]:
        return {"ports": [{"socket": str(tmp_path / f"{name}.sock"), "mac": "52:54:00:12:34:56"}]}

    src_app = appliance_factory("src", net=port("src"))
    dst_app = appliance_factory("dst", net=port("dst"))
    src = boot_with_net(guest_factory, src_app)
    ping(src, RESPONDER, 5)
    out, rc = src.run(f"(ping -i 0.05 -W 2 {RESPONDER} > /tmp/ping.log 2>&1 &) ; echo started")
    assert rc == 0 and out.endswith("started"), out
    dst = guest_factory(args=[*net_args(dst_app), "-incoming", "defer"], append="qe.shell",
                        name="dst")
    mig = f"unix:{dst.qmp_path.parent / 'mig.sock'}"
    dst.qmp("migrate-incoming", uri=mig)
    src.qmp("migrate", uri=mig)
    deadline = time.monotonic() + 60
    while (st := src.qmp("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, st
        time.sleep(0.2)  # polling QMP for the migration's end, bounded by the deadline
    assert st["status"] == "completed", st
    assert dst.qmp("query-status")["status"] == "running"
    dst._shell_ready = True  # the shell goes on where the source left it (no GUEST-SHELL here)
    ping(dst, RESPONDER, 20)  # on the destination's network now
    out, rc = dst.run("kill -INT $(pidof ping); while pidof ping >/dev/null; do usleep 10000; done; "
                      "tail -3 /tmp/ping.log")
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    assert m, out
    sent, got = int(m.group(1)), int(m.group(2))
    assert sent >= 20 and got >= sent - 3, out  # at most the in-flight few around the switch
    shutdown(dst)
    src.kill()
    src_log = src_app.log_path.read_text(errors="replace")
    assert "SET_LOG_BASE" in src_log, "the source was never given a dirty log"
    c = port_counters(dst_app, "net0")
    assert c["rarps"] >= 1 and c["rx_packets"] >= 20, c
