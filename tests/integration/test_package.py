"""The package as a user installs it: a wheel built from this checkout, installed
into a fresh venv (its dependencies from the package index), runs without the
source tree: ``appliance --version``, ``appliance run`` on the embedded defaults
(answering ``appliance ctl status``), ``appliance image info`` (the builder is the
wheel's package data), and the fixture examples that need no guest."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO),
                    "-w", str(root / "dist")], check=True, timeout=300)
    wheel, = (root / "dist").glob("appliance-*.whl")
    env = user_env(root)  # (pip would take an appliance on PYTHONPATH for installed)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120,
                   env=env)
    subprocess.run([str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "-q",
                    str(wheel), "pytest"], check=True, timeout=300, env=env)
    return root / "venv"


def user_env(tmp: Path) -> dict[str, str]:
    """No PYTHONPATH (the checkout must not be imported); default paths under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XDG_RUNTIME_DIR"] = str(tmp / "run")
    env["XDG_DATA_HOME"] = str(tmp / "data")
    (tmp / "run").mkdir(mode=0o700, exist_ok=True)
    return env


def test_the_installed_wheel_runs_on_its_own(venv: Path, tmp_path: Path) -> None:
    env = user_env(tmp_path)
    bin_dir = venv / "bin"
    out = subprocess.run([bin_dir / "appliance", "--version"], capture_output=True, text=True,
                         check=True, env=env, cwd=tmp_path).stdout
    assert out.strip() == f"appliance {VERSION}"
    where = subprocess.run([bin_dir / "python", "-c", ("import appliance, pathlib; "
                            "print(pathlib.Path(appliance.__file__).parent)")],
                           capture_output=True, text=True, check=True, env=env, cwd=tmp_path)
    package = Path(where.stdout.strip())
    assert package.is_relative_to(venv) and (package / "py.typed").is_file()
    assert (package / "data" / "qemu-env.sh").is_file()
    assert not (package / "data" / "qemu-env.sh").is_symlink()

    run = subprocess.Popen([bin_dir / "appliance", "run"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        assert run.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x.strip()) for x in run.stdout or ()],
                         daemon=True).start()
        seen = [lines.get(timeout=60)]
        while seen[-1] != "appliance: ready":
            seen.append(lines.get(timeout=60))
        ctl = subprocess.run([bin_dir / "appliance", "ctl", "status"], capture_output=True,
                             text=True, check=False, env=env, cwd=tmp_path, timeout=30)
        assert ctl.returncode == 0, ctl.stderr
        assert json.loads(ctl.stdout)["nvme"]["namespaces"]
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(30)
    assert run.returncode == 0

    info = subprocess.run([bin_dir / "appliance", "image", "info", "--json"],
                          capture_output=True, text=True, check=False, env=env, cwd=tmp_path)
    assert info.returncode in (0, 1), info.stderr  # 1: the QEMU environment is not built
    assert Path(json.loads(info.stdout)["builder"]) == package / "data" / "qemu-env.sh"


def test_fixture_examples_without_a_guest_pass_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    """The examples run from a copy (so nothing of the checkout is on sys.path)."""
    shutil.copy(REPO / "tests" / "integration" / "test_fixture_examples.py", tmp_path)
    done = subprocess.run([venv / "bin" / "pytest", "-q", "-p", "no:cacheprovider",
                           "-k", "driver_without_a_guest or driver_delayed_completion",
                           "test_fixture_examples.py"],
                          capture_output=True, text=True, check=False,
                          env=user_env(tmp_path), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]  # e.g. "6 passed, 11 deselected in 1.7s"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 2 and "failed" not in summary, summary
