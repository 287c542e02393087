"""Unix-socket and eventfd primitives shared by every socket service (runtime layer).

Both vfio-user and vhost-user pass fds as SCM_RIGHTS ancillary data attached to
the bytes of the message that carries them; the services read no more than one
message's worth at a time so the fds stay with their message.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket

from appliance.errors import RemoteProtocolError
from appliance.protocol_common import close_quietly

_ONE = (1).to_bytes(8, "little")
# plain ints: the socket module's flags are IntFlags, whose arithmetic costs per message
_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_CTRUNC = int(socket.MSG_CTRUNC)
_FD_SIZE = array.array("i").itemsize


def recv_chunk(sock: socket.socket, wanted: int, max_fds: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One recvmsg of at most ``wanted`` bytes, with its SCM_RIGHTS fds.

    Raises:
        BlockingIOError: with MSG_DONTWAIT, nothing to read now.
        RemoteProtocolError: more than ``max_fds`` fds arrived (all are closed).
    """
    fds = array.array("i")
    data, ancdata, msg_flags, _ = sock.recvmsg(wanted, socket.CMSG_SPACE(max_fds * _FD_SIZE),
                                               int(flags) | _CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    received = list(fds)
    if msg_flags & _CTRUNC:
        for fd in received:
            close_quietly(fd)
        raise RemoteProtocolError("too many fds in one message (control data truncated)")
    return data, received


class PeerClosed(ConnectionError):
    """The peer closed the stream after ``got`` of the ``size`` bytes asked for."""

    def __init__(self, got: int, size: int) -> None:
        super().__init__(f"peer closed the stream ({got} of {size} bytes)")
        self.got, self.size = got, size


def recv_exactly(sock: socket.socket, size: int, max_fds: int = 0) -> tuple[bytes, list[int]]:
    """``size`` bytes from a blocking stream socket, with every fd that came along.

    Raises:
        PeerClosed: end of stream first (the fds received are closed).
        RemoteProtocolError: more than ``max_fds`` fds in one message.
    """
    data, fds = bytearray(), []
    while len(data) < size:
        chunk, got = recv_chunk(sock, size - len(data), max_fds)
        fds += got
        if not chunk:
            for fd in fds:
                close_quietly(fd)
            raise PeerClosed(len(data), size)
        data += chunk
    return bytes(data), fds


def send_message(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send a whole message; fds travel with its first byte."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def send_some(sock: socket.socket, buffers: list[memoryview], fds: list[int]) -> int:
    """One ``sendmsg`` of ``buffers`` (gathered) on a non-blocking socket.

    The fds travel with the first byte sent.  Returns how many bytes the
    kernel took (at least one).

    Raises:
        BlockingIOError: the socket takes nothing now.
        OSError: the peer is gone (EPIPE, ECONNRESET) or another send error.
    """
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    return sock.sendmsg(buffers, anc)


def wait_readable(fd: int | socket.socket, timeout: float | None) -> bool:
    """Whether ``fd`` became readable (or hung up) within ``timeout`` seconds
    (None: no limit).  ``poll``, not ``select``: any fd number works."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0.0, timeout) * 1000))


def signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd counter (an interrupt, a call, a notice)."""
    try:
        os.write(fd, _ONE)
    except OSError as exc:  # EAGAIN: counter saturated, the reader is behind
        if exc.errno not in (errno.EAGAIN, errno.EBADF):
            raise


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (its /proc link reads ``anon_inode:[eventfd]``).

    A pipe, socket, regular file or device is not; neither is a closed fd.
    Kick, call and err fds must be eventfds: the loop reads 8 bytes per kick
    (a pipe at EOF would be readable forever) and signals by writing a counter
    (into a regular file that would write file data).

    Returns:
        True for an eventfd, False for anything else (or a closed fd).
    """
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


