"""Hostile vhost-user front-ends and guests against a real ``appliance run``.

Port ``p0`` (``net0``) takes the attacks; ``p1`` is the harness's well-behaved
handshake.  Each case ends with :meth:`hostile.HostileTarget.assert_healthy`
(alive, no traceback, fds and RSS back to baseline, well-behaved peers served
within 100 ms).  Guest memory is a memfd shared with SET_MEM_TABLE and the
rings are laid out by the unit tests' fake driver (``DriverRing``).
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from hostile import HostileTarget, wait_until

from appliance.net import vhost_wire as vw
from appliance.net.vhost_wire import Feature as F
from appliance.net.vhost_wire import ProtocolFeature as PF
from appliance.net.vhost_wire import Request as R
from appliance.runtime.control import ControlClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from test_vhost_frontend import DriverRing, GuestMemory

GET_FEATURES = vw.Header(request=R.GET_FEATURES, flags=vw.VERSION).pack()
HDR = bytes(vw.NetHdr.SIZE)
FRAME = b"\xff" * 6 + bytes.fromhex("525400aa0001") + b"\x88\xb5" + bytes(46)


def net0(target: HostileTarget) -> dict[str, Any]:
    with ControlClient(target.control_sock, timeout=5.0) as ctl:
        port: dict[str, Any] = ctl("status")["net"]["ports"]["net0"]
    return port


def peak_rss(target: HostileTarget) -> int:
    """The appliance's RSS high-water mark (VmHWM): a read that came and went shows here."""
    with open(f"/proc/{target.pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) << 10


def disconnected(target: HostileTarget, why: str) -> bool:
    return any("net0: front-end disconnected (" in line and why in line
               for line in target.proc.log_text().splitlines())


class Frontend:
    """A vhost-user front-end on ``p0`` (blocking socket, test-side timeouts)."""

    def __init__(self, target: HostileTarget) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        self.sock.connect(target.port_sock("p0"))

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:
        flags = vw.VERSION | (vw.FLAG_NEED_REPLY if need_reply else 0)
        data = vw.Header(request=request, flags=flags, size=len(payload)).pack() + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)

    def reply(self) -> int:
        head = self._read(vw.HEADER_SIZE)
        body = self._read(vw.Header.unpack(head).size)
        return vw.U64.unpack(body).value

    def _read(self, n: int) -> bytes:
        got = b""
        while len(got) < n:
            chunk = self.sock.recv(n - len(got))
            assert chunk, "the appliance closed the connection"
            got += chunk
        return got

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> int:
        self.send(request, payload, fds, need_reply)
        return self.reply()

    def u64(self, request: int, value: int, **kw: Any) -> None:
        self.send(request, vw.U64(value=value).pack(), **kw)

    def closed_by_peer(self) -> bool:
        """The appliance closed the connection (EOF after any unread bytes)."""
        try:
            while chunk := self.sock.recv(1 << 16, socket.MSG_DONTWAIT):
                del chunk
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True

    def negotiate(self, features: int, reply_ack: bool = True) -> None:
        self.send(R.SET_OWNER)
        offered = self.call(R.GET_FEATURES)
        pf = self.call(R.GET_PROTOCOL_FEATURES)
        self.u64(R.SET_PROTOCOL_FEATURES, pf & int(PF.REPLY_ACK if reply_ack else 0))
        self.u64(R.SET_FEATURES, offered & features)

    def start_tx(self, mem: GuestMemory, tx: DriverRing) -> None:
        body = vw.MemoryHeader(nregions=1).pack() + mem.region().pack()
        assert self.call(R.SET_MEM_TABLE, body, fds=[mem.fd], need_reply=True) == 0
        self.send(R.SET_VRING_NUM, vw.VringState(index=1, num=tx.size).pack())
        self.send(R.SET_VRING_BASE, vw.VringState(index=1, num=0).pack())
        self.send(R.SET_VRING_ADDR, tx.addr_payload())
        self.u64(R.SET_VRING_CALL, 1, fds=[tx.call_fd])
        self.u64(R.SET_VRING_KICK, 1, fds=[tx.kick_fd])
        assert self.call(R.SET_VRING_ENABLE, vw.VringState(index=1, num=1).pack(),
                         need_reply=True) == 0

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- a front-end that never reads
def test_pipelined_requests_never_read_do_not_stall_and_end_in_a_disconnect(
        target: HostileTarget) -> None:
    """30,000 GET_FEATURES sent without reading a reply (about 600 KiB of replies,
    more than the kernel buffers): the appliance answers everyone else at once
    while the front-end is connected; past net.max_backlog (1 MiB) of unread
    replies it disconnects it with one line."""
    fe = Frontend(target)
    fe.sock.setblocking(False)
    todo = bytearray()

    def pipeline() -> bool:
        """Send what the socket takes (whole requests only ever follow one another)."""
        if not todo:
            todo.extend(GET_FEATURES * 4096)
        try:
            del todo[:fe.sock.send(todo)]
        except BlockingIOError:
            pass
        except OSError:  # the appliance hung up: what the second half waits for
            return True
        return False

    first = 30_000
    todo.extend(GET_FEATURES * first)
    while todo:
        assert not pipeline()
        if todo:
            select.select([], [fe.sock], [], 1.0)  # until the appliance has read some
    assert wait_until(lambda: net0(target).get("protocol", {}).get("messages") == first, 30)
    assert "protocol" in net0(target)  # still connected, replies queued
    assert "front-end disconnected" not in target.proc.log_text()
    target.assert_healthy(peer_fds=1)  # the hostile peer still holds its socket
    assert wait_until(lambda: pipeline() or disconnected(target, "net.max_backlog"), 60)
    assert wait_until(lambda: disconnected(target, "net.max_backlog"))
    lines = [line for line in target.proc.log_text().splitlines() if "net.max_backlog" in line]
    assert len(lines) == 1 and "bytes of replies left unread" in lines[0], lines
    fe.close()
    target.assert_healthy()


# ---------------------------------------------------------------- guest-controlled sizes
@pytest.mark.parametrize("entries", [256, 4096])
def test_indirect_tx_chain_naming_all_memory_many_times_is_refused_unread(
        target: HostileTarget, entries: int) -> None:
    """An indirect table of 256 (or 4,096) descriptors, each naming the whole 4 MiB
    of guest memory: 1 GiB (16 GiB) if it were read.  The chain is refused before
    a byte is read (returned with length 0, counted malformed), the next frame
    goes through, and not even the RSS high-water mark grows by 64 MiB."""
    peak = peak_rss(target)
    mem = GuestMemory(4 << 20)
    tx = DriverRing(mem, 1, size=entries)  # a queue as long as the table: its count is legal
    fe = Frontend(target)
    try:
        fe.negotiate(int(F.VERSION_1 | F.RING_INDIRECT_DESC | F.PROTOCOL_FEATURES))
        fe.start_tx(mem, tx)
        table = mem.alloc(16 * entries, 16)
        mem.write(table, b"".join(
            struct.pack("<QIHH", mem.gpa, mem.size, vw.DescFlag.NEXT if i + 1 < entries else 0, i + 1)
            for i in range(entries)))
        tx.set_desc(0, table, 16 * entries, vw.DescFlag.INDIRECT)
        tx.make_available(0)
        tx.add_buffer(1, HDR + FRAME)
        os.eventfd_write(tx.kick_fd, 1)
        assert wait_until(lambda: tx.used_idx() == 2, 10)
        assert tx.take_used() == [(0, 0), (1, 0)]
        port = net0(target)
        assert (port["malformed_chains"], port["rx_packets"]) == (1, 1), port
        assert peak_rss(target) - peak < 64 << 20
    finally:
        fe.close()
        tx.close()
        mem.close()
    target.assert_healthy()


# ---------------------------------------------------------------- kick fds that are not eventfds
def pipe_at_eof() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def regular_file(tmp: Path) -> int:
    path = tmp / "kick"
    path.write_bytes(b"not an eventfd")
    return os.open(path, os.O_RDWR)


@pytest.mark.parametrize("kind", ["pipe at EOF", "regular file"])
def test_kick_fd_that_is_not_an_eventfd_is_refused(target: HostileTarget, tmp_path: Path,
                                                   kind: str) -> None:
    """With REPLY_ACK: a NACK and the connection goes on (the fd is closed, never
    watched: a pipe at EOF would be readable forever).  Without it: the connection
    closes, as for any bad request."""
    mem = GuestMemory(1 << 20)
    tx = DriverRing(mem, 1, size=16)
    bad = pipe_at_eof() if kind == "pipe at EOF" else regular_file(tmp_path)
    fe = Frontend(target)
    try:
        fe.negotiate(int(F.VERSION_1 | F.PROTOCOL_FEATURES))
        body = vw.MemoryHeader(nregions=1).pack() + mem.region().pack()
        assert fe.call(R.SET_MEM_TABLE, body, fds=[mem.fd], need_reply=True) == 0
        fe.send(R.SET_VRING_NUM, vw.VringState(index=1, num=tx.size).pack())
        fe.send(R.SET_VRING_BASE, vw.VringState(index=1, num=0).pack())
        fe.send(R.SET_VRING_ADDR, tx.addr_payload())
        assert fe.call(R.SET_VRING_KICK, vw.U64(value=1).pack(), fds=[bad], need_reply=True) != 0
        assert fe.call(R.GET_FEATURES) != 0  # still served
        assert net0(target)["queues"][1]["state"] == "stopped"
        target.assert_healthy(vfio_user=False)  # fds: the front-end is still connected
        target.check_nvme()
        fe.u64(R.SET_VRING_KICK, 1, fds=[bad])  # no need_reply: nothing can tell it, so close
        assert wait_until(fe.closed_by_peer)
        assert "SET_VRING_KICK rejected: vring 1: the fd is not an eventfd; closing" \
            in target.proc.log_text()
    finally:
        fe.close()
        os.close(bad)
        tx.close()
        mem.close()
    target.assert_healthy()
