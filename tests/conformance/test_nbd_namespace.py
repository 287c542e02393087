"""A namespace whose image is an NBD export (qemu-storage-daemon and nbdkit on a
Unix socket): the Python NVMe driver's I/O reaches the export's file, the size
and read-only flag come from the export, start-up problems are one line."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from appliance.client.nvme import NvmeDriver, NvmeError
from appliance.client.vfio_user import VfioUserClient
from appliance.runtime.control import ControlClient
from appliance.storage import identify_spec, spec
from appliance.testing.nbd import SERVERS, NbdServer
from appliance.testing.process import ApplianceProcess, make_config

SIZE = 32 << 20


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NbdServer]:
    image = tmp_path / "export.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    with NbdServer(request.param, image, tmp_path / "nbd.sock") as srv:
        yield srv


def appliance_on(server: NbdServer, tmp: Path, **ns: object) -> ApplianceProcess:
    cfg = make_config(tmp, storage={"namespaces": [{"image": server.uri, **ns}]})
    return ApplianceProcess(cfg, tmp / "proc")


def driver_for(proc: ApplianceProcess) -> NvmeDriver:
    client = VfioUserClient.connect(proc.config.storage.socket)
    d = NvmeDriver(client)
    d.setup(io_queues=2, depth=32)
    return d


def file_bytes(server: NbdServer, offset: int, length: int) -> bytes:
    with open(server.image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_verified_io_reaches_the_export(server: NbdServer, tmp_path: Path) -> None:
    with appliance_on(server, tmp_path) as proc:
        d = driver_for(proc)
        try:
            assert d.ns_blocks[1] == SIZE // 512  # the export's size
            rng = random.Random(11)
            written = {}
            for i in range(48):
                lba = rng.randrange(0, SIZE // 512 - 64)
                data = rng.randbytes(rng.choice((1, 8, 64)) * 512)
                d.write(1, lba, data, qid=1 + i % 2, fua=i % 5 == 0)
                assert d.read(1, lba, len(data) // 512, qid=2 - i % 2) == data
                for k in range(len(data) // 512):
                    written[lba + k] = data[k * 512:(k + 1) * 512]
            d.flush(1)
            for lba, block in written.items():
                assert file_bytes(server, lba * 512, 512) == block
            # Write Zeroes, plain and deallocating: zeroes read back, in the file too
            for deac in (0, 1 << 25):
                d.write(1, 4096, os.urandom(8 * 512))
                done, _ = d.io(spec.IoOpcode.WRITE_ZEROES, 4096, 8, cdw12=deac)
                assert done.status == 0
                assert d.read(1, 4096, 8) == bytes(8 * 512)
            d.flush(1)
            assert file_bytes(server, 4096 * 512, 8 * 512) == bytes(8 * 512)
        finally:
            d.close()
        assert proc.alive, proc.log_text()


def test_a_read_only_export_is_a_write_protected_namespace(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(b"\x5a" * SIZE)
    for kind in SERVERS:
        with NbdServer(kind, image, tmp_path / f"{kind}.sock", read_only=True) as srv, \
                appliance_on(srv, tmp_path / kind) as proc:
            d = driver_for(proc)
            try:
                assert d.identify_namespace(1).nsattr & identify_spec.NSATTR_WRITE_PROTECTED
                assert d.read(1, 100, 8) == b"\x5a" * 4096
                with pytest.raises(NvmeError) as err:
                    d.write(1, 100, bytes(4096))
                assert err.value.status == spec.Status.NS_WRITE_PROTECTED
            finally:
                d.close()
    assert image.read_bytes() == b"\x5a" * SIZE


def test_the_server_gone_fails_commands_not_the_appliance(server: NbdServer,
                                                          tmp_path: Path) -> None:
    with appliance_on(server, tmp_path) as proc:
        d = driver_for(proc)
        try:
            d.write(1, 0, b"\x01" * 4096)
            server.stop(signal.SIGKILL)
            for call in (lambda: d.read(1, 0, 8), lambda: d.write(1, 8, bytes(4096)),
                         lambda: d.flush(1)):
                with pytest.raises(NvmeError) as err:
                    call()
                assert err.value.status in (spec.Status.UNRECOVERED_READ_ERROR,
                                            spec.Status.WRITE_FAULT)
            assert proc.alive, proc.log_text()
        finally:
            d.close()


def run_appliance(tmp: Path, image: str, **ns: object) -> subprocess.CompletedProcess[str]:
    cfg = make_config(tmp, storage={"namespaces": [{"image": image, **ns}]})
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "appliance.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "appliance", "run", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_start_up_errors_of_an_nbd_namespace(server: NbdServer, tmp_path: Path) -> None:
    line = one_error_line(run_appliance(tmp_path / "a", server.uri, size="16M"))
    assert line == ("appliance: error: storage.namespaces[0].size: the export is 33554432 "
                    "bytes (32 MiB), size is 16777216 bytes (16 MiB) (leave size out to take "
                    "the export's)")
    assert not (tmp_path / "a" / "run").exists()  # connected first: nothing created
    missing = server.uri.replace("/disk?", "/other?")
    line = one_error_line(run_appliance(tmp_path / "b", missing))
    assert line.startswith(f"appliance: error: storage.namespaces[0].image: {missing}: ")
    assert "other" in line.split(missing, 1)[1]
    gone = f"nbd+unix:///disk?socket={tmp_path}/none.sock"
    line = one_error_line(run_appliance(tmp_path / "c", gone))
    assert line == (f"appliance: error: storage.namespaces[0].image: {gone}: "
                    "No such file or directory")
    line = one_error_line(run_appliance(tmp_path / "d", "nbd+unix:///disk"))
    assert line == ("appliance: error: storage.namespaces[0].image: nbd+unix:// needs one "
                    "?socket=PATH (got 'nbd+unix:///disk')")


def test_the_live_handoff_is_refused_for_an_nbd_namespace(server: NbdServer,
                                                          tmp_path: Path) -> None:
    with appliance_on(server, tmp_path) as proc, \
            ControlClient(proc.config.control.socket) as ctl:
        reply = ctl.request("handoff", to=str(tmp_path / "other" / "control.sock"))
        assert not reply.get("ok", False) and "NBD export" in str(reply), reply
        assert proc.alive
