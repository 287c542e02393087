"""The pytest plugin as a user's test suite sees it: options in ``pytest --help``,
the fixture examples under ``pytest -n 2``, and a failed test's report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "tests" / "integration" / "test_fixture_examples.py"


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
                          check=False)


def test_help_lists_the_options(tmp_path: Path) -> None:
    out = _pytest("--help", cwd=tmp_path).stdout
    assert "appliance fixtures (appliance.testing.plugin):" in out
    for name in ("--appliance-qemu-env", "--appliance-keep", "--appliance-log-level",
                 "--appliance-report-lines", "--appliance-shared-scope"):
        assert name in out, name
    assert "appliance_log_level (string):" in out  # the ini key


def test_fixture_examples_without_a_guest_pass_under_xdist(tmp_path: Path) -> None:
    done = _pytest("-n", "2", "-q", "-k", "driver_without_a_guest or driver_delayed",
                   "-W", "error::DeprecationWarning", str(EXAMPLES), cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "6 passed" in done.stdout, done.stdout[-2000:]


FAILING = '''
import pytest

@pytest.mark.appliance_config(storage={"namespaces": [{"image": "{data_dir}/d.img",
                                                       "size": "4M"}]})
def test_fails(appliance_nvme_driver, appliance_ctl):
    appliance_ctl("fault-add", action="status", lba=3, status="write_fault", dnr=True)
    appliance_nvme_driver.write(1, 3, b"z" * 512)   # raises NvmeError
'''


def test_a_failed_test_reports_the_log_tail_and_the_faults(tmp_path: Path) -> None:
    (tmp_path / "test_failing.py").write_text(FAILING)
    done = _pytest("-q", "--appliance-report-lines", "20", "test_failing.py", cwd=tmp_path)
    out = done.stdout
    assert done.returncode == 1, out[-3000:] + done.stderr[-2000:]
    assert "NvmeError" in out
    # the INFO log of the run directory, with the client's connection in it
    assert "appliance log (last 20 lines of " in out
    assert "nvme: client connected on" in out
    # the fault list, with the rule that fired
    assert "appliance faults (fault-list)" in out
    assert '"nvme.status": 1' in out
    # stderr held nothing: no section names the empty file
    assert "appliance stderr" not in out
    # a failed test's directory stays; a passed one's would be gone


SHARED = '''
import pathlib

def test_record(appliance_shared):
    with open(pathlib.Path(__file__).parent / "sockets.txt", "a") as f:
        f.write(appliance_shared.config.control.socket + "\\n")
'''


def _shared_sockets(tmp_path: Path, *args: str) -> list[str]:
    for name in ("test_one.py", "test_two.py"):
        (tmp_path / name).write_text(SHARED)
    done = _pytest("-q", *args, "test_one.py", "test_two.py", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    return (tmp_path / "sockets.txt").read_text().split()


def test_shared_appliance_per_module_or_per_session(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    per_module = _shared_sockets(tmp_path / "m")
    assert len(per_module) == 2 and per_module[0] != per_module[1]
    (tmp_path / "s").mkdir()
    per_session = _shared_sockets(tmp_path / "s", "--appliance-shared-scope", "session")
    assert len(per_session) == 2 and per_session[0] == per_session[1]


PASSING = '''
def test_passes(appliance):
    assert appliance.alive
'''


def test_a_passed_tests_directory_goes_unless_keep(tmp_path: Path) -> None:
    (tmp_path / "test_passing.py").write_text(PASSING)
    short = Path(tempfile.mkdtemp(prefix="keep-", dir="/tmp"))  # socket paths stay < 108
    try:
        for keep in (False, True):
            base = short / str(keep)
            args = ["-q", f"--basetemp={base}", "test_passing.py"]
            done = _pytest(*(["--appliance-keep", *args] if keep else args), cwd=tmp_path)
            assert done.returncode == 0, done.stdout[-3000:]
            kept = list(base.glob("test_passes0/appliance/run/appliance.log"))
            assert len(kept) == (1 if keep else 0), (keep, kept)
    finally:
        shutil.rmtree(short)


def test_sockets_stay_short_under_a_long_temporary_directory(tmp_path: Path) -> None:
    """A base temporary directory deep enough that RUN_DIR/control.sock would pass
    the 107 bytes of a unix socket path: the appliance runs in a short directory
    in /tmp, which tmp_path/appliance links to (kept with --appliance-keep)."""
    (tmp_path / "test_passing.py").write_text(PASSING)
    base = tmp_path / ("deep-" * 12)
    done = _pytest("-q", f"--basetemp={base}", "--appliance-keep", "test_passing.py",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    link = base / "test_passes0" / "appliance"
    try:
        assert link.is_symlink() and str(link.resolve()).startswith("/tmp/appliance-")
        assert (link / "run" / "appliance.log").exists()
    finally:
        shutil.rmtree(link.resolve(), ignore_errors=True)
