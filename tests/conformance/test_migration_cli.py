"""``appliance migrate``: real appliance processes, the CLI as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client import migrate as orch
from appliance.client.vfio_user import VfioUserClient
from appliance.testing.process import ApplianceProcess
from appliance.testing.workload import file_hash, make_image, pair_configs
from appliance.vfio_user.migration_states import MigState

SIZE = 64 << 20


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "migrate", *args],
                          check=False, capture_output=True, text=True, timeout=120)


def start(tmp: Path, shared: bool) -> tuple[ApplianceProcess, ApplianceProcess]:
    src_cfg, dst_cfg = pair_configs(tmp, SIZE, shared=shared)
    make_image(tmp / "src" / "data" / "disk0.img", SIZE, seed=3, random_mib=6)
    if not shared:
        make_image(tmp / "dst" / "data" / "disk0.img", SIZE, seed=4, fill=7)
    return (ApplianceProcess(src_cfg, tmp / "src" / "proc").start(),
            ApplianceProcess(dst_cfg, tmp / "dst" / "proc").start())


@pytest.fixture(params=[False, True], ids=["full", "shared-storage"])
def pair(request: pytest.FixtureRequest,
         tmp_path: Path) -> Iterator[tuple[ApplianceProcess, ApplianceProcess, bool]]:
    src, dst = start(tmp_path, request.param)
    try:
        yield src, dst, request.param
    finally:
        src.stop()
        dst.stop()


def sock(p: ApplianceProcess) -> str:
    return p.config.storage.socket


def image(p: ApplianceProcess) -> str:
    return p.config.storage.namespaces[0].image


def test_migrate_command(pair: tuple[ApplianceProcess, ApplianceProcess, bool]) -> None:
    src, dst, shared = pair
    src_hash = file_hash(image(src))
    if not shared:
        assert file_hash(image(dst)) != src_hash
    args = [sock(src), sock(dst), "--max-rounds", "4", "--converge", "64K"]
    res = cli(*args, *(["--shared-storage"] if shared else []))
    assert res.returncode == 0, res.stderr
    assert "downtime:" in res.stdout and "pre-copy rounds:" in res.stdout
    assert "\r[" not in res.stdout  # no progress bar when stdout is not a terminal
    assert file_hash(image(dst)) == src_hash == file_hash(image(src))
    moved = int(res.stdout.split("bytes: ")[1].split()[0])
    if shared:
        assert moved < 64 << 10  # device state only
        assert "shared storage" in res.stdout
    else:
        assert moved > 4 << 20  # the random MiBs travelled
    with VfioUserClient.connect(sock(dst)) as c:  # a fresh client: the device runs
        assert orch.get_state(c) is MigState.RUNNING


def test_errors_are_one_line(tmp_path: Path) -> None:
    res = cli(str(tmp_path / "nope.sock"), str(tmp_path / "nope2.sock"))
    assert res.returncode == 2
    assert res.stderr.startswith("appliance: error: source ")
    assert res.stderr.count("\n") == 1
    res = cli("a", "b", "--converge", "lots")
    assert res.returncode == 2 and "--converge" in res.stderr


def test_shared_storage_mode_must_match(tmp_path: Path) -> None:
    """A stream made in shared-storage mode is refused by a destination set for a full
    copy: images on both sides keep their contents, the source runs again."""
    src, dst = start(tmp_path, shared=False)
    try:
        before = file_hash(image(src)), file_hash(image(dst))
        with VfioUserClient.connect(sock(src)) as s, VfioUserClient.connect(sock(dst)) as d:
            orch.set_options(s, orch.MigOption.SHARED_STORAGE)
            orch.set_state(d, MigState.RESUMING)
            orch.set_state(s, MigState.STOP_COPY)
            data = orch.data_read(s, 1 << 20)
            with pytest.raises(orch.VfioUserError) as err:
                orch.data_write(d, data)
            assert err.value.errno == 22
            orch.set_state(s, MigState.RUNNING)
            with pytest.raises(orch.VfioUserError):
                orch.set_state(d, MigState.STOP)  # the failed session is refused once ...
            orch.set_state(d, MigState.STOP)  # ... then the empty one cancels
            orch.set_state(d, MigState.RUNNING)
        assert "shared-storage mode differs" in dst.log_text()
        assert (file_hash(image(src)), file_hash(image(dst))) == before
    finally:
        src.stop()
        dst.stop()


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    import os

    src, dst = start(tmp_path, shared=False)
    master, slave = os.openpty()
    try:
        # the bar on stderr (the terminal), the summary alone on stdout (a pipe)
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "migrate", sock(src),
                                 sock(dst)], stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(60) == 0, out.decode(errors="replace")
        text = out.decode()
        assert "\r[" in text and "100.0% done" in text and "downtime:" not in text
        assert proc.stdout is not None
        summary = proc.stdout.read().decode()
        assert "downtime:" in summary and "\r[" not in summary
        assert file_hash(image(src)) == file_hash(image(dst))
    finally:
        os.close(master)
        src.stop()
        dst.stop()
