"""The plugin's failure report and its shared guest, as a user's suite sees them.

One pytest run in a subprocess, one guest boot: a module with two tests on
``appliance_guest_shared``; the first fails on purpose after arming a fault
and writing a line on the guest console, the second passes on the same guest,
its fault rules cleared by the reset between them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.testing.qemu_environment import qemu_env

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

SUITE = '''
import pytest

def test_a_fails_on_purpose(appliance_guest_shared, appliance_shared_ctl):
    appliance_shared_ctl("fault-add", action="status", lba=42, status="unrecovered_read_error")
    out, rc = appliance_guest_shared.run("echo MARK-$((6 * 7)) > /dev/console; "
                                         "dd if=/dev/nvme0n1 of=/dev/null bs=512 skip=42 "
                                         "count=1 iflag=direct")
    assert rc == 0, "the guest read block 42 (it should have failed: this test fails)"

def test_b_shares_the_guest_after_a_reset(appliance_guest_shared, appliance_shared_ctl):
    assert appliance_shared_ctl("fault-list")["rules"] == []      # cleared between tests
    assert appliance_guest_shared.name == "guest-boot1"              # not booted again
    out, rc = appliance_guest_shared.run("dd if=/dev/nvme0n1 of=/dev/null bs=512 skip=42 "
                                         "count=1 iflag=direct 2>&1")
    assert rc == 0, out
'''


def test_failed_guest_test_reports_log_faults_and_console(tmp_path: Path) -> None:
    env_dir = qemu_env().root
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("APPLIANCE_QEMU_ENV", None)  # the option says where it is
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p",
                           "no:randomly", "--appliance-qemu-env", str(env_dir),
                           "--appliance-report-lines", "30", "test_suite.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
                          check=False)
    out = done.stdout
    assert "1 failed, 1 passed" in out, out[-4000:] + done.stderr[-2000:]
    failure = out[out.index("test_a_fails_on_purpose"):]
    assert "appliance log (last 30 lines of " in failure
    assert "INFO event FAULT_FIRED" in failure                  # the log tail
    assert "appliance faults (fault-list)" in failure
    assert re.search(r'"nvme.status": [1-9]', failure)          # the fault list (Linux retries)
    assert "guest-boot1 console (last 30 lines of " in failure
    assert "MARK-42" in failure                                  # the console tail
    assert "appliance stderr" not in failure                     # an empty file: no section
