"""Live handoff of the running devices to another appliance process (runtime layer).

The channel and its frames are described in :mod:`appliance.runtime.handoff.frames`.
Here are the two ends, each driven by a control command:

* :class:`HandoffSource` (``handoff`` with ``to`` = the destination's control
  socket).  With separate images it pre-copies the namespaces in rounds while
  the devices keep serving (the loop runs a pass between chunks); then it
  stops reading every socket and eventfd, pauses the controller, sends what is
  still dirty, the device state and the manifest with every fd, and waits for
  the destination's verdict.  Refused: it resumes, nothing lost.  Accepted: it
  lets go of its copies without a word to the clients, says ``go``, answers
  the operator with the figures and stops its loop (the process exits).
* :class:`HandoffSink` (``handoff.accept``), in an idle process with the same
  device configuration.  It verifies the whole stream before adopting
  anything.  A refusal before adoption leaves it idle and serving as before.
  Once it has adopted (connections, memory, eventfds, listeners, controller
  state), it serves only after the source's ``go`` (or the source's end);
  should the source abort after that, it lets go of the adopted copies the
  same silent way and exits, so nothing is ever served by two processes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError
from appliance.protocol_common import close_quietly
from appliance.runtime import unix
from appliance.runtime.control import ControlClient
from appliance.runtime.handoff.frames import (
    ABORT,
    GO,
    HANDOFF_VERSION,
    MAX_FDS_PER_FRAME,
    FrameHead,
    FrameKind,
    HandoffError,
    Manifest,
    frame,
    handoff_record,
    parse_handoff,
    parse_head,
)
from appliance.runtime.listener import Claim, ListenerError, listen
from appliance.vfio_user.migration_stream import (
    HeaderFlag,
    RecordType,
    StreamReader,
    StreamWriter,
    dirty_round,
)

if TYPE_CHECKING:
    from appliance.runtime.app import Appliance

log = logging.getLogger("appliance.handoff")

TIMEOUT = 30.0  # seconds for any one step of the peer
PRECOPY_CHUNK = 4 << 20  # bytes of records between two loop passes
PRECOPY_MAX_ROUNDS = 8
PRECOPY_STOP_BYTES = 8 << 20  # stop pre-copying once this little is dirty
DEVICE_RECORDS = frozenset({RecordType.PCI_CONFIG, RecordType.MSIX, RecordType.DEVICE_STATE,
                            RecordType.NAMESPACE_BLOCKS})


def image_ids(app: Appliance) -> list[list[int]]:
    """(nsid, st_dev, st_ino) of every writable namespace's image."""
    assert app.controller is not None
    out = []
    for nsid, ns in sorted(app.controller.namespaces.items()):
        if not ns.read_only:
            st = os.fstat(ns.fd)
            out.append([nsid, st.st_dev, st.st_ino])
    return out


def _recv_exactly(sock: socket.socket, size: int, max_fds: int = 0) -> tuple[bytes, list[int]]:
    try:
        return unix.recv_exactly(sock, size, max_fds)
    except unix.PeerClosed as exc:
        raise HandoffError(f"peer closed the handoff channel ({exc.got} of {exc.size} bytes)") from None


def _recv_line(sock: socket.socket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            return bytes(line)
        line += chunk
        if len(line) > 65536:
            raise HandoffError("handoff verdict line too long")
    return bytes(line)


class HandoffSource:
    """The sending end: ``handoff to=CONTROL_SOCK``."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.active = False

    def run(self, to: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Move every device to the process whose control socket is ``to``.

        Returns:
            The figures: mode, rounds, bytes, fds, the pause (ms) and the
            destination's own time to adopt.

        Raises:
            HandoffError: refused or failed; this process serves on as before.
        """
        if self.active:
            raise HandoffError("a handoff is already under way")
        if self._own_socket(to):  # this loop would wait on itself for the whole timeout
            raise HandoffError(f"{to} is a socket of this process, not another appliance's")
        why = self.app.handoff_blocker()
        if why:
            raise HandoffError(f"cannot hand off now: {why}")
        self.active = True
        try:
            return self._run(to, timeout)
        finally:
            self.active = False

    def _own_socket(self, to: str) -> bool:
        """Whether ``to`` is one of the sockets this process serves."""
        cfg = self.app.cfg
        own = [cfg["control"]["socket"], cfg["storage"]["socket"],
               *(p["socket"] for p in cfg["net"]["ports"])]
        try:
            st = os.stat(to)
        except (OSError, ValueError):
            return False
        for path in own:
            try:
                mine = os.stat(path)
            except OSError:
                continue
            if (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino):
                return True
        return False

    def _run(self, to: str, timeout: float) -> dict[str, Any]:
        app = self.app
        mig = app.migratable
        try:
            with ControlClient(to, timeout=timeout) as ctl:
                reply = ctl.request("handoff.accept", version=HANDOFF_VERSION,
                                    fingerprint=mig.migration_fingerprint().hex(),
                                    images=image_ids(app), net=app.net is not None)
        except (OSError, ValueError, ConnectionError) as exc:
            raise HandoffError(f"cannot reach {to}: {exc}") from None
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise HandoffError(f"{to} refused the handoff: {err.get('message')}")
        result = reply.get("result") or {}
        shared = bool(result.get("shared"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(str(result.get("socket")))
            return self._transfer(sock, shared, to)
        except OSError as exc:
            raise HandoffError(f"handoff channel to {to}: {exc}") from None
        finally:
            sock.close()

    def _send_data(self, sock: socket.socket, writer: StreamWriter) -> int:
        sent = 0
        while writer.pending:
            data = writer.read(1 << 20)
            sock.sendall(frame(FrameKind.DATA, data))
            sent += len(data)
        return sent

    def _precopy(self, sock: socket.socket, writer: StreamWriter) -> tuple[int, int]:
        """Rounds of dirty namespace data while the devices serve; (rounds, bytes)."""
        mig, loop = self.app.migratable, self.app.loop
        rounds = sent = 0
        mig.start_tracking()
        while rounds < PRECOPY_MAX_ROUNDS:
            pending = mig.precopy_pending()
            if rounds and pending <= PRECOPY_STOP_BYTES:
                break
            rounds += 1
            writer.add(dirty_round(rounds, pending))
            budget = pending
            while budget > 0 and (records := mig.precopy_records(PRECOPY_CHUNK)):
                writer.add_all(records)
                budget -= sum(len(r.payload) for r in records)
                sent += self._send_data(sock, writer)
                loop.run_once(0)  # the devices keep serving between chunks
        return rounds, sent

    def _transfer(self, sock: socket.socket, shared: bool, to: str) -> dict[str, Any]:
        app, mig = self.app, self.app.migratable
        writer = StreamWriter(mig.migration_fingerprint(),
                              flags=HeaderFlag.SHARED_STORAGE if shared else 0)
        rounds = sent = 0
        if not shared:
            try:
                rounds, sent = self._precopy(sock, writer)
            except BaseException as exc:
                mig.stop_tracking()
                exc = _refused(sock, to, exc)
                log.warning("handoff to %s failed during pre-copy, serving on: %s", to, exc)
                raise exc from None
        why = app.handoff_blocker()  # the loop ran during pre-copy
        if why:
            mig.stop_tracking()
            raise HandoffError(f"cannot hand off now: {why}")
        started = time.monotonic()
        app.handoff_quiesce()
        try:
            # Quiescing finished the I/O in flight: what it completed (a completion
            # DMA'd by message, say) must not stay behind in this process.
            why = app.handoff_blocker()
            if why:
                raise HandoffError(f"cannot hand off now: {why}")
            if not shared:
                writer.add(dirty_round(rounds + 1, mig.precopy_pending(), final=True))
                while records := mig.precopy_records(PRECOPY_CHUNK):
                    writer.add_all(records)
                mig.stop_tracking()
            writer.add_all(mig.save_state())
            fds: list[int] = []
            manifest = app.handoff_export(fds)  # its version and fd count set
            writer.add(handoff_record(manifest))
            writer.finish()
            for i in range(0, len(fds), MAX_FDS_PER_FRAME):
                part = fds[i:i + MAX_FDS_PER_FRAME]
                unix.send_message(sock, frame(FrameKind.FDS, nfds=len(part)), part)
            sent += self._send_data(sock, writer)
            sock.sendall(frame(FrameKind.DONE))
            verdict = _recv_line(sock)
            if not verdict:
                raise HandoffError(f"{to} closed the handoff channel without a verdict")
            answer = json.loads(verdict)
            if not answer.get("ok"):
                raise HandoffError(f"{to} refused the handoff: {answer.get('error')}")
        except BaseException as exc:
            exc = _refused(sock, to, exc)
            try:
                sock.sendall(ABORT)
            except OSError:
                pass
            if not shared:
                mig.stop_tracking()
            app.handoff_resume()
            log.warning("handoff to %s failed, serving on: %s", to, exc)
            raise exc from None
        app.handoff_release()
        try:
            sock.sendall(GO)
        except OSError as exc:  # the destination went away after adopting: nothing to undo
            log.error("handoff: could not confirm to %s: %s", to, exc)
        pause_ms = (time.monotonic() - started) * 1000
        log.info("handed off to %s: %d fds, %d stream bytes, pause %.1f ms", to, len(fds),
                 writer.bytes_written, pause_ms)
        return {"to": to, "mode": "shared-storage" if shared else "full", "rounds": rounds,
                "stream_bytes": writer.bytes_written, "data_bytes": sent, "fds": len(fds),
                "pause_ms": round(pause_ms, 3), "adopt_ms": answer.get("adopt_ms")}


class HandoffSink:
    """The receiving end: ``handoff.accept``, then the one-shot channel."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.listener: socket.socket | None = None
        self.claim: Claim | None = None  # the channel socket's lock
        self.path = ""
        self.shared = False
        self._serial = 0

    def accept(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check the offer and open the channel's socket.

        Raises:
            HandoffError: another version or device configuration, this
                process is not idle, or a handoff is already pending.
        """
        app = self.app
        if args.get("version") != HANDOFF_VERSION:
            raise HandoffError(f"handoff version {args.get('version')!r}, this side speaks "
                               f"{HANDOFF_VERSION}")
        if self.listener is not None:
            raise HandoffError("a handoff is already pending here")
        if args.get("fingerprint") != app.migratable.migration_fingerprint().hex():
            raise HandoffError("device configuration differs (fingerprint): "
                               "the storage sections must match")
        if bool(args.get("net")) != (app.net is not None):
            raise HandoffError("net configuration differs: one side has no net ports")
        why = app.handoff_not_idle()
        if why:
            raise HandoffError(f"this process is not idle: {why}")
        self.shared = args.get("images") == image_ids(app)
        self._serial += 1
        self.path = os.path.join(app.cfg["run_dir"], f"handoff-{os.getpid()}-{self._serial}.sock")
        try:
            listener, self.claim = listen(self.path, 1)
        except ListenerError as exc:
            raise HandoffError(f"handoff channel: {exc}") from None
        self.listener = listener
        app.loop.add_reader(listener.fileno(), self._incoming)
        serial = self._serial
        app.loop.call_later(TIMEOUT, lambda: self._expire(serial))
        return {"socket": self.path, "shared": self.shared}

    def _expire(self, serial: int) -> None:
        if self.listener is not None and serial == self._serial:
            log.warning("handoff: nobody came to %s; closing it", self.path)
            self._close_listener()

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.app.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        if self.claim is not None:
            self.claim.close()
            self.claim = None

    def _incoming(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._close_listener()
        conn.settimeout(TIMEOUT)
        try:
            self._receive(conn)
        finally:
            conn.close()

    def _receive(self, conn: socket.socket) -> None:
        app, mig = self.app, self.app.migratable
        started = 0.0
        fds: list[int] = []
        try:
            manifest = self._read_stream(conn, fds)
            started = time.monotonic()
            app.handoff_check(manifest, fds)
        except Exception as exc:  # whatever it is, nothing was adopted yet: refuse
            if not isinstance(exc, (ApplianceError, OSError, ValueError)):
                log.exception("handoff: unexpected error before adoption")
                exc = HandoffError(f"{type(exc).__name__}: {exc}")
            mig.abort_restore()
            for fd in fds:
                close_quietly(fd)
            log.warning("handoff refused: %s", exc)
            _send_quietly(conn, {"ok": False, "error": str(exc)})
            return
        try:
            app.handoff_adopt(manifest, fds)
        except Exception as exc:  # noqa: BLE001 - half adopted: let go silently and leave
            log.error("handoff: adopting failed (%s); letting go and exiting", exc)
            _send_quietly(conn, {"ok": False, "error": f"adopting failed: {exc}"})
            app.handoff_release()
            app.loop.stop()
            return
        finally:
            for fd in fds:
                close_quietly(fd)
        adopt_ms = round((time.monotonic() - started) * 1000, 3)
        _send_quietly(conn, {"ok": True, "adopt_ms": adopt_ms})
        try:
            verdict = _recv_line(conn)
        except OSError:
            verdict = b""
        if verdict == ABORT:
            log.error("handoff: the source aborted after adoption; letting go and exiting")
            app.handoff_release()
            app.loop.stop()
            return
        if verdict not in (GO, b""):
            log.warning("handoff: unexpected verdict %r; taking it as go", verdict[:40])
        app.handoff_start()
        log.info("handoff: serving what the source handed over (adopted in %.1f ms)", adopt_ms)

    def _read_stream(self, conn: socket.socket, fds: list[int]) -> Manifest:
        mig = self.app.migratable
        reader = StreamReader(mig.migration_fingerprint(),
                              HeaderFlag.SHARED_STORAGE if self.shared else 0)
        manifest: Manifest | None = None
        while True:
            raw, got = _recv_exactly(conn, FrameHead.SIZE, MAX_FDS_PER_FRAME)
            fds += got
            head = parse_head(raw, len(got))
            if head.kind == FrameKind.DONE:
                break
            if head.kind == FrameKind.FDS:
                continue
            payload, _ = _recv_exactly(conn, head.length)
            for record in reader.feed(payload):
                if record.type == RecordType.HANDOFF:
                    manifest = parse_handoff(record, len(fds))
                elif record.type in DEVICE_RECORDS:
                    mig.load_records([record])
        reader.check_complete()
        if manifest is None:
            raise HandoffError("the stream carried no HANDOFF record")
        return manifest


def _refused(sock: socket.socket, to: str, exc: BaseException) -> BaseException:
    """``exc``, or the destination's refusal when that is why sending failed.

    A destination that refuses the stream says why and closes the channel
    while the source may still be sending; the source's send then fails
    (EPIPE), and the reason is already in its receive buffer.
    """
    if not isinstance(exc, OSError):
        return exc
    try:
        sock.setblocking(False)
        line = _recv_line(sock)
        answer = json.loads(line) if line.endswith(b"\n") else None
    except (OSError, ValueError):
        return exc
    if isinstance(answer, dict) and answer.get("ok") is False:
        return HandoffError(f"{to} refused the handoff: {answer.get('error')}")
    return exc


def _send_quietly(conn: socket.socket, answer: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(answer).encode() + b"\n")
    except OSError as exc:
        log.warning("handoff: could not answer the source: %s", exc)
