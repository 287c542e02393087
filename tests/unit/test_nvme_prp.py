"""PRP walking against a memfd-backed ClientMemory."""

from __future__ import annotations

import os
import struct

import pytest

from appliance.memory import ClientMemory, GuestMemoryError
from appliance.storage.prp import prp_segments, read_segments, write_segments
from appliance.storage.spec import CommandError, Status

BASE, SIZE, P = 0x100000, 1 << 20, 4096
LIMIT = 128 * P


@pytest.fixture
def mem() -> ClientMemory:
    fd = os.memfd_create("prp")
    os.ftruncate(fd, SIZE)
    m = ClientMemory()
    m.map(BASE, SIZE, fd=fd)
    return m


def put_list(mem: ClientMemory, address: int, entries: list[int]) -> None:
    mem.write(address, struct.pack(f"<{len(entries)}Q", *entries))


def test_single_page_with_offset(mem: ClientMemory) -> None:
    assert prp_segments(mem, BASE + 100, 0xDEAD, 200, LIMIT) == [(BASE + 100, 200)]
    assert prp_segments(mem, BASE + 4092, 0, 4, LIMIT) == [(BASE + 4092, 4)]
    assert prp_segments(mem, BASE, 0, 0, LIMIT) == []


def test_two_pages_prp2_is_data(mem: ClientMemory) -> None:
    assert prp_segments(mem, BASE + 512, BASE + 8 * P, P, LIMIT) == [
        (BASE + 512, P - 512), (BASE + 8 * P, 512)]
    assert prp_segments(mem, BASE, BASE + P, 2 * P, LIMIT) == [(BASE, 2 * P)]  # merged


def test_list_merges_contiguous_pages(mem: ClientMemory) -> None:
    lst = BASE + 64 * P + 256  # list pointers may have an offset
    put_list(mem, lst, [BASE + P, BASE + 2 * P, BASE + 10 * P])
    assert prp_segments(mem, BASE, lst, 4 * P, LIMIT) == [(BASE, 3 * P), (BASE + 10 * P, P)]


def test_list_chains_through_last_slot(mem: ClientMemory) -> None:
    first = BASE + 64 * P + P - 16  # two slots left: one entry, then the chain pointer
    second = BASE + 70 * P
    put_list(mem, first, [BASE + 20 * P, second])
    put_list(mem, second, [BASE + 30 * P, BASE + 31 * P])
    segs = prp_segments(mem, BASE, first, 4 * P, LIMIT)
    assert segs == [(BASE, P), (BASE + 20 * P, P), (BASE + 30 * P, 2 * P)]


def test_list_exactly_filling_a_page_does_not_chain(mem: ClientMemory) -> None:
    lst = BASE + 64 * P + P - 16
    put_list(mem, lst, [BASE + 20 * P, BASE + 40 * P])
    assert prp_segments(mem, BASE, lst, 3 * P, LIMIT)[-1] == (BASE + 40 * P, P)


@pytest.mark.parametrize("prp1, prp2, length, why", [
    (BASE + 2, 0, 16, "PRP1"),
    (BASE, BASE + P + 8, 2 * P, "PRP2"),
    (BASE, BASE + 64 * P + 4, 3 * P, "QWORD"),
])
def test_bad_offsets(mem: ClientMemory, prp1: int, prp2: int, length: int, why: str) -> None:
    with pytest.raises(CommandError, match=why) as info:
        prp_segments(mem, prp1, prp2, length, LIMIT)
    assert info.value.status == Status.INVALID_PRP_OFFSET and info.value.dnr


def test_bad_list_entry_and_chain(mem: ClientMemory) -> None:
    lst = BASE + 64 * P
    put_list(mem, lst, [BASE + P, BASE + 2 * P + 512])
    with pytest.raises(CommandError, match="list entry"):
        prp_segments(mem, BASE, lst, 3 * P, LIMIT)
    chain = BASE + 65 * P - 8
    put_list(mem, chain, [BASE + 66 * P + 8])
    with pytest.raises(CommandError, match="chain"):
        prp_segments(mem, BASE, chain, 3 * P, LIMIT)


def test_limit_and_unmapped_list(mem: ClientMemory) -> None:
    with pytest.raises(CommandError) as info:
        prp_segments(mem, BASE, 0, LIMIT + 1, LIMIT)
    assert info.value.status == Status.INVALID_FIELD
    with pytest.raises(GuestMemoryError):
        prp_segments(mem, BASE, 0x7000_0000, 3 * P, LIMIT)


def test_self_referencing_chain_is_bounded(mem: ClientMemory) -> None:
    page = BASE + 64 * P
    put_list(mem, page, [BASE] * 511 + [page])  # the chain points back to itself
    segs = prp_segments(mem, BASE, page, LIMIT, LIMIT)
    assert sum(n for _, n in segs) == LIMIT


def test_gather_scatter(mem: ClientMemory) -> None:
    segs = [(BASE + 10, 5), (BASE + P, 3)]
    write_segments(mem, segs, b"abcdefgh")
    assert read_segments(mem, segs) == b"abcdefgh"
