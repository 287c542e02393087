"""Client-side live migration between two appliances (runtime layer: it blocks).

Theory of operation
-------------------
QEMU 11.1 does not migrate vfio-user devices, so this module is the client
that does: it holds one :class:`~appliance.client.vfio_user.VfioUserClient` connection
to the source appliance and one to the destination, drives both migration
state machines with VFIO_USER_DEVICE_FEATURE (MIG_DEVICE_STATE), and copies
the stream from MIG_DATA_READ on the source to MIG_DATA_WRITE on the
destination, chunk by chunk (pipelined: a MIG_DATA_WRITE is sent without
waiting and its reply collected before the next one, so the destination
stages a chunk while the source produces the next).  Shared-storage mode
(both sides on the same images) sets APPLIANCE_MIG_OPTIONS on both first:
the stream then carries device state only.

1. dst RUNNING -> RESUMING (the server walks RUNNING -> STOP -> RESUMING).
2. src RUNNING -> PRE_COPY (if the source offers PRE_COPY).  Rounds: a few
   small reads reveal the round's DIRTY_ROUND marker (the bytes still
   dirty); if that is at most ``converge_bytes``, or ``max_rounds`` full
   rounds were read, pre-copy ends, else the round is read to its short
   read and the next one starts.
3. src -> STOP_COPY (downtime starts): read to the short read that ends the
   stream; the client's own :class:`~appliance.vfio_user.migration_stream.StreamReader`
   checks every record and the END digest on the way, so garbage from the
   source never reaches the destination.
4. dst RESUMING -> STOP: the destination verifies and commits; -> RUNNING
   (downtime ends).  src -> STOP: the source stays stopped.

On any failure before the destination committed, both sides go back to
where they were: the destination cancels its session (RESUMING -> STOP,
which fails once for a partial stream and then cancels, see
docs/migration.md) and returns to RUNNING with its old state; the source
returns to RUNNING (saving never changes a device).  If the destination
committed but did not start, it is left stopped and the source resumes.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.client.datachannel import ChannelPlan, set_channel, setup_channel
from appliance.client.vfio_user import VfioUserClient, VfioUserError
from appliance.errors import ApplianceError
from appliance.vfio_user import wire as w
from appliance.vfio_user.migration_channel import parse_channel_sync
from appliance.vfio_user.migration_states import MigrationFlag, MigState
from appliance.vfio_user.migration_stream import (
    ROUND_MARKER_SIZE,
    HeaderFlag,
    RecordType,
    StreamReader,
    parse_dirty_round,
)
from appliance.vfio_user.wire import (
    ChannelMode,
    DmaLoggingControl,
    DmaLoggingRange,
    DmaLoggingReport,
    Feature,
    MigOption,
    MigOptions,
    MigrationInfo,
    MigStateData,
)

log = logging.getLogger("appliance.migrate")

DEFAULT_CHUNK = 1 << 20
# SO_SNDBUF of the destination connection: a whole MIG_DATA_WRITE (1 MiB) goes in
# one sendmsg and is read whole (capped by net.core.wmem_max).
SEND_BUFFER = 2 << 20


class MigrationFailed(ApplianceError):
    """Migration did not complete; ``phase`` says where, ``__cause__`` why.

    Attributes:
        phase: the step that failed.
        rollback_errors: what went wrong while restoring both sides (empty
            when both are back where they started).
    """

    def __init__(self, phase: str, cause: BaseException, rollback_errors: list[str]) -> None:
        extra = f"; rollback: {'; '.join(rollback_errors)}" if rollback_errors else ""
        super().__init__(f"migration failed during {phase}: {cause}{extra}")
        self.phase = phase
        self.rollback_errors = rollback_errors


@dataclass
class Progress:
    """What the progress callback gets after every chunk and state change."""

    phase: str  # "pre-copy", "stop-copy", "commit", "done"
    rounds: int
    bytes: int
    pending: int  # dirty bytes the last DIRTY_ROUND marker reported


@dataclass
class Summary:
    """What a completed migration took.

    Attributes:
        rounds: full pre-copy rounds read before stop-and-copy.
        bytes: stream bytes moved in total.
        seconds: wall time of the whole migration.
        downtime: from the source stopping to the destination running.
        precopy_bytes: bytes moved while the source was running.
        pending_at_stop: dirty bytes reported when pre-copy ended.
    """

    rounds: int
    bytes: int
    seconds: float
    downtime: float
    precopy_bytes: int = 0
    pending_at_stop: int = 0
    #: how the bulk data went: "" (the stream), "same host" or "ssh forward" (data channel)
    data_channel: str = ""
    #: why a data channel asked for was not used ("" when it was, or was not asked for)
    channel_fallback: str = ""
    #: bytes the data channel carried (heads included)
    channel_bytes: int = 0


# ------------------------------------------------------------ single-connection requests
def feature(client: VfioUserClient, flags: int, data: bytes = b"", reply_data: int = 0) -> bytes:
    """One DEVICE_FEATURE request.

    Returns:
        The reply's data (after the 8-byte head).

    Raises:
        VfioUserError: the server refused (errno set).
    """
    argsz = w.DeviceFeatureHead.SIZE + max(len(data), reply_data)
    head = w.DeviceFeatureHead(argsz=argsz, flags=flags)
    _, payload, _ = client.request(w.Command.DEVICE_FEATURE, head.pack() + data)
    return payload[w.DeviceFeatureHead.SIZE:]


def migration_flags(client: VfioUserClient) -> MigrationFlag:
    """VFIO_DEVICE_FEATURE_MIGRATION: which optional states the device supports."""
    data = feature(client, w.FEATURE_GET | Feature.MIGRATION, reply_data=MigrationInfo.SIZE)
    return MigrationFlag(MigrationInfo.unpack(data).flags)


def get_state(client: VfioUserClient) -> MigState:
    """The device's migration state."""
    data = feature(client, w.FEATURE_GET | Feature.MIG_DEVICE_STATE, reply_data=MigStateData.SIZE)
    return MigState(MigStateData.unpack(data).device_state)


def set_state(client: VfioUserClient, state: MigState) -> MigState:
    """Ask for ``state`` (the server walks the arcs); returns the state reported."""
    data = feature(client, w.FEATURE_SET | Feature.MIG_DEVICE_STATE,
                   MigStateData(device_state=state).pack())
    return MigState(MigStateData.unpack(data).device_state)


def get_options(client: VfioUserClient) -> MigOption:
    """APPLIANCE_MIG_OPTIONS: the options of the device's next migration session."""
    data = feature(client, w.FEATURE_GET | Feature.APPLIANCE_MIG_OPTIONS,
                   reply_data=MigOptions.SIZE)
    return MigOption(MigOptions.unpack(data).options)


def set_options(client: VfioUserClient, options: MigOption) -> MigOption:
    """Set APPLIANCE_MIG_OPTIONS (RUNNING or STOP only); returns what the device took."""
    data = feature(client, w.FEATURE_SET | Feature.APPLIANCE_MIG_OPTIONS,
                   MigOptions(options=int(options)).pack())
    return MigOption(MigOptions.unpack(data).options)


def data_read(client: VfioUserClient, size: int) -> bytes:
    """MIG_DATA_READ of up to ``size`` bytes (fewer: no more data for now)."""
    return bytes(data_read_view(client, size))


def data_read_view(client: VfioUserClient, size: int) -> memoryview:
    """:func:`data_read`, as a view of the reply (no copy of the data).

    Raises:
        VfioUserError: an error reply, or a reply whose size does not match.
    """
    return data_read_wait(client, data_read_send(client, size), size)


def data_read_send(client: VfioUserClient, size: int) -> int:
    """Send a MIG_DATA_READ of up to ``size`` bytes without waiting; returns its
    message id (see :func:`data_read_wait`)."""
    req = w.MigDataHead(argsz=w.MigDataHead.SIZE + size, size=size)
    return client.send(w.Command.MIG_DATA_READ, req.pack())


def data_read_wait(client: VfioUserClient, msg_id: int, size: int) -> memoryview:
    """The data of the reply to the MIG_DATA_READ ``msg_id`` of ``size`` bytes,
    as a view of the reply.

    Raises:
        VfioUserError: an error reply, or a reply whose size does not match.
        ConnectionError, TimeoutError: as :func:`wait_reply`.
    """
    _, payload, fds = client.wait_reply(msg_id, w.Command.MIG_DATA_READ)
    for fd in fds:
        os.close(fd)
    if len(payload) < w.MigDataHead.SIZE:
        raise VfioUserError(errno.EPROTO, f"MIG_DATA_READ reply of {len(payload)} bytes")
    head = w.MigDataHead.unpack(payload)
    data = memoryview(payload)[w.MigDataHead.SIZE:]
    if head.size != len(data) or head.size > size:
        raise VfioUserError(errno.EPROTO, f"MIG_DATA_READ reply size {head.size}/{len(data)}")
    return data


def data_write(client: VfioUserClient, data: bytes) -> None:
    """MIG_DATA_WRITE of ``data``."""
    wait_reply(client, data_write_send(client, data), w.Command.MIG_DATA_WRITE)


def data_write_send(client: VfioUserClient, data: bytes | memoryview) -> int:
    """Send a MIG_DATA_WRITE without waiting (head and data gathered by one
    ``sendmsg``, the data not copied); returns its message id (see :func:`wait_reply`)."""
    req = w.MigDataHead(argsz=w.MigDataHead.SIZE + len(data), size=len(data))
    return client.send_parts(w.Command.MIG_DATA_WRITE, [req.pack(), data])


def wait_reply(client: VfioUserClient, msg_id: int, command: w.Command) -> bytes:
    """The payload of the reply to ``msg_id`` (serving DMA requests meanwhile).

    Raises:
        VfioUserError: an error reply.
        ConnectionError: the server closed the connection.
        TimeoutError: no reply within the client's timeout.
    """
    _, payload, fds = client.wait_reply(msg_id, command)
    for fd in fds:
        os.close(fd)
    return payload


def dma_logging_start(client: VfioUserClient, page_size: int,
                      ranges: list[tuple[int, int]] | None = None) -> int:
    """Start dirty logging of ``ranges`` (None: everything); returns the page size chosen."""
    ranges = ranges or []
    data = DmaLoggingControl(page_size=page_size, num_ranges=len(ranges)).pack()
    data += b"".join(DmaLoggingRange(iova=a, length=n).pack() for a, n in ranges)
    reply = feature(client, w.FEATURE_SET | Feature.DMA_LOGGING_START, data)
    return int(DmaLoggingControl.unpack(reply).page_size)


def dma_logging_stop(client: VfioUserClient) -> None:
    feature(client, w.FEATURE_SET | Feature.DMA_LOGGING_STOP)


def dma_logging_report(client: VfioUserClient, iova: int, length: int, page_size: int) -> bytes:
    """The dirty bitmap of ``[iova, iova+length)`` (reported bits are cleared)."""
    nbits = -(-length // page_size)
    nbytes = -(-nbits // 64) * 8
    req = DmaLoggingReport(iova=iova, length=length, page_size=page_size).pack()
    reply = feature(client, w.FEATURE_GET | Feature.DMA_LOGGING_REPORT, req,
                    reply_data=DmaLoggingReport.SIZE + nbytes)
    return reply[DmaLoggingReport.SIZE:]


# ------------------------------------------------------------ the migration
class _Copier:
    """Moves stream bytes from src to dst, checking them on the way."""

    def __init__(self, src: VfioUserClient, dst: VfioUserClient, chunk: int,
                 report: Callable[[str], None]) -> None:
        self.src, self.dst, self.chunk = src, dst, chunk
        self.watch = StreamReader(fingerprint=None, flags=None)
        self.bytes = 0
        self.markers = 0
        self.pending = 0
        self.report = report
        self.forward: Callable[[bytes], bytes] | None = None
        self.between: Callable[[], None] | None = None
        self.inflight: int | None = None  # MIG_DATA_WRITE sent, reply not yet seen
        self.stream_pos = 0  # stream bytes of the records the watch completed
        self.channel_bytes = 0  # what the last CHANNEL_SYNC announced

    def flush(self) -> None:
        """Wait for the outstanding MIG_DATA_WRITE's reply (its error raises here)."""
        if self.inflight is not None:
            msg_id, self.inflight = self.inflight, None
            wait_reply(self.dst, msg_id, w.Command.MIG_DATA_WRITE)

    def copy(self, size: int) -> int:
        """Move one read's worth; returns how many bytes came."""
        return self.forward_chunk(data_read_view(self.src, size))

    def forward_chunk(self, data: memoryview) -> int:
        """Check ``data`` (what one read returned) and write it to dst; returns its length."""
        cuts: set[int] = set()
        for record in self.watch.feed(data):
            self.stream_pos += record.size
            if record.type == RecordType.DIRTY_ROUND:
                self.markers += 1
                self.pending = parse_dirty_round(record).pending
            elif record.type == RecordType.CHANNEL_SYNC:
                # A write ends with each sync: the destination holds the next one
                # until its channel caught up (the round's data is all there).
                self.channel_bytes = parse_channel_sync(record).bytes
                cuts.add(self.stream_pos - self.bytes)
        out = data if self.forward is None else memoryview(self.forward(bytes(data)))
        bounds = sorted({*range(0, len(out), self.chunk), *(at for at in cuts if at < len(out))})
        for at, end in zip(bounds, [*bounds[1:], len(out)], strict=False):
            # Pipelined: the destination stages this chunk while the source
            # produces the next; its reply is collected before the next write.
            self.flush()
            self.inflight = data_write_send(self.dst, out[at:end])
        self.bytes += len(data)
        return len(data)

    def next_marker(self) -> int:
        """Read small pieces until the next DIRTY_ROUND marker passed; its pending count."""
        seen = self.markers
        while self.markers == seen:
            if self.copy(ROUND_MARKER_SIZE) < ROUND_MARKER_SIZE and self.markers == seen:
                raise VfioUserError(errno.EPROTO, "source ended a round without a marker")
        return self.pending

    def rest_of_round(self, phase: str) -> None:
        """Read full chunks until the short read that ends the round (or stream).

        The read after a full one is the same request either way; it goes to
        the source before the full chunk is checked and written, so the source
        produces the next chunk while this one travels to the destination.
        Not while a ``between`` hook runs: its I/O shares the source's socket.
        """
        load = self.between if phase == "pre-copy" else None
        msg_id = data_read_send(self.src, self.chunk)
        while True:
            data = data_read_wait(self.src, msg_id, self.chunk)
            full = len(data) == self.chunk
            if full and load is None:
                msg_id = data_read_send(self.src, self.chunk)
            self.forward_chunk(data)
            if not full:
                return
            self.report(phase)
            if load is not None:
                load()
                msg_id = data_read_send(self.src, self.chunk)


def migrate(src: VfioUserClient, dst: VfioUserClient, *, max_rounds: int = 8,
            converge_bytes: int = 1 << 20, chunk: int | None = None,
            progress: Callable[[Progress], None] | None = None,
            shared_storage: bool = False,
            between_reads: Callable[[], None] | None = None,
            forward: Callable[[bytes], bytes] | None = None,
            commit_timeout: float = 600.0,
            data_channel: ChannelPlan | None = None,
            clock: Callable[[], float] = time.monotonic) -> Summary:
    """Live-migrate the device behind ``src`` to the one behind ``dst``.

    Args:
        src, dst: connected, negotiated clients (the source device RUNNING,
            the destination RUNNING or STOP).
        max_rounds: full pre-copy rounds at most before stopping the source.
        converge_bytes: stop pre-copy once a round starts with at most this
            many dirty bytes.
        chunk: bytes per MIG_DATA_READ/WRITE (default: the smaller
            ``max_data_xfer_size`` of the two servers, at most 1 MiB).
        progress: called with a :class:`Progress` after every full chunk and
            state change.
        shared_storage: both appliances use the same images: set the
            SHARED_STORAGE option on both, so the stream carries device state
            only (the destination refuses a stream made the other way).
        between_reads: called between pre-copy reads while the source runs
            (a test's or benchmark's load: it may do I/O on the source); with
            a data channel, once after each full round, while that round's
            data is on its way on the channel.
        commit_timeout: seconds to wait for the destination's commit
            (RESUMING -> STOP), which syncs each staged image and renames it
            over the old one while the event loop waits: longer than one
            request for a large namespace.
        forward: sees every chunk on its way to the destination and returns
            what to write instead (fault injection in tests); the client-side
            check runs on what the source sent.
        data_channel: carry the bulk data on a data channel straight between
            the appliances when both offer it (see
            :mod:`appliance.client.datachannel`); the summary says whether it
            was used (``data_channel``) or why not (``channel_fallback``).
            None: the standard stream, as a client that does not know it.

    Returns:
        A :class:`Summary`.

    Raises:
        MigrationFailed: any step failed; both sides were rolled back (see
            the module docstring), ``rollback_errors`` lists what could not be.
    """
    started = clock()
    if chunk is None:
        chunk = min(DEFAULT_CHUNK, *(int(c.server_caps.get("max_data_xfer_size", DEFAULT_CHUNK))
                                     for c in (src, dst)))
    rounds = 0
    phase = "setup"
    copier: _Copier

    def report(now: str) -> None:
        if progress is not None:
            progress(Progress(now, rounds, copier.bytes + copier.channel_bytes, copier.pending))

    copier = _Copier(src, dst, chunk, report)
    dst.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    copier.between = between_reads
    if forward is not None:
        copier.forward = forward
    src_started = dst_started = committed = False
    dst_initial = MigState.RUNNING
    channel_how = ""
    try:
        flags = migration_flags(src)
        dst_flags = migration_flags(dst)
        if not flags & MigrationFlag.STOP_COPY or not dst_flags & MigrationFlag.STOP_COPY:
            raise VfioUserError(errno.ENOTSUP, "a device does not support STOP_COPY")
        if (state := get_state(src)) is not MigState.RUNNING:
            raise VfioUserError(errno.EINVAL, f"source is {state.name}, not RUNNING")
        dst_initial = get_state(dst)
        if dst_initial not in (MigState.RUNNING, MigState.STOP):
            raise VfioUserError(errno.EINVAL, f"destination is {dst_initial.name}")
        want = MigOption.SHARED_STORAGE if shared_storage else MigOption(0)
        for side in (src, dst):
            if set_options(side, want) != want:
                raise VfioUserError(errno.ENOTSUP, f"a device did not take options {want!r}")
        copier.watch.expected_flags = int(HeaderFlag.SHARED_STORAGE) if shared_storage else 0
        channel_how = channel_fallback = ""
        if data_channel is not None and not shared_storage:
            phase = "data channel"
            # Half the request timeout: a stalled channel fails the appliance's
            # waiting request before the request itself times out here.
            timeout = max(0.001, min(src.timeout, dst.timeout) / 2)
            used, why = setup_channel(src, dst, data_channel, timeout)
            if used:
                channel_how = why
                copier.watch.expected_flags |= int(HeaderFlag.DATA_CHANNEL)
            else:
                channel_fallback = why
                log.info("migrating on the standard path: %s", why)
        phase = "destination RESUMING"
        dst_started = True
        set_state(dst, MigState.RESUMING)
        pending_at_stop = 0
        if flags & MigrationFlag.PRE_COPY:
            phase = "pre-copy"
            src_started = True
            set_state(src, MigState.PRE_COPY)
            report(phase)
            while True:
                pending_at_stop = copier.next_marker()
                if pending_at_stop <= converge_bytes or rounds >= max_rounds:
                    break
                copier.rest_of_round(phase)
                rounds += 1
                if channel_how and between_reads is not None:
                    # The round's data is on its way on the channel: the load runs
                    # meanwhile (the next marker waits for the channel to drain).
                    between_reads()
                report(phase)
        precopy_bytes = copier.bytes
        # The destination stages (and, at the round marker, syncs) the last
        # pre-copy write before the source stops, not in the downtime.
        copier.flush()
        phase = "stop-copy"
        src_started = True
        stopped_at = clock()
        set_state(src, MigState.STOP_COPY)
        report(phase)
        copier.rest_of_round(phase)
        copier.flush()
        copier.watch.check_complete()
        phase = "commit"
        timeout, dst.timeout = dst.timeout, max(dst.timeout, commit_timeout)
        try:
            set_state(dst, MigState.STOP)
        finally:
            dst.timeout = timeout
        committed = True
        set_state(dst, MigState.RUNNING)
        running_at = clock()
    except (VfioUserError, ConnectionError, TimeoutError, ApplianceError, OSError) as exc:
        errors = _rollback(src if src_started else None, dst if dst_started else None,
                           dst_initial, committed)
        if channel_how:  # a channel a session has not taken stays set for the next one
            errors += _channel_off(src, dst)
        log.info("migration failed during %s: %s", phase, exc)  # the caller reports it
        raise MigrationFailed(phase, exc, errors) from exc
    try:
        set_state(src, MigState.STOP)
    except (VfioUserError, ConnectionError, TimeoutError) as exc:
        log.warning("migration done, but the source could not leave STOP_COPY: %s", exc)
    report("done")
    return Summary(rounds=rounds, bytes=copier.bytes, seconds=clock() - started,
                   downtime=running_at - stopped_at, precopy_bytes=precopy_bytes,
                   pending_at_stop=pending_at_stop, data_channel=channel_how,
                   channel_fallback=channel_fallback, channel_bytes=copier.channel_bytes)


def _rollback(src: VfioUserClient | None, dst: VfioUserClient | None, dst_initial: MigState,
              committed: bool) -> list[str]:
    """Return both sides to where they were; returns what could not be done."""
    errors: list[str] = []
    if dst is not None:
        try:
            if committed:
                # The destination holds the new state; it must not run next to the source.
                set_state(dst, MigState.STOP)
            else:
                _cancel_destination(dst, dst_initial)
        except (VfioUserError, ConnectionError, TimeoutError, OSError) as exc:
            errors.append(f"destination: {exc}")
    if src is not None:
        try:
            state = get_state(src)
            if state is MigState.ERROR:
                src.reset()
            set_state(src, MigState.RUNNING)
        except (VfioUserError, ConnectionError, TimeoutError, OSError) as exc:
            errors.append(f"source: {exc}")
    return errors


def _channel_off(src: VfioUserClient, dst: VfioUserClient) -> list[str]:
    """Set both data channels back to OFF; returns what could not be done (a
    closed connection dropped its channel anyway)."""
    errors: list[str] = []
    for name, side in (("source", src), ("destination", dst)):
        try:
            set_channel(side, ChannelMode.OFF)
        except ConnectionError:
            pass
        except (VfioUserError, TimeoutError, OSError) as exc:
            errors.append(f"{name} data channel: {exc}")
    return errors


def _cancel_destination(dst: VfioUserClient, initial: MigState) -> None:
    state = get_state(dst)
    if state is MigState.ERROR:
        dst.reset()  # the only way out of ERROR; the old state cannot be vouched for
        return
    if state is MigState.RESUMING:
        try:
            set_state(dst, MigState.STOP)  # a partial stream is refused once ...
        except VfioUserError:
            set_state(dst, MigState.STOP)  # ... then the empty session cancels
    set_state(dst, initial)
