"""The runtime's one output queue: partial sends, a full socket, fds, the cap."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from appliance.runtime import unix
from appliance.runtime.outqueue import SEND_GATHER, Flush, OutputQueue


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def drain(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Everything readable now, with every fd that came along."""
    data, fds = b"", []
    while True:
        try:
            chunk, more = unix.recv_chunk(sock, 1 << 16, 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return data, fds
        data += chunk
        fds += more


def test_everything_goes_in_order_in_gathered_sends(
        pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = pair
    calls: list[int] = []
    real = unix.send_some

    def counting(sock: socket.socket, buffers: list[memoryview], fds: list[int]) -> int:
        calls.append(len(buffers))
        return real(sock, buffers, fds)

    monkeypatch.setattr(unix, "send_some", counting)
    q = OutputQueue(1 << 20)
    messages = [bytes([i]) * 10 for i in range(SEND_GATHER + 6)]
    for m in messages:
        q.push(m)
    q.push(b"")  # nothing to send: not queued
    assert len(q) == q.pending_bytes == 10 * len(messages)
    assert q.flush(ours) is Flush.DONE
    assert not q and q.pending_bytes == 0
    assert calls == [SEND_GATHER, 6]
    assert drain(theirs) == (b"".join(messages), [])


def test_a_full_socket_blocks_and_a_partial_send_resumes_where_it_stopped(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    q = OutputQueue(1 << 30)
    payload = os.urandom(4 << 20)  # more than any unix socket buffer
    q.push(payload[:1 << 20])
    q.push(payload[1 << 20:])
    assert q.flush(ours) is Flush.BLOCKED  # EAGAIN: wait for writability
    assert 0 < q.pending_bytes < len(payload)
    received = b""
    while q:
        got, _ = drain(theirs)
        received += got
        assert q.flush(ours) in (Flush.BLOCKED, Flush.DONE)
    received += drain(theirs)[0]
    assert received == payload and q.pending_bytes == 0


def test_fds_go_with_the_first_byte_of_their_message_once(
        pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = pair
    sends: list[tuple[bytes, list[int]]] = []
    real = unix.send_some
    limit = [3]  # the kernel takes 3 bytes per call

    def partial(sock: socket.socket, buffers: list[memoryview], fds: list[int]) -> int:
        data = b"".join(bytes(b) for b in buffers)[:limit[0]]
        sends.append((data, list(fds)))
        return real(sock, [memoryview(data)], fds)

    monkeypatch.setattr(unix, "send_some", partial)
    r, w = os.pipe()
    try:
        q = OutputQueue(1 << 20)
        q.push(b"aa")
        q.push(b"bbbbbbb", [r])
        q.push(b"cc")
        assert q.flush(ours) is Flush.DONE
        # the message with fds starts its own sendmsg and only its first part carries them
        assert sends == [(b"aa", []), (b"bbb", [r]), (b"bbb", []), (b"bcc", [])]
        data, fds = drain(theirs)
        assert data == b"aabbbbbbbcc" and len(fds) == 1
        os.close(fds[0])
        os.fstat(r)  # lent, not closed by the queue
    finally:
        os.close(r)
        os.close(w)


def test_a_failed_send_reports_the_error_and_keeps_the_bytes(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.close()
    q = OutputQueue(1 << 20)
    q.push(b"reply")
    assert q.flush(ours) is Flush.FAILED
    assert isinstance(q.error, OSError) and q.pending_bytes == 5
    q.clear()
    assert not q and q.pending_bytes == 0


def test_the_cap_counts_every_byte_or_those_behind_the_head() -> None:
    whole = OutputQueue(10)
    behind = OutputQueue(10, cap_behind_head=True)
    for q in (whole, behind):
        q.push(b"x" * 8)
        q.push(b"y" * 2)
        assert not q.over_cap()  # exactly the cap is allowed
        q.push(b"z")
    assert whole.over_cap()
    assert not behind.over_cap()  # 3 bytes behind the 8 being written
    behind.push(b"w" * 8)
    assert behind.over_cap()
    big = OutputQueue(10, cap_behind_head=True)
    big.push(b"h" * 100)  # one message larger than the cap is no reason to drop
    assert not big.over_cap()
