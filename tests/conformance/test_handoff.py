"""Live handoff between two real appliance processes (`appliance handoff`), with the
Python NVMe driver doing verified I/O over the very socket that moves."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from appliance.client.nvme import NvmeDriver, NvmeError
from appliance.client.vfio_user import VfioUserClient, VfioUserError
from appliance.runtime.control import ControlClient
from appliance.testing.process import ApplianceProcess
from appliance.testing.workload import VerifiedWriter, file_hash, make_image, pair_configs

SIZE = 64 << 20


def ctl(p: ApplianceProcess) -> str:
    return p.config.control.socket


def sock(p: ApplianceProcess) -> str:
    return p.config.storage.socket


def image(p: ApplianceProcess) -> str:
    return p.config.storage.namespaces[0].image


def handoff(src: ApplianceProcess, dst: ApplianceProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "handoff", "--from", ctl(src),
                           "--to", ctl(dst)], check=False, capture_output=True, text=True, timeout=120)


def start_pair(tmp: Path, *, shared: bool, dst_size: int | None = None,
               doorbells: str = "message") -> tuple[ApplianceProcess, ApplianceProcess]:
    src_cfg, dst_cfg = pair_configs(tmp, SIZE, shared=shared, dst_size=dst_size)
    for cfg in (src_cfg, dst_cfg):
        cfg["storage"]["doorbells"] = doorbells  # type: ignore[index]
    make_image(tmp / "src" / "data" / "disk0.img", SIZE, seed=1, random_mib=4)
    if not shared:
        make_image(tmp / "dst" / "data" / "disk0.img", dst_size or SIZE, seed=2, random_mib=2, fill=9)
    src = ApplianceProcess(src_cfg, tmp / "src" / "proc").start()
    dst = ApplianceProcess(dst_cfg, tmp / "dst" / "proc").start()
    return src, dst


@pytest.fixture
def procs() -> Iterator[list[ApplianceProcess]]:
    started: list[ApplianceProcess] = []
    yield started
    for p in started:
        p.stop()
    for p in started:
        assert "Traceback" not in p.log_text(), p.log_text()


def driver_on(p: ApplianceProcess, doorbells: str = "message") -> tuple[NvmeDriver, VerifiedWriter]:
    """``doorbells="mmap"``: the driver stores into the mmap'd doorbell page, so
    with the fast path its reads and writes are the C poller's."""
    driver = NvmeDriver(VfioUserClient.connect(sock(p)), mem_size=8 << 20, doorbells=doorbells)
    driver.setup(io_queues=2, depth=32)
    return driver, VerifiedWriter(driver, blocks=8, seed=5)


def status(p: ApplianceProcess) -> Any:
    with ControlClient(ctl(p)) as c:
        return c("status")


@pytest.mark.parametrize(("shared", "doorbells"), [(True, "message"), (False, "message"),
                                                   (True, "mmap")])
def test_handoff_moves_the_live_connection(tmp_path: Path, procs: list[ApplianceProcess],
                                           shared: bool, doorbells: str) -> None:
    src, dst = start_pair(tmp_path, shared=shared, doorbells=doorbells)
    procs += [src, dst]
    driver, writer = driver_on(src, doorbells)
    writer.step(40)
    src_socket = sock(src)

    errors: list[BaseException] = []
    stop = threading.Event()
    during: list[int] = []

    def load() -> None:  # verified I/O the whole time the handoff runs
        try:
            while not stop.is_set():
                writer.step(1)
                during.append(writer.ios)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    watcher = ControlClient(ctl(src))  # a QMP client of the source sees the handoff go by
    watcher.negotiate()
    try:
        done = handoff(src, dst)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    with watcher:
        completed = watcher.wait_event("HANDOFF_COMPLETED", timeout=30)
        assert completed["data"]["mode"] == ("shared-storage" if shared else "full")
        progress = watcher.wait_event("HANDOFF_PROGRESS", timeout=0)
        assert progress["data"]["phase"] == ("paused" if shared else "precopy")
    assert done.returncode == 0, done.stderr
    assert "handed off to" in done.stdout and ("shared-storage" if shared else "full") in done.stdout
    assert src.proc is not None and src.proc.wait(timeout=30) == 0  # the source exits
    assert len(during) > 0

    # The same client socket, the same memory and eventfds: now served by dst.
    before = writer.ios
    assert writer.verify_all() == len(writer.written)
    writer.step(40)
    assert writer.ios > before
    st = status(dst)
    assert st["nvme"]["attached"] is True and st["nvme"]["state"] == "ready", st
    # dst listens where src did, and refuses a second client there (one client a device).
    with pytest.raises((OSError, ConnectionError, VfioUserError)):
        VfioUserClient.connect(src_socket, timeout=5)
    driver.c.close()
    if not shared:
        # dst's image: the source's image as the source left it, plus what was written since.
        expected = bytearray(Path(image(src)).read_bytes())
        for lba, data in writer.written.items():
            expected[lba * 512:lba * 512 + len(data)] = data
        assert xxhash.xxh64(expected).hexdigest() == file_hash(image(dst))


def test_injected_faults_move_with_the_devices(tmp_path: Path,
                                              procs: list[ApplianceProcess]) -> None:
    """A rule armed on the source fires on the destination with its count going on;
    the fault ids and counters continue there."""
    src, dst = start_pair(tmp_path, shared=True)
    procs += [src, dst]
    driver, _ = driver_on(src)
    with ControlClient(ctl(src)) as c:
        rule = c("fault.add", action="status", lba=100, count=2, status="unrecovered_read_error")
    with pytest.raises(NvmeError) as first:
        driver.read(1, 100, 1)
    assert first.value.status == 0x281
    done = handoff(src, dst)
    assert done.returncode == 0, done.stderr
    assert src.proc is not None and src.proc.wait(timeout=30) == 0
    with pytest.raises(NvmeError) as second:  # the second and last firing, on dst
        driver.read(1, 100, 1)
    assert second.value.status == 0x281
    assert len(driver.read(1, 100, 1)) == 512  # spent
    with ControlClient(ctl(dst)) as c:
        listed = c("fault.list")
        assert listed["rules"][0]["id"] == rule["id"] and listed["rules"][0]["hits"] == 2
        assert listed["fired"] == {"nvme.status": 2}
        assert c("fault.add", action="fatal", qid=9)["id"] == rule["id"] + 1
    driver.c.close()


def test_uncorrectable_blocks_move_with_the_controller(tmp_path: Path,
                                                      procs: list[ApplianceProcess]) -> None:
    """Blocks Write Uncorrectable marked on the source still fail reads on the
    destination, until written there."""
    from appliance.storage.spec import IoOpcode

    src, dst = start_pair(tmp_path, shared=False)
    procs += [src, dst]
    driver, _ = driver_on(src)
    assert driver.blocks_command(IoOpcode.WRITE_UNCORRECTABLE, 1, 200, 2).status == 0
    done = handoff(src, dst)
    assert done.returncode == 0, done.stderr
    assert src.proc is not None and src.proc.wait(timeout=30) == 0
    for lba in (200, 201):
        with pytest.raises(NvmeError) as info:
            driver.read(1, lba, 1)
        assert (info.value.status, info.value.dnr) == (0x281, True)
    assert len(driver.read(1, 202, 1)) == 512
    driver.write(1, 200, b"w" * 1024)
    assert driver.read(1, 200, 2) == b"w" * 1024
    driver.c.close()


def test_handoff_refused_by_another_configuration(tmp_path: Path,
                                                  procs: list[ApplianceProcess]) -> None:
    src, dst = start_pair(tmp_path, shared=False, dst_size=SIZE * 2)
    procs += [src, dst]
    driver, writer = driver_on(src)
    writer.step(20)
    done = handoff(src, dst)
    assert done.returncode != 0
    assert "refused" in done.stderr and "configuration differs" in done.stderr, done.stderr
    assert src.alive and dst.alive
    writer.step(20)  # the source serves on
    assert writer.verify_all() == len(writer.written)
    driver.c.close()


def test_handoff_refused_by_a_busy_destination(tmp_path: Path,
                                               procs: list[ApplianceProcess]) -> None:
    src, dst = start_pair(tmp_path, shared=True)
    procs += [src, dst]
    driver, writer = driver_on(src)
    writer.step(10)
    with VfioUserClient.connect(sock(dst)):
        done = handoff(src, dst)
    assert done.returncode != 0 and "not idle" in done.stderr, done.stderr
    writer.step(10)
    assert writer.verify_all() == len(writer.written)
    driver.c.close()


def test_handoff_to_nowhere_keeps_serving(tmp_path: Path, procs: list[ApplianceProcess]) -> None:
    src, dst = start_pair(tmp_path, shared=True)
    procs += [src, dst]
    driver, writer = driver_on(src)
    writer.step(10)
    with ControlClient(ctl(src)) as watcher:
        watcher.negotiate()
        done = subprocess.run([sys.executable, "-m", "appliance", "handoff", "--from", ctl(src),
                               "--to", str(tmp_path / "nobody.sock")], check=False,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "cannot reach" in done.stderr, done.stderr
        failed = watcher.wait_event("HANDOFF_FAILED", timeout=10)
        assert "cannot reach" in failed["data"]["error"]
    writer.step(10)
    assert writer.verify_all() == len(writer.written)
    driver.c.close()
