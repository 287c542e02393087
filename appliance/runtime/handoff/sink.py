"""The receiving end of a live handoff: ``handoff.accept``, then the channel (runtime layer).

:class:`HandoffSink` answers ``handoff.accept`` in an idle process with the
same device configuration: it opens a one-shot socket and hands the
connection that comes to an :class:`Incoming`, which runs in the event loop:

* ``READING``: frames as the source sends them, read as they come (at most
  :data:`READS_PER_PASS` reads per loop pass, each at most one frame head or
  1 MiB of payload, fds only with a frame head and at most
  :data:`MAX_HANDOFF_FDS` in all).  Device records are loaded as they are
  verified; the HANDOFF record is the manifest.
* At DONE the whole stream is checked, then everything the adopt would refuse
  is refused first (``Appliance.handoff_check``), so a refusal leaves this
  process idle and unchanged and the source resumes.  Then the adopt
  (connections, memory, eventfds, listeners, controller state) and
  ``{"ok": true}``.  Nothing adopted is served yet.
* ``VERDICT``: the source's ``go`` (or its end, or silence for the timeout:
  it has let go) starts serving; its ``abort`` makes this process
  let go of the adopted copies the same silent way and exit, so nothing is
  ever served by two processes.

Control commands that would change a device are refused from the accept to
the end (``Target.busy``); a source that makes no progress for the timeout
it named in ``handoff.accept`` (default ``TIMEOUT``, 30 s) is refused.  The loop never waits on the source.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError, RemoteProtocolError
from appliance.protocol_common import close_quietly
from appliance.runtime import unix
from appliance.runtime.handoff.channel import TIMEOUT, ChannelEnd, image_ids
from appliance.runtime.handoff.frames import (
    ABORT,
    GO,
    HANDOFF_VERSION,
    MAX_FDS_PER_FRAME,
    FrameHead,
    FrameKind,
    HandoffError,
    Manifest,
    parse_handoff,
    parse_head,
)
from appliance.runtime.listener import Claim, ListenerError, listen
from appliance.vfio_user.migration_stream import (
    DEVICE_RECORDS,
    HeaderFlag,
    RecordType,
    StreamReader,
)

if TYPE_CHECKING:
    from appliance.runtime.app import Appliance

log = logging.getLogger("appliance.handoff")

READS_PER_PASS = 16
MAX_READ = 1 << 20
MAX_HANDOFF_FDS = 4096
MAX_LINE = 1 << 16
BUSY = "a live handoff is arriving"


class HandoffSink:
    """The destination: ``handoff.accept``, then one :class:`Incoming` at a time."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.listener: socket.socket | None = None
        self.claim: Claim | None = None  # the channel socket's lock
        self.path = ""
        self.shared = False
        self.current: Incoming | None = None
        self.timeout = TIMEOUT
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
        if self.listener is not None or self.current is not None:
            raise HandoffError("a handoff is already pending here")
        if args.get("fingerprint") != app.migratable.migration_fingerprint().hex():
            raise HandoffError("device configuration differs (fingerprint): "
                               "the storage sections must match")
        if bool(args.get("net")) != (app.net is not None):
            raise HandoffError("net configuration differs: one side has no net ports")
        why = app.handoff_not_idle()
        if why:
            raise HandoffError(f"this process is not idle: {why}")
        # Shared: every image the source still has is ours too (it may have deleted
        # configured namespaces; the ones it created are opened by name).
        offered, own = args.get("images"), image_ids(app)
        self.shared = isinstance(offered, list) and all(entry in own for entry in offered)
        self._serial += 1
        self.path = os.path.join(app.cfg.run_dir, f"handoff-{os.getpid()}-{self._serial}.sock")
        try:
            listener, self.claim = listen(self.path, 1)
        except ListenerError as exc:
            raise HandoffError(f"handoff channel: {exc}") from None
        self.listener = listener
        self.timeout = float(args.get("timeout") or TIMEOUT)  # the source's own
        app.loop.add_reader(listener.fileno(), self._incoming)
        serial = self._serial
        app.loop.call_later(self.timeout, lambda: self._expire(serial))
        app.control.target.busy = BUSY
        return {"socket": self.path, "shared": self.shared}

    def _expire(self, serial: int) -> None:
        if self.listener is not None and serial == self._serial:
            log.warning("handoff: nobody came to %s; closing it", self.path)
            self._close_listener()
            self.app.control.target.busy = ""

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
        except OSError as exc:  # (it would fail again on every loop pass): no handoff
            log.warning("handoff: accepting on %s failed (%s); closing it", self.path, exc)
            self._close_listener()
            self.app.control.target.busy = ""
            return
        self._close_listener()
        self.current = Incoming(self.app, conn, self.shared, self._done, self.timeout)

    def _done(self) -> None:
        self.current = None
        self.app.control.target.busy = ""


class Phase(enum.Enum):
    READING = "reading"
    VERDICT = "verdict"
    DONE = "done"


class Incoming:
    """One handoff arriving (see the module docstring)."""

    def __init__(self, app: Appliance, conn: socket.socket, shared: bool,
                 done: Callable[[], None], timeout: float = TIMEOUT) -> None:
        self.app = app
        self.done = done
        self.phase = Phase.READING
        self.reader = StreamReader(app.migratable.migration_fingerprint(),
                                   HeaderFlag.SHARED_STORAGE if shared else 0)
        self.fds: list[int] = []  # every fd received, in order (the manifest's index)
        self.head: FrameHead | None = None  # the DATA frame whose payload is being read
        self.unit = FrameHead.SIZE  # bytes of the head or payload being read
        self.buf = bytearray()
        self.head_fds = 0  # fds that came with the head being read
        self.manifest: Manifest | None = None
        self.adopt_ms = 0.0
        self.end = ChannelEnd(app.loop, conn, self._readable, self._failed, timeout=timeout)

    # ------------------------------------------------------------ READING
    def _readable(self) -> None:
        if self.phase is Phase.VERDICT:
            self._read_verdict()
            return
        try:
            for _ in range(READS_PER_PASS):
                if not self._read_some():
                    return
        except Exception as exc:  # noqa: BLE001 - whatever it is, nothing was adopted yet: refuse
            self._refuse(exc)

    def _read_some(self) -> bool:
        """One read and what it completes; False once there is nothing more now.

        Raises:
            HandoffError, StreamError, ...: the stream is refused.
        """
        wanted = min(self.unit - len(self.buf), MAX_READ)
        max_fds = MAX_FDS_PER_FRAME if self.head is None else 0
        try:
            chunk, got = unix.recv_chunk(self.end.sock, wanted, max_fds, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        self.fds += got
        self.head_fds += len(got)
        if len(self.fds) > MAX_HANDOFF_FDS:
            raise HandoffError(f"more than {MAX_HANDOFF_FDS} fds on the handoff channel")
        if not chunk:
            raise HandoffError(f"peer closed the handoff channel ({len(self.buf)} of "
                               f"{self.unit} bytes)")
        self.end.progress()
        self.buf += chunk
        if len(self.buf) < self.unit:
            return True
        data = bytes(self.buf)
        self.buf.clear()
        if self.head is not None:  # a DATA frame's payload
            self.head, self.unit = None, FrameHead.SIZE
            self._records(data)
            return True
        head = parse_head(data, self.head_fds)
        self.head_fds = 0
        if head.kind == FrameKind.DONE:
            self._complete()
            return False
        if head.kind == FrameKind.DATA and head.length:
            self.head, self.unit = head, head.length
        return True

    def _records(self, payload: bytes) -> None:
        mig = self.app.migratable
        for record in self.reader.feed(payload):
            if record.type == RecordType.HANDOFF:
                self.manifest = parse_handoff(record, len(self.fds))
            elif record.type in DEVICE_RECORDS:
                mig.load_records([record])

    def _complete(self) -> None:
        """DONE: check everything, adopt, say ok (or refuse: nothing adopted)."""
        app = self.app
        self.reader.check_complete()
        if self.manifest is None:
            raise HandoffError("the stream carried no HANDOFF record")
        manifest, fds = self.manifest, self.fds
        started = time.monotonic()
        app.handoff_check(manifest, fds)  # raises: refused before anything is adopted
        self.phase = Phase.VERDICT
        try:
            app.handoff_adopt(manifest, fds)
        except Exception as exc:  # noqa: BLE001 - half adopted: let go silently and leave
            log.error("handoff: adopting failed (%s); letting go and exiting", exc)
            self._say({"ok": False, "error": f"adopting failed: {exc}"})
            self._finish()
            app.handoff_release()
            app.loop.stop()
            return
        finally:
            self._close_fds()
        self.adopt_ms = round((time.monotonic() - started) * 1000, 3)
        self._say({"ok": True, "adopt_ms": self.adopt_ms})

    # ------------------------------------------------------------ VERDICT
    def _read_verdict(self) -> None:
        try:
            data = self.end.sock.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.buf += data
        if data and b"\n" not in self.buf and len(self.buf) <= MAX_LINE:
            self.end.progress()
            return
        line, newline, _ = bytes(self.buf).partition(b"\n")
        self._verdict(line + newline if newline else line[:40])

    def _verdict(self, verdict: bytes) -> None:
        """``go`` (or the source's end): serve; ``abort``: let go and exit."""
        app = self.app
        self._finish()
        if verdict == ABORT:
            log.error("handoff: the source aborted after adoption; letting go and exiting")
            app.handoff_release()
            app.loop.stop()
            return
        if verdict not in (GO, b""):
            log.warning("handoff: unexpected verdict %r; taking it as go", verdict[:40])
        app.handoff_start()
        log.info("handoff: serving what the source handed over (adopted in %.1f ms)",
                 self.adopt_ms)

    # ------------------------------------------------------------ the end
    def _failed(self, exc: OSError) -> None:
        """The channel failed (a send, or no progress for ``TIMEOUT`` s)."""
        if self.phase is Phase.VERDICT:
            self._read_verdict()  # a word that came after the loop last looked decides
        if self.phase is Phase.VERDICT:  # the source went quiet after our ok: it let go
            log.warning("handoff: no word from the source (%s); taking it as go", exc)
            self._verdict(b"")
        elif self.phase is Phase.READING:
            self._refuse(HandoffError(f"handoff channel: {exc}"))

    def _refuse(self, exc: BaseException) -> None:
        """Nothing was adopted: forget what was loaded, close every fd, say why."""
        if not isinstance(exc, (ApplianceError, OSError, ValueError)):
            log.exception("handoff: unexpected error before adoption")
            exc = HandoffError(f"{type(exc).__name__}: {exc}")
        elif isinstance(exc, RemoteProtocolError):
            exc = HandoffError(str(exc))
        self._close_fds()
        try:  # (whatever forgetting raises, the source is told and this process is idle)
            self.app.migratable.abort_restore()
        finally:
            log.warning("handoff refused: %s", exc)
            self._say({"ok": False, "error": str(exc)})
            self._finish()

    def _say(self, answer: dict[str, Any]) -> None:
        """One line to the source, now (it is short and the source reads it;
        a source that does not is told nothing, and that is logged)."""
        if self.end.closed:
            return
        try:
            self.end.sock.send(json.dumps(answer).encode() + b"\n", socket.MSG_DONTWAIT)
        except OSError as exc:
            log.warning("handoff: could not answer the source: %s", exc)

    def _close_fds(self) -> None:
        for fd in self.fds:
            close_quietly(fd)
        self.fds = []

    def _finish(self) -> None:
        if self.phase is Phase.DONE:
            return
        self.phase = Phase.DONE
        self.end.close()
        self.done()
