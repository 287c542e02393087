"""Firmware Image Download / Commit and NVMe 2.0 registers against the running
appliance over a real vfio-user socket: activation at the next controller reset,
hostile fields, and the firmware state in a vfio-user migration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.storage import firmware
from appliance.storage.spec import CRTO, AdminOpcode, Reg, Status
from appliance.testing.process import ApplianceProcess, make_config

ST = Status
REPLACE, REPLACE_ACTIVATE, ACTIVATE, ACTIVATE_NOW = range(4)


@pytest.fixture
def driver(sock_path: str) -> Iterator[NvmeDriver]:
    with VfioUserClient.connect(sock_path) as c:
        d = NvmeDriver(c)
        d.setup(io_queues=1, depth=32)
        yield d
        d.close()


def reset(d: NvmeDriver) -> None:
    """CC.EN 1 -> 0, then the bring-up again: a Controller Level Reset."""
    d.write_reg(Reg.CC, 0)
    d.queues.clear()
    d.setup(io_queues=1, depth=32)


def test_version_and_ready_timeouts(driver: NvmeDriver) -> None:
    assert driver.read_reg(Reg.VS) == 0x00020000
    cap = driver.read_reg(Reg.CAP, 8)
    assert (cap >> 59) & 3 == 1  # CAP.CRMS: CRWMS
    assert CRTO.get(driver.read_reg(Reg.CRTO), "crwmt") == (cap >> 24) & 0xFF


def test_download_commit_activate_at_reset(driver: NvmeDriver) -> None:
    image = b"SOCK0002" + bytes(range(256)) * 47 + b"tail"  # 12044 bytes, 3 pieces
    assert driver.firmware_download(image).status == ST.SUCCESS
    done = driver.firmware_commit(2, ACTIVATE_NOW)
    assert (done.status, done.dnr) == (ST.FIRMWARE_NEEDS_CONTROLLER_RESET, True)
    log = driver.firmware_log()
    assert (log.afi, log.frs1, log.frs2_7[:8]) == (0x21, b"0.1     ", b"SOCK0002")
    assert driver.identify_controller().fr == b"0.1     "
    driver.write(1, 100, b"r" * 512)
    reset(driver)
    assert driver.identify_controller().fr == b"SOCK0002"
    assert driver.firmware_log().afi == 2
    assert driver.read(1, 100, 1) == b"r" * 512
    # back to the factory image, slot 1
    assert driver.firmware_commit(1, ACTIVATE).status == ST.SUCCESS
    reset(driver)
    assert driver.identify_controller().fr == b"0.1     "


def test_hostile_fields_fail_with_their_status(driver: NvmeDriver) -> None:
    def dl(offset: int, data: bytes) -> tuple[int, bool]:
        done = driver.firmware_download(data, offset=offset, piece=len(data))
        return done.status, done.dnr

    assert dl(0, b"HOST" * 1024) == (ST.SUCCESS, False)
    assert dl(2048, b"x" * 4096) == (ST.OVERLAPPING_RANGE, True)
    assert dl(firmware.MAX_IMAGE - 4, b"x" * 8) == (ST.INVALID_FIELD, True)
    done = driver.admin_command(AdminOpcode.FIRMWARE_DOWNLOAD, cdw10=0xFFFFFFFF, prp1=0x1000)
    assert (done.status, done.dnr) == (ST.INVALID_FIELD, True)  # NUMD past MDTS
    for cdw10, want in ((3, ST.INVALID_FIRMWARE_SLOT), (1, ST.INVALID_FIRMWARE_SLOT),
                        (2 | 5 << 3, ST.INVALID_FIELD), (2 | 1 << 31, ST.INVALID_FIELD)):
        done = driver.admin_command(AdminOpcode.FIRMWARE_COMMIT, cdw10=cdw10)
        assert (done.status, done.dnr) == (want, True), cdw10
    assert dl(8192, b"y" * 4096) == (ST.SUCCESS, False)  # a gap at 4096
    assert driver.firmware_commit(2, REPLACE).status == ST.INVALID_FIRMWARE_IMAGE
    assert dl(4096, b"z" * 4096) == (ST.SUCCESS, False)
    assert driver.firmware_commit(2, REPLACE).status == ST.SUCCESS
    log = driver.firmware_log()
    assert log.frs2_7[:8] == b"HOSTHOST" and log.afi & 0x70 == 0
    assert driver.csts == 1  # still running


def test_firmware_state_moves_with_a_vfio_user_migration(tmp_path: Path) -> None:
    """After an activation, the running revision, the slots and a download in
    flight travel; the destination's next reset keeps what runs."""
    from appliance.client import migrate as orch

    procs = [ApplianceProcess(make_config(tmp_path / name), tmp_path / name / "proc").start()
             for name in ("src", "dst")]
    try:
        d = NvmeDriver(VfioUserClient.connect(procs[0].config.storage.socket))
        d.setup(io_queues=1, depth=32)
        d.firmware_download(b"MIG00002" + bytes(4088))
        assert d.firmware_commit(2, REPLACE_ACTIVATE).status == ST.SUCCESS
        reset(d)  # MIG00002 runs from slot 2
        d.firmware_download(b"MIG00003" + bytes(4088))
        assert d.firmware_commit(2, REPLACE).status == ST.SUCCESS  # slot 2: 0003, not active
        d.firmware_download(b"MIG00004" + bytes(4088))  # the first piece of the next
        d.write(1, 0, b"m" * 4096)
        dst = VfioUserClient.connect(procs[1].config.storage.socket)
        orch.migrate(d.c, dst, converge_bytes=0)
        dst.close()
        d.close()
        e = NvmeDriver(VfioUserClient.connect(procs[1].config.storage.socket))
        e.setup(io_queues=1, depth=32)  # a controller reset: nothing was to be activated
        assert e.identify_controller().fr == b"MIG00002"
        log = e.firmware_log()
        assert (log.afi, log.frs2_7[:8]) == (2, b"MIG00003")
        assert e.read(1, 0, 8) == b"m" * 4096
        # the reset forgot the download in flight (as a reset does): a commit now fails
        assert e.firmware_commit(2, REPLACE).status == ST.INVALID_FIRMWARE_IMAGE
        e.close()
    finally:
        for p in procs:
            p.stop()
            assert "Traceback" not in p.log_text(), p.log_text()


def test_firmware_state_moves_with_a_live_handoff(tmp_path: Path) -> None:
    """The same driver, on the socket that moves: the running revision, slot 2 and a
    download in flight are the destination's; the download goes on there."""
    from test_handoff import driver_on, handoff, start_pair

    src, dst = start_pair(tmp_path, shared=True)
    try:
        d, _ = driver_on(src)
        d.firmware_download(b"HAND0002" + bytes(4088))
        assert d.firmware_commit(2, REPLACE_ACTIVATE).status == ST.SUCCESS
        d.write_reg(Reg.CC, 0)
        d.queues.clear()
        d.setup(io_queues=2, depth=32)  # the reset: HAND0002 runs from slot 2
        d.firmware_download(b"HAND0003" + bytes(4088))  # the first half of the next image
        done = handoff(src, dst)
        assert done.returncode == 0, done.stderr
        assert src.proc is not None and src.proc.wait(timeout=30) == 0
        assert d.identify_controller().fr == b"HAND0002"
        assert d.firmware_log().afi == 2
        assert d.firmware_download(bytes(4096), offset=4096).status == ST.SUCCESS  # 2nd half
        assert d.firmware_commit(2, REPLACE_ACTIVATE).status == ST.SUCCESS
        d.write_reg(Reg.CC, 0)
        d.queues.clear()
        d.setup(io_queues=2, depth=32)
        assert d.identify_controller().fr == b"HAND0003"
        d.c.close()
    finally:
        for p in (src, dst):
            p.stop()
            assert "Traceback" not in p.log_text(), p.log_text()
