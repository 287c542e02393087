"""The migration data channel: its records, their checks, and what the handler needs of it.

Theory of operation
-------------------
An extension to vfio-user migration v2 (docs/migration.md, *Data channel*):
the bulk namespace data travels on a separate stream socket straight from
the source appliance to the destination appliance, while MIG_DATA_READ /
MIG_DATA_WRITE carry the rest of the stream (HEADER, device state, round
markers, END).  It is negotiated with the vendor device feature
APPLIANCE_MIG_CHANNEL (0x8002): a GET says which modes a device offers, a
SET in RUNNING or STOP takes one for the next session (an fd passed with
the SET, or a listening socket the destination makes).  A client that never
SETs it gets the standard stream.

This module is sans-I/O: the channel's framing (:class:`ChannelHead`, 48
bytes, then ``length`` payload bytes for DATA), the destination's checks of
every head and of the sequence (:class:`ChannelReceiver`), and the
interfaces the runtime implements (:class:`DataChannel`,
:class:`ChannelFactory`).  The runtime moves the bytes (``sendfile`` on the
source, ``splice`` on the destination) and hashes them from mmaps.

A record whose range the source saw written while it was being sent (only
possible while the source runs, in pre-copy) is followed by RETRACT: its
checksum may not match, its range is dirty again and will be sent in a later
round, and the destination requires every retracted byte to be covered by a
later verified record before the final sync.  A DATA record whose checksum
does not match and that is not retracted by the very next record fails the
channel.
"""

from __future__ import annotations

import bisect
import enum
import errno
import logging
from collections.abc import Callable
from typing import Annotated, Protocol

import xxhash

from appliance.errors import LocalProtocolError
from appliance.protocol_common import Reject, close_quietly, require
from appliance.vfio_user import wire as w
from appliance.vfio_user.connection_state import NotYet
from appliance.vfio_user.migration_stream import (
    MAX_ZERO_RUN,
    ChannelSync,
    ChannelSyncFlag,
    Record,
    RecordType,
    StreamError,
)
from appliance.wire import U16, U32, U64, Struct

log = logging.getLogger("appliance.vfio_user.migration")

CHANNEL_MAGIC = b"AMDC"
MAX_CHANNEL_RECORD = 16 << 20  # DATA payload bytes per record, at most
HEAD_CHECKED = 40  # head bytes covered by ``head_check``
MIN_TIMEOUT_MS, MAX_TIMEOUT_MS = 1, 600_000
#: separate retracted ranges a destination keeps at most until they are sent again
MAX_RETRACTED = 1 << 16


class ChannelType(enum.IntEnum):
    DATA = 1  # ``length`` bytes of namespace ``nsid`` at ``offset`` follow
    ZEROES = 2  # the range reads as zeroes; no payload
    RETRACT = 3  # the previous DATA record's range changed while it was sent


class ChannelHead(Struct, size=48):
    magic: Annotated[bytes, "4s"] = CHANNEL_MAGIC
    type: U16 = 0
    flags: U16 = 0  # none defined: must be 0
    nsid: U32 = 0
    seq: U32 = 0  # record index on the channel from 0
    offset: U64 = 0
    length: U64 = 0
    checksum: U64 = 0  # xxh3_64 of the payload (DATA); 0 otherwise
    head_check: U64 = 0  # xxh3_64 of head bytes 0..39


def channel_head(kind: ChannelType, seq: int, nsid: int, offset: int, length: int,
                 checksum: int = 0) -> bytes:
    """The 48 head bytes of one channel record."""
    head = ChannelHead(type=kind, nsid=nsid, seq=seq, offset=offset, length=length,
                       checksum=checksum)
    raw = head.pack()
    head.head_check = xxhash.xxh3_64_intdigest(raw[:HEAD_CHECKED])
    return head.pack()


def channel_sync(records: int, nbytes: int, final: bool = False) -> Record:
    """A CHANNEL_SYNC stream record: the channel carried ``records`` / ``nbytes`` so far."""
    flags = ChannelSyncFlag.FINAL if final else 0
    return Record(RecordType.CHANNEL_SYNC,
                  ChannelSync(records=records, bytes=nbytes, flags=flags).pack())


def parse_channel_sync(record: Record) -> ChannelSync:
    """Raises:
        StreamError: wrong size or reserved bits.
    """
    if record.type != RecordType.CHANNEL_SYNC or len(record.payload) != ChannelSync.SIZE:
        raise StreamError(f"malformed CHANNEL_SYNC ({len(record.payload)} bytes)")
    sync = ChannelSync.unpack(record.payload)
    if sync.reserved or sync.flags & ~int(ChannelSyncFlag.FINAL):
        raise StreamError(f"CHANNEL_SYNC flags {sync.flags:#x}")
    return sync


class _Ranges:
    """Disjoint, non-touching byte ranges ``[starts[i], ends[i])`` in order."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        """Take ``[start, end)``, merged with every range it overlaps or touches."""
        i = bisect.bisect_left(self.ends, start)  # the first that ends at or after start
        j = bisect.bisect_right(self.starts, end)  # past the last that starts at or before end
        if i < j:
            start, end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j], self.ends[i:j] = [start], [end]

    def remove(self, start: int, end: int) -> None:
        """Drop ``[start, end)``; what sticks out of it on either side stays."""
        i = bisect.bisect_right(self.ends, start)  # the first that ends after start
        j = bisect.bisect_left(self.starts, end)  # past the last that starts before end
        if i >= j:
            return
        starts: list[int] = []
        ends: list[int] = []
        if self.starts[i] < start:
            starts.append(self.starts[i])
            ends.append(start)
        if self.ends[j - 1] > end:
            starts.append(end)
            ends.append(self.ends[j - 1])
        self.starts[i:j], self.ends[i:j] = starts, ends


class ChannelReceiver:
    """The destination's checks of the channel records, in order (sans-I/O).

    The runtime calls :meth:`head` for each 48-byte head, then (DATA) moves
    the payload and calls :meth:`data_done` with whether its checksum
    verified.  Counts are what the source's CHANNEL_SYNC records announce.
    """

    def __init__(self, max_retracted: int = MAX_RETRACTED) -> None:
        self.max_retracted = max_retracted
        self.records = 0  # complete records
        self.bytes = 0  # stream bytes of complete records (heads + payloads)
        self.announced: ChannelSync | None = None  # the last CHANNEL_SYNC seen
        self._prev: ChannelHead | None = None  # the last complete record
        self._mismatch = False  # the last DATA did not verify: RETRACT must follow
        #: nsid -> retracted byte ranges still to be covered: sorted, disjoint, not touching
        self._retracted: dict[int, _Ranges] = {}
        self._current: ChannelHead | None = None
        self.closed = False  # the source closed its end (set by the runtime)

    def head(self, raw: bytes) -> ChannelHead:
        """Check one head (before anything of it is used).

        Raises:
            StreamError: bad magic, head checksum, type, flags, sequence,
                length, a RETRACT that does not name the previous DATA, an
                unverified DATA not retracted, or more than the final sync
                announced.
        """
        head = ChannelHead.unpack(raw)
        where = f"data channel record {self.records}"
        if head.magic != CHANNEL_MAGIC:
            raise StreamError(f"{where}: bad magic {head.magic!r}")
        if xxhash.xxh3_64_intdigest(raw[:HEAD_CHECKED]) != head.head_check:
            raise StreamError(f"{where}: head checksum mismatch")
        try:
            kind = ChannelType(head.type)
        except ValueError:
            raise StreamError(f"{where}: unknown type {head.type}") from None
        if head.flags:
            raise StreamError(f"{where}: reserved flags {head.flags:#x}")
        if head.seq != self.records:
            raise StreamError(f"{where}: sequence number {head.seq}")
        final = self.announced
        # (the final sync may arrive before the records it counts: they travel apart)
        if final is not None and final.flags & ChannelSyncFlag.FINAL \
                and self.records >= final.records:
            raise StreamError(f"{where}: more than the {final.records} records announced")
        if kind is ChannelType.RETRACT:
            prev = self._prev
            if prev is None or prev.type != ChannelType.DATA or (
                    head.nsid, head.offset, head.length) != (prev.nsid, prev.offset, prev.length):
                raise StreamError(f"{where}: RETRACT does not name the previous DATA record")
        elif self._mismatch:
            raise StreamError(f"data channel record {self.records - 1}: checksum mismatch")
        if kind is ChannelType.DATA and not 0 < head.length <= MAX_CHANNEL_RECORD:
            raise StreamError(f"{where}: DATA length {head.length}")
        if kind is ChannelType.ZEROES and not 0 < head.length <= MAX_ZERO_RUN:
            raise StreamError(f"{where}: ZEROES length {head.length}")
        self._current = head
        if kind is not ChannelType.DATA:
            self._complete(head, True)
        return head

    def data_done(self, verified: bool) -> None:
        """The current DATA record's payload is staged; ``verified``: its checksum matched."""
        head = self._current
        assert head is not None and head.type == ChannelType.DATA
        self._complete(head, verified)

    def _complete(self, head: ChannelHead, verified: bool) -> None:
        self._current = None
        kind = ChannelType(head.type)
        if kind is ChannelType.RETRACT:
            self._mismatch = False
            owed = self._retracted.setdefault(head.nsid, _Ranges())
            owed.add(head.offset, head.offset + head.length)
            if self.retracted > self.max_retracted:
                raise StreamError(f"data channel record {self.records}: more than "
                                  f"{self.max_retracted} retracted ranges not sent again")
        else:
            self._mismatch = not verified
            if verified:
                self._cover(head.nsid, head.offset, head.offset + head.length)
        self.records += 1
        self.bytes += ChannelHead.SIZE + (head.length if kind is ChannelType.DATA else 0)
        self._prev = head

    def _cover(self, nsid: int, start: int, end: int) -> None:
        owed = self._retracted.get(nsid)
        if owed is not None:
            owed.remove(start, end)
            if not owed.starts:
                del self._retracted[nsid]

    @property
    def retracted(self) -> int:
        """How many separate retracted ranges are still to be covered."""
        return sum(len(owed.starts) for owed in self._retracted.values())

    @property
    def mid_record(self) -> bool:
        return self._current is not None

    def sync(self, sync: ChannelSync) -> None:
        """A CHANNEL_SYNC arrived on the stream.

        Raises:
            StreamError: it announces less than was already received (more
                than announced), or less than an earlier sync.
        """
        before = self.announced
        if before is not None and (sync.records < before.records or sync.bytes < before.bytes
                                   or before.flags & ChannelSyncFlag.FINAL):
            raise StreamError(f"CHANNEL_SYNC {sync.records} after {before.records}")
        if sync.flags & ChannelSyncFlag.FINAL and self.records > sync.records:
            raise StreamError(f"the data channel carried {self.records} records, "
                              f"more than the {sync.records} announced")
        self.announced = sync

    def caught_up(self) -> bool:
        """Whether every record the last CHANNEL_SYNC announced was received.

        Raises:
            StreamError: the channel closed before it carried what was announced.
        """
        sync = self.announced
        if sync is None or self.records >= sync.records:
            return True
        if self.closed:
            raise StreamError(f"the data channel closed after {self.records} records, "
                              f"{sync.records} announced")
        return False

    def check_complete(self) -> None:
        """Raises:
            StreamError: no final sync, fewer or more records or bytes than it
                announced, an unverified record, or retracted bytes never
                sent again.
        """
        sync = self.announced
        if sync is None or not sync.flags & ChannelSyncFlag.FINAL:
            raise StreamError("the stream ended without the data channel's final sync")
        if (self.records, self.bytes) != (sync.records, sync.bytes) or self.mid_record:
            raise StreamError(f"the data channel carried {self.records} records / {self.bytes} "
                              f"bytes, the stream announced {sync.records} / {sync.bytes}")
        if self._mismatch:
            raise StreamError(f"data channel record {self.records - 1}: checksum mismatch")
        if self._retracted:
            nsid, owed = min(self._retracted.items())
            a, b = owed.starts[0], owed.ends[0]
            raise StreamError(f"nsid {nsid}: retracted range {a:#x}..{b:#x} never sent again")


# ------------------------------------------------------------ what the runtime provides
class DataChannel(Protocol):
    """One session's channel end, owned by the runtime (on the event loop).

    ``error`` is set once the channel failed (closed early, garbage, a
    stalled peer past the timeout, a local I/O error); the handler is told
    through the ``notify`` callback it gave the factory whenever the channel
    made progress or failed.
    """

    error: Exception | None

    def fill(self, max_bytes: int) -> int:
        """Source: send up to ``max_bytes`` of dirty data (clearing it in the
        dirty map as it is taken: part now, the rest as the channel drains);
        returns the data bytes taken now (0: nothing more for now)."""

    @property
    def idle(self) -> bool:
        """Source: nothing queued, in flight or still to take of the last ``fill``."""

    @property
    def sent(self) -> tuple[int, int]:
        """Source: (records, bytes) sent so far."""

    @property
    def receiver(self) -> ChannelReceiver:
        """Destination: the checks and counts of what arrived."""

    def close(self) -> None:
        """End the channel (idempotent); a listening socket's path is removed."""


class ChannelListener(Protocol):
    """A destination's per-session listening socket (LISTEN mode)."""

    path: str

    def close(self) -> None:
        """Stop listening, remove the socket and its directory."""


class ChannelFactory(Protocol):
    """How the handler gets channel ends (the runtime implements it)."""

    def blocker(self) -> str:
        """Why the device's data cannot travel on a channel now ("" when it can)."""

    def check_fd(self, fd: int) -> None:
        """Whether ``fd`` can be a channel end (the caller keeps it either way).

        Raises:
            OSError: EINVAL when it is not a connected stream socket.
        """

    def listen(self) -> ChannelListener:
        """A fresh listening socket in a new 0700 directory.

        Raises:
            OSError: it could not be made.
        """

    def source(self, fd: int, timeout: float, notify: Callable[[], None]) -> DataChannel:
        """The source end on connected socket ``fd`` (ours from now on)."""

    def destination(self, endpoint: int | ChannelListener, timeout: float,
                    notify: Callable[[], None]) -> DataChannel:
        """The destination end on socket ``fd``, or on the first connection to a listener."""


def channel_error(exc: BaseException) -> StreamError:
    """The migration error a failed channel becomes (EIO unless it was the peer's garbage)."""
    if isinstance(exc, StreamError):
        return exc
    err = exc.errno if isinstance(exc, (OSError, LocalProtocolError)) and exc.errno \
        else errno.EIO
    return StreamError(f"data channel failed: {exc}", err)


# ------------------------------------------------------------ the handler's side
class ChannelSession:
    """APPLIANCE_MIG_CHANNEL for one connection: the configuration a SET made
    for the next session, then that session's :class:`DataChannel`.

    One SET serves one session: starting a session consumes it (the fd or the
    listener moves to the channel); DEVICE_RESET and the connection's close
    drop both.
    """

    def __init__(self, factory: ChannelFactory | None, notify: Callable[[], None],
                 name: str) -> None:
        self.factory = factory
        self.notify = notify
        self.name = name
        self.mode = w.ChannelMode.OFF
        self.timeout_ms = 0
        self._fd: int | None = None
        self._listener: ChannelListener | None = None
        self.active: DataChannel | None = None

    @property
    def offered(self) -> bool:
        return self.factory is not None

    @property
    def configured(self) -> bool:
        """The next session uses a data channel."""
        return self.mode is not w.ChannelMode.OFF

    # ------------------------------------------------------------ the feature
    def describe(self) -> bytes:
        """The GET / SET reply data (a LISTEN reply appends the socket path)."""
        data = w.MigChannel(offered=w.CHANNEL_OFFERED, mode=self.mode,
                            timeout_ms=self.timeout_ms).pack()
        return data + (self._listener.path.encode() if self._listener is not None else b"")

    def configure(self, data: bytes, fds: list[int]) -> bytes:
        """A SET (RUNNING or STOP, checked by the caller): take the mode; returns the reply.

        Raises:
            Reject: EINVAL for reserved fields, an unknown mode, a timeout out of
                range or the wrong number of fds (FD: exactly one, else none),
                or an FD fd that is not a connected stream socket;
                ENOTSUP when the device's data cannot use a channel
                (``ChannelFactory.blocker``); the errno of a listening socket that could not be made.
        """
        req = w.MigChannel.unpack(data)
        require(not req.offered and not req.reserved, errno.EINVAL,
                "APPLIANCE_MIG_CHANNEL reserved fields set")
        try:
            mode = w.ChannelMode(req.mode)
        except ValueError:
            raise Reject(f"data channel mode {req.mode}", errno.EINVAL) from None
        want_fds = 1 if mode is w.ChannelMode.FD else 0
        require(len(fds) == want_fds, errno.EINVAL,
                f"data channel mode {mode.name} takes {want_fds} fd(s), got {len(fds)}")
        require(mode is w.ChannelMode.OFF or MIN_TIMEOUT_MS <= req.timeout_ms <= MAX_TIMEOUT_MS,
                errno.EINVAL, f"data channel timeout {req.timeout_ms} ms")
        assert self.factory is not None
        why = self.factory.blocker() if mode is not w.ChannelMode.OFF else ""
        require(not why, errno.ENOTSUP, f"data channel: {why}")
        if mode is w.ChannelMode.FD:
            try:
                self.factory.check_fd(fds[0])
            except OSError as exc:
                raise Reject(f"data channel fd: {exc.strerror or exc}", errno.EINVAL) from None
        self._clear()
        if mode is w.ChannelMode.LISTEN:
            try:
                self._listener = self.factory.listen()
            except OSError as exc:
                raise Reject(f"data channel socket: {exc}", exc.errno or errno.EIO) from None
        elif mode is w.ChannelMode.FD:
            self._fd = fds.pop()
        self.mode = mode
        self.timeout_ms = req.timeout_ms if mode is not w.ChannelMode.OFF else 0
        log.info("%s: data channel for the next session: %s", self.name, mode.name)
        return self.describe()

    def _clear(self) -> None:
        if self._fd is not None:
            close_quietly(self._fd)
            self._fd = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.mode = w.ChannelMode.OFF
        self.timeout_ms = 0

    def reset(self) -> None:
        """DEVICE_RESET or close: drop the session's channel and the configuration."""
        self.end_session()
        self._clear()

    # ------------------------------------------------------------ sessions
    def start_source(self) -> None:
        """A saving session starts: its channel end, if one was configured.

        Raises:
            LocalProtocolError: EINVAL for LISTEN (a source needs a connected
                socket) or an fd that is not a connected stream socket.
        """
        if not self.configured:
            return
        if self.mode is w.ChannelMode.LISTEN:
            self._clear()
            raise LocalProtocolError("a saving session needs a data channel fd (mode FD), "
                                     "not LISTEN", errno.EINVAL)
        fd, self._fd = self._fd, None
        assert fd is not None and self.factory is not None
        timeout = self.timeout_ms / 1000
        self._clear()
        try:
            self.active = self.factory.source(fd, timeout, self.notify)
        except OSError as exc:
            raise LocalProtocolError(f"data channel: {exc}", errno.EINVAL) from None

    def start_destination(self) -> None:
        """A resuming session starts: its channel end, if one was configured.

        Raises:
            LocalProtocolError: EINVAL for an fd that is not a stream socket.
        """
        if not self.configured:
            return
        endpoint: int | ChannelListener | None = self._fd if self._fd is not None \
            else self._listener
        self._fd = self._listener = None
        assert endpoint is not None and self.factory is not None
        timeout = self.timeout_ms / 1000
        self._clear()
        try:
            self.active = self.factory.destination(endpoint, timeout, self.notify)
        except OSError as exc:
            raise LocalProtocolError(f"data channel: {exc}", errno.EINVAL) from None

    def end_session(self) -> None:
        if self.active is not None:
            self.active.close()
            self.active = None

    # ------------------------------------------------------------ source
    def check_source(self) -> None:
        """Raises:
            LocalProtocolError: the channel failed (its errno, EIO by default).
        """
        assert self.active is not None
        if self.active.error is not None:
            exc = channel_error(self.active.error)
            raise LocalProtocolError(str(exc), exc.errno or errno.EIO)

    def fill(self, max_bytes: int) -> int:
        assert self.active is not None
        return self.active.fill(max_bytes) if max_bytes > 0 else 0

    def sync_record(self, final: bool) -> Record:
        """A CHANNEL_SYNC of everything sent so far.

        Raises:
            NotYet: records are still queued or being sent.
        """
        assert self.active is not None
        if not self.active.idle:
            raise NotYet()
        records, nbytes = self.active.sent
        return channel_sync(records, nbytes, final)

    # ------------------------------------------------------------ destination
    def gate(self) -> LocalProtocolError | None:
        """Before a MIG_DATA_WRITE or leaving RESUMING: the channel must have caught up.

        Returns:
            The error that fails the session (the channel failed), or None.

        Raises:
            NotYet: announced records are still on their way.
        """
        chan = self.active
        if chan is None:
            return None
        try:
            if chan.error is None and not chan.receiver.caught_up():
                raise NotYet()
        except StreamError as exc:
            chan.error = exc
        if chan.error is None:
            return None
        failed = channel_error(chan.error)
        return LocalProtocolError(str(failed), failed.errno or errno.EINVAL)

    def synced(self, sync: ChannelSync) -> None:
        """A CHANNEL_SYNC arrived on the stream.

        Raises:
            LocalProtocolError: no channel in this session, or the sync
                contradicts what the channel carried (EINVAL).
        """
        if self.active is None:
            raise LocalProtocolError("CHANNEL_SYNC without a data channel", errno.EINVAL)
        try:
            self.active.receiver.sync(sync)
        except StreamError as exc:
            raise LocalProtocolError(str(exc), errno.EINVAL) from None

    def check_complete(self) -> None:
        """At commit: everything announced arrived, verified.

        Raises:
            LocalProtocolError: the channel failed or is incomplete.
        """
        chan = self.active
        if chan is None:
            return
        try:
            if chan.error is not None:
                raise channel_error(chan.error)
            chan.receiver.check_complete()
        except StreamError as exc:
            raise LocalProtocolError(str(exc), exc.errno or errno.EINVAL) from None
