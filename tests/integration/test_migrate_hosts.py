"""Migration across hosts: hosts simulated by network namespaces the test makes
(appliance.testing.hosts: a veth pair each to a bridge, 10.88.0.1-3 existing only
inside them), OpenSSH's sshd on the destination host with generated keys, the
destination's socket reached as ssh://root@10.88.0.2/PATH (ssh's Unix-socket
forwarding, run inside host a).  The Python NVMe driver plays the guest: its
verified random writes run on the source while pre-copy runs, and after the
switch-over every block is read back on the destination.  Needs root."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client import migrate as orch
from appliance.client.datachannel import ChannelPlan
from appliance.client.nvme import NvmeDriver
from appliance.client.ssh import SshForward, parse_target
from appliance.client.vfio_user import VfioUserClient
from appliance.runtime.control import ControlClient
from appliance.testing.hosts import Hosts, Sshd
from appliance.testing.nbd import NbdServer
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.workload import VerifiedWriter, file_hash, make_image
from appliance.vfio_user.migration_states import MigState

SIZE = 256 << 20
SMALL = 64 << 20


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Hosts, Sshd]]:
    with Hosts() as h:
        sshd = Sshd(h, "b", tmp_path / "ssh")
        sshd.start()
        try:
            yield h, sshd
        finally:
            sshd.stop()


def appliance(hosts: Hosts, host: str, tmp: Path, image: str, **ns: object) -> ApplianceProcess:
    cfg = make_config(tmp / host, storage={"namespaces": [{"image": image, **ns}]})
    return ApplianceProcess(cfg, tmp / host / "proc", wrapper=hosts.wrapper(host)).start()


def sock(p: ApplianceProcess) -> str:
    return p.config.storage.socket


def image(p: ApplianceProcess) -> str:
    return p.config.storage.namespaces[0].image


def forward(hosts: Hosts, sshd: Sshd, dst: ApplianceProcess) -> SshForward:
    """The destination's socket, from host a, over ssh."""
    target = parse_target(f"ssh://root@{hosts.address('b')}{sock(dst)}")
    assert target is not None
    return SshForward(target, sshd.ssh_options(), ssh=(*hosts.wrapper("a"), "ssh"))


def driver_on(p: ApplianceProcess) -> NvmeDriver:
    """The guest's driver on ``p``'s own host (a local connection)."""
    d = NvmeDriver(VfioUserClient.connect(sock(p)), mem_size=16 << 20)
    d.setup(io_queues=2, depth=32)
    return d


def close(driver: NvmeDriver) -> None:
    """Release the driver and close its connection (the device takes the next client)."""
    driver.close()
    driver.c.close()


def verify_on(p: ApplianceProcess, writer: VerifiedWriter, more: int = 50) -> None:
    """Every block written so far reads back on ``p``; then more verified writes."""
    driver = driver_on(p)
    try:
        writer.driver = driver
        assert writer.verify_all() == len(writer.written)
        writer.step(more)
        writer.verify_all()
    finally:
        close(driver)


def let_go(hosts: Hosts, sshd: Sshd, dst: ApplianceProcess) -> None:
    """Wait until sshd's sessions on host b are gone (the forwarded connection to
    ``dst`` is closed then) and ``dst``'s loop has seen it: two control round trips
    after, the hang-up was pending before the second select round began."""
    keep = {int(sshd.pidfile.read_text().split()[0]), dst.proc.pid if dst.proc else -1}
    pids = hosts.run("b", "ip", "netns", "pids", hosts.ns("b")).stdout.split()
    fds = []
    for pid in (int(p) for p in pids if int(p) not in keep):
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass
    try:
        for fd in fds:
            assert select.select([fd], [], [], 30)[0], "an sshd session did not end"
    finally:
        for fd in fds:
            os.close(fd)
    with ControlClient(dst.config.control.socket) as ctl:
        ctl.request("status")
        ctl.request("status")


def test_full_copy_to_another_host_under_verified_writes(hosts: tuple[Hosts, Sshd],
                                                         tmp_path: Path) -> None:
    h, sshd = hosts
    make_image(tmp_path / "a" / "data" / "disk0.img", SIZE, seed=1, random_mib=24)
    make_image(tmp_path / "b" / "data" / "disk0.img", SIZE, seed=2, random_mib=4, fill=9)
    src_p = appliance(h, "a", tmp_path, str(tmp_path / "a" / "data" / "disk0.img"), size="256M")
    dst_p = appliance(h, "b", tmp_path, str(tmp_path / "b" / "data" / "disk0.img"), size="256M")
    try:
        driver = driver_on(src_p)
        writer = VerifiedWriter(driver, blocks=8, seed=7)
        writer.step(50)
        with forward(h, sshd, dst_p) as fwd:
            steps: list[int] = []

            def load() -> None:
                writer.step(2)
                steps.append(writer.ios)

            dst = VfioUserClient.connect(fwd.local, timeout=60)
            try:
                summary = orch.migrate(driver.c, dst, between_reads=load, max_rounds=10,
                                       converge_bytes=256 << 10)
            finally:
                dst.close()
            close(driver)
        assert len(steps) >= 10 and summary.bytes > 16 << 20  # the random MiBs travelled
        assert file_hash(image(src_p)) == file_hash(image(dst_p))  # byte-identical
        verify_on(dst_p, writer)
    finally:
        src_p.stop()
        dst_p.stop()


def test_full_copy_over_the_forwarded_data_channel(hosts: tuple[Hosts, Sshd],
                                                   tmp_path: Path) -> None:
    """The bulk data on the data channel: the destination's per-session socket,
    forwarded over the same ssh master as its vfio-user socket."""
    h, sshd = hosts
    make_image(tmp_path / "a" / "data" / "disk0.img", SIZE, seed=1, random_mib=24)
    make_image(tmp_path / "b" / "data" / "disk0.img", SIZE, seed=2, random_mib=4, fill=9)
    src_p = appliance(h, "a", tmp_path, str(tmp_path / "a" / "data" / "disk0.img"), size="256M")
    dst_p = appliance(h, "b", tmp_path, str(tmp_path / "b" / "data" / "disk0.img"), size="256M")
    try:
        driver = driver_on(src_p)
        writer = VerifiedWriter(driver, blocks=8, seed=7)
        writer.step(50)
        with forward(h, sshd, dst_p) as fwd:
            steps: list[int] = []

            def load() -> None:  # while a round's data is on the channel
                writer.step(20)
                steps.append(writer.ios)

            dst = VfioUserClient.connect(fwd.local, timeout=60)
            try:
                summary = orch.migrate(driver.c, dst, between_reads=load, max_rounds=6,
                                       converge_bytes=256 << 10,
                                       data_channel=ChannelPlan(forward=fwd.forward))
            finally:
                dst.close()
            close(driver)
        assert summary.data_channel == "ssh forward", summary.channel_fallback
        assert steps and summary.channel_bytes > 16 << 20 and summary.bytes < 1 << 20
        assert file_hash(image(src_p)) == file_hash(image(dst_p))  # byte-identical
        run_dir = Path(sock(dst_p)).parent
        assert not list(run_dir.glob("migch-*"))  # the per-session socket is gone
        verify_on(dst_p, writer)
    finally:
        src_p.stop()
        dst_p.stop()


def test_shared_storage_on_a_third_host_under_verified_writes(hosts: tuple[Hosts, Sshd],
                                                              tmp_path: Path) -> None:
    h, sshd = hosts
    make_image(tmp_path / "export.img", SMALL, seed=3, random_mib=4)
    server = NbdServer("qemu-storage-daemon", tmp_path / "export.img", tmp_path / "nbd.sock",
                       netns=h.ns("c"), tcp=(h.address("c"), 10809))
    with server:
        src_p = appliance(h, "a", tmp_path, server.uri)
        dst_p = appliance(h, "b", tmp_path, server.uri)
        try:
            driver = driver_on(src_p)
            writer = VerifiedWriter(driver, blocks=8, seed=9)
            writer.step(100)
            steps: list[int] = []

            def load() -> None:
                writer.step(2)
                steps.append(writer.ios)

            with forward(h, sshd, dst_p) as fwd:
                dst = VfioUserClient.connect(fwd.local, timeout=60)
                try:
                    summary = orch.migrate(driver.c, dst, shared_storage=True,
                                           between_reads=load)
                finally:
                    dst.close()
            close(driver)
            assert summary.bytes < 64 << 10  # device state only: no data copied
            verify_on(dst_p, writer)  # every write, through b's own connection to c
            # and back, with the command line run on host a, the source named by ssh://
            res = subprocess.run(
                [*h.wrapper("a"), sys.executable, "-m", "appliance", "migrate",
                 f"ssh://root@{h.address('b')}{sock(dst_p)}", sock(src_p), "--shared-storage",
                 *[f"--ssh-option={o}" for o in sshd.ssh_options()]],
                capture_output=True, text=True, timeout=120, check=False)
            assert res.returncode == 0, res.stderr
            assert "shared storage" in res.stdout
            verify_on(src_p, writer)
        finally:
            src_p.stop()
            dst_p.stop()


def test_faults_across_hosts_leave_the_source_serving(hosts: tuple[Hosts, Sshd],
                                                      tmp_path: Path) -> None:
    h, sshd = hosts
    make_image(tmp_path / "a" / "data" / "disk0.img", SMALL, seed=4, random_mib=16)
    make_image(tmp_path / "b" / "data" / "disk0.img", SMALL, seed=5, random_mib=2, fill=3)
    src_p = appliance(h, "a", tmp_path, str(tmp_path / "a" / "data" / "disk0.img"), size="64M")
    dst_p = appliance(h, "b", tmp_path, str(tmp_path / "b" / "data" / "disk0.img"), size="64M")
    dst_hash = file_hash(image(dst_p))
    writer: VerifiedWriter | None = None
    try:
        # a key the destination's sshd does not know: refused, nothing touched
        res = subprocess.run(
            [*h.wrapper("a"), sys.executable, "-m", "appliance", "migrate", sock(src_p),
             f"ssh://root@{h.address('b')}{sock(dst_p)}",
             *[f"--ssh-option={o}" for o in sshd.ssh_options(sshd.other_key)]],
            capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 2
        assert res.stderr.count("\n") == 1 and "Permission denied (publickey)" in res.stderr
        assert res.stderr.startswith("appliance: error: destination ssh://root@")

        # the link cut mid-stream (host b's veth down during pre-copy)
        driver = driver_on(src_p)
        writer = VerifiedWriter(driver, blocks=8, seed=11)
        writer.step(20)

        def cut(step: int) -> None:
            if step == 3:
                h.link("b", up=False)

        with forward(h, sshd, dst_p) as fwd:
            dst = VfioUserClient.connect(fwd.local, timeout=60)
            steps: list[int] = []

            def load() -> None:
                writer.step(2)
                steps.append(writer.ios)
                cut(len(steps))

            try:
                with pytest.raises(orch.MigrationFailed):
                    orch.migrate(driver.c, dst, between_reads=load, converge_bytes=4096)
            finally:
                dst.close()
        h.link("b", up=True)
        assert orch.get_state(driver.c) is MigState.RUNNING
        writer.step(20)  # the source serves, with its queues, as before
        writer.verify_all()
        close(driver)
        let_go(h, sshd, dst_p)
        with VfioUserClient.connect(sock(dst_p), timeout=60) as c:
            assert orch.get_state(c) is MigState.RUNNING
        assert file_hash(image(dst_p)) == dst_hash  # the destination is untouched

        # the destination killed mid-stream
        driver = driver_on(src_p)
        writer.driver = driver

        def kill(step: int) -> None:
            if step == 3:
                dst_p.stop()

        with forward(h, sshd, dst_p) as fwd:
            dst = VfioUserClient.connect(fwd.local, timeout=60)
            steps = []

            def load_kill() -> None:
                writer.step(2)
                steps.append(writer.ios)
                kill(len(steps))

            try:
                with pytest.raises(orch.MigrationFailed):
                    orch.migrate(driver.c, dst, between_reads=load_kill, converge_bytes=4096)
            finally:
                dst.close()
        assert orch.get_state(driver.c) is MigState.RUNNING
        writer.step(20)
        writer.verify_all()
        close(driver)
        assert file_hash(image(dst_p)) == dst_hash
    finally:
        src_p.stop()
        dst_p.stop()
