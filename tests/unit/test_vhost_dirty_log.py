"""vhost-user dirty logging (VHOST_F_LOG_ALL, SET_LOG_BASE with LOG_SHMFD): the shared bitmap."""

from __future__ import annotations

import mmap
import os

import pytest
from test_vhost_frontend import (
    GPA_BASE,
    GuestMemory,
    Rig,
    fastpath,  # noqa: F401 (autouse: every test on both paths)
    frame,
)

from appliance.net import vhost_wire as vw
from appliance.net.dirty_log import VhostLog
from appliance.net.port import OFFERED_FEATURES
from appliance.net.vhost_wire import Feature as F
from appliance.net.vhost_wire import Request as R

LOG_SIZE = 4096  # bytes of bitmap: 32768 pages = 128 MiB of guest physical space
WANT = F.VERSION_1 | F.NET_MRG_RXBUF | F.PROTOCOL_FEATURES


def pages(log: GuestMemory) -> list[int]:
    return VhostLog(bytearray(log.mm[:LOG_SIZE])).dirty_pages()


def test_bitmap_layout_one_bit_per_4k_page() -> None:
    buf = bytearray(4)
    log = VhostLog(buf)
    log.mark(5 * 4096 + 100, 1)  # page 5: byte 0, bit 5
    assert buf == bytearray([0x20, 0, 0, 0])
    log.mark(7 * 4096 + 4095, 2)  # straddles pages 7 and 8
    assert buf == bytearray([0xA0, 0x01, 0, 0])
    log.mark(17 * 4096, 3 * 4096)  # exactly pages 17..19
    assert buf[2] == 0b1110 and log.dirty_pages() == [5, 7, 8, 17, 18, 19]
    log.mark(0, 0)  # nothing
    assert log.dirty_pages() == [5, 7, 8, 17, 18, 19]
    log.mark(31 * 4096, 2 * 4096)  # runs past the end of a 32-page log: counted, not written
    assert log.beyond == 1 and buf[3] == 0x80 and len(buf) == 4


def test_log_all_is_offered() -> None:
    assert OFFERED_FEATURES & F.LOG_ALL


def share_log(rig: Rig) -> GuestMemory:
    log = GuestMemory(LOG_SIZE)
    replies = rig.fe.send(R.SET_LOG_BASE, vw.LogDescription(mmap_size=LOG_SIZE).pack(),
                          fds=[os.dup(log.fd)], need_reply=True)
    assert len(replies) == 1 and replies[0].u64 == 0
    return log


def log_rings(rig: Rig) -> None:
    """SET_VRING_ADDR again with VHOST_VRING_F_LOG and the used rings' guest addresses."""
    for ring in (rig.rx, rig.tx):
        m = ring.mem
        rig.fe.send(R.SET_VRING_ADDR, vw.VringAddr(
            index=ring.index, flags=int(vw.VringAddrFlag.LOG), desc_user_addr=m.uva_of(ring.desc),
            used_user_addr=m.uva_of(ring.used), avail_user_addr=m.uva_of(ring.avail),
            log_guest_addr=ring.used).pack())


def page(gpa: int) -> int:
    return gpa // 4096


def test_rx_buffers_and_used_rings_are_logged_while_log_all() -> None:
    rig = Rig(features=int(WANT))
    log = share_log(rig)
    try:
        buf = rig.rx.add_buffer(0, writable=2048)
        rig.port.deliver(frame())
        rig.port.flush()
        assert pages(log) == []  # a log is shared but LOG_ALL is not negotiated
        rig.fe.u64(R.SET_FEATURES, int(WANT | F.LOG_ALL))
        log_rings(rig)
        assert rig.port.stats()["dirty_logging"] is True
        far = GPA_BASE + 0x80000  # an RX buffer on a page of its own
        rig.rx.set_desc(1, far, 2048, vw.DescFlag.WRITE)
        rig.rx.make_available(1)
        rig.port.deliver(frame())
        rig.port.flush()
        dirty = pages(log)
        assert page(far) in dirty and page(rig.rx.used) in dirty, (dirty, page(far))
        assert page(buf) not in dirty or page(buf) == page(rig.rx.used)
        # the transmit ring: reading a frame writes only the used ring
        tx_used_page = page(rig.tx.used)
        rig.tx.add_buffer(0, bytes(12) + frame())
        rig.port.process_tx(1, 8)
        assert tx_used_page in pages(log)
        # LOG_ALL off again: no more marks
        rig.fe.u64(R.SET_FEATURES, int(WANT))
        assert rig.port.stats()["dirty_logging"] is False
        log.mm[:LOG_SIZE] = bytes(LOG_SIZE)
        rig.rx.set_desc(2, far, 2048, vw.DescFlag.WRITE)
        rig.rx.make_available(2)
        rig.port.deliver(frame())
        rig.port.flush()
        assert pages(log) == []
    finally:
        rig.close()
        log.close()


def test_get_vring_base_reply_follows_the_last_marks() -> None:
    """Frames written but not yet published are published and logged before the reply."""
    rig = Rig(features=int(WANT | F.LOG_ALL))
    log = share_log(rig)
    try:
        log_rings(rig)
        far = GPA_BASE + 0xC0000
        rig.rx.set_desc(0, far, 2048, vw.DescFlag.WRITE)
        rig.rx.make_available(0)
        rig.port.deliver(frame())  # not flushed yet
        log.mm[:LOG_SIZE] = bytes(LOG_SIZE)  # the front-end's last sync before stopping
        replies = rig.fe.send(R.GET_VRING_BASE, vw.VringState(index=0, num=0).pack())
        assert replies and replies[0].header.request == R.GET_VRING_BASE
        assert page(rig.rx.used) in pages(log)
        assert rig.rx.take_used() == [(0, 12 + len(frame()))]
    finally:
        rig.close()
        log.close()


def test_new_log_base_replaces_the_old_and_disconnect_drops_it() -> None:
    rig = Rig(features=int(WANT | F.LOG_ALL))
    old, new = share_log(rig), share_log(rig)
    try:
        log_rings(rig)
        rig.rx.add_buffer(0, writable=2048)
        rig.port.deliver(frame())
        rig.port.flush()
        assert pages(old) == [] and page(rig.rx.used) in pages(new)
        assert isinstance(rig.conn.log_mm, mmap.mmap)
        rig.conn.close()
        assert rig.port.log is None and rig.conn.log_mm is None
    finally:
        rig.close()
        old.close()
        new.close()



def test_a_log_the_front_end_could_shrink_is_refused_and_a_sealable_one_sealed() -> None:
    """We write into the log: a shrink behind our back would be a SIGBUS."""
    rig = Rig(features=int(WANT | F.LOG_ALL))
    plain = GuestMemory(LOG_SIZE, sealable=False)  # no MFD_ALLOW_SEALING
    log = share_log(rig)  # a memfd that allows sealing (QEMU's log is sealed already)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(log.fd, 0)
        rig.fe.send(R.SET_LOG_BASE, vw.LogDescription(mmap_size=LOG_SIZE).pack(),
                    fds=[os.dup(plain.fd)], need_reply=True)
        assert rig.conn.closed  # refused (the rejection closes the connection)
        too_long = Rig(features=int(WANT | F.LOG_ALL))
        too_long.fe.send(R.SET_LOG_BASE, vw.LogDescription(mmap_size=2 * LOG_SIZE).pack(),
                         fds=[os.dup(log.fd)], need_reply=True)
        assert too_long.conn.closed  # past the end of the file: refused too
        too_long.close()
    finally:
        rig.close()
        log.close()
        plain.close()
