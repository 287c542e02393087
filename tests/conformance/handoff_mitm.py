"""A man in the middle of a live handoff, for the fault tests (test_handoff_faults.py).

The source is told the proxy is the destination (``appliance handoff --from A
--to PROXY_CTL``).  The proxy, a thread of the test process:

1. takes the source's ``handoff.accept`` line on its control socket, asks the
   real destination, and answers with the destination's reply, its
   ``result.socket`` replaced by the proxy's own channel socket;
2. relays the channel's frames source -> destination: FDS frames with their
   SCM_RIGHTS fds (the proxy's copies are closed once forwarded or dropped),
   DATA frames cut into migration records (parsed from the *unmodified*
   input) and handed to a transform that may change, drop, hold, reorder or
   re-sign them, or return an :class:`Action` (cut the stream, kill a side);
3. relays what the destination says (its verdict) to the source as it comes,
   and from the source's END record on the source's bytes as they are
   (any frame it sends after its stream, then its ``go`` / ``abort``).

Everything blocks with a timeout; whatever fails in the thread is kept in
:attr:`Mitm.error` and raised by :meth:`Mitm.join`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import xxhash

from appliance.runtime import unix
from appliance.runtime.handoff.frames import MAGIC, MAX_FDS_PER_FRAME, FrameHead, FrameKind, frame
from appliance.testing.process import ApplianceProcess
from appliance.vfio_user.migration_stream import EndPayload, RecordHead, RecordType, record_checksum

TIMEOUT = 30.0


@dataclass(frozen=True)
class Cut:
    """Stop the stream here: send what came before in one DATA frame whose head
    promises ``promise`` bytes more than follow (or, with ``head_bytes``, then
    only that many bytes of another frame head), and close the way to the
    destination for writing."""

    promise: int = 0
    head_bytes: int = 0


@dataclass(frozen=True)
class Kill:
    """SIGKILL the source (``"src"``) or the destination (``"dst"``) here, after
    sending what came before."""

    who: str


Action = Cut | Kill
Piece = bytes | Action
#: (record type, the record's raw bytes: head and payload) -> what to send instead
Transform = Callable[[RecordType, bytes], list[Piece]]


class _Stop(Exception):
    """The relay ends early (a cut, a kill, the destination gone)."""


class RecordCutter:
    """Cuts a byte stream into whole records (no verification: the input is
    the real source's)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[RecordType, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= RecordHead.SIZE:
            head = RecordHead.unpack(self.buf)
            end = RecordHead.SIZE + head.length
            if len(self.buf) < end:
                break
            out.append((RecordType(head.type), bytes(self.buf[:end])))
            del self.buf[:end]
        return out


class Resigner:
    """Renumbers and re-checksums records, and rewrites END's count and digest,
    so that a changed record passes every integrity check and only the meaning
    of its fields can get it refused."""

    def __init__(self) -> None:
        self.count = 0
        self.digest = xxhash.xxh3_64()  # END digest: what migration_stream.stream_digest() makes

    def __call__(self, raw: bytes) -> bytes:
        old = RecordHead.unpack(raw)
        payload = raw[RecordHead.SIZE:]
        if old.type == RecordType.END:
            payload = EndPayload(records=self.count, digest=self.digest.intdigest()).pack()
        head = RecordHead(type=old.type, flags=old.flags, length=len(payload), seq=self.count)
        head.checksum = record_checksum(head.pack(), payload)
        out = head.pack() + payload
        self.digest.update(out)
        self.count += 1
        return out


def _read_line(sock: socket.socket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        try:
            chunk = sock.recv(1)
        except OSError:  # ECONNRESET once what was queued is read
            break
        if not chunk:
            break
        line += chunk
    return bytes(line)


def _recv_exactly(sock: socket.socket, size: int, max_fds: int = 0) -> tuple[bytes, list[int]]:
    try:
        return unix.recv_exactly(sock, size, max_fds)
    except unix.PeerClosed as exc:
        raise _Stop(f"the source closed the channel ({exc.got} of {exc.size} bytes)") from None


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(str(path))
    sock.listen(1)
    sock.settimeout(TIMEOUT)
    return sock


class Mitm:
    """One handoff through the proxy.  Use as a context manager around the
    ``appliance handoff`` run; leaving it joins the thread (raising what failed
    there).

    The channel is relayed the way the kernel would pass on what happens at
    either end: an end that closes is seen closed by the other (after what it
    sent), a destination that stops taking data makes the source's sends fail
    (once the destination's last words have been passed on), and from the
    source's END record on the bytes go through as they are (whatever the
    source sends after its stream, then its ``go`` / ``abort``).
    """

    def __init__(self, workdir: Path, src: ApplianceProcess, dst: ApplianceProcess, *,
                 transform: Transform | None = None, drop_fds: bool = False,
                 resign: bool = False, verdict_within: float = TIMEOUT) -> None:
        """Args:
            transform: what to send for each record of the source's stream.
            drop_fds: withhold the FDS frames (their fds are closed here).
            resign: renumber and re-checksum what ``transform`` returns.
            verdict_within: seconds to wait for the destination's words; then
                :attr:`stalled` is set and both ends are shut.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        self.src, self.dst = src, dst
        self.transform = transform or (lambda _kind, raw: [raw])
        self.drop_fds = drop_fds
        self.resign = Resigner() if resign else None
        self.verdict_within = verdict_within
        self.ctl_path = workdir / "proxy-ctl.sock"
        self.chan_path = workdir / "proxy-chan.sock"
        for path in (self.ctl_path, self.chan_path):
            if path.exists():
                path.unlink()
        self._ctl = _listen(self.ctl_path)
        self._chan = _listen(self.chan_path)
        self.accept_reply: dict[str, Any] = {}
        self.records_in: list[RecordType] = []
        self.fds_in = 0
        self.verdict = b""  # all the destination said on the channel
        self.tail = b""  # all the source sent after its END record
        self.stopped = ""  # why the relay ended early
        self.stalled = False
        self.error: BaseException | None = None
        self._input_done = False
        self._thread = threading.Thread(target=self._main, name="handoff-mitm", daemon=True)

    @property
    def answer(self) -> bytes:
        """The source's go / abort line (frames it sent after END skipped)."""
        tail = self.tail
        while len(tail) >= FrameHead.SIZE and tail.startswith(MAGIC):
            tail = tail[FrameHead.SIZE + FrameHead.unpack(tail).length:]
        return tail

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()

    def join(self) -> None:
        self._thread.join(TIMEOUT * 2)
        assert not self._thread.is_alive(), "the proxy thread is stuck"
        if self.error is not None:
            raise self.error

    # ------------------------------------------------------------ the thread
    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - raised again by join()
            self.error = exc
        finally:
            for sock in (self._ctl, self._chan):
                sock.close()
            for path in (self.ctl_path, self.chan_path):
                path.unlink(missing_ok=True)

    def _run(self) -> None:
        conn, _ = self._ctl.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            request = _read_line(conn)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as real:
                real.settimeout(TIMEOUT)
                real.connect(self.dst.config.control.socket)
                real.sendall(request)
                line = _read_line(real)
                if line.startswith(b'{"QMP":'):  # the greeting: the reply follows
                    line = _read_line(real)
                reply = json.loads(line)
            self.accept_reply = reply
            if reply.get("ok"):
                dst_channel = reply["result"]["socket"]
                reply = {**reply, "result": {**reply["result"], "socket": str(self.chan_path)}}
            conn.sendall(json.dumps(reply).encode() + b"\n")
        if not self.accept_reply.get("ok"):
            return
        a, _ = self._chan.accept()
        with a, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as b:
            a.settimeout(TIMEOUT)
            b.connect(dst_channel)
            back = threading.Thread(target=self._back, args=(a, b), name="handoff-mitm-back")
            back.start()
            try:
                self._relay(a, b)
            except _Stop as why:
                self.stopped = str(why)
            except OSError as exc:  # the destination stopped taking data (refused, killed)
                self.stopped = f"destination: {exc}"
            if self.stopped:
                back.join(TIMEOUT)  # its last words reach the source first
                if not self._input_done and self.src.alive:
                    a.shutdown(socket.SHUT_RD)  # the source's next send fails
            if self._input_done and self.src.alive:
                self._rest(a, b)
            back.join(TIMEOUT)

    def _back(self, a: socket.socket, b: socket.socket) -> None:
        """Destination -> source, as it comes, until the destination's end."""
        b.settimeout(self.verdict_within)
        while True:
            try:
                data = b.recv(65536)
            except TimeoutError:
                self.stalled = True
                for sock in (a, b):
                    sock.shutdown(socket.SHUT_RDWR)
                return
            except OSError:  # ECONNRESET: it closed with our data unread
                data = b""
            if not data:
                break
            self.verdict += data
            try:
                a.sendall(data)
            except OSError:
                pass
        try:
            a.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _rest(self, a: socket.socket, b: socket.socket) -> None:
        """Source -> destination after END, byte for byte, until the source's end."""
        while True:
            try:
                data = a.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            self.tail += data
            try:
                b.sendall(data)
            except OSError:
                pass
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        cutter = RecordCutter()
        while not self._input_done:
            raw, fds = _recv_exactly(a, FrameHead.SIZE, MAX_FDS_PER_FRAME)
            head = FrameHead.unpack(raw)
            if head.kind == FrameKind.FDS:
                self.fds_in += len(fds)
                try:
                    if not self.drop_fds:
                        unix.send_message(b, raw, fds)
                finally:
                    for fd in fds:  # the destination has its own copies now
                        os.close(fd)
                continue
            assert head.kind == FrameKind.DATA and not fds, head
            payload, _ = _recv_exactly(a, head.length)
            pieces: list[Piece] = []
            for kind, record in cutter.feed(payload):
                self.records_in.append(kind)
                self._input_done = kind == RecordType.END
                pieces += self.transform(kind, record)
            self._send(b, pieces)

    def _send(self, b: socket.socket, pieces: list[Piece]) -> None:
        data = bytearray()
        for piece in pieces:
            if isinstance(piece, bytes):
                data += self.resign(piece) if self.resign is not None else piece
                continue
            if isinstance(piece, Cut):
                if data or piece.promise:
                    b.sendall(FrameHead(kind=FrameKind.DATA, length=len(data) + piece.promise)
                              .pack() + data)
                if piece.head_bytes:
                    b.sendall(frame(FrameKind.DATA, bytes(64))[:piece.head_bytes])
                b.shutdown(socket.SHUT_WR)
                raise _Stop(f"cut {piece}")
            if data:
                b.sendall(frame(FrameKind.DATA, bytes(data)))
                data.clear()
            victim = self.src if piece.who == "src" else self.dst
            assert victim.proc is not None
            victim.proc.kill()
            victim.proc.wait(TIMEOUT)
            if piece.who == "src":
                b.shutdown(socket.SHUT_WR)  # what the kernel does for a dead source
            raise _Stop(f"killed {piece.who}")
        if data:
            b.sendall(frame(FrameKind.DATA, bytes(data)))
