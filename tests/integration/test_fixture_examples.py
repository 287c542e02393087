"""The fixture guide's examples (docs/fixture.md): guest drivers against injected faults.

Only the pytest plugin's fixtures are used (``appliance``, ``appliance_ctl``,
``appliance_guest``); each test boots one TCG guest.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from typing import Any

import pytest

pytestmark = pytest.mark.integration

if not any(ep.value == "appliance.testing.plugin"
           for ep in entry_points(group="pytest11")):  # pragma: no cover
    # Not installed with its pytest11 entry point (an editable install made before the
    # entry point existed): take the plugin's fixtures from the module itself.
    from appliance.testing.plugin import (  # noqa: F401
        _appliance_guest_maker,
        _appliance_maker,
        _appliance_shared_state,
        appliance,
        appliance_ctl,
        appliance_factory,
        appliance_guest,
        appliance_guest_factory,
        appliance_nvme_driver,
        appliance_shared,
        appliance_shared_ctl,
        nvme_driver,
        pytest_addoption,
        pytest_configure,
        pytest_runtest_makereport,
    )

DD_ONE = "dd if=/dev/nvme0n1 of=/dev/null bs=512 skip={lba} count=1 iflag=direct 2>&1"


@pytest.mark.appliance_config(storage={"namespaces": [{"image": "{data_dir}/disk0.img",
                                                       "size": "16M"}]})
def test_unrecovered_read_error_fails_that_block_only(appliance_guest: Any,
                                                      appliance_ctl: Any) -> None:
    appliance_ctl("fault.add", action="status", lba=100, status="unrecovered_read_error")
    out, rc = appliance_guest.run(DD_ONE.format(lba=100))
    # BLK_STS_MEDIUM: dd sees ENODATA ("No data available"), the kernel logs the sector
    assert rc != 0 and re.search(r"No data available|I/O error", out), out
    for lba in (99, 101):
        out, rc = appliance_guest.run(DD_ONE.format(lba=lba))
        assert rc == 0 and "1+0 records in" in out, out
    dmesg, _ = appliance_guest.run("dmesg | grep -i 'critical medium error\\|I/O error' | tail -3")
    assert "sector 100" in dmesg, dmesg
    faults = appliance_ctl("fault.list")
    assert faults["fired"]["nvme.status"] >= 1


IO_TIMEOUT_5S = "echo 5000 > /sys/block/nvme0n1/queue/io_timeout"


def test_never_completed_command_times_out_and_the_guest_recovers(appliance_guest: Any,
                                                                  appliance_ctl: Any) -> None:
    _, rc = appliance_guest.run(IO_TIMEOUT_5S)
    assert rc == 0
    appliance_ctl("fault.add", action="hang", count=1, lba=300)
    out, rc = appliance_guest.run(DD_ONE.format(lba=300), timeout=60)
    assert rc == 0 and "1+0 records in" in out, out  # retried after the abort
    dmesg, _ = appliance_guest.run("dmesg | grep -i 'timeout\\|abort\\|reset' | tail -5")
    assert re.search(r"timeout, aborting|resetting", dmesg), dmesg
    status = appliance_ctl("status")
    assert status["faults"]["fired"]["nvme.hang"] == 1
    assert status["faults"]["hung_commands"] == 0  # aborted, or gone with a reset
    out, rc = appliance_guest.run("dd if=/dev/nvme0n1 of=/dev/null bs=64k count=16 iflag=direct 2>&1")
    assert rc == 0 and "16+0 records in" in out, out


def test_controller_fatal_status_makes_the_guest_reset_and_recover(appliance_guest: Any,
                                                                   appliance_ctl: Any) -> None:
    _, rc = appliance_guest.run(IO_TIMEOUT_5S)
    assert rc == 0
    resets_before = appliance_ctl("status")["nvme"]["counters"]["commands"].get("admin.create_sq")
    appliance_ctl("fault.add", action="fatal", count=1, lba=400)
    out, rc = appliance_guest.run(DD_ONE.format(lba=400), timeout=60)
    assert rc == 0 and "1+0 records in" in out, out
    dmesg, _ = appliance_guest.run("dmesg | grep -i 'controller is down\\|reset' | tail -5")
    assert "controller is down" in dmesg, dmesg
    status = appliance_ctl("status")
    assert status["nvme"]["counters"]["fatal"] == 1 and status["nvme"]["state"] == "ready"
    assert status["nvme"]["counters"]["commands"]["admin.create_sq"] > resets_before
    out, rc = appliance_guest.run("dd if=/dev/nvme0n1 of=/dev/null bs=64k count=16 iflag=direct 2>&1")
    assert rc == 0 and "16+0 records in" in out, out


NET = {"ports": [{"socket": "{run_dir}/net0.sock", "mac": "52:54:00:12:34:56"}]}


@pytest.mark.appliance_config(net=NET)
def test_ten_percent_drop_still_completes_a_ping_series(appliance_guest: Any,
                                                        appliance_ctl: Any) -> None:
    out, rc = appliance_guest.run("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && "
                                  "ping -c 3 -W 2 10.0.2.2 >/dev/null && echo configured",
                                  timeout=120)
    assert rc == 0 and out.endswith("configured"), out
    appliance_ctl("fault.add", action="drop", port="net0", direction="rx", probability=0.1,
                  seed=1234)
    out, _ = appliance_guest.run("ping -c 200 -i 0.02 -W 1 10.0.2.2 | tail -3", timeout=120)
    m = re.search(r"200 packets transmitted, (\d+) packets received", out)
    assert m, out
    received = int(m.group(1))
    dropped = appliance_ctl("fault.list")["rules"][0]["hits"]
    # echo replies towards the guest are the only frames at ~10%: 200 - received of them
    assert 200 - received == dropped, (out, dropped)
    assert 5 <= dropped <= 40, out  # 10% of 200 with a wide binomial margin


def test_namespace_resize_reaches_the_guest_through_the_async_event(appliance_guest: Any,
                                                                    appliance_ctl: Any) -> None:
    out, _ = appliance_guest.run("cat /sys/block/nvme0n1/size")
    before = int(out.split()[-1])
    appliance_ctl("namespace.resize", size=2 * before * 512)
    out, rc = appliance_guest.run(
        f"for i in $(seq 200); do [ $(cat /sys/block/nvme0n1/size) = {2 * before} ] && break; "
        "sleep 0.1; done; cat /sys/block/nvme0n1/size", timeout=60)
    assert out.split()[-1] == str(2 * before), out
    out, rc = appliance_guest.run(DD_ONE.format(lba=2 * before - 1))
    assert rc == 0 and "1+0 records in" in out, out


@pytest.mark.appliance_config(storage={"namespaces": [{"image": "{data_dir}/d.img", "size": "4M"}]})
def test_driver_without_a_guest_sees_the_error(appliance_nvme_driver: Any, appliance_ctl: Any) -> None:
    from appliance.client.nvme import NvmeError

    appliance_ctl("fault.add", action="status", lba=0, status="write_fault", dnr=True)
    with pytest.raises(NvmeError) as info:
        appliance_nvme_driver.write(1, 0, b"x" * 512)
    assert info.value.status == 0x280 and info.value.dnr
    appliance_nvme_driver.write(1, 1, b"y" * 512)  # the next block is fine
    assert appliance_nvme_driver.read(1, 1, 1) == b"y" * 512


@pytest.mark.appliance_config(storage={"namespaces": [{
    "image": "{data_dir}/z.img", "size": "16M",
    "zoned": {"zone_size": "1M", "max_open": 2, "max_active": 2}}]})
def test_zone_append_and_its_fault(appliance_nvme_driver: Any, appliance_ctl: Any) -> None:
    from appliance.storage.zones import ZoneState

    appliance_nvme_driver.identify_namespace(1)
    assert appliance_nvme_driver.zone_append(1, 2048, b"a" * 512).result == 2048
    appliance_ctl("fault.add", action="status", opcode=0x7D, status="zone_is_full", count=1)
    assert appliance_nvme_driver.zone_append(1, 2048, b"b" * 512).status == 0x1B9
    assert appliance_nvme_driver.zone_append(1, 2048, b"c" * 512).result == 2049  # the fault fired once
    total, zones = appliance_nvme_driver.report_zones(1, count=2, partial=False)
    assert total == 16
    assert [(z.zs >> 4, z.wp) for z in zones] == [(ZoneState.EMPTY, 0),
                                                  (ZoneState.IMPLICITLY_OPENED, 2050)]
    assert appliance_nvme_driver.read(1, 2048, 2) == b"a" * 512 + b"c" * 512


@pytest.mark.appliance_config(storage={"capacity": "16M", "namespaces": [
    {"image": "{data_dir}/d.img", "size": "4M"}]})
def test_namespace_hot_add(appliance_nvme_driver: Any, appliance_ctl: Any) -> None:
    nsid = appliance_nvme_driver.create_namespace(2048).result
    assert nsid == 2
    assert appliance_nvme_driver.attach_namespace(nsid).status == 0
    assert appliance_nvme_driver.active_namespaces() == [1, nsid]
    appliance_nvme_driver.identify_namespace(nsid)
    appliance_nvme_driver.write(nsid, 0, b"n" * 512)
    assert appliance_nvme_driver.read(nsid, 0, 1) == b"n" * 512
    assert appliance_nvme_driver.attach_namespace(nsid, detach=True).status == 0
    assert appliance_nvme_driver.active_namespaces() == [1]
    assert appliance_nvme_driver.delete_namespace(nsid).status == 0
    assert appliance_nvme_driver.allocated_namespaces() == [1]


@pytest.mark.appliance_config(storage={"namespaces": [{
    "image": "{data_dir}/pi.img", "size": "8M", "block_size": 4096, "metadata": 8, "pi": 1}]})
def test_pi_guard_error_on_one_block(appliance_nvme_driver: Any, appliance_ctl: Any) -> None:
    prinfo = 0xF << 26  # PRACT + PRCHK guard, application tag, reference tag
    appliance_nvme_driver.identify_namespace(1)
    assert appliance_nvme_driver.io(0x01, 7, 2, data=b"p" * 8192, cdw12=prinfo, cdw14=7)[0].status == 0
    appliance_ctl("fault.add", action="corrupt_guard", opcode=0x02, lba=8)
    assert appliance_nvme_driver.io(0x02, 7, 1, cdw12=prinfo, cdw14=7)[0].status == 0
    assert appliance_nvme_driver.io(0x02, 8, 1, cdw12=prinfo, cdw14=8)[0].status == 0x282  # guard
    appliance_ctl("fault.clear")
    done, data = appliance_nvme_driver.io(0x02, 7, 2, cdw12=prinfo, cdw14=7)
    assert done.status == 0 and data == b"p" * 8192


def test_driver_delayed_completion_arrives_after_the_delay(appliance_nvme_driver: Any,
                                                           appliance_ctl: Any) -> None:
    import time

    appliance_nvme_driver.write(1, 5, b"d" * 512)
    appliance_ctl("fault.add", action="delay", delay=0.5, count=1, lba=5)
    start = time.monotonic()
    assert appliance_nvme_driver.read(1, 5, 1) == b"d" * 512
    assert time.monotonic() - start >= 0.5
    status = appliance_ctl("status")["faults"]
    assert status["fired"] == {"nvme.delay": 1} and status["deferred_completions"] == 0


def test_driver_without_a_guest_on_two_appliances(appliance_factory: Any) -> None:
    """Two appliances in one test, each its own directory, sockets and disk."""
    from appliance.client.nvme import NvmeDriver
    from appliance.client.vfio_user import VfioUserClient

    small = appliance_factory("small", storage={"namespaces": [{"image": "{data_dir}/s.img",
                                                                "size": "4M"}]})
    big = appliance_factory("big")
    assert small.config.storage.socket != big.config.storage.socket
    for proc, payload in ((small, b"s" * 512), (big, b"b" * 512)):
        with VfioUserClient.connect(proc.config.storage.socket) as client:
            driver = NvmeDriver(client)
            try:
                driver.setup(io_queues=1, depth=16)
                driver.write(1, 0, payload)
                assert driver.read(1, 0, 1) == payload
            finally:
                driver.close()


def test_driver_without_a_guest_old_fixture_name_warns(request: Any) -> None:
    from appliance.testing.plugin import ApplianceDeprecationWarning

    with pytest.warns(ApplianceDeprecationWarning, match="appliance_nvme_driver"):
        driver = request.getfixturevalue("nvme_driver")
    assert driver is request.getfixturevalue("appliance_nvme_driver")


@pytest.mark.parametrize("round_", [1, 2])
def test_driver_without_a_guest_shared_appliance_is_reset(appliance_shared: Any,
                                                          appliance_shared_ctl: Any,
                                                          round_: int) -> None:
    """One appliance for the module: each test starts with no fault rules, though
    the one before left one armed (the counters stay: they are the appliance's)."""
    assert appliance_shared_ctl("fault-list")["rules"] == []
    appliance_shared_ctl("fault-add", action="hang", lba=round_)
    assert len(appliance_shared_ctl("fault-list")["rules"]) == 1


# ---------------------------------------------------------------- `appliance boot` (not a fixture)
def test_appliance_boot_starts_appliance_and_guest_on_the_terminal(tmp_path: Any) -> None:
    """`appliance boot` with nothing running: the guest sees the disk; exiting its
    shell powers it off and the appliance boot started is stopped again."""
    import os
    import select
    import subprocess
    import sys
    import time

    import yaml

    from appliance import config
    from appliance.testing.process import make_config
    from appliance.testing.qemu_environment import qemu_env

    qemu_env()  # skip / fail like every QEMU test when the environment is missing
    cfg = make_config(tmp_path, storage={"namespaces": [{"image": "{data_dir}/d.img",
                                                         "size": "8M"}]},
                      net={"ports": [{"socket": str(tmp_path / "run" / "net0.sock"),
                                      "mac": "52:54:00:12:34:56"}]})
    path = tmp_path / "boot.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "boot", "-c", str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    buf, deadline = b"", time.monotonic() + 120

    def expect(needle: bytes) -> None:
        nonlocal buf
        while needle not in buf:
            left = deadline - time.monotonic()
            assert left > 0, buf.decode(errors="replace")[-3000:]
            if select.select([proc.stdout], [], [], left)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, buf.decode(errors="replace")[-3000:]
                buf += chunk

    try:
        expect(b"GUEST-SHELL")
        proc.stdin.write(b"for i in $(seq 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done; "
                         b"echo SIZE=$(cat /sys/block/nvme0n1/size)\n")
        proc.stdin.flush()
        expect(b"SIZE=16384")
        # ... and the network interface on the appliance's port (its MAC).
        proc.stdin.write(b"echo NET=$(cat /sys/class/net/eth0/address)\n")
        proc.stdin.flush()
        expect(b"NET=52:54:00:12:34:56")
        proc.stdin.write(b"exit\n")
        proc.stdin.flush()
        expect(b"GUEST-POWEROFF")
        assert proc.wait(60) == 0
        assert b"appliance: started" in buf
        assert not os.path.exists(config.load(str(path)).control.socket)  # the appliance stopped again
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


# ---------------------------------------------------------------- nvme-cli in the guest
def test_nvme_cli_sees_the_controller_and_the_injected_error(appliance_guest: Any,
                                                             appliance_ctl: Any) -> None:
    """The guest image carries nvme-cli (admin passthrough through the guest's nvme
    driver): identify, an injected Unrecovered Read Error as the command's status, the
    Error Information log naming the LBA, SMART counting the media error."""
    import json

    def nvme(args: str) -> Any:
        out, rc = appliance_guest.run(f"nvme {args} -o json")
        assert rc == 0, out
        return json.loads(out)

    ctrl = nvme("id-ctrl /dev/nvme0")
    assert ctrl["vid"] == 0xA9A9 and ctrl["sn"].strip() == "APPLIANCE0001", ctrl
    assert nvme("id-ns /dev/nvme0n1")["nsze"] == 64 << 20 >> 9
    appliance_ctl("fault.add", action="status", lba=7, status="unrecovered_read_error")
    out, rc = appliance_guest.run("nvme read /dev/nvme0n1 -s 6 -c 3 -z 2048 -d /tmp/blk 2>&1")
    assert rc != 0 and "Unrecovered Read Error" in out, out
    newest = nvme("error-log /dev/nvme0 -e 1")["errors"][0]
    assert (newest["sqid"] > 0, newest["status_field"], newest["lba"], newest["nsid"]) == \
        (True, 0x281, 7, 1), newest  # nvme-cli prints the Status Field without the phase bit
    smart = nvme("smart-log /dev/nvme0")
    # 128-bit counters: numbers in nvme-cli 2.x of sid, strings in bookworm's 2.4
    assert int(smart["media_errors"]) == 1 and int(smart["num_err_log_entries"]) >= 1, smart


# ---------------------------------------------------------------- the Debian guest
@pytest.mark.appliance_config(net=NET)
@pytest.mark.appliance_guest(image="debian")
def test_debian_guest_runs_fio_into_an_injected_media_error(appliance_guest: Any,
                                                            appliance_ctl: Any) -> None:
    """The Debian guest (bash, fio, nvme-cli, real file systems) on the appliance's
    disk and NIC: fio's read of a block with an injected media error fails with
    ENODATA, the kernel names the sector, and the block next to it reads fine."""
    out, rc = appliance_guest.run("uname -r; fio --version")
    assert rc == 0 and out.splitlines()[-1].startswith("fio-"), out
    out, rc = appliance_guest.run("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && "
                                  "ping -c 1 -W 5 10.0.2.2 >/dev/null && echo pong", timeout=60)
    assert rc == 0 and out.endswith("pong"), out
    appliance_ctl("fault.add", action="status", status="unrecovered_read_error", opcode=2,
                  lba="2048-2055")  # the 4 KiB at 1 MiB
    fio = ("fio --name=r --filename=/dev/nvme0n1 --direct=1 --rw=read --bs=4k --size=4k "
           "--offset={offset} 2>&1")
    out, rc = appliance_guest.run(fio.format(offset="1M"))
    assert rc != 0 and "No data available" in out, out
    out, rc = appliance_guest.run(fio.format(offset="1028k"))
    assert rc == 0 and "err= 0" in out, out
    dmesg, _ = appliance_guest.run("dmesg | grep -i 'critical medium error' | tail -1")
    assert "sector 2048" in dmesg, dmesg
