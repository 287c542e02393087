"""The sending end of a live handoff: ``handoff to=CONTROL_SOCK`` (runtime layer).

:class:`HandoffSource` starts one :class:`Outgoing` handoff, which runs in the
event loop as a sequence of :class:`Phase` steps, each driven by what the
other process does (a reply, writability) or by a loop pass, never by
waiting on it:

1. ``ASKING``: ``handoff.accept`` on the destination's control socket (its
   answer names the channel's socket and whether storage is shared).
2. ``PRECOPY`` (separate images only): rounds of dirty namespace data while
   the devices keep serving.  A chunk of records is added only while less
   than :data:`~appliance.runtime.handoff.channel.LOW_WATER` waits unsent, so
   a slow destination slows the pre-copy instead of growing the queue.
3. ``FINAL``: the devices stop (no socket or eventfd of theirs is read, the
   controller pauses); what is still dirty, the device state, the manifest
   and every fd go out, then DONE.  Control commands that would change a
   device are refused meanwhile (``Target.busy``).
4. ``VERDICT``: the destination's one line.  Refused (or any failure before
   it): the devices resume, nothing lost.  Accepted: this process lets go of
   its copies, says ``go``, answers the operator and stops its loop.

A destination that makes no progress for ``TIMEOUT`` seconds fails the step
it is in; the devices serve on meanwhile (before FINAL) or resume after.
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

from appliance.control.events import HANDOFF_PROGRESS
from appliance.runtime.handoff.channel import (
    LOW_WATER,
    TIMEOUT,
    ChannelEnd,
    connect,
    image_ids,
)
from appliance.runtime.handoff.frames import (
    ABORT,
    GO,
    HANDOFF_VERSION,
    MAX_FDS_PER_FRAME,
    FrameKind,
    HandoffError,
    frame,
    handoff_record,
)
from appliance.vfio_user.migration_stream import HeaderFlag, StreamWriter, dirty_round

if TYPE_CHECKING:
    from appliance.runtime.app import Appliance

log = logging.getLogger("appliance.handoff")

PRECOPY_CHUNK = 1 << 20  # bytes of records added at a time (read from the image on the loop)
PRECOPY_MAX_ROUNDS = 8
PRECOPY_STOP_BYTES = 8 << 20  # stop pre-copying once this little is dirty
MAX_LINE = 1 << 16  # the control reply and the verdict are one short line each
BUSY = "a live handoff is under way"

#: (the figures, None) once handed off, or (None, why) when this process serves on
Finished = Callable[[dict[str, Any] | None, HandoffError | None], None]


class Phase(enum.Enum):
    ASKING = "asking"
    PRECOPY = "pre-copy"
    FINAL = "final"
    VERDICT = "verdict"
    DONE = "done"


class HandoffSource:
    """Starts handoffs, one at a time."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.current: Outgoing | None = None

    @property
    def active(self) -> bool:
        return self.current is not None

    def start(self, to: str, finished: Finished, timeout: float = TIMEOUT) -> None:
        """Start moving every device to the process whose control socket is ``to``.

        ``finished`` is called once, from the loop, with the figures (mode,
        rounds, bytes, fds, the pause in ms, the destination's time to adopt)
        or with the reason this process serves on.

        Raises:
            HandoffError: refused at once (already handing off, ``to`` is this
                process's own socket, a device is busy, ``to`` unreachable).
        """
        if self.current is not None:
            raise HandoffError("a handoff is already under way")
        if self._own_socket(to):  # the answer would never come: this loop asks itself
            raise HandoffError(f"{to} is a socket of this process, not another appliance's")
        why = self.app.handoff_blocker()
        if why:
            raise HandoffError(f"cannot hand off now: {why}")

        def done(result: dict[str, Any] | None, error: HandoffError | None) -> None:
            self.current = None
            self.app.control.target.busy = ""
            finished(result, error)

        self.current = Outgoing(self.app, to, timeout, done)
        self.app.control.target.busy = BUSY
        try:
            self.current.ask()
        except BaseException:  # nothing started (whatever failed): nothing stays busy
            if self.current.control is not None:
                self.current.control.close()
            self.current = None
            self.app.control.target.busy = ""
            raise

    def _own_socket(self, to: str) -> bool:
        """Whether ``to`` is one of the sockets this process serves."""
        cfg = self.app.cfg
        own = [cfg.control.socket, cfg.storage.socket, *(p.socket for p in cfg.net.ports)]
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


class Outgoing:
    """One handoff, from the question to the verdict (see the module docstring)."""

    def __init__(self, app: Appliance, to: str, timeout: float, finished: Finished) -> None:
        self.app = app
        self.to = to
        self.timeout = timeout
        self.finished = finished
        self.phase = Phase.ASKING
        self.control: ChannelEnd | None = None  # the destination's control socket
        self.chan: ChannelEnd | None = None  # the handoff channel
        self.inbuf = bytearray()
        self.shared = False
        self.tracking = False  # the namespaces' dirty tracking is on
        self.paused = False  # the devices are quiesced
        self.producing = False
        self.writer = StreamWriter(b"")  # (the real one once the channel is open)
        self.rounds = self.sent = self.budget = self.fds = 0
        self.started = 0.0

    # ------------------------------------------------------------ ASKING
    def ask(self) -> None:
        """Send ``handoff.accept`` to the destination's control socket.

        Raises:
            HandoffError: nothing listens there.
        """
        app = self.app
        args = {"version": HANDOFF_VERSION,
                "fingerprint": app.migratable.migration_fingerprint().hex(),
                "images": image_ids(app), "net": app.net is not None, "timeout": self.timeout}
        try:
            sock = connect(self.to)
        except (OSError, ValueError) as exc:
            raise HandoffError(f"cannot reach {self.to}: {exc}") from None
        self.control = ChannelEnd(app.loop, sock, self._control_readable,
                                  lambda exc: self._fail(HandoffError(f"cannot reach {self.to}: {exc}")),
                                  timeout=self.timeout)
        self.control.send(json.dumps({"id": 1, "cmd": "handoff.accept", "args": args}).encode()
                          + b"\n")

    def _control_readable(self) -> None:
        assert self.control is not None
        line = self._read_line(self.control, "control reply")
        while line is not None and line.startswith(b'{"QMP":'):  # the greeting: the reply follows
            if b"\n" not in self.inbuf:
                return
            line, _, rest = bytes(self.inbuf).partition(b"\n")
            self.inbuf = bytearray(rest)
        if line is None:
            return
        self.control.close()
        self.inbuf.clear()
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            reply = None
        if not isinstance(reply, dict):
            self._fail(HandoffError(f"cannot reach {self.to}: its control reply is not a JSON object"))
            return
        if not reply.get("ok"):
            err = reply.get("error")
            message = err.get("message") if isinstance(err, dict) else err
            self._fail(HandoffError(f"{self.to} refused the handoff: {message}"))
            return
        result = reply.get("result")
        result = result if isinstance(result, dict) else {}
        self.shared = bool(result.get("shared"))
        try:
            sock = connect(str(result.get("socket")))
        except (OSError, ValueError) as exc:
            self._fail(HandoffError(f"handoff channel to {self.to}: {exc}"))
            return
        self.chan = ChannelEnd(self.app.loop, sock, self._channel_readable, self._channel_failed,
                               on_sent=self._produce, timeout=self.timeout)
        mig = self.app.migratable
        self.writer = StreamWriter(mig.migration_fingerprint(),
                                   flags=HeaderFlag.SHARED_STORAGE if self.shared else 0)
        if self.shared:
            try:
                self._pause()
            except HandoffError as exc:
                self._fail(exc)
            return
        mig.start_tracking()
        self.tracking = True
        self.phase = Phase.PRECOPY
        self._produce()

    # ------------------------------------------------------------ PRECOPY, FINAL
    def _produce(self) -> None:
        """Add the next records while the queue is short (called once the
        channel took some, and by a loop pass after each chunk)."""
        if self.producing or self.chan is None or self.chan.closed:
            return
        if self.chan.queued >= LOW_WATER or self.phase not in (Phase.PRECOPY, Phase.FINAL):
            return
        self.producing = True
        try:
            more = self._precopy_chunk() if self.phase is Phase.PRECOPY else self._final_chunk()
        except Exception as exc:  # whatever it is, the devices serve on here
            if not isinstance(exc, HandoffError):
                log.exception("handoff: unexpected error")
                exc = HandoffError(f"{type(exc).__name__}: {exc}")
            self._fail(exc)
            return
        finally:
            self.producing = False
        if more and self.chan is not None and not self.chan.closed:
            self.app.loop.call_later(0, self._produce)  # the devices serve in between

    def _precopy_chunk(self) -> bool:
        """One chunk of the current round (or the next round, or the pause)."""
        mig = self.app.migratable
        if self.budget <= 0:
            assert self.chan is not None
            if self.chan.queued:  # the round goes out first: what is dirty then decides
                return False  # (the channel calls again once it took the rest)
            pending = mig.precopy_pending()
            if (self.rounds and pending <= PRECOPY_STOP_BYTES) or self.rounds >= PRECOPY_MAX_ROUNDS:
                self._pause()
                return False
            self.rounds += 1
            self.writer.add(dirty_round(self.rounds, pending))
            self.app.control.emit(HANDOFF_PROGRESS, {"phase": "precopy", "round": self.rounds,
                                                     "pending_bytes": pending,
                                                     "sent_bytes": self.sent})
            self.budget = pending
        records = mig.precopy_records(PRECOPY_CHUNK)
        if records:
            self.writer.add_all(records)
            self.budget -= sum(len(r.payload) for r in records)
        else:
            self.budget = 0
        self._send_data()
        return True

    def _pause(self) -> None:
        """Stop the devices and go on with what is left (``FINAL``).

        Raises:
            HandoffError: a device cannot move now (checked again once quiet).
        """
        app = self.app
        why = app.handoff_blocker()  # the loop ran during pre-copy
        if why:
            raise HandoffError(f"cannot hand off now: {why}")
        self.started = time.monotonic()
        app.handoff_quiesce()
        self.paused = True
        app.control.emit(HANDOFF_PROGRESS, {"phase": "paused", "round": self.rounds,
                                            "pending_bytes": app.migratable.precopy_pending(),
                                            "sent_bytes": self.sent})
        # Quiescing finished the I/O in flight: what it completed (a completion
        # DMA'd by message, say) must not stay behind in this process.
        why = app.handoff_blocker()
        if why:
            raise HandoffError(f"cannot hand off now: {why}")
        self.phase = Phase.FINAL
        if not self.shared:
            self.writer.add(dirty_round(self.rounds + 1, app.migratable.precopy_pending(),
                                        final=True))
        self.app.loop.call_later(0, self._produce)

    def _final_chunk(self) -> bool:
        """The rest of the dirty data a chunk at a time, then in one step (no
        loop pass between the state and the manifest that names its fds) the
        device state, the manifest, the fds and DONE."""
        app, mig = self.app, self.app.migratable
        assert self.chan is not None
        if self.tracking:
            records = mig.precopy_records(PRECOPY_CHUNK)
            if records:
                self.writer.add_all(records)
                self._send_data()
                return True
            mig.stop_tracking()
            self.tracking = False
        self.writer.add_all(mig.save_state())
        fds: list[int] = []
        manifest = app.handoff_export(fds)  # (with its version and fd count)
        self.writer.add(handoff_record(manifest))
        self.writer.finish()
        self.fds = len(fds)
        self.phase = Phase.VERDICT
        for i in range(0, len(fds), MAX_FDS_PER_FRAME):
            part = fds[i:i + MAX_FDS_PER_FRAME]
            self.chan.send(frame(FrameKind.FDS, nfds=len(part)), part)
        self._send_data()
        self.chan.send(frame(FrameKind.DONE))
        return False

    def _send_data(self) -> None:
        assert self.chan is not None
        while self.writer.pending and not self.chan.closed:
            data = self.writer.read(1 << 20)
            self.chan.send(frame(FrameKind.DATA, data))
            self.sent += len(data)

    # ------------------------------------------------------------ VERDICT
    def _read_line(self, end: ChannelEnd, what: str) -> bytes | None:
        """A whole line from ``end``, or None (more to come, or failed)."""
        try:
            data = end.sock.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self._peer_closed(end)
            return None
        end.progress()
        self.inbuf += data
        if b"\n" not in self.inbuf:
            if len(self.inbuf) > MAX_LINE:
                self._fail(HandoffError(f"{self.to}: {what} longer than {MAX_LINE} bytes"))
            return None
        line, _, rest = bytes(self.inbuf).partition(b"\n")
        self.inbuf = bytearray(rest)
        return line

    def _peer_closed(self, end: ChannelEnd) -> None:
        """The other process closed its end: what is still unsent fails on its
        own (EPIPE); with everything sent, no verdict will come."""
        end.read(False)
        if end is self.control:
            self._fail(HandoffError(f"cannot reach {self.to}: control socket closed"))
        elif self.phase is Phase.VERDICT and not end.queued:
            self._fail(HandoffError(f"{self.to} closed the handoff channel without a verdict"))

    def _channel_readable(self) -> None:
        assert self.chan is not None
        line = self._read_line(self.chan, "verdict")
        if line is None:
            return
        try:
            answer = json.loads(line)
        except (ValueError, RecursionError):
            answer = None
        if not isinstance(answer, dict):
            self._fail(HandoffError(f"{self.to}: the verdict is not a JSON object"))
        elif not answer.get("ok"):
            self._fail(HandoffError(f"{self.to} refused the handoff: {answer.get('error')}"))
        elif self.phase is not Phase.VERDICT or self.chan.queued:
            self._fail(HandoffError(f"{self.to} accepted a stream it has not received"))
        else:
            self._succeed(answer)

    def _channel_failed(self, exc: OSError) -> None:
        """A send failed or the destination stalled.  A destination that refused
        the stream says why and closes while this side may still be sending:
        the reason, already in the receive buffer, is the better error."""
        assert self.chan is not None
        reason: HandoffError = HandoffError(f"handoff channel to {self.to}: {exc}")
        while True:
            try:
                data = self.chan.sock.recv(MAX_LINE)
            except OSError:
                break
            if not data:
                break
            self.inbuf += data
        line = bytes(self.inbuf).partition(b"\n")[0] if b"\n" in self.inbuf else b""
        try:
            answer = json.loads(line) if line else None
        except (ValueError, RecursionError):
            answer = None
        if isinstance(answer, dict) and answer.get("ok") is False:
            reason = HandoffError(f"{self.to} refused the handoff: {answer.get('error')}")
        self._fail(reason)

    # ------------------------------------------------------------ the end
    def _succeed(self, answer: dict[str, Any]) -> None:
        app = self.app
        assert self.chan is not None
        self.phase = Phase.DONE
        try:  # (whatever letting go raises, the devices live there now: go, and answer)
            app.handoff_release()
        finally:
            try:
                self.chan.sock.send(GO)
            except OSError as exc:  # the destination went away after adopting: nothing to undo
                log.error("handoff: could not confirm to %s: %s", self.to, exc)
            self.chan.close()
            pause_ms = (time.monotonic() - self.started) * 1000
            log.info("handed off to %s: %d fds, %d stream bytes, pause %.1f ms", self.to,
                     self.fds, self.writer.bytes_written, pause_ms)
            self.finished({"to": self.to, "mode": "shared-storage" if self.shared else "full",
                           "rounds": self.rounds, "stream_bytes": self.writer.bytes_written,
                           "data_bytes": self.sent, "fds": self.fds,
                           "pause_ms": round(pause_ms, 3), "adopt_ms": answer.get("adopt_ms")},
                          None)

    def _fail(self, exc: HandoffError) -> None:
        """Undo what this handoff changed here and say why; the devices serve on."""
        if self.phase is Phase.DONE:
            return
        phase, self.phase = self.phase, Phase.DONE
        app = self.app
        if self.chan is not None and not self.chan.closed and phase in (Phase.FINAL, Phase.VERDICT):
            try:  # a destination that adopted lets go again
                self.chan.sock.send(ABORT, socket.MSG_DONTWAIT)
            except OSError:
                pass
        unsent = self.chan.queued if self.chan is not None else 0
        try:  # (whatever undoing raises, the operator is answered and busy cleared)
            for end in (self.control, self.chan):
                if end is not None:
                    end.close()
            if self.tracking:
                self.tracking = False
                app.migratable.stop_tracking()
            if self.paused:
                self.paused = False
                app.handoff_resume()
            if phase is not Phase.ASKING:
                log.warning("handoff to %s failed (%s, %d bytes unsent), serving on: %s",
                            self.to, phase.value, unsent, exc)
        finally:
            self.finished(None, exc)
