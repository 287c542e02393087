"""The saving side of one migration session: the stream in rounds (sans-I/O).

A :class:`SavingSession` owns the session's
:class:`~appliance.vfio_user.migration_stream.StreamWriter` and answers each
MIG_DATA_READ with up to its ``size`` bytes (:meth:`SavingSession.produce`):

* In PRE_COPY reads come in *rounds* (:class:`RoundPhase`).  The first read,
  and the first read after a short one, opens a round: a DIRTY_ROUND record
  carrying the device's pending bytes is queued, then bulk records are added
  until the read is satisfied or the round's budget (the pending count it
  started with) is spent or the device has nothing dirty.  A read answered
  short closes the round; the next read opens the next one.
* In STOP_COPY (``final``) a final DIRTY_ROUND is queued, the remaining bulk
  data drained, then the device state and END.
* With a data channel the bulk data goes to the channel instead, and the
  stream gets a CHANNEL_SYNC (what the channel carried) before each round
  marker and before the device state.

With shared storage no bulk data is sent at all (the images are the same).
The protocol around it (states, checks, errors) is
:class:`~appliance.vfio_user.migration.VfioUserMigration`'s.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from appliance.vfio_user.migration_channel import ChannelSession
from appliance.vfio_user.migration_stream import Record, StreamWriter, dirty_round

if TYPE_CHECKING:
    from appliance.vfio_user.migratable import Migratable

MIN_PRECOPY_CHUNK = 64 * 1024  # what precopy_records is asked for at least


class RoundPhase(enum.Enum):
    """Where the pre-copy reader is inside a round."""

    IDLE = "idle"  # the next read opens a round
    OPEN = "open"  # records are still added as reads need them
    DRAINING = "draining"  # budget spent or nothing dirty: the queue empties, then a short read


class SavingSession:
    """One saving session's stream writer and where its pre-copy rounds are."""

    def __init__(self, writer: StreamWriter, device: Migratable, channel: ChannelSession,
                 shared_storage: bool, counters: dict[str, int]) -> None:
        """Args:
            writer: the session's stream (its HEADER queued).
            device: what the records come from.
            channel: the connection's data channel feature (bulk data goes
                there while it is active).
            shared_storage: no bulk data at all (the session's option).
            counters: the connection's migration counters (``rounds`` counts here).
        """
        self.writer = writer
        self.device = device
        self.channel = channel
        self.shared_storage = shared_storage
        self.counters = counters
        self.phase = RoundPhase.IDLE
        self.round = 0
        self.budget = 0
        self.final_started = False

    def produce(self, size: int, final: bool) -> list[memoryview]:
        """Up to ``size`` stream bytes for one MIG_DATA_READ, as views of the queued
        records; fewer only when a round (or, ``final``: the stream) ends.

        Raises:
            NotYet: the data channel must drain first.
            LocalProtocolError: the channel failed.
            Exception: whatever the device raised saving (the session is lost).
        """
        return (self._produce(size, final) if self.channel.active is None
                else self._produce_channel(size, final))

    def _start_final(self) -> None:
        """The stop-and-copy round's marker, once, at its first read."""
        if not self.final_started:
            self.final_started = True
            self.phase = RoundPhase.DRAINING
            self.writer.add(dirty_round(self.round, self._pending(), final=True))
            self.round += 1

    def _produce(self, size: int, final: bool) -> list[memoryview]:
        """Up to ``size`` stream bytes, as views of the queued records."""
        writer = self.writer
        device = self.device
        if final:
            self._start_final()
            while writer.pending < size and not writer.finished:
                records = self._bulk(max(size - writer.pending, MIN_PRECOPY_CHUNK))
                if not records:
                    writer.add_all(device.save_state())
                    writer.finish()
                else:
                    writer.add_all(records)
            return writer.read_parts(size)
        if self.phase is RoundPhase.IDLE:
            self.budget = self._pending()
            writer.add(dirty_round(self.round, self.budget))
            self.round += 1
            self.counters["rounds"] += 1
            self.phase = RoundPhase.OPEN
        while self.phase is RoundPhase.OPEN and writer.pending < size:
            records = self._bulk(max(size - writer.pending, MIN_PRECOPY_CHUNK))
            writer.add_all(records)
            self.budget -= sum(len(r.payload) for r in records)
            if not records or self.budget <= 0:
                self.phase = RoundPhase.DRAINING
        parts = writer.read_parts(size)
        if sum(len(part) for part in parts) < size:
            self.phase = RoundPhase.IDLE  # the short read ended the round
        return parts

    def _produce_channel(self, size: int, final: bool) -> list[memoryview]:
        """:meth:`_produce` with a data channel: bulk data goes to the channel, the
        stream gets a CHANNEL_SYNC (what the channel carried) before each round
        marker and before the device state.

        Raises:
            NotYet: the channel must drain first (a sync needs an idle channel).
            LocalProtocolError: the channel failed.
        """
        writer, chan = self.writer, self.channel
        chan.check_source()
        if final:
            self._start_final()
            while writer.pending < size and not writer.finished:
                if chan.fill(self._pending()):
                    continue
                writer.add(chan.sync_record(final=True))  # NotYet until the channel drained
                writer.add_all(self.device.save_state())
                writer.finish()
            return writer.read_parts(size)
        if self.phase is RoundPhase.IDLE:
            sync = chan.sync_record(final=False)  # NotYet until the last round was sent
            writer.add(sync)
            self.budget = self._pending()
            writer.add(dirty_round(self.round, self.budget))
            self.round += 1
            self.counters["rounds"] += 1
            self.phase = RoundPhase.OPEN
        if self.phase is RoundPhase.OPEN:
            # The whole round's ranges go to the channel now (descriptors, not data).
            chan.fill(self.budget)
            self.phase = RoundPhase.DRAINING
        parts = writer.read_parts(size)
        if sum(len(part) for part in parts) < size:
            self.phase = RoundPhase.IDLE  # the short read ended the round
        return parts

    def _pending(self) -> int:
        """Bulk bytes still to send (none with shared storage: the images are the same)."""
        return 0 if self.shared_storage else self.device.precopy_pending()

    def _bulk(self, max_bytes: int) -> list[Record]:
        return [] if self.shared_storage else self.device.precopy_records(max_bytes)
