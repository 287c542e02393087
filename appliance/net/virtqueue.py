"""Split virtqueue over client memory (device layer; virtio 1.2 §2.7).

Theory of operation
-------------------
A :class:`SplitQueue` is configured the vhost-user way (SET_VRING_NUM, _BASE,
_ADDR with front-end virtual addresses, _KICK) and then *attached* to the
connection's :class:`~appliance.memory.ClientMemory`: the three ring areas are
translated with :meth:`ClientMemory.translate_user`, checked for size and
alignment, and held as zero-copy views from :meth:`ClientMemory.buffers`.
Packet buffers named by descriptors are guest physical addresses and are read
and written through :meth:`ClientMemory.read` / :meth:`ClientMemory.write`.

When the memory table changes (SET_MEM_TABLE at run time, ADD/REM_MEM_REG),
the owner calls :meth:`detach` before the old mappings go away and
:meth:`attach` with the new memory; ring indices are kept, so a remap loses no
state.

Ring lifecycle is a table (:mod:`appliance.net.vring_state`): a ring starts
when its kick fd is set and stops on GET_VRING_BASE, reset or disconnect.

:meth:`pop` walks one available chain (:func:`~appliance.net.descriptor_chain.walk_chain`,
which lists the bounds) within the queue's :attr:`~SplitQueue.max_readable` /
:attr:`~SplitQueue.max_writable`.  A malformed chain is returned to the driver
with length 0, counted, and skipped: the queue keeps running.  An avail index
that runs more than a queue size ahead of us cannot be followed at all; the
ring is marked broken (it stays so until reconfigured) and that is counted too.

Ring fields the driver reads or writes concurrently (indices, flags, ring
entries, event indices) are accessed through ``memoryview.cast`` views, which
load and store each element with one fixed-size copy.  ``struct.pack_into`` is
not safe there: CPython zero-fills the target before writing the fields, so a
published used index would briefly read as 0 (a driver that looks in that
window sees 65536 - n bogus completions).

Rings in memory the front-end could shrink (a memfd it did not allow us to
seal, see :mod:`appliance.memory`) are not mmap'd for Python: its views are
:class:`~appliance.memory.FdArea`/``FdWords`` stand-ins doing one pread or
pwrite per field.  When one fails (the file shrank), the ring is marked
broken, as for an avail index it cannot follow.

With the native fast path (:attr:`SplitQueue.native`, set by the owner) and
every region of the memory mapped for it (mmap'd, or an fd region's guarded
mapping: :func:`~appliance.net.native.native_regions`), :meth:`pop`,
:meth:`drain` and :meth:`publish` run in C (:mod:`appliance.net.native`): the
same walk, bounds and messages, batched; the Python code below stays the
reference and runs for everything else.  A native call that faulted in a
guarded mapping (the front-end shrank its file meanwhile) changed nothing the
ring adopts: the ring leaves the native path with its memory
(:func:`appliance.memory_guarded.native_fault`)
and the same call runs in Python through the fd, so the outcome is the fd
path's (a malformed chain, a broken ring, a faulted frame).

Used entries are written as chains complete (:meth:`push`) but the used index
is published once per batch (:meth:`publish`), which also reports whether the
driver wants an interrupt (VRING_AVAIL_F_NO_INTERRUPT, or EVENT_IDX's
``used_event``).  With EVENT_IDX the queue also writes ``avail_event`` so the
driver kicks for the next buffer (:meth:`arm_kick`).
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from typing import TypeVar

from appliance.memory import ClientMemory, FdArea, FdWords, GuestMemoryError
from appliance.net import vhost_wire as vw
from appliance.net.descriptor_chain import MAX_CHAIN_BYTES, Chain, MalformedChain, walk_chain
from appliance.net.native import (
    NativeRegions,
    NativeRingArgs,
    NativeVring,
    is_vanished,
    native_fault,
    native_ring,
)
from appliance.net.vring_state import (
    RING_ALLOWED,
    RING_TRANSITIONS,
    QueueCounters,
    RingError,
    RingState,
    VringState,
)
from appliance.protocol_common import step

_fence_lock = threading.Lock()
_T = TypeVar("_T")

if not vw.NATIVE_IS_LITTLE_ENDIAN:  # pragma: no cover - no big-endian hosts here
    raise ImportError("split virtqueues need a little-endian host (native ring codecs)")


def full_fence() -> None:
    """A full memory barrier between our stores and later loads.

    A locked instruction (the uncontended lock's compare-and-swap) orders a store
    before a following load on x86, which the used-index publish / ``used_event``
    check and the ``avail_event`` write / avail-index re-check need (virtio 1.2
    §2.7.7.2, §2.7.10.1).
    """
    with _fence_lock:
        pass


class SplitQueue:
    """One split virtqueue as the device side sees it."""

    def __init__(self, index: int, max_size: int = vw.MAX_QUEUE_SIZE) -> None:
        self.index = index
        self.max_size = max_size
        self.state = RingState.STOPPED
        self.size = 0
        self.desc_user = self.avail_user = self.used_user = None  # type: int | None
        self.log_guest_addr = 0
        self.addr_flags = 0
        self.last_avail_idx = 0
        self.used_idx = 0  # next used index we will write (shadow)
        self._published = 0  # used index the driver can see
        self.event_idx = False
        self.indirect = False
        self.enabled = True
        self.max_readable = MAX_CHAIN_BYTES  # byte limits per chain (set by the owner)
        self.max_writable = MAX_CHAIN_BYTES
        self.broken = ""  # why the ring cannot be followed ("" = fine)
        self.last_error = ""  # the last malformed chain, for the log
        self.counters = QueueCounters()
        self.memory: ClientMemory | None = None
        self._sync_used = False
        # memoryviews of mmap'd memory, or their FdArea/FdWords stand-ins (fd regions)
        self._desc: memoryview | FdArea | None = None  # bytes of the descriptor table
        self._avail: memoryview | FdWords | None = None  # u16: flags, idx, ring[n], used_event
        self._used: memoryview | FdWords | None = None  # u16: flags, idx, ..., avail_event
        self._used_elems: memoryview | FdWords | None = None  # u32: id, len per used element
        self._bases: list[memoryview | FdArea] = []  # byte views the casts above come from
        self._spans: list[tuple[int, int, bool]] = []
        self.native: NativeVring | None = None  # the native fast path, when the owner enables it
        # desc, avail, used byte views and the regions, when every region is mmap'd
        self._native_ring: tuple[memoryview, memoryview, memoryview, NativeRegions] | None = None

    # ------------------------------------------------------------ state table
    def _event(self, event: str) -> None:
        self.state = step(RING_TRANSITIONS, self.state, event, RingError, where=f"vring {self.index}")

    def _allow(self, what: str) -> None:
        if what not in RING_ALLOWED[self.state]:
            raise RingError(f"vring {self.index}: {what} not allowed while {self.state.value}")

    @property
    def started(self) -> bool:
        return self.state is RingState.STARTED

    @property
    def unpublished(self) -> int:
        """Used entries pushed but not yet visible to the driver."""
        return (self.used_idx - self._published) & 0xFFFF

    @property
    def ready(self) -> bool:
        """Started, mapped and followable: buffers can be taken from it."""
        return self.state is RingState.STARTED and self._avail is not None and not self.broken

    # ------------------------------------------------------------ configuration
    def set_num(self, num: int) -> None:
        """SET_VRING_NUM: a power of two from 1 to the maximum queue size."""
        self._allow("set_num")
        if not 0 < num <= self.max_size or num & (num - 1):
            raise RingError(f"vring {self.index}: size {num} is not a power of two in 1..{self.max_size}")
        self.size = num

    def set_base(self, base: int) -> None:
        """SET_VRING_BASE: the next avail index to process (split ring: 16 bits)."""
        self._allow("set_base")
        if base > 0xFFFF:
            raise RingError(f"vring {self.index}: base {base:#x} does not fit 16 bits")
        self.last_avail_idx = self.used_idx = self._published = base
        self._sync_used = True
        self.broken = ""

    def get_base(self) -> int:
        return self.last_avail_idx

    # ------------------------------------------------------------ live handoff
    def handoff_state(self) -> VringState:
        """What another process needs to continue this ring (no fds).

        ``last_avail_idx`` is what GET_VRING_BASE would return; ``used_idx``
        may trail it (a malformed chain whose head was out of range got no used
        entry).  Everything pushed has been published (the caller flushed).
        """
        return VringState(self.size, self.desc_user, self.avail_user, self.used_user,
                          self.log_guest_addr, self.addr_flags, self.last_avail_idx,
                          self.used_idx, self._sync_used, self.started)

    def restore_indices(self, last_avail_idx: int, used_idx: int, sync_used: bool) -> None:
        """Handoff import: continue at the indices the previous process reached.

        Called after the ring was configured through the ordinary setters
        (SET_VRING_NUM/BASE/ADDR/KICK), which may have synced ``last_avail_idx``
        to the used index in memory; this puts back the exact pair.

        Raises:
            RingError: an index does not fit 16 bits, or ``used_idx`` is ahead of
                ``last_avail_idx`` or behind it by more than the queue size.
        """
        for name, value in (("last_avail_idx", last_avail_idx), ("used_idx", used_idx)):
            if not 0 <= value <= 0xFFFF:
                raise RingError(f"vring {self.index}: {name} {value:#x} does not fit 16 bits")
        if (last_avail_idx - used_idx) & 0xFFFF > self.size:
            raise RingError(f"vring {self.index}: used index {used_idx} is not within a queue "
                            f"size ({self.size}) behind the avail index {last_avail_idx}")
        self.last_avail_idx = last_avail_idx
        self.used_idx = self._published = used_idx
        self._sync_used = sync_used

    def set_addr(self, desc: int, used: int, avail: int, log_guest_addr: int, flags: int) -> None:
        """SET_VRING_ADDR: record the areas (front-end virtual addresses).

        With memory attached and a size set, the areas are checked at once
        (inside memory, aligned); a started ring switches to them.

        Raises:
            RingError: misaligned, or not inside the mapped memory.
        """
        self._allow("set_addr")
        if desc % vw.DESC_ALIGN or avail % vw.AVAIL_ALIGN or used % vw.USED_ALIGN:
            raise RingError(f"vring {self.index}: misaligned ring areas desc={desc:#x} "
                            f"avail={avail:#x} used={used:#x}")
        old = (self.desc_user, self.avail_user, self.used_user)
        self.desc_user, self.avail_user, self.used_user = desc, avail, used
        self.log_guest_addr, self.addr_flags = log_guest_addr, flags
        if self.memory is not None and self.size:
            try:
                self._map(self.memory)  # on failure the old views stay in place
            except RingError:
                self.desc_user, self.avail_user, self.used_user = old
                raise
        self.broken = ""

    def start(self) -> None:
        """The kick fd is set: begin processing.

        Raises:
            RingError: size or addresses missing, or the areas are not mapped.
        """
        if not self.size or self.desc_user is None:
            raise RingError(f"vring {self.index}: started before its size and addresses were set")
        if self.memory is None:
            raise RingError(f"vring {self.index}: started before the memory table")
        self._map(self.memory)
        self._event("start")

    def stop(self) -> int:
        """GET_VRING_BASE: stop and return the next avail index to process."""
        self._event("stop")
        return self.last_avail_idx

    def reset(self) -> None:
        """Back to the unconfigured, stopped state (disconnect, RESET_DEVICE)."""
        self._event("reset")
        self._unmap()
        self.memory = None
        self.size = 0
        self.desc_user = self.avail_user = self.used_user = None
        self.log_guest_addr = self.addr_flags = 0
        self.last_avail_idx = self.used_idx = self._published = 0
        self.event_idx = self.indirect = False
        self.enabled = True
        self.broken = ""
        self._sync_used = False

    # ------------------------------------------------------------ memory
    def attach(self, memory: ClientMemory) -> None:
        """Use ``memory`` from now on; a configured ring remaps its areas.

        A started ring whose areas are no longer mapped is marked broken (and
        stays so until its addresses are set again) rather than failing the
        memory update: the front-end may be about to send new addresses.
        """
        self.memory = memory
        self._spans = [(r.address, r.end, r.writable) for r in memory.regions]
        if self.size and self.desc_user is not None:
            try:
                self._map(memory)
            except RingError as exc:
                if self.started:
                    self.broken = str(exc)

    def detach(self) -> None:
        """Release every view of client memory (before the mappings change)."""
        self._unmap()
        self.memory = None
        self._spans = []

    def _map(self, memory: ClientMemory) -> None:
        assert self.desc_user is not None and self.avail_user is not None and self.used_user is not None
        n = self.size
        areas = ((self.desc_user, vw.desc_table_size(n), False),
                 (self.avail_user, vw.avail_ring_size(n), False),
                 (self.used_user, vw.used_ring_size(n), True))
        got: list[memoryview | FdArea] = []
        try:
            for user, length, write in areas:
                address = memory.translate_user(user, length)
                pieces = memory.buffers(address, length, write)
                if pieces is None:  # not mmap'd: one pread/pwrite per field
                    area = memory.fd_area(address, length, write, self._fd_failed)
                    pieces = [area] if area is not None else None  # type: ignore[list-item]
                if pieces is None or len(pieces) != 1:
                    for piece in pieces or ():
                        piece.release()
                    raise RingError(f"vring {self.index}: ring area {user:#x}+{length:#x} "
                                    "must lie in one mapped region")
                got.append(pieces[0])
        except (GuestMemoryError, RingError) as exc:
            for view in got:
                view.release()
            if isinstance(exc, RingError):
                raise
            raise RingError(f"vring {self.index}: ring areas outside memory: {exc}") from None
        self._unmap()
        desc, avail, used = got
        used_elems = used[4:4 + vw.UsedElem.SIZE * n]
        self._bases = [desc, avail, used, used_elems]
        self._desc = desc
        self._avail = avail.cast("H")
        self._used = used.cast("H")
        self._used_elems = used_elems.cast("I")
        self._spans = [(r.address, r.end, r.writable) for r in memory.regions]
        if self.native is not None:
            self._native_ring = native_ring(memory, self.native, [
                (memory.translate_user(user, length), length) for user, length, _ in areas])
        if self._sync_used:
            # A fresh start: the driver's used index is the truth (we keep no
            # in-flight state across connections).
            cur = self._used[1]
            if cur != self.used_idx:
                self.last_avail_idx = self.used_idx = self._published = cur
            self._sync_used = False

    def _drop_native(self) -> None:
        ring, self._native_ring = self._native_ring, None
        if ring is not None:
            for view in ring[:3]:
                view.release()

    def _vanished(self) -> None:
        """A native call on this ring faulted in a guarded mapping: its memory
        leaves the native path (the call's work runs in Python next)."""
        if self.memory is not None:
            native_fault([self.memory])
        self._drop_native()

    def _fd_failed(self, exc: GuestMemoryError) -> None:
        """An fd-region ring field could not be reached (the file shrank)."""
        if not self.broken:
            self.broken = f"ring memory unreachable: {exc}"
            self.counters.malformed += 1

    def _unmap(self) -> None:
        for view in (self._avail, self._used, self._used_elems, *self._bases):
            if view is not None:
                view.release()
        self._desc = self._avail = self._used = self._used_elems = None
        self._bases = []
        self._drop_native()

    @property
    def uses_native(self) -> bool:
        """Whether :meth:`pop`, :meth:`drain` and :meth:`publish` run natively now."""
        return self.native is not None and self._native_now() is not None

    def _native_now(self) -> tuple[memoryview, memoryview, memoryview, NativeRegions] | None:
        """The native ring, unless its memory left the native path (a guarded
        call faulted in it, maybe on another ring)."""
        ring = self._native_ring
        if ring is not None and self.memory is not None and not self.memory.native_ok:
            self._drop_native()
            return None
        return ring

    def _native_walk(self, walk: Callable[..., tuple[list[_T], int, int, int, str | None,
                                                      str | None]], budget: int) -> list[_T]:
        """One native batch (``pop_chains`` or ``drain``), its results applied to the ring."""
        args = self.native_args()
        assert args is not None
        items, last_avail_idx, used_idx, malformed, error, broken = walk(*args, budget)
        self.native_done(last_avail_idx, used_idx, malformed, error, broken)
        return items

    def native_args(self) -> NativeRingArgs | None:
        """The ring as the native calls take it (None: it does not run natively now)."""
        ring = self._native_now()
        if self.native is None or ring is None:
            return None
        return (*ring, self.size, self.last_avail_idx, self.used_idx, self.indirect,
                self.max_readable, self.max_writable)

    def native_done(self, last_avail_idx: int, used_idx: int, malformed: int,
                    error: str | None, broken: str | None) -> None:
        """Adopt what a native call reports of this ring: its new indices, the chains
        it refused (counted), the last refusal and why the ring broke (None: no news)."""
        self.last_avail_idx, self.used_idx = last_avail_idx, used_idx
        self.counters.malformed += malformed
        if error is not None:
            self.last_error = error
        if broken is not None:
            self.broken = broken

    def native_receive(self, frame: bytes, hdr_len: int, mrg: bool,
                       log: bytearray | mmap.mmap | None) -> tuple[int, int] | None:
        """One frame written natively (``receive.write_frame``, whose caller
        checked :attr:`uses_native` and :attr:`ready`): (its ``Outcome`` value, log marks that
        reached past the end of ``log``, the vhost-user log bitmap), or None when
        the call faulted in a guarded mapping (the ring left the native path:
        write the frame in Python)."""
        args = self.native_args()
        assert self.native is not None and args is not None and self.ready
        try:
            outcome, last_avail_idx, used_idx, malformed, error, broken, beyond = (
                self.native.receive(*args, frame, hdr_len, mrg, log))
        except OSError as exc:
            if not is_vanished(exc):
                raise
            self._vanished()
            return None
        self.native_done(last_avail_idx, used_idx, malformed, error, broken)
        return outcome, beyond

    # ------------------------------------------------------------ driver -> device
    def avail_pending(self) -> int:
        """How many chains the driver has made available that we have not taken."""
        if self._avail is None or self.broken:
            return 0
        return (self._avail[1] - self.last_avail_idx) & 0xFFFF

    def pop(self) -> Chain | None:
        """The next well-formed available chain, or None when there is none.

        Malformed chains met on the way are counted, returned to the driver
        with length 0 (when their head is valid) and skipped.
        """
        avail = self._avail
        if avail is None or self.broken or self.state is not RingState.STARTED:
            return None
        if self.native is not None and self._native_now() is not None:
            try:
                chains = self._native_walk(self.native.pop_chains, 1)
            except OSError as exc:
                if not is_vanished(exc):
                    raise
                self._vanished()  # the same pop in Python, through the fd
            else:
                return Chain(*chains[0]) if chains else None
        size = self.size
        while True:
            idx = avail[1]
            last = self.last_avail_idx
            if idx == last or self.broken:
                return None
            if (idx - last) & 0xFFFF > size:
                self.broken = f"avail index {idx} is more than {size} ahead of {last}"
                self.counters.malformed += 1
                return None
            head = avail[2 + last % size]
            self.last_avail_idx = (last + 1) & 0xFFFF
            try:
                chain = walk_chain(self._desc, head, size, self.indirect, self.max_readable,
                                   self.max_writable, self.memory, self._spans)
            except MalformedChain as exc:
                if self.broken:
                    return None
                self.counters.malformed += 1
                self.last_error = f"chain {head}: {exc}"
                if head < size:
                    self.push(head, 0)
            else:
                return None if self.broken else chain

    def drain(self, budget: int) -> list[bytes]:
        """Take up to ``budget`` chains (a transmit ring's batch), each given back
        used with length 0, and return the bytes of each one's buffers in order.

        A chain whose bytes cannot be read is counted malformed and left out;
        nothing is published (:meth:`publish`).
        """
        if not self.ready:
            return []
        if self.native is not None and self._native_now() is not None:
            try:
                return self._native_walk(self.native.drain, budget)
            except OSError as exc:
                if not is_vanished(exc):
                    raise
                self._vanished()  # the same batch in Python, through the fd
        memory = self.memory
        assert memory is not None
        frames = []
        for _ in range(budget):
            chain = self.pop()
            if chain is None:
                break
            self.push(chain.head, 0)
            segs = chain.segments
            try:
                if len(segs) == 1:
                    frames.append(memory.read(segs[0][0], segs[0][1]))
                else:
                    frames.append(b"".join([memory.read(a, n) for a, n, _ in segs]))
            except GuestMemoryError:
                self.counters.malformed += 1
        return frames

    def checkpoint(self) -> tuple[int, int, int]:
        """Indices to :meth:`rollback` to (un-take chains not yet published)."""
        return self.last_avail_idx, self.used_idx, self.counters.malformed

    def rollback(self, mark: tuple[int, int, int]) -> None:
        self.last_avail_idx, self.used_idx, self.counters.malformed = mark

    # ------------------------------------------------------------ device -> driver
    def push(self, head: int, length: int) -> None:
        """Write one used element (visible to the driver at :meth:`publish`)."""
        elems = self._used_elems
        if elems is None:
            return
        slot = 2 * (self.used_idx % self.size)
        if isinstance(elems, FdWords):  # not mmap'd: both words in one pwrite
            elems.area.write(4 * slot, (head | length << 32).to_bytes(8, "little"))
        else:
            elems[slot] = head
            elems[slot + 1] = length
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Make pushed entries visible; True when the driver wants an interrupt."""
        used = self._used
        new = self.used_idx
        old = self._published
        if used is None or new == old:
            return False
        ring = self._native_now() if self.native is not None else None
        if self.native is not None and ring is not None:
            _, avail_bytes, used_bytes, _ = ring
            try:
                wants = self.native.publish(avail_bytes, used_bytes, self.size, old, new,
                                            self.event_idx)
            except OSError as exc:
                if not is_vanished(exc):
                    raise
                self._vanished()  # the same publish in Python, through the fd
            else:
                self._published = new
                return wants
        used[1] = new  # one 16-bit store, after the elements (x86 keeps store order)
        self._published = new
        avail = self._avail
        assert avail is not None
        full_fence()
        if self.event_idx:
            used_event = avail[2 + self.size]
            # vring_need_event(): did new pass used_event since old?
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not avail[0] & vw.VRING_AVAIL_F_NO_INTERRUPT

    def arm_kick(self) -> bool:
        """Ask for a kick on the next buffer; True if one is already pending.

        With EVENT_IDX the device writes ``avail_event`` (virtio 1.2 §2.7.10),
        otherwise it clears VRING_USED_F_NO_NOTIFY; then it looks again, so a
        buffer made available meanwhile is not left without a kick.
        """
        used = self._used
        if used is None or self.broken:
            return False
        if self.event_idx:
            used[2 + 4 * self.size] = self.last_avail_idx
        elif used[0]:
            used[0] = 0
        full_fence()
        return self.avail_pending() > 0

    def suppress_kicks(self) -> None:
        """We will come back without a kick: tell the driver not to send one.

        Without EVENT_IDX that is VRING_USED_F_NO_NOTIFY; with it, leaving
        ``avail_event`` behind has the same effect.
        """
        used = self._used
        if used is not None and not self.event_idx and not used[0]:
            used[0] = vw.VRING_USED_F_NO_NOTIFY
