"""Start ``appliance run`` as a real subprocess and wait until it is ready.

Readiness is the line ``appliance: ready`` on its stdout, read with a bounded
select loop (no sleeping).  Stop sends SIGTERM and waits; the log file keeps
everything the process printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from appliance.config import Config, RawConfig
from appliance.runtime.unix import wait_readable


def make_config(tmp: Path, **overrides: Any) -> RawConfig:
    """A configuration in its raw form (what the YAML file holds) with every path
    inside ``tmp`` (short socket paths); a table in ``overrides`` is merged into
    the same table, any other value replaces the key's."""
    run = tmp / "run"
    cfg: RawConfig = {
        "data_dir": str(tmp / "data"),
        "run_dir": str(run),
        "storage": {"socket": str(run / "nvme.sock"),
                    "namespaces": [{"image": str(tmp / "data" / "disk0.img"), "size": "64M"}]},
        "net": {"ports": []},
        "control": {"socket": str(run / "control.sock")},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


PROFILE_ENV = "APPLIANCE_PROFILE_DIR"


def profile_args(workdir: Path) -> list[str]:
    """``-m cProfile -o DIR/NAME.prof`` when the environment asks for profiles
    (``APPLIANCE_PROFILE_DIR=DIR``: benchmarks and tests, never the product),
    else nothing.  NAME is the work directory's path, ``/`` as ``_``; the
    profile is written when the process exits on SIGTERM."""
    where = os.environ.get(PROFILE_ENV)
    if not where:
        return []
    name = "_".join(workdir.resolve().parts[-3:])
    return ["-m", "cProfile", "-o", str(Path(where) / f"{name}.prof")]


class ApplianceProcess:
    """A running ``appliance run -c CONFIG``."""

    def __init__(self, raw_config: RawConfig, workdir: Path, *, trace: bool = False,
                 extra_args: tuple[str, ...] = (), wrapper: tuple[str, ...] = (),
                 log_level: str | None = None) -> None:
        """``raw_config``: the configuration's raw form, written to ``config_path``;
        ``wrapper``: what runs the command (``("ip", "netns", "exec", NAME)``);
        ``log_level``: ``appliance run --log-level`` (its default, info, when None).
        ``log_path`` keeps what the process prints on stderr (warnings and up),
        ``run_log_path`` its log (``RUN_DIR/appliance.log``)."""
        self.wrapper = wrapper
        self.raw_config = raw_config
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "appliance.yaml"
        self.config_path.write_text(yaml.safe_dump(raw_config))
        self.log_path = workdir / "appliance.log"
        self.stdout_lines: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.trace = trace
        self.extra_args = extra_args  # e.g. ("--standby",)
        self.log_level = log_level

    @property
    def config(self) -> Config:
        """The configuration as the appliance sees it (defaults filled, paths expanded).

        Raises:
            ConfigError: the file does not hold a valid configuration.
        """
        from appliance import config

        return config.load(str(self.config_path))

    @property
    def run_log_path(self) -> Path:
        """The log ``appliance run`` writes in its run directory (INFO by default)."""
        from appliance.runtime.logs import LOG_FILE

        return Path(self.config.run_dir) / LOG_FILE

    def start(self, timeout: float = 30.0) -> ApplianceProcess:
        profile = profile_args(self.workdir)
        args = [*self.wrapper, sys.executable, *profile, "-m", "appliance", "run", "-c",
                str(self.config_path)]
        if self.trace:
            args.append("--trace")
        if self.log_level is not None:
            args += ["--log-level", self.log_level]
        args += self.extra_args
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        self.wait_for_line("appliance: ready", timeout)
        return self

    def wait_for_line(self, needle: str, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"appliance did not print {needle!r}; log: {self.log_text()}")
            if not wait_readable(fd, left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"appliance exited ({self.proc.wait()}): {self.log_text()}")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                self.stdout_lines.append(text)
                if needle in text:
                    return text

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit. Returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ApplianceProcess:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
