"""vfio-user migration v2 for one connection: DEVICE_FEATURE and MIG_DATA_READ/WRITE.

Theory of operation
-------------------
:class:`VfioUserMigration` is the server connection's
:class:`~appliance.vfio_user.server.MigrationHandler`.  The connection asks
:meth:`VfioUserMigration.allows` before dispatching any command (a refusal is
an EBUSY error reply) and hands commands 16-18 to
:meth:`VfioUserMigration.handle`, which returns the reply payload or raises
:class:`~appliance.vfio_user.server.Reject` with the errno for the error
reply.  It is sans-I/O like the connection; the device is reached only
through :class:`~appliance.vfio_user.migratable.Migratable` (save/restore), client
memory only through :class:`~appliance.memory.ClientMemory`'s dirty log.

Checks follow qemu/qemu docs/interop/vfio-user.rst and <linux/vfio.h>
(``vfio_ioctl_device_feature`` / ``vfio_check_feature``), in this order: the
8-byte head, reserved flag bits, GET and SET together only with PROBE, the
feature index (unknown: ENOTTY, as the kernel), the operation (unsupported:
EINVAL), ``argsz`` against what the reply needs, then the feature's data.

Device state (feature 2): a SET walks :func:`appliance.vfio_user.migration_states.path`
one arc at a time and calls the device per arc (:data:`ARC_ACTIONS`).  If an
arc's device call fails with a protocol error the device is still in the
state the arc started from, so that is the state kept and reported; an
unexpected failure leaves no valid state and moves to ERROR, which only
DEVICE_RESET leaves (:meth:`VfioUserMigration.device_reset`).

The stream (see :mod:`appliance.vfio_user.migration_stream` and docs/migration.md;
the saving side is :mod:`appliance.vfio_user.migration_saving`):

* PRE_COPY reads come in *rounds*.  The first read, and the first read
  after a short one, opens a round: a DIRTY_ROUND record carrying
  ``precopy_pending()`` is queued (after the HEADER, in round 0), then
  bulk records are added until the read is satisfied or the round's budget
  (the pending count it started with) is spent or the device has nothing
  dirty.  A read answered short ("If this is less than the requested size,
  there is no more migration data to read") closes the round; the next read
  opens the next one.  Reads of :data:`~appliance.vfio_user.migration_stream.ROUND_MARKER_SIZE`
  bytes let a client see a round's pending count before pulling its data.
* STOP_COPY reads queue a final DIRTY_ROUND, drain the remaining bulk data,
  then ``save_state()`` and END; a short read there means the stream is over.
* RESUMING writes feed a :class:`~appliance.vfio_user.migration_stream.StreamReader`
  built with this device's fingerprint; verified device records are staged
  by ``load_records``; a (non-final) DIRTY_ROUND marker calls ``round_received``
  (the device makes the rounds before durable); RESUMING -> STOP commits once
  END verified.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.errors import LocalProtocolError, StreamRefused
from appliance.memory import ClientMemory, DirtyLog
from appliance.protocol_common import Reject, require
from appliance.vfio_user import wire as w
from appliance.vfio_user.connection_state import MAX_DATA_XFER_SIZE, MIG_MAX_BITMAP_SIZE, NotYet
from appliance.vfio_user.dma_logging import DmaLog, logging_report, start_logging
from appliance.vfio_user.migration_channel import (
    ChannelFactory,
    ChannelSession,
    parse_channel_sync,
)
from appliance.vfio_user.migration_saving import SavingSession
from appliance.vfio_user.migration_states import (
    ALLOWED,
    ARCS,
    SUPPORTED_FLAGS,
    MigState,
    TransitionError,
    path,
)
from appliance.vfio_user.migration_stream import (
    DEVICE_RECORDS,
    DirtyRoundFlag,
    HeaderFlag,
    RecordType,
    StreamError,
    StreamReader,
    StreamWriter,
    parse_dirty_round,
)

if TYPE_CHECKING:
    from appliance.vfio_user.migratable import Migratable

log = logging.getLogger("appliance.vfio_user.migration")


# ------------------------------------------------------------ feature data
# The structs live in appliance.vfio_user.wire; re-exported for callers of this module.
Feature = w.Feature
MigrationInfo = w.MigrationInfo
MigStateData = w.MigStateData
DmaLoggingControl = w.DmaLoggingControl
DmaLoggingRange = w.DmaLoggingRange
DmaLoggingReport = w.DmaLoggingReport
DATA_FD_NONE = w.DATA_FD_NONE
FEATURE_FLAGS_RESERVED = ~(w.FEATURE_INDEX_MASK | w.FEATURE_GET | w.FEATURE_SET
                           | w.FEATURE_PROBE) & 0xFFFFFFFF


@dataclass(frozen=True)
class FeatureSpec:
    """What one feature supports: operations and the data sizes they need."""

    ops: int  # FEATURE_GET / FEATURE_SET bits
    get_size: int  # reply data bytes of a GET (before variable parts)
    set_size: int  # request data bytes of a SET (before variable parts)


FEATURES: dict[Feature, FeatureSpec] = {
    Feature.MIGRATION: FeatureSpec(w.FEATURE_GET, MigrationInfo.SIZE, 0),
    Feature.MIG_DEVICE_STATE: FeatureSpec(w.FEATURE_GET | w.FEATURE_SET, MigStateData.SIZE,
                                          MigStateData.SIZE),
    Feature.DMA_LOGGING_START: FeatureSpec(w.FEATURE_SET, 0, DmaLoggingControl.SIZE),
    Feature.DMA_LOGGING_STOP: FeatureSpec(w.FEATURE_SET, 0, 0),
    Feature.DMA_LOGGING_REPORT: FeatureSpec(w.FEATURE_GET, DmaLoggingReport.SIZE, 0),
    Feature.APPLIANCE_MIG_OPTIONS: FeatureSpec(w.FEATURE_GET | w.FEATURE_SET, w.MigOptions.SIZE,
                                               w.MigOptions.SIZE),
    Feature.APPLIANCE_MIG_CHANNEL: FeatureSpec(w.FEATURE_GET | w.FEATURE_SET, w.MigChannel.SIZE,
                                               w.MigChannel.SIZE),
}


C = w.Command


# ------------------------------------------------------------ arcs -> device calls
ARC_ACTIONS: dict[tuple[MigState, MigState], str] = {
    (MigState.RUNNING, MigState.STOP): "_arc_stop",
    (MigState.STOP, MigState.RUNNING): "_arc_run",
    (MigState.RUNNING, MigState.PRE_COPY): "_arc_start_saving",
    (MigState.STOP, MigState.STOP_COPY): "_arc_start_saving",
    (MigState.PRE_COPY, MigState.STOP_COPY): "_arc_stop",
    (MigState.PRE_COPY, MigState.RUNNING): "_arc_end_saving",
    (MigState.STOP_COPY, MigState.STOP): "_arc_end_saving",
    (MigState.STOP, MigState.RESUMING): "_arc_start_resuming",
    (MigState.RESUMING, MigState.STOP): "_arc_end_resuming",
}
assert set(ARC_ACTIONS) == {(a, b) for a, targets in ARCS.items() for b in targets}

class VfioUserMigration:
    """Migration state, stream and dirty logging of one vfio-user connection."""

    def __init__(self, device: Migratable, memory: ClientMemory, *,
                 max_data_xfer_size: int = MAX_DATA_XFER_SIZE,
                 max_bitmap_size: int = MIG_MAX_BITMAP_SIZE,
                 name: str = "vfio-user", channels: ChannelFactory | None = None) -> None:
        """Args:
            device: save/restore interface of the device.
            memory: the connection's client memory (its dirty log is ours).
            max_data_xfer_size: the largest MIG_DATA_READ/WRITE ``size``.
            max_bitmap_size: the largest DMA_LOGGING_REPORT bitmap, bytes.
            channels: makes data channel ends (the runtime's); None: the
                APPLIANCE_MIG_CHANNEL feature is not offered (ENOTTY).
        """
        self.device = device
        self.memory = memory
        self.max_data_xfer_size = max_data_xfer_size
        self.max_bitmap_size = max_bitmap_size
        self.name = name
        self.state = MigState.RUNNING
        #: told (old, new) whenever the state changes (the runtime sends an event)
        self.on_state: Callable[[MigState, MigState], None] | None = None
        self.options = w.MigOption(0)  # APPLIANCE_MIG_OPTIONS for the next session
        #: APPLIANCE_MIG_CHANNEL: the next session's data channel, then the session's
        self.channel = ChannelSession(channels, self._channel_progress, name)
        #: set by the runtime: runs a command again that waited for the channel (NotYet)
        self.wake: Callable[[], None] | None = None
        self.quiesced = False  # migration_stop() called and not yet undone
        self.dma_log: DmaLog | None = None
        self._saving: SavingSession | None = None
        self._reader: StreamReader | None = None
        self._resume_error: LocalProtocolError | StreamRefused | None = None
        self._save_error: Exception | None = None
        self.counters = {"bytes_read": 0, "bytes_written": 0, "rounds": 0, "transitions": 0}
        self._fds: list[int] = []  # the command's fds (only the channel SET takes one)
        self._handlers: dict[w.Command, Callable[[bytes], bytes]] = {
            C.DEVICE_FEATURE: self._feature,
            C.MIG_DATA_WRITE: self._data_write,  # (MIG_DATA_READ: handle_parts)
        }

    # ------------------------------------------------------------ MigrationHandler
    def allows(self, command: w.Command) -> bool:
        """Whether ``command`` may be dispatched in the current migration state."""
        return command in ALLOWED[self.state]

    def handle(self, command: w.Command, payload: bytes, fds: list[int] | None = None) -> bytes:
        """Answer DEVICE_FEATURE, MIG_DATA_READ or MIG_DATA_WRITE.

        ``fds``: the message's fds; the one an APPLIANCE_MIG_CHANNEL SET keeps is
        removed from the list (the connection closes the rest).

        Returns:
            The reply payload.

        Raises:
            Reject: the errno for the error reply.
            NotYet: the data channel has not caught up; nothing changed.
        """
        return b"".join(self.handle_parts(command, payload, fds))

    def handle_parts(self, command: w.Command, payload: bytes,
                     fds: list[int] | None = None) -> list[bytes | memoryview]:
        """:meth:`handle`'s reply payload as pieces in order: a MIG_DATA_READ's
        head, then views of the queued records (no copy of the data).

        Raises:
            Reject: the errno for the error reply.
            NotYet: the data channel has not caught up; nothing changed.
        """
        if command == C.MIG_DATA_READ:
            return self._data_read(payload)
        handler = self._handlers.get(command)
        if handler is None:
            raise Reject(f"{command.name} is not a migration command", errno.EINVAL)
        self._fds = fds if fds is not None else []
        try:
            return [handler(payload)]
        finally:
            self._fds = []

    def _channel_progress(self) -> None:
        if self.wake is not None:
            self.wake()

    def device_reset(self) -> None:
        """DEVICE_RESET: drop any session and return to RUNNING (also from ERROR).

        Call before the device's own reset; dirty logging is not affected.
        """
        self._drop_sessions()
        if self.quiesced:
            self.quiesced = False
            self._quietly(self.device.migration_run)
        if self.state is not MigState.RUNNING:
            log.info("%s: migration state %s -> RUNNING by DEVICE_RESET", self.name,
                     self.state.name)
        self._set_state(MigState.RUNNING)
        self.options = w.MigOption(0)
        self.channel.reset()

    def close(self) -> None:
        """The connection is closing: drop sessions, stop logging, un-quiesce."""
        self.device_reset()
        self.dma_log = None
        self.memory.dirty_log = None

    def handoff_blocker(self) -> str:
        """Why the device cannot be handed off now ("" when it can)."""
        if self.state is not MigState.RUNNING:
            return f"migration state {self.state.name}"
        if self.dma_log is not None:
            return "DMA dirty logging is on"
        if self.channel.configured:
            return "a migration data channel is set for the next session"
        return ""

    # ------------------------------------------------------------ DEVICE_FEATURE
    def _feature(self, payload: bytes) -> bytes:
        require(len(payload) >= w.DeviceFeatureHead.SIZE, errno.EINVAL, "short DEVICE_FEATURE")
        head = w.DeviceFeatureHead.unpack(payload)
        data = payload[w.DeviceFeatureHead.SIZE:]
        require(head.argsz >= w.DeviceFeatureHead.SIZE, errno.EINVAL,
                f"DEVICE_FEATURE argsz {head.argsz}")
        require(not head.flags & FEATURE_FLAGS_RESERVED, errno.EINVAL,
                f"DEVICE_FEATURE flags {head.flags:#x}")
        probe = bool(head.flags & w.FEATURE_PROBE)
        ops = head.flags & (w.FEATURE_GET | w.FEATURE_SET)
        require(probe or ops != w.FEATURE_GET | w.FEATURE_SET, errno.EINVAL,
                "GET and SET together without PROBE")
        index = head.flags & w.FEATURE_INDEX_MASK
        try:
            feature = Feature(index)
        except ValueError:
            raise Reject(f"device feature {index} is not supported", errno.ENOTTY) from None
        if feature is Feature.APPLIANCE_MIG_CHANNEL and not self.channel.offered:
            raise Reject("no migration data channel here", errno.ENOTTY)
        spec = FEATURES[feature]
        require(not ops & ~spec.ops, errno.EINVAL,
                f"{feature.name} does not support flags {head.flags:#x}")
        if probe:
            # "The reply payload must be the same as the request payload for ... probing."
            return payload
        require(ops != 0, errno.EINVAL, f"{feature.name}: neither GET nor SET")
        if ops == w.FEATURE_GET:
            require(head.argsz >= w.DeviceFeatureHead.SIZE + spec.get_size, errno.EINVAL,
                    f"{feature.name} GET argsz {head.argsz}")
            reply = self._feature_get(feature, head.argsz, data)
            # "the data is added in the data section and its length is added to argsz"
            return w.DeviceFeatureHead(argsz=w.DeviceFeatureHead.SIZE + len(reply),
                                       flags=head.flags).pack() + reply
        require(len(data) >= spec.set_size, errno.EINVAL,
                f"{feature.name} SET data of {len(data)} bytes")
        require(head.argsz >= w.DeviceFeatureHead.SIZE + spec.set_size, errno.EINVAL,
                f"{feature.name} SET argsz {head.argsz}")
        reply = self._feature_set(feature, head.argsz, data)
        return w.DeviceFeatureHead(argsz=w.DeviceFeatureHead.SIZE + len(reply),
                                   flags=head.flags).pack() + reply

    def _feature_get(self, feature: Feature, argsz: int, data: bytes) -> bytes:
        if feature is Feature.MIGRATION:
            return MigrationInfo(flags=int(SUPPORTED_FLAGS)).pack()
        if feature is Feature.MIG_DEVICE_STATE:
            return MigStateData(device_state=self.state).pack()
        if feature is Feature.APPLIANCE_MIG_OPTIONS:
            return w.MigOptions(options=int(self.options)).pack()
        if feature is Feature.APPLIANCE_MIG_CHANNEL:
            return self.channel.describe()
        assert feature is Feature.DMA_LOGGING_REPORT
        return logging_report(argsz, data, self.dma_log, self.memory.dirty_log,
                              self.max_bitmap_size)

    def _feature_set(self, feature: Feature, argsz: int, data: bytes) -> bytes:
        if feature is Feature.MIG_DEVICE_STATE:
            req = MigStateData.unpack(data)
            self.set_state(req.device_state)
            return MigStateData(device_state=self.state).pack()
        if feature is Feature.DMA_LOGGING_START:
            self.dma_log, reply = start_logging(argsz, data, self.dma_log)
            self.memory.dirty_log = DirtyLog(self.dma_log.page_size)
            return reply
        if feature is Feature.APPLIANCE_MIG_OPTIONS:
            opts = w.MigOptions.unpack(data)
            require(not opts.options & w.MIG_OPTIONS_RESERVED and not opts.reserved, errno.EINVAL,
                    f"migration options {opts.options:#x}")
            require(self.state in (MigState.RUNNING, MigState.STOP), errno.EBUSY,
                    f"migration options cannot change in {self.state.name}")
            self.options = w.MigOption(opts.options)
            return w.MigOptions(options=int(self.options)).pack()
        if feature is Feature.APPLIANCE_MIG_CHANNEL:
            require(self.state in (MigState.RUNNING, MigState.STOP), errno.EBUSY,
                    f"the data channel cannot change in {self.state.name}")
            return self.channel.configure(data, self._fds)
        assert feature is Feature.DMA_LOGGING_STOP
        self.dma_log = None
        self.memory.dirty_log = None
        return data

    # ------------------------------------------------------------ device state
    def set_state(self, target: int) -> None:
        """Walk the arcs from the current state to ``target``, one device call each.

        Raises:
            Reject: EINVAL for a refused target (nothing happens then); the
                arc's errno when a device call fails (the state is where the
                walk stopped, or ERROR when no valid state could be kept).
        """
        try:
            hops = path(self.state, target)
        except TransitionError as exc:
            raise Reject(str(exc), exc.errno) from None
        reader = self._reader
        if (self.state is MigState.RESUMING and hops and self._resume_error is None
                and reader is not None and reader.failed is None and reader.bytes_fed):
            # A session that could commit: NotYet while announced data is still coming.
            self._resume_error = self.channel.gate()
        for hop in hops:
            arc = (self.state, hop)
            action: Callable[[], None] = getattr(self, ARC_ACTIONS[arc])
            try:
                action()
            except (LocalProtocolError, StreamRefused) as exc:
                log.warning("%s: arc %s -> %s failed: %s", self.name, arc[0].name, hop.name, exc)
                raise Reject(f"{arc[0].name} -> {hop.name}: {exc}",
                             exc.errno or errno.EIO) from None
            except Exception as exc:  # a device bug: no valid state can be vouched for
                log.exception("%s: arc %s -> %s broke the device", self.name, arc[0].name, hop.name)
                self._enter_error()
                raise Reject(f"{arc[0].name} -> {hop.name}: {exc!r}; device in ERROR",
                             errno.EIO) from None
            log.info("%s: migration arc %s -> %s", self.name, arc[0].name, hop.name)
            self._set_state(hop)
            self.counters["transitions"] += 1

    def _set_state(self, new: MigState) -> None:
        old, self.state = self.state, new
        if old is not new and self.on_state is not None:
            self.on_state(old, new)

    def _enter_error(self) -> None:
        self._set_state(MigState.ERROR)
        self._drop_sessions()

    def _drop_sessions(self) -> None:
        self.channel.end_session()
        if self._saving is not None:
            self._saving = None
            self._quietly(self.device.stop_tracking)
        if self._reader is not None:
            self._reader = None
            self._quietly(self.device.abort_restore)
        self._resume_error = None

    def _quietly(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:  # cleanup on a path that already reports its own error
            log.exception("%s: %s failed during migration cleanup", self.name, call.__name__)

    def _arc_stop(self) -> None:
        self.device.migration_stop()
        self.quiesced = True

    def _arc_run(self) -> None:
        self.device.migration_run()
        self.quiesced = False

    def _arc_start_saving(self) -> None:
        writer = StreamWriter(self.device.migration_fingerprint(), flags=self._header_flags())
        self.device.start_tracking()
        try:
            self.channel.start_source()
        except BaseException:
            self.device.stop_tracking()
            raise
        self._saving = SavingSession(writer, self.device, self.channel, self.shared_storage,
                                     self.counters)
        self._save_error = None

    def _arc_end_saving(self) -> None:
        self._saving = None
        self.channel.end_session()
        self.device.stop_tracking()

    def _arc_start_resuming(self) -> None:
        self.device.abort_restore()
        reader = StreamReader(self.device.migration_fingerprint(), self._header_flags())
        self.channel.start_destination()
        self._reader = reader
        self._resume_error = None

    @property
    def shared_storage(self) -> bool:
        return bool(self.options & w.MigOption.SHARED_STORAGE)

    def _header_flags(self) -> int:
        flags = int(HeaderFlag.SHARED_STORAGE) if self.shared_storage else 0
        return flags | (int(HeaderFlag.DATA_CHANNEL) if self.channel.configured else 0)

    def _arc_end_resuming(self) -> None:
        """Commit a complete stream; an empty one cancels; anything else fails.

        On failure the staged data is dropped and a fresh, empty session
        starts (still RESUMING), so a second RESUMING -> STOP cancels.
        """
        reader = self._reader
        assert reader is not None
        if reader.bytes_fed == 0 and self._resume_error is None:
            self.device.abort_restore()  # nothing was written: cancel, keep the old state
            self.channel.end_session()
            self._reader = None
            return
        try:
            if self._resume_error is not None:
                raise self._resume_error
            reader.check_complete()
            self.channel.check_complete()
            self.device.commit_restore()
        except (LocalProtocolError, StreamRefused) as exc:
            self.device.abort_restore()
            self.channel.end_session()
            self._reader = StreamReader(reader.expected_fingerprint, reader.expected_flags)
            self._resume_error = None
            raise LocalProtocolError(f"migration data rejected: {exc}",
                                     exc.errno or errno.EINVAL) from None
        self.channel.end_session()
        self._reader = None

    # ------------------------------------------------------------ MIG_DATA_READ / WRITE
    def _data_read(self, payload: bytes) -> list[bytes | memoryview]:
        # Bytes after the head are ignored, as libvfio-user ignores them.
        require(len(payload) >= w.MigDataHead.SIZE, errno.EINVAL,
                f"MIG_DATA_READ payload of {len(payload)} bytes")
        req = w.MigDataHead.unpack(payload)
        require(self.state in (MigState.PRE_COPY, MigState.STOP_COPY), errno.EINVAL,
                f"MIG_DATA_READ in state {self.state.name}")
        require(req.size <= self.max_data_xfer_size, errno.EINVAL,
                f"MIG_DATA_READ size {req.size} > {self.max_data_xfer_size}")
        require(req.argsz >= w.MigDataHead.SIZE + req.size, errno.EINVAL,
                f"MIG_DATA_READ argsz {req.argsz} < {w.MigDataHead.SIZE + req.size}")
        if self._save_error is not None:
            raise Reject(f"saving session failed: {self._save_error}", errno.EIO)
        try:
            parts = self._produce(req.size)
        except NotYet:
            raise
        except Exception as exc:  # records may be lost: this session cannot continue
            self._save_error = exc
            if not isinstance(exc, LocalProtocolError):
                log.exception("%s: saving device state failed", self.name)
            err = exc.errno if isinstance(exc, LocalProtocolError) and exc.errno else errno.EIO
            raise Reject(f"saving device state: {exc}; cancel and retry", err) from None
        size = sum(len(part) for part in parts)
        self.counters["bytes_read"] += size
        head = w.MigDataHead(argsz=w.MigDataHead.SIZE + size, size=size).pack()
        return [head, *parts]  # sent gathered by the runtime: no copy of the data here

    def _produce(self, size: int) -> list[memoryview]:
        saving = self._saving
        assert saving is not None
        return saving.produce(size, final=self.state is MigState.STOP_COPY)

    def _data_write(self, payload: bytes) -> bytes:
        require(len(payload) >= w.MigDataHead.SIZE, errno.EINVAL, "short MIG_DATA_WRITE")
        req = w.MigDataHead.unpack(payload)
        sent = len(payload) - w.MigDataHead.SIZE
        # The reader keeps views, not copies.  Bytes after ``size`` are ignored, as
        # libvfio-user ignores them; fewer than ``size`` is refused.
        data = memoryview(payload)[w.MigDataHead.SIZE:w.MigDataHead.SIZE + req.size]
        require(self.state is MigState.RESUMING, errno.EINVAL,
                f"MIG_DATA_WRITE in state {self.state.name}")
        require(req.size <= sent, errno.EINVAL, f"MIG_DATA_WRITE size {req.size} > data {sent}")
        require(req.size <= self.max_data_xfer_size, errno.EINVAL,
                f"MIG_DATA_WRITE size {req.size} > {self.max_data_xfer_size}")
        require(req.argsz >= w.MigDataHead.SIZE + req.size, errno.EINVAL,
                f"MIG_DATA_WRITE argsz {req.argsz} < {w.MigDataHead.SIZE + req.size}")
        reader = self._reader
        assert reader is not None
        if self._resume_error is None and self.channel.active is not None:
            self._resume_error = self.channel.gate()  # NotYet while data is still coming
        if self._resume_error is not None:
            raise Reject(f"migration stream already rejected: {self._resume_error}",
                         self._resume_error.errno or errno.EINVAL)
        try:
            records = reader.feed(data)
            if any(r.type == RecordType.HANDOFF for r in records):
                raise LocalProtocolError("a HANDOFF record (live handoff only) in a vfio-user "
                                         "migration stream", errno.EINVAL)
            for r in records:
                if r.type == RecordType.CHANNEL_SYNC:
                    self.channel.synced(parse_channel_sync(r))
            self.device.load_records([r for r in records if r.type in DEVICE_RECORDS])
            if any(r.type == RecordType.DIRTY_ROUND and not parse_dirty_round(r).flags
                   & DirtyRoundFlag.FINAL for r in records):
                self.device.round_received()
        except (LocalProtocolError, StreamRefused) as exc:
            if not isinstance(exc, StreamError):
                self._resume_error = exc
            raise Reject(f"migration data: {exc}", exc.errno or errno.EINVAL) from None
        except Exception as exc:  # staging failed (e.g. no space): the session is lost
            log.exception("%s: staging migration data failed", self.name)
            self._resume_error = LocalProtocolError(f"staging failed: {exc!r}", errno.EIO)
            raise Reject(f"staging migration data: {exc!r}", errno.EIO) from None
        self.counters["bytes_written"] += len(data)
        return b""
