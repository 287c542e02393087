"""Queue rings, doorbell validation, shadow doorbells, held AERs and the error log."""

from __future__ import annotations

import os
import struct

import pytest

from appliance.memory import ClientMemory
from appliance.storage.queues import (
    AsyncEvents,
    CompletionQueue,
    ErrorLog,
    Shadow,
    SubmissionQueue,
    doorbell_target,
)
from appliance.storage.spec import Command, CommandError, Completion, Status

pytestmark = pytest.mark.usefixtures("nvme_fastpath")  # both I/O queue paths

BASE = 0x200000


@pytest.fixture
def mem() -> ClientMemory:
    fd = os.memfd_create("q")
    os.ftruncate(fd, 1 << 20)
    m = ClientMemory()
    m.map(BASE, 1 << 20, fd=fd)
    return m


def test_doorbell_targets() -> None:
    assert doorbell_target(0x1000) == (0, False)
    assert doorbell_target(0x1004) == (0, True)
    assert doorbell_target(0x1018) == (3, False)
    assert doorbell_target(0x101C) == (3, True)


def test_sq_tail_and_fetch(mem: ClientMemory) -> None:
    sq = SubmissionQueue(1, BASE, 4, cqid=1)
    assert not sq.set_tail(4) and sq.tail == 0
    mem.write(BASE + 64 * 3, Command(opcode=2, cid=7).pack())
    sq.head = sq.tail = 3
    assert sq.set_tail(0) and not sq.empty
    assert sq.fetch(mem).cid == 7 and sq.head == 0 and sq.empty


def test_cq_phase_room_and_head_validation(mem: ClientMemory) -> None:
    cq = CompletionQueue(1, BASE, 3, vector=1, ien=True)
    assert cq.room == 2
    for cid in (1, 2):
        cq.push(mem, Completion(cid=cid))
    assert cq.room == 0 and cq.tail == 2 and cq.phase == 1
    assert not cq.set_head(3)  # outside the ring
    assert cq.set_head(1) and cq.room == 1
    cq.push(mem, Completion(cid=3))
    assert cq.tail == 0 and cq.phase == 0  # wrapped: phase flips
    entries = [Completion.unpack(mem.read(BASE + 16 * i, 16)) for i in range(3)]
    assert [(e.cid, e.status & 1) for e in entries] == [(1, 1), (2, 1), (3, 1)]
    assert cq.set_head(2)  # entry 1 was posted: consuming it is fine
    assert not cq.set_head(1)  # moving backwards past the tail: invalid


def test_cq_backlog_and_flush(mem: ClientMemory) -> None:
    cq = CompletionQueue(1, BASE, 2, vector=1, ien=True)
    cq.post(mem, Completion(cid=1))
    cq.post(mem, Completion(cid=2))
    assert cq.tail == 1 and len(cq.backlog) == 1 and not cq.has_room(mem)
    assert not cq.flush(mem)
    assert cq.set_head(1) and cq.flush(mem) and not cq.backlog


def test_shadow_slots_and_sync(mem: ClientMemory) -> None:
    shadow = Shadow.for_queue((BASE, BASE + 4096), qid=2, is_cq=True)
    assert (shadow.doorbell, shadow.event_idx) == (BASE + 20, BASE + 4096 + 20)
    sq = SubmissionQueue(2, BASE + 8192, 8, cqid=2,
                         shadow=Shadow.for_queue((BASE, BASE + 4096), 2, False))
    mem.write(BASE + 16, struct.pack("<I", 5))
    assert sq.sync(mem) and sq.tail == 5
    mem.write(BASE + 16, struct.pack("<I", 50))
    assert not sq.sync(mem) and sq.tail == 5  # invalid: reported once
    assert sq.sync(mem)
    assert sq.shadow is not None
    sq.shadow.publish(mem, 5)
    assert mem.read(BASE + 4096 + 16, 4) == struct.pack("<I", 5)


def test_full_shadowed_cq_rereads_head_and_asks_for_a_ring(mem: ClientMemory) -> None:
    buffers = (BASE, BASE + 4096)
    cq = CompletionQueue(1, BASE + 8192, 2, vector=1, ien=True,
                         shadow=Shadow.for_queue(buffers, 1, True))
    cq.push(mem, Completion())
    assert not cq.has_room(mem)
    assert mem.read(BASE + 4096 + 12, 4) == struct.pack("<I", 0)  # EventIdx = head
    mem.write(BASE + 12, struct.pack("<I", 1))  # the host consumed without ringing
    assert cq.has_room(mem) and cq.head == 1


def test_async_events_limit_mask_and_abort() -> None:
    ev = AsyncEvents(limit=2)
    ev.request(10)
    ev.request(11)
    with pytest.raises(CommandError) as info:
        ev.request(12)
    assert info.value.status == Status.AER_LIMIT_EXCEEDED
    ev.add(0, 1, 1)
    ev.add(0, 1, 1)  # merged
    ev.add(0, 0, 1)
    ev.add(2, 0, 4)
    assert ev.take() == [(10, 0x010100), (11, 0x040002)]
    assert ev.pending == [(0, 0, 1)]  # log 01h still masked
    ev.request(13)
    assert ev.take() == []
    ev.log_read(1)  # covers the pending event
    assert ev.pending == [] and ev.take() == []
    assert ev.abort(13) and not ev.abort(13)
    ev.reset()
    assert ev.outstanding == [] and ev.masked == set()


def test_error_log_newest_first() -> None:
    log = ErrorLog(entries=2)
    for cid in (1, 2, 3):
        log.add(sqid=1, cid=cid, status=Status.INVALID_FIELD)
    page = log.page()
    assert len(page) == 128 and log.count == 3
    assert struct.unpack_from("<QHH", page, 0) == (3, 1, 3)
    assert struct.unpack_from("<QHH", page, 64) == (2, 1, 2)
