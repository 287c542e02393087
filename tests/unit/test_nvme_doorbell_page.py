"""storage.doorbells: mmap -- BAR0's doorbell page as a memfd the controller polls."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import make_controller, status

from appliance import config
from appliance.client.nvme import NvmeDriver
from appliance.errors import ConfigError
from appliance.storage import NvmeController
from appliance.storage.controller import FAST_TICKS, POLL_FAST, POLL_SLOW
from appliance.storage.doorbells import DoorbellMode, DoorbellPage
from appliance.storage.spec import AdminOpcode, Command, IoOpcode, LogPage, Status
from appliance.testing.nvme import controller_driver
from appliance.vfio_user.wire import PciRegion

pytestmark = pytest.mark.usefixtures("nvme_fastpath")  # both I/O queue paths


def page_driver(ctrl: NvmeController, poll: bool = True) -> NvmeDriver:
    """The driver ringing doorbells by storing into its own mapping of the region
    fd, as QEMU's guest does; ``poll``: the controller's poll (the runtime's timer)
    runs after each store."""
    desc = ctrl.region(PciRegion.BAR0)
    assert desc.mmap_areas == [(0x1000, 0x1000)] and desc.mmap_fd is not None
    return controller_driver(ctrl, doorbells="mmap", auto_poll=poll)


@pytest.fixture
def ctrl(tmp_path: Path) -> Iterator[NvmeController]:
    c = make_controller(tmp_path, io_queues=2, queue_entries=64, doorbells="mmap")
    yield c
    c.close()


def test_region_info_offers_the_doorbell_page(tmp_path: Path) -> None:
    plain = make_controller(tmp_path)
    assert plain.region(PciRegion.BAR0).mmap_areas == [] and plain.doorbell_page is None
    plain.close()
    with pytest.raises(ValueError):
        make_controller(tmp_path, doorbells="ioeventfd")


def test_every_config_value_is_a_doorbell_mode(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="must be one of message, mmap "):
        config.load(overrides={"storage": {"doorbells": "ioeventfd"}})
    for mode in DoorbellMode:
        value = config.load(overrides={"storage": {"doorbells": mode.value}}).storage.doorbells
        assert value is mode
        c = make_controller(tmp_path, doorbells=value)  # the config's value, as the runtime passes
        assert (c.doorbell_page is not None) == (mode is DoorbellMode.MMAP)
        c.close()


def test_io_through_the_mapped_page(ctrl: NvmeController, tmp_path: Path) -> None:
    d = page_driver(ctrl).ready(io_queues=2)
    payload = bytes(range(256)) * 16
    done, _ = d.io(IoOpcode.WRITE, slba=16, nlb=8, data=payload, qid=2)
    assert status(done) == (Status.SUCCESS, False)
    done, back = d.io(IoOpcode.READ, slba=16, nlb=8, qid=1)
    assert status(done) == (Status.SUCCESS, False) and back == payload
    assert (tmp_path / "ns1.img").read_bytes()[16 * 512:16 * 512 + 4096] == payload
    d.close()


def test_nothing_runs_until_the_page_is_polled(ctrl: NvmeController) -> None:
    d = page_driver(ctrl).ready()
    d.bus.auto_poll = False
    cids = [d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1)) for _ in range(3)]
    assert d.reap(1) == [] and ctrl.sqs[1].tail == 0  # no message: not seen yet
    assert ctrl.poll() is True
    assert [c.cid for c in d.reap(1)] == cids  # one scan, every SQE up to the last tail
    assert ctrl.poll() is True  # ... and the CQ head the reap stored
    assert ctrl.cqs[1].head == 3 and ctrl.poll() is False
    d.close()


def test_a_recreated_queue_does_not_inherit_the_old_slot(ctrl: NvmeController) -> None:
    d = page_driver(ctrl).ready()
    for _ in range(5):
        assert status(d.command(1, Command(opcode=IoOpcode.FLUSH, nsid=1)))[0] == 0
    assert d.doorbell_words[2] == 5  # SQ 1 tail as the host left it
    assert status(d.admin_command(AdminOpcode.DELETE_SQ, cdw10=1))[0] == 0
    assert status(d.admin_command(AdminOpcode.DELETE_CQ, cdw10=1))[0] == 0
    d.create_queue_pair(1)
    assert d.doorbell_words[2] == 0 and d.doorbell_words[3] == 0  # adopted before the CREATE completed
    d.bus.auto_poll = False
    cids = [d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1)) for _ in range(5)]
    assert d.doorbell_words[2] == 5  # the same value the old queue's slot held
    ctrl.poll()
    assert [c.cid for c in d.reap(1)] == cids
    d.close()


def test_bad_page_writes_are_reported_once(ctrl: NvmeController) -> None:
    d = page_driver(ctrl).ready()
    held = d.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
    d.doorbell_words[2] = 999  # SQ 1 tail outside its 64 entries
    ctrl.poll()
    (event,) = d.reap(0)
    assert event.cid == held and event.dw0 & 0xFF == 0 and event.dw0 >> 16 == LogPage.ERROR
    assert ctrl.counters["invalid_doorbells"] == 1 and ctrl.sqs[1].tail == 0
    ctrl.poll()
    assert ctrl.counters["invalid_doorbells"] == 1  # the same value is not a new write
    d.doorbell_words[200] = 1  # the doorbell of a queue that cannot exist
    ctrl.poll()
    assert ctrl.counters["invalid_doorbells"] == 2
    d.close()


def test_message_writes_to_the_page_stay_consistent(ctrl: NvmeController) -> None:
    """A REGION_WRITE of a doorbell in mmap mode lands in the page too: not seen twice."""
    d = page_driver(ctrl).ready()
    cid = d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1), ring=False)
    ctrl.region_write(PciRegion.BAR0, 0x1008, (1).to_bytes(4, "little"))
    assert d.doorbell_words[2] == 1
    assert [c.cid for c in d.reap(1)] == [cid]
    ctrl.poll()
    assert ctrl.sqs[1].tail == 1 and ctrl.counters["invalid_doorbells"] == 0
    d.close()


def test_pause_still_latches_page_doorbells(ctrl: NvmeController) -> None:
    d = page_driver(ctrl).ready()
    ctrl.pause()
    cid = d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert ctrl.sqs[1].tail == 1 and d.reap(1) == []
    ctrl.resume()
    assert [c.cid for c in d.reap(1)] == [cid]
    d.close()


def test_reset_then_enable_adopts_the_admin_queue_afresh(ctrl: NvmeController) -> None:
    d = page_driver(ctrl).ready()
    assert d.doorbell_words[0] != 0  # admin SQ tail after bring-up
    d.write_reg(0x14, 0)  # CC.EN = 0: controller reset
    d.enable()
    assert d.doorbell_words[0] == 0 and d.doorbell_words[1] == 0
    done, _ = d.identify(1)
    assert status(done) == (Status.SUCCESS, False)
    d.close()


def test_poll_interval_fast_while_busy_slow_when_quiet(ctrl: NvmeController) -> None:
    d = page_driver(ctrl).ready()
    assert ctrl.poll_interval() == POLL_FAST  # just did work
    for _ in range(FAST_TICKS):
        ctrl.poll_interval()
    assert ctrl.poll_interval() == POLL_SLOW
    d.submit(1, Command(opcode=IoOpcode.FLUSH, nsid=1))  # the poll after the store sees it
    assert ctrl.poll_interval() == POLL_FAST
    d.close()


def test_changed_reads_each_candidate_whole() -> None:
    page = DoorbellPage()
    try:
        view = mmap.mmap(page.fd, 0x1000, offset=0x1000)
        view[8:12] = (0x01020304).to_bytes(4, "little")
        view[0x800:0x804] = (7).to_bytes(4, "little")
        assert page.changed(4) == [(2, 0x01020304), (0x200, 7)]
        assert page.changed(4) == []
        page.store(8, 9)
        assert view[8:12] == (9).to_bytes(4, "little") and page.changed(4) == []
        view.close()
    finally:
        page.close()


def test_config_key(tmp_path: Path) -> None:
    from appliance import config
    from appliance.errors import ConfigError

    ns = [{"image": str(tmp_path / "d.img")}]
    assert config.load(overrides={"storage": {"namespaces": ns}}).storage.doorbells is DoorbellMode.MESSAGE
    cfg = config.load(overrides={"storage": {"namespaces": ns, "doorbells": "mmap"}})
    assert cfg.storage.doorbells is DoorbellMode.MMAP
    with pytest.raises(ConfigError, match=r"storage\.doorbells: must be one of message, mmap"):
        config.load(overrides={"storage": {"namespaces": ns, "doorbells": "ioeventfd"}})


def test_the_client_cannot_resize_the_page() -> None:
    """The client gets the memfd (REGION_INFO): a shrink would SIGBUS our next scan."""
    page = DoorbellPage()
    try:
        for size in (0, 0x1000, 0x3000):
            with pytest.raises(PermissionError):
                os.ftruncate(page.fd, size)
        assert os.fstat(page.fd).st_size == 0x2000
        assert page.changed(4) == []
    finally:
        page.close()


def test_take_over_refuses_before_it_changes_anything() -> None:
    """What a handoff destination checks before it adopts anything: one page of
    snapshot, and a file sealed against shrinking (else our next scan could SIGBUS)."""
    page = DoorbellPage()
    other = DoorbellPage()
    plain = os.memfd_create("plain")  # not sealable: a peer could shrink it
    os.ftruncate(plain, 2 << 20)
    try:
        with pytest.raises(ValueError, match="snapshot of 100 bytes"):
            DoorbellPage.check_take_over(other.fd, bytes(100))
        with pytest.raises(ValueError, match="not sealed"):
            DoorbellPage.check_take_over(plain, bytes(4096))
        with pytest.raises(ValueError, match="not sealed"):
            page.take_over(plain, bytes(4096))
        DoorbellPage.check_take_over(other.fd, bytes(4096))  # ours: sealed, one page
        page.store(0, 7)
        assert page.read(0) == 7  # still its own page
    finally:
        os.close(plain)
        other.close()
        page.close()
