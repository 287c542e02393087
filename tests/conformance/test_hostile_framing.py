"""Hostile framing against a real ``appliance run``: both protocols share one
framer (appliance/framing.py), so each is fed what it must frame exactly.

* a request trickled one byte per send, its fd attached to a byte in the middle
  of its header, is framed whole and keeps its fd;
* a header announcing more than the limit, with an fd attached, is refused the
  protocol's way (vhost-user: the connection closes; vfio-user: an EMSGSIZE
  error reply, then the close) and the fd is closed.

Each case ends with :meth:`hostile.HostileTarget.assert_healthy`.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket

from hostile import HostileTarget, wait_until

from appliance.net import vhost_wire as vw
from appliance.net.vhost_wire import ProtocolFeature as PF
from appliance.net.vhost_wire import Request as R
from appliance.vfio_user import wire as w


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10.0)
    sock.connect(path)
    return sock


def trickle(sock: socket.socket, data: bytes, fd: int, fd_at: int) -> None:
    """Send ``data`` one byte per sendmsg, ``fd`` riding with byte ``fd_at``."""
    for i in range(len(data)):
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
               if i == fd_at else [])
        sock.sendmsg([data[i:i + 1]], anc)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, "the appliance closed the connection"
        got += chunk
    return got


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while sock.recv(1 << 16, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def vhost_request(request: int, payload: bytes = b"", need_reply: bool = False,
                  size: int | None = None) -> bytes:
    flags = vw.VERSION | (vw.FLAG_NEED_REPLY if need_reply else 0)
    return vw.Header(request=request, flags=flags,
                     size=len(payload) if size is None else size).pack() + payload


def vhost_call(sock: socket.socket, request: int, payload: bytes = b"") -> int:
    sock.sendall(vhost_request(request, payload))
    head = vw.Header.unpack(read_exactly(sock, vw.HEADER_SIZE))
    return vw.U64.unpack(read_exactly(sock, head.size)).value


def test_vhost_request_trickled_a_byte_at_a_time_keeps_its_fd(target: HostileTarget) -> None:
    call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    sock = connect(target.port_sock("p0"))
    try:
        sock.sendall(vhost_request(R.SET_OWNER))
        pf = vhost_call(sock, R.GET_PROTOCOL_FEATURES)
        assert pf & PF.REPLY_ACK
        sock.sendall(vhost_request(R.SET_PROTOCOL_FEATURES, vw.U64(value=int(PF.REPLY_ACK)).pack()))
        offered = vhost_call(sock, R.GET_FEATURES)
        sock.sendall(vhost_request(R.SET_FEATURES,
                                   vw.U64(value=offered & int(vw.Feature.PROTOCOL_FEATURES)).pack()))
        # SET_VRING_CALL for ring 0 with its eventfd on the header's 5th byte.
        trickle(sock, vhost_request(R.SET_VRING_CALL, vw.U64(value=0).pack(), need_reply=True),
                call_fd, fd_at=4)
        head = vw.Header.unpack(read_exactly(sock, vw.HEADER_SIZE))
        assert head.request == R.SET_VRING_CALL
        assert vw.U64.unpack(read_exactly(sock, head.size)).value == 0  # ACK: the fd was there
    finally:
        sock.close()
        os.close(call_fd)
    target.assert_healthy()


def test_vhost_oversized_request_with_an_fd_closes_the_connection(target: HostileTarget) -> None:
    r, w_ = os.pipe()
    sock = connect(target.port_sock("p0"))
    try:
        head = vhost_request(R.SET_FEATURES, size=vw.MAX_PAYLOAD + 1)
        sock.sendmsg([head], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())])
        assert wait_until(lambda: closed_by_peer(sock))
        assert wait_until(lambda: "exceeds" in target.proc.log_text())
    finally:
        sock.close()
        os.close(r)
        os.close(w_)
    target.assert_healthy()


def vfio_message(command: int, payload: bytes, msg_id: int, size: int | None = None) -> bytes:
    size = w.HEADER_SIZE + len(payload) if size is None else size
    return w.Header(msg_id=msg_id, command=command, size=size).pack() + payload


def vfio_reply(sock: socket.socket) -> tuple[w.Header, bytes]:
    head = w.Header.unpack(read_exactly(sock, w.HEADER_SIZE))
    return head, read_exactly(sock, head.size - w.HEADER_SIZE)


def test_vfio_user_messages_trickled_a_byte_at_a_time_are_served(target: HostileTarget) -> None:
    version = w.VersionHead(major=0, minor=0).pack() + json.dumps({"capabilities": {}}).encode() + b"\0"
    sock = connect(target.nvme_sock)
    r, w_ = os.pipe()
    try:
        for byte in vfio_message(w.Command.VERSION, version, 1):
            sock.send(bytes([byte]))
        head, _ = vfio_reply(sock)
        assert head.msg_id == 1 and not head.flags & w.MsgFlag.ERROR
        # DEVICE_GET_INFO takes no fd: one riding on its header is closed, the command runs.
        trickle(sock, vfio_message(w.Command.DEVICE_GET_INFO, w.DeviceInfo().pack(), 2), r, fd_at=3)
        head, body = vfio_reply(sock)
        assert head.msg_id == 2 and not head.flags & w.MsgFlag.ERROR
        assert w.DeviceInfo.unpack(body).num_regions == w.PCI_NUM_REGIONS
    finally:
        sock.close()
        os.close(r)
        os.close(w_)
    target.assert_healthy()


def test_vfio_user_oversized_message_with_an_fd_gets_emsgsize_then_close(
        target: HostileTarget) -> None:
    version = w.VersionHead(major=0, minor=0).pack() + json.dumps({"capabilities": {}}).encode() + b"\0"
    sock = connect(target.nvme_sock)
    r, w_ = os.pipe()
    try:
        sock.sendall(vfio_message(w.Command.VERSION, version, 1))
        vfio_reply(sock)
        head = vfio_message(w.Command.DMA_MAP, b"", 2, size=0x7FFFFFFF)
        sock.sendmsg([head], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())])
        reply, _ = vfio_reply(sock)
        assert reply.msg_id == 2 and reply.flags & w.MsgFlag.ERROR
        assert reply.error == errno.EMSGSIZE
        assert wait_until(lambda: closed_by_peer(sock))
    finally:
        sock.close()
        os.close(r)
        os.close(w_)
    target.assert_healthy()
