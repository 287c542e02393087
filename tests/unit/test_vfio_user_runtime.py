"""The vfio-user socket runtime (appliance.runtime.vfio_user) with a real controller
and the project's client over a socketpair; the loop is pumped by hand."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nvme_driver import make_controller

from appliance.client.vfio_user import VfioUserClient, VfioUserError
from appliance.memory import DmaPending, DmaScope
from appliance.runtime import vfio_user as runtime_vfio_user
from appliance.runtime.loop import EventLoop
from appliance.runtime.vfio_user import VfioUserClientSocket
from appliance.storage.spec import CommandError, Status
from appliance.vfio_user import wire as w
from appliance.vfio_user.connection_state import NotYet
from appliance.vfio_user.framing import encode

MEM = 0x10_0000  # client memory, DMA_MAPped without an fd: DMA_READ/WRITE messages


def pump(loop: EventLoop, until: Callable[[], bool], passes: int = 500) -> None:
    for _ in range(passes):
        if until():
            return
        loop.run_once(0.01)
    raise AssertionError("condition not reached")


def in_thread(loop: EventLoop, fn: Callable[[], Any]) -> Any:
    """Run a blocking client call while this thread serves the loop."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    pump(loop, lambda: not thread.is_alive())
    thread.join()
    return out[0] if out else None


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[EventLoop, VfioUserClientSocket, VfioUserClient]]:
    loop = EventLoop()
    ctrl = make_controller(tmp_path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = VfioUserClientSocket(loop, ours, ctrl, lambda s: None, "t")
    client = VfioUserClient(theirs)
    in_thread(loop, lambda: client.negotiate({}))
    in_thread(loop, lambda: client.map_memfd(MEM, 4096, share_fd=False))
    yield loop, server, client
    client.close()
    server.close()
    ctrl.close()
    loop.close()


def test_a_bar_write_is_served_while_a_dma_read_waits(
        rig: tuple[EventLoop, VfioUserClientSocket, VfioUserClient]) -> None:
    """Device work asks for client memory through a DMA_READ; the client sends a
    BAR write before answering.  Nothing waits on the client: the write is served
    at once, and the reply, when it comes, makes the scope ready."""
    loop, server, client = rig
    client.memory(MEM, 8)[:] = b"\x11" * 8
    arrived: list[bool] = []
    server.conn.memory.scope = DmaScope(on_ready=lambda: arrived.append(True))
    with pytest.raises(DmaPending):
        server.conn.memory.read(MEM, 8)
    server.flush()
    request = client.receive(timeout=5)
    assert request is not None and request.header.command == w.Command.DMA_READ
    payload = w.RegionAccess(offset=0x24, region=w.PciRegion.BAR0, count=4).pack()
    sent = client.send(w.Command.REGION_WRITE, payload + (0x1F001F).to_bytes(4, "little"))
    pump(loop, lambda: server.conn.device.regs.aqa == 0x1F001F)  # type: ignore[attr-defined]
    header, _, _ = client.wait_reply(sent, w.Command.REGION_WRITE)
    assert not header.flags & w.MsgFlag.ERROR and not arrived
    client._serve(request)  # the DMA reply, after the BAR write was served
    pump(loop, lambda: bool(arrived))
    assert server.conn.memory.read(MEM, 8) == b"\x11" * 8


def test_a_client_that_never_answers_a_dma_is_disconnected_once(
        rig: tuple[EventLoop, VfioUserClientSocket, VfioUserClient],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    loop, server, _ = rig
    monkeypatch.setattr(runtime_vfio_user, "DMA_TIMEOUT", 0.05)
    scopes = [DmaScope(on_ready=lambda: None) for _ in range(4)]
    for i, scope in enumerate(scopes):  # four pieces of work wait at once
        server.conn.memory.scope = scope
        with pytest.raises(DmaPending):
            server.conn.memory.read(MEM + 8 * i, 8)
    server.flush()
    pump(loop, lambda: server.sock.fileno() < 0)
    assert [r.message for r in caplog.records].count(
        "t: no reply to 4 DMA message(s) within 0.05 s; disconnecting") == 1
    assert all(s.error == "client gone" for s in scopes)


# ------------------------------------------------------------ output queue
def region_info_burst(count: int) -> bytes:
    request = w.RegionInfo(argsz=w.RegionInfo.SIZE, index=w.PciRegion.CONFIG).pack()
    return b"".join(encode(w.Header(msg_id=i, command=w.Command.DEVICE_GET_REGION_INFO), request)
                    for i in range(count))


def test_replies_wait_for_a_full_socket_and_all_arrive_in_order(
        rig: tuple[EventLoop, VfioUserClientSocket, VfioUserClient]) -> None:
    loop, server, client = rig
    server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    count = 3000
    client.sock.sendall(region_info_burst(count))
    pump(loop, lambda: server.out.pending_bytes > 0)  # the socket is full: replies queue
    seen: list[int] = []

    def drain() -> bool:
        try:
            while len(seen) < count:
                frame = client.receive(timeout=0)
                assert frame is not None and not frame.header.flags & w.MsgFlag.ERROR
                seen.append(frame.header.msg_id)
        except TimeoutError:
            pass
        return len(seen) == count

    pump(loop, drain, passes=5000)  # the writer callback sends as the client drains
    assert seen == list(range(count))
    pump(loop, lambda: server.out.pending_bytes == 0)
    info = in_thread(loop, client.device_info)  # still served
    assert info.num_regions == w.PCI_NUM_REGIONS


def test_a_client_that_does_not_read_is_disconnected_past_the_backlog_limit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loop = EventLoop()
    ctrl = make_controller(tmp_path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    closed: list[VfioUserClientSocket] = []
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server = VfioUserClientSocket(loop, ours, ctrl, closed.append, "slow", max_backlog=16384)
    client = VfioUserClient(theirs)
    try:
        in_thread(loop, lambda: client.negotiate({}))
        burst = region_info_burst(4000)  # 192 KB of replies: far past the socket's buffer
        sent = 0
        theirs.setblocking(False)
        for _ in range(100_000):  # a bound, not a pause: each pass makes progress or waits 1 ms
            if sent == len(burst) or closed:
                break
            try:
                sent += theirs.send(burst[sent:])
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
            loop.run_once(0.001)
        pump(loop, lambda: bool(closed), passes=5000)
        assert closed == [server] and server.sock.fileno() < 0
        lines = [r.getMessage() for r in caplog.records if "replies unread" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith("slow:"), lines
    finally:
        client.close()
        server.close()
        ctrl.close()
        loop.close()


def test_a_device_error_is_eio_not_a_rejection_and_the_client_is_served_on(
        rig: tuple[EventLoop, VfioUserClientSocket, VfioUserClient],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An NVMe CommandError escaping from a device call is the device's failure:
    the reply says EIO (not EINVAL, the peer's-fault errno), the bug is logged,
    and the connection goes on."""
    loop, server, client = rig

    def broken(*_: object) -> bytes:
        raise CommandError(Status.INTERNAL_ERROR, "a device bug")

    monkeypatch.setattr(server.conn.device, "region_read", broken)
    def read() -> OSError | None:
        try:
            client.read32(w.PciRegion.BAR0, 0)
        except VfioUserError as exc:
            return exc
        return None

    refused = in_thread(loop, read)
    assert refused is not None and refused.errno == errno.EIO
    assert "the device failed" in caplog.text
    monkeypatch.undo()
    assert in_thread(loop, client.device_info).num_regions == w.PCI_NUM_REGIONS


# ------------------------------------------------------------ a message that waits
class ParkingMigration:
    """Answers DEVICE_FEATURE with NotYet while ``blocked`` (a data channel behind)."""

    def __init__(self) -> None:
        self.blocked = True
        self.wake: Callable[[], None] | None = None

    def handle(self, command: w.Command, payload: bytes, fds: list[int] | None = None) -> bytes:
        if self.blocked:
            raise NotYet()
        return b""

    def handle_parts(self, command: w.Command, payload: bytes) -> list[bytes | memoryview]:
        return [self.handle(command, payload)]

    def allows(self, command: w.Command) -> bool:
        return True

    def device_reset(self) -> None:
        pass

    def close(self) -> None:
        pass

    def handoff_blocker(self) -> str:
        return ""


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def replies(client: VfioUserClient, count: int, seen: list[int]) -> Callable[[], bool]:
    """A condition for :func:`pump`: the client has read ``count`` replies (their
    message ids appended to ``seen``, their fds closed)."""
    def drain() -> bool:
        try:
            while len(seen) < count:
                frame = client.receive(timeout=0)
                assert frame is not None
                frame.close_fds()
                seen.append(frame.header.msg_id)
        except TimeoutError:
            pass
        return len(seen) == count
    return drain


def test_a_waiting_connection_reads_only_a_few_messages_more(tmp_path: Path) -> None:
    # While a message waits (NotYet) nothing after it runs; a client that keeps
    # sending (each message with fds) must not make the server hold them all:
    # it stops reading once a few are queued, and reads on when the wait ends.
    loop = EventLoop()
    ctrl = make_controller(tmp_path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mig = ParkingMigration()
    server = VfioUserClientSocket(loop, ours, ctrl, lambda s: None, "t",
                                  migration=lambda memory: mig)  # type: ignore[arg-type,return-value]
    client = VfioUserClient(theirs)
    r, w_ = os.pipe()
    try:
        in_thread(loop, lambda: client.negotiate({}))
        theirs.sendall(encode(w.Header(msg_id=1, command=w.Command.DEVICE_FEATURE), bytes(16)))
        pump(loop, lambda: server.conn.parked)
        before = open_fd_count()
        request = w.RegionInfo(argsz=w.RegionInfo.SIZE, index=w.PciRegion.CONFIG).pack()
        count = 100
        for i in range(count):
            msg = encode(w.Header(msg_id=2 + i, command=w.Command.DEVICE_GET_REGION_INFO),
                         request)
            socket.send_fds(theirs, [msg], [r] * 4)
            loop.run_once(0)
        held = open_fd_count() - before
        assert server.conn.queued <= runtime_vfio_user.MAX_PARKED_FRAMES
        assert held <= 4 * runtime_vfio_user.MAX_PARKED_FRAMES, held
        mig.blocked = False
        assert mig.wake is not None
        mig.wake()
        seen: list[int] = []
        pump(loop, replies(client, count + 1, seen), passes=5000)
        assert seen == list(range(1, count + 2))  # every message answered, in order
        assert open_fd_count() == before  # every fd that came with them closed
    finally:
        os.close(r)
        os.close(w_)
        client.close()
        server.close()
        ctrl.close()
        loop.close()


def test_reading_resumes_when_the_waiting_message_ran_outside_the_wake(tmp_path: Path) -> None:
    # A second client knocking makes the service read the first one's socket
    # (its EOF may be there): that read runs the waiting message when the wait
    # is over, before the wake's timer does.  Reading must resume all the same,
    # or the rest of the client's messages are never answered.
    loop = EventLoop()
    ctrl = make_controller(tmp_path)
    mig = ParkingMigration()
    path = str(tmp_path / "nvme.sock")
    service = runtime_vfio_user.VfioUserService(
        loop, path, ctrl, migration=lambda memory: mig)  # type: ignore[arg-type,return-value]
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.connect(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = VfioUserClient(theirs)
    try:
        pump(loop, lambda: service.client is not None)
        server = service.client
        assert server is not None
        in_thread(loop, lambda: client.negotiate({}))
        theirs.sendall(encode(w.Header(msg_id=1, command=w.Command.DEVICE_FEATURE), bytes(16)))
        pump(loop, lambda: server.conn.parked)
        request = w.RegionInfo(argsz=w.RegionInfo.SIZE, index=w.PciRegion.CONFIG).pack()
        count = 4 * runtime_vfio_user.BATCH  # more than one read takes
        for i in range(count):
            theirs.sendall(encode(w.Header(msg_id=2 + i,
                                           command=w.Command.DEVICE_GET_REGION_INFO), request))
        for _ in range(20):
            loop.run_once(0)
        assert server.conn.queued == runtime_vfio_user.MAX_PARKED_FRAMES  # reading paused
        mig.blocked = False
        assert mig.wake is not None
        mig.wake()  # the channel's progress: a timer, after this pass's events
        other.connect(path)  # this pass: the accept reads the first client first
        seen: list[int] = []
        pump(loop, replies(client, count + 1, seen), passes=2000)
        assert seen == list(range(1, count + 2))
    finally:
        other.close()
        client.close()
        service.close()
        ctrl.close()
        loop.close()
