"""Submission and completion queues and their doorbells (NVMe 1.4 sections 4.1, 4.6, 5.7).

Theory of operation
-------------------
Queues are physically contiguous rings in client memory (CAP.CQR = 1), of
``size`` entries, addressed by index.  The host owns an SQ's tail and a CQ's
head (it writes them through doorbells); the controller owns an SQ's head and
a CQ's tail and the CQ's phase tag, which flips each time the tail wraps
(section 4.6).  A ring is full when ``tail + 1 == head`` (mod size), so a
queue of ``size`` entries holds ``size - 1``.

Posting a completion races with the host: a driver on another vCPU polls the
phase tag of the next CQ slot while we write it.  :meth:`CompletionQueue.push`
therefore writes DW0-DW2 and the CID first and the 16-bit status word (phase
tag) last, as one 2-byte store (:meth:`ClientMemory.write_uint`), so an entry
whose phase tag flipped is whole.  EventIdx values are single 4-byte stores
for the same reason.

Doorbell values are checked here: a tail or head outside the ring, or a CQ
head that moves past entries the controller has not posted, is an "Invalid
Doorbell Write Value" (section 5.2.1, figure 146); the caller turns the
refusal into an asynchronous event.

Shadow doorbells (Doorbell Buffer Config, section 5.7): when configured, the
host writes each I/O queue's doorbell value into a shadow buffer in its own
memory first and rings the MMIO doorbell only when the value crosses the
EventIdx the controller publishes in a second buffer -- Linux's
``nvme_dbbuf_need_event(event_idx, new, old)`` rings when ``event_idx`` lies
in ``[old, new)``.  A queue with a :class:`Shadow` therefore takes its value
from the shadow slot (MMIO writes only wake the controller: a posted MMIO
write may be older than the shadow value already read), and the controller
publishes the value it has consumed as the EventIdx so the next update rings
again.  Linux never shadows the admin queue (``nvme_dbbuf_init`` skips qid 0),
so neither does this controller.

Held commands: an Asynchronous Event Request completes only when an event
occurs (section 5.2).  :class:`AsyncEvents` keeps the held AERs and the events
not yet reported; once an event is reported, further events for the same log
page stay masked until the host reads that log page with RAE cleared.
:class:`ErrorLog` is the Error Information log page those events point at.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.memory import ClientMemory, DmaPending
from appliance.storage.log_spec import ErrorLogEntry
from appliance.storage.spec import (
    CQE_SIZE,
    DOORBELL_BASE,
    SQE_SIZE,
    Command,
    CommandError,
    Completion,
    Status,
    status_field,
)

DOORBELL_STRIDE = 4  # CAP.DSTRD = 0
CQE_STATUS_OFFSET = 14  # figure 120: DW3 bits 31:16, the status field and phase tag


def doorbell_target(offset: int) -> tuple[int, bool]:
    """(queue id, is a CQ head doorbell) for a BAR0 offset at or past 1000h."""
    qid, is_cq = divmod((offset - DOORBELL_BASE) // DOORBELL_STRIDE, 2)
    return qid, bool(is_cq)


@dataclass
class Shadow:
    """One queue's slots in the shadow doorbell and EventIdx buffers."""

    doorbell: int
    event_idx: int
    published: int | None = None  # the EventIdx last written
    rejected: int | None = None  # the invalid doorbell value last reported

    @classmethod
    def for_queue(cls, buffers: tuple[int, int], qid: int, is_cq: bool) -> Shadow:
        """The slots of queue ``qid`` given (shadow buffer, EventIdx buffer) addresses."""
        slot = (2 * qid + int(is_cq)) * DOORBELL_STRIDE
        return cls(buffers[0] + slot, buffers[1] + slot)

    def read(self, memory: ClientMemory) -> int:
        """The host's latest doorbell value (GuestMemoryError if unreachable)."""
        return int.from_bytes(memory.read(self.doorbell, 4), "little")

    def publish(self, memory: ClientMemory, value: int) -> None:
        """Write the EventIdx if it changed (GuestMemoryError if unreachable)."""
        if value != self.published:
            memory.write_uint(self.event_idx, value, 4)  # one store: the host reads it racily
            self.published = value


def _take_shadow(shadow: Shadow, memory: ClientMemory, take: Callable[[int], bool]) -> bool:
    """Apply the shadow doorbell value with ``take``; False when it is newly refused."""
    value = shadow.read(memory)
    if take(value) or value == shadow.rejected:
        return True
    shadow.rejected = value  # report each bad value once, not on every poll
    return False


@dataclass
class SubmissionQueue:
    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0
    shadow: Shadow | None = None

    @property
    def empty(self) -> bool:
        return self.head == self.tail

    def set_tail(self, value: int) -> bool:
        """Take a tail doorbell value; False (and no change) if it is invalid."""
        if not 0 <= value < self.size:
            return False
        self.tail = value
        return True

    def sync(self, memory: ClientMemory) -> bool:
        """Take the shadow doorbell's tail, if shadowed; False for a new invalid value.

        Raises:
            GuestMemoryError: the shadow buffer is unreachable.
        """
        return self.shadow is None or _take_shadow(self.shadow, memory, self.set_tail)

    def fetch(self, memory: ClientMemory) -> Command:
        """Read the entry at the head and advance the head.

        Raises:
            GuestMemoryError: the entry is not in reachable client memory.
        """
        command = Command.unpack(memory.read(self.base + self.head * SQE_SIZE, SQE_SIZE))
        self.head = (self.head + 1) % self.size
        return command


@dataclass
class CompletionQueue:
    qid: int
    base: int
    size: int
    vector: int
    ien: bool
    head: int = 0
    tail: int = 0
    phase: int = 1
    shadow: Shadow | None = None
    sqids: set[int] = field(default_factory=set)
    backlog: deque[Completion] = field(default_factory=deque)
    unsignalled: bool = False  # entries posted since the last interrupt

    @property
    def outstanding(self) -> int:
        """Entries posted and not yet consumed by the host."""
        return (self.tail - self.head) % self.size

    @property
    def room(self) -> int:
        """Entries that can be posted before the ring is full."""
        return self.size - 1 - self.outstanding

    def set_head(self, value: int) -> bool:
        """Take a head doorbell value; False (and no change) if it is invalid.

        The head may not move past the tail: the host can only consume entries
        that were posted.
        """
        if not 0 <= value < self.size or (value - self.head) % self.size > self.outstanding:
            return False
        self.head = value
        return True

    def sync(self, memory: ClientMemory) -> bool:
        """Take the shadow doorbell's head, if shadowed; False for a new invalid value.

        Raises:
            GuestMemoryError: the shadow buffer is unreachable.
        """
        return self.shadow is None or _take_shadow(
            self.shadow, memory, lambda value: value == self.head or self.set_head(value))

    def has_room(self, memory: ClientMemory) -> bool:
        """Whether an entry can be posted now (never while a backlog waits).

        A full shadowed CQ re-reads the host's head; still full, it publishes
        the head as EventIdx so the host's next head update rings the doorbell.

        A shadow head that must come by DMA message counts as full until it
        arrived (its arrival runs the controller again).

        Raises:
            GuestMemoryError: the shadow buffers are unreachable.
        """
        if self.backlog:
            return False
        if self.room == 0 and self.shadow is not None:
            try:
                self.sync(memory)
                if self.room == 0:
                    self.shadow.publish(memory, self.head)
                    self.sync(memory)
            except DmaPending:
                return False
        return self.room > 0

    def post(self, memory: ClientMemory, entry: Completion) -> None:
        """Push ``entry``, or queue it in the backlog while the ring is full.

        Raises:
            GuestMemoryError: the slot or the shadow buffers are unreachable.
        """
        if self.has_room(memory):
            self.push(memory, entry)
        else:
            self.backlog.append(entry)

    def flush(self, memory: ClientMemory) -> bool:
        """Move backlog entries into the ring while there is room; True if any moved.

        Raises:
            GuestMemoryError: a slot or the shadow buffers are unreachable.
        """
        moved = False
        while self.backlog:
            entry = self.backlog.popleft()
            if not self.has_room(memory):
                self.backlog.appendleft(entry)
                break
            self.push(memory, entry)
            moved = True
        return moved

    def push(self, memory: ClientMemory, entry: Completion) -> None:
        """Write ``entry`` (phase tag added) at the tail and advance; the caller checks room.

        Raises:
            GuestMemoryError: the slot is not in reachable client memory
                (nothing advances then).
        """
        entry.status = (entry.status & ~1) | self.phase
        slot = self.base + self.tail * CQE_SIZE
        # The host polls the phase tag while we write (another vCPU): DW0-DW3's
        # CID first, then the status word with the phase tag as one 2-byte store.
        memory.write(slot, entry.pack()[:CQE_STATUS_OFFSET])
        memory.write_uint(slot + CQE_STATUS_OFFSET, entry.status, 2)
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= 1
        self.unsignalled = True


# ---------------------------------------------------------------- held commands and events
class AsyncEvents:
    """Outstanding Asynchronous Event Requests and the events waiting for one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # AERL + 1
        self.reset()

    def reset(self) -> None:
        """Controller reset: held AERs are dropped without completions (section 7.3.1)."""
        self.outstanding: list[int] = []
        self.pending: list[tuple[int, int, int]] = []  # (type, info, log page)
        self.masked: set[int] = set()  # log pages whose events wait for a read

    def request(self, cid: int) -> None:
        """Hold an AER.

        Raises:
            CommandError: AER_LIMIT_EXCEEDED past AERL + 1 held requests (5.2).
        """
        if len(self.outstanding) >= self.limit:
            raise CommandError(Status.AER_LIMIT_EXCEEDED, f"{self.limit} AERs outstanding")
        self.outstanding.append(cid)

    def add(self, event_type: int, info: int, log_page: int) -> None:
        """Record an event (duplicates of a pending one merge)."""
        if (event_type, info, log_page) not in self.pending:
            self.pending.append((event_type, info, log_page))

    def take(self) -> list[tuple[int, int]]:
        """Pair held AERs with reportable events; returns (cid, DWORD 0) pairs."""
        out = []
        for event in list(self.pending):
            if not self.outstanding:
                break
            event_type, info, log_page = event
            if log_page in self.masked:
                continue
            self.pending.remove(event)
            self.masked.add(log_page)
            out.append((self.outstanding.pop(0), event_type | info << 8 | log_page << 16))
        return out

    def log_read(self, log_page: int) -> None:
        """The host read ``log_page`` with RAE clear: what it reported is seen, and
        its later events are reportable again."""
        self.pending = [event for event in self.pending if event[2] != log_page]
        self.masked.discard(log_page)

    def abort(self, cid: int) -> bool:
        """Drop held AER ``cid``; False if there is none."""
        if cid in self.outstanding:
            self.outstanding.remove(cid)
            return True
        return False


class ErrorLog:
    """The Error Information log (section 5.14.1.1): newest entry first."""

    def __init__(self, entries: int) -> None:
        self.size = entries  # ELPE + 1
        self.count = 0
        self.entries: deque[ErrorLogEntry] = deque(maxlen=entries)

    def add(self, sqid: int, cid: int, status: int, dnr: bool = False, nsid: int = 0,
            lba: int = 0) -> None:
        """Record a failed command; the entry's Status Field carries SC, SCT and DNR;
        ``lba``: the first LBA that saw the error (0 when not applicable)."""
        self.count += 1
        self.entries.appendleft(ErrorLogEntry(error_count=self.count, sqid=sqid, cid=cid,
                                              status=status_field(status, dnr, 0), nsid=nsid,
                                              lba=lba))

    def page(self) -> bytes:
        data = b"".join(entry.pack() for entry in self.entries)
        return data.ljust(self.size * ErrorLogEntry.SIZE, b"\0")
