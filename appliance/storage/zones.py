"""The zones of a zoned namespace and their state machine (device layer;
NVMe Zoned Namespace Command Set 1.1, section 2.1).

Theory of operation
-------------------
A zoned namespace is cut into zones of ``zone_blocks`` logical blocks (ZSZE);
the first ``capacity`` blocks of each can be written (ZCAP), sequentially, at
the zone's write pointer.  :class:`ZoneTable` holds every zone's state and
write pointer and the two resource counts the limits apply to: *open* zones
(implicitly or explicitly opened) at most ``max_open`` (MOR + 1), *active*
zones (opened or closed) at most ``max_active`` (MAR + 1); 0 means no limit.

Every change of a zone's state goes through :data:`TRANSITIONS`, a literal
table state -> {event: next state}; a pair it lacks is Invalid Zone State
Transition for a Zone Management Send, and for a write the status of
:data:`WRITE_REFUSED` (Zone Is Full, Zone Is Read Only, Zone Is Offline).
A write is checked (:meth:`ZoneTable.check_write`) before its data reaches the
image and applied (:meth:`ZoneTable.advance`) after: the write pointer moves,
an Empty or Closed zone becomes Implicitly Opened (when the open limit is
reached, the lowest implicitly opened zone is closed to make room, as the
spec allows; with none: Too Many Open Zones) and a zone written up to its
capacity becomes Full, which releases its resources.  Reads may not cross a
zone boundary (Identify OZCS.RAZB = 0: Zone Boundary Error) nor touch an
offline zone.

Zone states are device state: :meth:`ZoneTable.state` gives the zones that
are not Empty as a value, :meth:`ZoneTable.checked` checks such a value
against this table's geometry and limits and :meth:`ZoneTable.adopt` takes
it (migration and the live handoff decode first, adopt at commit).  The image file holds the data only: a process that starts
afresh sees every zone Empty.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from appliance.protocol_common import step
from appliance.storage.spec import CommandError, Status


class ZonedSettings(Protocol):
    """A namespace's zoned geometry in bytes (the configuration's ``zoned`` entry)."""

    @property
    def zone_size(self) -> int: ...
    @property
    def zone_capacity(self) -> int | None: ...  # None: the zone size
    @property
    def max_open(self) -> int: ...  # 0: no limit
    @property
    def max_active(self) -> int: ...  # 0: no limit


class ZoneState(enum.IntEnum):
    """The Zone State field (ZS, bits 7:4 of a zone descriptor's byte 1)."""

    EMPTY = 0x1
    IMPLICITLY_OPENED = 0x2
    EXPLICITLY_OPENED = 0x3
    CLOSED = 0x4
    READ_ONLY = 0xD
    FULL = 0xE
    OFFLINE = 0xF


class ZoneEvent(enum.Enum):
    """What moves a zone: a write at its write pointer, a Zone Management Send
    action, or the media (a zone that turns read-only)."""

    WRITE = "write"
    FILL = "fill"  # a write that reaches the zone capacity
    OPEN = "open"
    CLOSE = "close"
    FINISH = "finish"
    RESET = "reset"
    OFFLINE = "offline"
    MEDIA_READ_ONLY = "media read-only"


Z, E = ZoneState, ZoneEvent
#: ZNS 1.1 figure 7 (the zone state machine) and the Zone Send Actions of
#: section 3.4.3; an action on a zone already in its target state is a no-op.
TRANSITIONS: dict[ZoneState, dict[ZoneEvent, ZoneState]] = {
    Z.EMPTY: {E.WRITE: Z.IMPLICITLY_OPENED, E.FILL: Z.FULL, E.OPEN: Z.EXPLICITLY_OPENED,
              E.FINISH: Z.FULL, E.RESET: Z.EMPTY, E.MEDIA_READ_ONLY: Z.READ_ONLY},
    Z.IMPLICITLY_OPENED: {E.WRITE: Z.IMPLICITLY_OPENED, E.FILL: Z.FULL,
                          E.OPEN: Z.EXPLICITLY_OPENED, E.CLOSE: Z.CLOSED, E.FINISH: Z.FULL,
                          E.RESET: Z.EMPTY, E.MEDIA_READ_ONLY: Z.READ_ONLY},
    Z.EXPLICITLY_OPENED: {E.WRITE: Z.EXPLICITLY_OPENED, E.FILL: Z.FULL,
                          E.OPEN: Z.EXPLICITLY_OPENED, E.CLOSE: Z.CLOSED, E.FINISH: Z.FULL,
                          E.RESET: Z.EMPTY, E.MEDIA_READ_ONLY: Z.READ_ONLY},
    Z.CLOSED: {E.WRITE: Z.IMPLICITLY_OPENED, E.FILL: Z.FULL, E.OPEN: Z.EXPLICITLY_OPENED,
               E.CLOSE: Z.CLOSED, E.FINISH: Z.FULL, E.RESET: Z.EMPTY,
               E.MEDIA_READ_ONLY: Z.READ_ONLY},
    Z.FULL: {E.FINISH: Z.FULL, E.RESET: Z.EMPTY, E.MEDIA_READ_ONLY: Z.READ_ONLY},
    Z.READ_ONLY: {E.OFFLINE: Z.OFFLINE},
    Z.OFFLINE: {E.OFFLINE: Z.OFFLINE},
}
#: the status a write to a zone in these states completes with (ZNS 2.1.1)
WRITE_REFUSED = {Z.FULL: Status.ZONE_IS_FULL, Z.READ_ONLY: Status.ZONE_IS_READ_ONLY,
                 Z.OFFLINE: Status.ZONE_IS_OFFLINE}
OPEN = frozenset({Z.IMPLICITLY_OPENED, Z.EXPLICITLY_OPENED})
ACTIVE = OPEN | {Z.CLOSED}
#: the zones Select All acts on, per action (ZNS 3.4.3: Close, Finish, Open, Reset, Offline)
SELECT_ALL: dict[ZoneEvent, frozenset[ZoneState]] = {
    E.CLOSE: OPEN, E.FINISH: ACTIVE, E.OPEN: frozenset({Z.CLOSED}),
    E.RESET: ACTIVE | {Z.FULL}, E.OFFLINE: frozenset({Z.READ_ONLY}),
}
NO_WRITE_POINTER = (1 << 64) - 1  # a descriptor's WP for a Full, Read Only or Offline zone


def _transition_error(message: str) -> CommandError:
    return CommandError(Status.INVALID_ZONE_STATE_TRANSITION, message)


@dataclass(frozen=True)
class ZoneRecord:
    """One zone that is not Empty, as it travels in the device state."""

    index: int
    state: ZoneState
    wp: int  # the write pointer (an LBA)


@dataclass(frozen=True)
class ZoneSnapshot:
    """Every zone's state and write pointer, checked (what a restore adopts)."""

    states: tuple[ZoneState, ...]
    wps: tuple[int, ...]


@dataclass(frozen=True)
class ZoneDescriptorValue:
    """What a Zone Management Receive reports of one zone."""

    state: ZoneState
    capacity: int
    zslba: int
    wp: int


class ZoneTable:
    """The zones of one namespace: states, write pointers, resource counts."""

    def __init__(self, nsid: int, nlbas: int, lba_shift: int, settings: ZonedSettings) -> None:
        """Cut ``nlbas`` blocks into zones as ``settings`` (bytes) says; every zone Empty.

        Raises:
            ValueError: a zone size or capacity that is not a positive multiple of
                the block size, a capacity above the zone size, a namespace that is
                not a whole number of zones, or open limit above the active limit.
        """
        block = 1 << lba_shift
        capacity = settings.zone_capacity or settings.zone_size
        if (settings.zone_size <= 0 or settings.zone_size % block or capacity % block
                or not 0 < capacity <= settings.zone_size):
            raise ValueError(f"namespace {nsid}: zone size {settings.zone_size} / capacity "
                             f"{capacity} not positive multiples of {block} (capacity <= size)")
        self.nsid = nsid
        self.zone_blocks = settings.zone_size >> lba_shift
        self.capacity = capacity >> lba_shift
        if nlbas % self.zone_blocks:
            raise ValueError(f"namespace {nsid}: {nlbas} blocks are not whole zones of "
                             f"{self.zone_blocks}")
        self.count = nlbas // self.zone_blocks
        self.max_open, self.max_active = settings.max_open, settings.max_active
        if self.max_open and self.max_active and self.max_open > self.max_active:
            raise ValueError(f"namespace {nsid}: max_open {self.max_open} above max_active "
                             f"{self.max_active}")
        self.states = [Z.EMPTY] * self.count
        self.wps = [i * self.zone_blocks for i in range(self.count)]
        self.open: set[int] = set()
        self.closed: set[int] = set()

    # ------------------------------------------------------------ geometry
    def zone_of(self, lba: int) -> int:
        """The index of the zone holding ``lba``."""
        return lba // self.zone_blocks

    def start(self, index: int) -> int:
        """The zone's first LBA (ZSLBA)."""
        return index * self.zone_blocks

    def start_index(self, slba: int) -> int:
        """The index of the zone that starts at ``slba``.

        Raises:
            CommandError: LBA_OUT_OF_RANGE past the namespace, INVALID_FIELD for an
                LBA that is not a zone's first.
        """
        if not 0 <= slba < self.count * self.zone_blocks:
            raise CommandError(Status.LBA_OUT_OF_RANGE, f"nsid {self.nsid}: LBA {slba}")
        if slba % self.zone_blocks:
            raise CommandError(Status.INVALID_FIELD, f"nsid {self.nsid}: LBA {slba} is not a "
                               "zone start")
        return slba // self.zone_blocks

    @property
    def active(self) -> int:
        """Zones holding an active resource (opened or closed)."""
        return len(self.open) + len(self.closed)

    # ------------------------------------------------------------ reads and writes
    def check_read(self, slba: int, nlb: int) -> None:
        """Raises:
            CommandError: ZONE_BOUNDARY_ERROR for a range across zones (RAZB = 0),
                ZONE_IS_OFFLINE for blocks of an offline zone.
        """
        index = self.zone_of(slba)
        if nlb and self.zone_of(slba + nlb - 1) != index:
            raise CommandError(Status.ZONE_BOUNDARY_ERROR,
                               f"nsid {self.nsid}: read of LBA {slba}+{nlb} crosses a zone")
        if self.states[index] is Z.OFFLINE:
            raise CommandError(Status.ZONE_IS_OFFLINE, f"nsid {self.nsid}: zone {index}")

    def check_write(self, slba: int, nlb: int, append: bool = False) -> int:
        """Check a write of ``nlb`` blocks at ``slba`` (for Zone Append: the zone
        starting at ``slba``) before any data moves.

        Returns:
            The LBA the data goes to (Zone Append: the write pointer).

        Raises:
            CommandError: INVALID_FIELD (an append not at a zone start),
                ZONE_IS_FULL / ZONE_IS_READ_ONLY / ZONE_IS_OFFLINE, ZONE_INVALID_WRITE
                (not at the write pointer), ZONE_BOUNDARY_ERROR (past the zone
                capacity), TOO_MANY_ACTIVE_ZONES / TOO_MANY_OPEN_ZONES.
        """
        index = self.start_index(slba) if append else self.zone_of(slba)
        state, wp = self.states[index], self.wps[index]
        refused = WRITE_REFUSED.get(state)
        if refused is not None:
            raise CommandError(refused, f"nsid {self.nsid}: zone {index} is {state.name}")
        if append:
            slba = wp
        elif slba != wp:
            raise CommandError(Status.ZONE_INVALID_WRITE,
                               f"nsid {self.nsid}: write at LBA {slba}, write pointer {wp}")
        if slba + nlb > self.start(index) + self.capacity:
            raise CommandError(Status.ZONE_BOUNDARY_ERROR,
                               f"nsid {self.nsid}: LBA {slba}+{nlb} past zone {index}'s capacity")
        if state not in OPEN:
            self._check_resources(index)
        return slba

    def advance(self, slba: int, nlb: int) -> None:
        """Apply a write :meth:`check_write` allowed: the write pointer moves on,
        the zone opens implicitly (closing an implicitly opened one if the open
        limit says so) or becomes Full."""
        if nlb == 0:
            return
        index = self.zone_of(slba)
        if self.states[index] not in OPEN:
            self._make_room(index)
        self._move(index, E.WRITE)
        self.wps[index] = slba + nlb
        if self.wps[index] >= self.start(index) + self.capacity:
            self._move(index, E.FILL)

    # ------------------------------------------------------------ Zone Management Send
    def manage(self, event: ZoneEvent, slba: int, select_all: bool) -> list[int]:
        """Run a Zone Send Action on the zone starting at ``slba``, or with
        ``select_all`` on every zone in the states :data:`SELECT_ALL` names.

        Returns:
            The indexes of the zones that were reset (their blocks are to be
            deallocated by the caller).

        Raises:
            CommandError: LBA_OUT_OF_RANGE / INVALID_FIELD for a bad SLBA,
                INVALID_ZONE_STATE_TRANSITION, TOO_MANY_OPEN_ZONES /
                TOO_MANY_ACTIVE_ZONES (nothing changed then).
        """
        if select_all:
            targets = [i for i, s in enumerate(self.states) if s in SELECT_ALL[event]]
            if event is E.OPEN and self.max_open and (
                    len(self.open) + len(targets) > self.max_open):
                raise CommandError(Status.TOO_MANY_OPEN_ZONES,
                                   f"nsid {self.nsid}: opening {len(targets)} closed zones")
        else:
            index = self.start_index(slba)
            step(TRANSITIONS, self.states[index], event, _transition_error,
                 f"nsid {self.nsid} zone {index}")
            targets = [index]
        reset = []
        for index in targets:
            if event is E.OPEN and self.states[index] not in OPEN:
                self._check_resources(index)
                self._make_room(index)
            if event is E.RESET and self.states[index] is not Z.EMPTY:
                reset.append(index)
            self._move(index, event)
            if event is E.RESET:
                self.wps[index] = self.start(index)
            elif event is E.FINISH:
                self.wps[index] = self.start(index) + self.capacity
        return reset

    def make_read_only(self, index: int) -> None:
        """The media turned zone ``index`` read-only (a test's or a fault's doing).

        Raises:
            CommandError: INVALID_ZONE_STATE_TRANSITION for an offline zone.
        """
        self._move(index, E.MEDIA_READ_ONLY)

    def reset_all(self) -> None:
        """Every zone Empty, write pointers at zone starts (Format NVM)."""
        self.states = [Z.EMPTY] * self.count
        self.wps = [self.start(i) for i in range(self.count)]
        self.open.clear()
        self.closed.clear()

    # ------------------------------------------------------------ Zone Management Receive
    def report(self, slba: int, wanted: frozenset[ZoneState] | None, limit: int,
               partial: bool) -> tuple[int, list[ZoneDescriptorValue]]:
        """The zones from the one holding ``slba`` on, in the states ``wanted``
        (None: all): the first ``limit`` of them, and how many there are (with
        ``partial``: how many are returned).

        Raises:
            CommandError: LBA_OUT_OF_RANGE past the namespace.
        """
        if not 0 <= slba < self.count * self.zone_blocks:
            raise CommandError(Status.LBA_OUT_OF_RANGE, f"nsid {self.nsid}: LBA {slba}")
        out: list[ZoneDescriptorValue] = []
        count = 0
        for index in range(self.zone_of(slba), self.count):
            state = self.states[index]
            if wanted is not None and state not in wanted:
                continue
            if len(out) < limit:
                wp = NO_WRITE_POINTER if state in WRITE_REFUSED else self.wps[index]
                out.append(ZoneDescriptorValue(state, self.capacity, self.start(index), wp))
            elif partial:
                break
            elif wanted is None:  # every zone from here on matches: no need to look
                return count + self.count - index, out
            count += 1
        return (len(out) if partial else count), out

    # ------------------------------------------------------------ device state
    def state(self) -> list[ZoneRecord]:
        """The zones that are not Empty (the rest are)."""
        return [ZoneRecord(i, s, self.wps[i]) for i, s in enumerate(self.states)
                if s is not Z.EMPTY]

    def checked(self, records: Iterable[ZoneRecord]) -> ZoneSnapshot:
        """Zone states saved by :meth:`state`, checked against this table's
        geometry and limits (nothing is adopted: :meth:`adopt` does that).

        Raises:
            ValueError: a zone index past the table, a zone listed twice, a write
                pointer outside its zone (or not where its state puts it), more
                open or active zones than the limits.
        """
        states = [Z.EMPTY] * self.count
        wps = [self.start(i) for i in range(self.count)]
        seen: set[int] = set()
        for r in records:
            if not 0 <= r.index < self.count or r.index in seen:
                raise ValueError(f"zone {r.index} of namespace {self.nsid}")
            seen.add(r.index)
            start = self.start(r.index)
            if r.state is Z.EMPTY:
                ok = r.wp == start
            elif r.state in ACTIVE:
                ok = start <= r.wp < start + self.capacity
            else:  # Full, Read Only, Offline: the write pointer is not valid there
                ok = r.wp == start + self.capacity or r.state is not Z.FULL and (
                    start <= r.wp <= start + self.capacity)
            if not ok:
                raise ValueError(f"namespace {self.nsid} zone {r.index}: {r.state.name} with "
                                 f"write pointer {r.wp}")
            states[r.index], wps[r.index] = r.state, r.wp
        opened = sum(1 for s in states if s in OPEN)
        active = opened + sum(1 for s in states if s is Z.CLOSED)
        if self.max_open and opened > self.max_open or self.max_active and (
                active > self.max_active):
            raise ValueError(f"namespace {self.nsid}: {opened} open / {active} active zones "
                             "past the limits")
        return ZoneSnapshot(tuple(states), tuple(wps))

    def adopt(self, snapshot: ZoneSnapshot) -> None:
        """Take the zone states :meth:`checked` returned."""
        self.states, self.wps = list(snapshot.states), list(snapshot.wps)
        self.open = {i for i, s in enumerate(self.states) if s in OPEN}
        self.closed = {i for i, s in enumerate(self.states) if s is Z.CLOSED}

    def restore(self, records: Iterable[ZoneRecord]) -> None:
        """:meth:`checked`, then :meth:`adopt` (ValueError: the table is unchanged)."""
        self.adopt(self.checked(records))

    # ------------------------------------------------------------ internals
    def _check_resources(self, index: int) -> None:
        """Raise the limit a zone about to open would break (nothing changes); an
        implicitly opened zone that :meth:`_make_room` can close leaves room."""
        state = self.states[index]
        if state is Z.EMPTY and self.max_active and self.active >= self.max_active:
            raise CommandError(Status.TOO_MANY_ACTIVE_ZONES,
                               f"nsid {self.nsid}: {self.active} zones active")
        if self.max_open and len(self.open) >= self.max_open and not any(
                self.states[i] is Z.IMPLICITLY_OPENED for i in self.open):
            raise CommandError(Status.TOO_MANY_OPEN_ZONES,
                               f"nsid {self.nsid}: {len(self.open)} zones open")

    def _make_room(self, index: int) -> None:
        """Close the lowest implicitly opened zone if zone ``index`` opening would
        pass the open limit (what :meth:`_check_resources` allowed)."""
        if self.max_open and len(self.open) >= self.max_open:
            implicit = [i for i in self.open if self.states[i] is Z.IMPLICITLY_OPENED]
            if implicit:
                self._move(min(implicit), E.CLOSE)

    def _move(self, index: int, event: ZoneEvent) -> None:
        new = step(TRANSITIONS, self.states[index], event, _transition_error,
                   f"nsid {self.nsid} zone {index}")
        self.states[index] = new
        self.open.discard(index)
        self.closed.discard(index)
        if new in OPEN:
            self.open.add(index)
        elif new is Z.CLOSED:
            self.closed.add(index)
