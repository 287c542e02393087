"""Every row of the "Start-up errors" table in docs/configuration.md, against the real
``python -m appliance run -c CONFIG``: exit status 2, exactly the documented line on
stderr (the key first), no traceback, and nothing under the test's tree created,
changed or removed.  The table is read from the page, so page and behaviour agree."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.runtime.control import ControlClient
from appliance.testing.process import ApplianceProcess

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
DOC_ROOT = "/srv/appliance"  # the layout the table's lines are written for
SIZE = 16 << 20
DENIED = {os.strerror(e) for e in (errno.EACCES, errno.EPERM, errno.EROFS)}


def table() -> dict[str, str]:
    """case -> the documented stderr line."""
    text = DOC.read_text()
    section = text.split("## Start-up errors", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| ([a-z-]+) \| .* \| `(appliance: error: .*)` \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


ROWS = table()


def base_config(root: Path) -> dict[str, Any]:
    run, data = root / "run", root / "data"
    return {
        "data_dir": str(data), "run_dir": str(run),
        "storage": {"socket": str(run / "nvme.sock"),
                    "namespaces": [{"image": str(data / "disk0.img"), "size": SIZE}]},
        "net": {"ports": [{"socket": str(run / "p0.sock"), "mac": "52:54:00:00:00:10"}]},
        "control": {"socket": str(run / "control.sock")},
    }


def image(root: Path, size: int) -> None:
    with open(root / "data" / "disk0.img", "wb") as f:
        f.write(b"precious data")
        f.truncate(size)


def namespace(cfg: dict[str, Any], **keys: Any) -> None:
    cfg["storage"]["namespaces"][0].update(keys)


def in_parent_file(root: Path) -> Path:
    (root / "f").write_text("a file, not a directory")
    return root / "f"


def long_name(root: Path) -> Path:
    """A socket path of 120 bytes under ``root`` (its name a run of c's)."""
    head = f"{root}/run/"
    return Path(head + "c" * (120 - len(head) - len(".sock")) + ".sock")


def listening(path: Path) -> socket.socket:
    """A socket another program listens on (kept open while the test runs)."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(1)
    return s


Setup = Callable[[Path, dict[str, Any]], Any]
SETUPS: dict[str, Setup] = {
    "socket-file": lambda r, c: (r / "run" / "nvme.sock").write_text("not a socket"),
    "socket-dir": lambda r, c: (r / "run" / "nvme.sock").mkdir(),
    "socket-symlink": lambda r, c: (r / "run" / "nvme.sock").symlink_to(r / "data"),
    "port-socket-file": lambda r, c: (r / "run" / "p0.sock").write_text("not a socket"),
    "control-socket-file": lambda r, c: (r / "run" / "control.sock").write_text("not a socket"),
    "control-socket-dir": lambda r, c: (r / "run" / "control.sock").mkdir(),
    "socket-foreign": lambda r, c: listening(r / "run" / "nvme.sock"),
    "lock-dir": lambda r, c: (r / "run" / "nvme.sock.lock").mkdir(),
    "socket-too-long": lambda r, c: c["control"].update(socket=str(long_name(r))),
    "socket-parent-file": lambda r, c: c["storage"].update(
        socket=str(in_parent_file(r) / "nvme.sock")),
    "image-parent-file": lambda r, c: namespace(c, image=str(in_parent_file(r) / "disk0.img")),
    "image-dir": lambda r, c: (r / "data" / "disk0.img").mkdir(),
    "image-denied": lambda r, c: namespace(c, image="/sys/appliance-disk0.img"),
    "image-larger": lambda r, c: image(r, 64 << 20),
    "image-larger-grow": lambda r, c: (image(r, 64 << 20), namespace(c, grow=True)),
    "image-smaller": lambda r, c: image(r, 4 << 20),
    "image-smaller-read-only": lambda r, c: (image(r, 4 << 20),
                                             namespace(c, grow=True, read_only=True)),
    "placeholder": lambda r, c: namespace(c, image="{dta_dir}/disk0.img"),
    "run-dir-file": lambda r, c: ((r / "run").rmdir(), (r / "run").write_text("a file")),
    "data-dir-denied": lambda r, c: c.update(data_dir="/sys/appliance-data"),
    "socket-denied": lambda r, c: c["storage"].update(socket="/sys/appliance-nvme.sock"),
    "pcap-dir": lambda r, c: (r / "run" / "p0.pcap").mkdir() or c["net"]["ports"][0].update(
        pcap=str(r / "run" / "p0.pcap")),
}


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: its type, inode, size and (files) content digest."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            out[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size,
                                                digest)
    return out


def run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "appliance"
    (root / "run").mkdir(parents=True)
    (root / "data").mkdir()
    yield root


def test_the_table_has_every_case() -> None:
    assert set(ROWS) == set(SETUPS) | {"socket-in-use"}


@pytest.mark.parametrize("case", sorted(SETUPS))
def test_start_up_error(root: Path, tmp_path: Path, case: str) -> None:
    cfg = base_config(root)
    kept = SETUPS[case](root, cfg)  # a foreign listener stays open while the appliance runs
    config = tmp_path / "appliance.yaml"
    config.write_text(yaml.safe_dump(cfg))
    before = tree(root)
    result = run(config)
    expected = ROWS[case].replace(DOC_ROOT, str(root))
    if case == "socket-too-long":  # the same 120 bytes: the run of c's fills what root leaves
        expected = re.sub(r"/c{20,}\.sock", f"/{long_name(root).name}", expected)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    if case.endswith("-denied"):  # the reason is the kernel's: /sys may be read-only here
        assert len(lines) == 1 and lines[0].rsplit(": ", 1)[1] in DENIED, lines
        lines, expected = [lines[0].rsplit(": ", 1)[0]], expected.rsplit(": ", 1)[0]
    assert lines == [expected]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert tree(root) == before  # nothing created, changed or removed
    for name in ("appliance-disk0.img", "appliance-data", "appliance-nvme.sock.lock"):
        assert not os.path.exists(f"/sys/{name}")
    if isinstance(kept, socket.socket):
        kept.close()


def test_socket_in_use(root: Path, tmp_path: Path) -> None:
    cfg = base_config(root)
    first = ApplianceProcess(cfg, tmp_path / "first").start()
    try:
        before = tree(root)
        result = run(first.config_path)  # the very same configuration
        assert first.proc is not None
        expected = ROWS["socket-in-use"].replace(DOC_ROOT, str(root)).replace(
            "PID", str(first.proc.pid))
        assert result.returncode == 2, result
        assert result.stderr.splitlines() == [expected]
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert tree(root) == before
        with ControlClient(first.config.control.socket, timeout=5.0) as ctl:
            assert isinstance(ctl("status"), dict)  # the first one is still reachable
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(first.config.net.ports[0].socket)
    finally:
        assert first.stop() == 0
    # it removed its sockets and locks; its log stays
    assert sorted(os.listdir(root / "run")) == ["appliance.log"]


@pytest.mark.parametrize(("have", "grow"), [(SIZE, False), (SIZE, True), (4 << 20, True)])
def test_an_image_of_the_right_size_or_grown_is_served(root: Path, tmp_path: Path, have: int,
                                                       grow: bool) -> None:
    cfg = base_config(root)
    image(root, have)
    namespace(cfg, grow=grow)
    with ApplianceProcess(cfg, tmp_path / "proc") as proc:
        assert any(f"({SIZE} bytes" in line for line in proc.stdout_lines)
    img = root / "data" / "disk0.img"
    assert img.stat().st_size == SIZE and img.read_bytes()[:13] == b"precious data"
