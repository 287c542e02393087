"""Where ``appliance run`` logs, and in which format.

``appliance run`` logs at INFO by default into ``appliance.log`` in its run
directory (connections, negotiated features, NVMe I/O queues created, migration state
changes, TAP and socket takeovers, every
control-plane event: faults fired, namespace changes, CFS, handoff progress),
and only warnings and errors on stderr (all of it with ``-v``/``--trace``).
``--log-format json`` writes one JSON object per line (``ts``, ``level``,
``logger``, ``message``, and ``exc`` with a traceback) for machines.  The data
path never logs per command or frame above DEBUG.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from typing import Any

#: ``--log-level`` choices, lowest first
LEVELS = ("debug", "info", "warning", "error")
#: the log file's name inside ``run_dir``
LOG_FILE = "appliance.log"
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO 8601, UTC, ms), ``level``,
    ``logger``, ``message``, ``pid`` and, with an exception, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        """Returns the record as one line of JSON."""
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {"ts": f"{ts}.{int(record.msecs):03d}Z",
                               "level": record.levelname, "logger": record.name,
                               "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, sort_keys=True)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of ``--log-format`` (``text`` or ``json``)."""
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


class LogFile:
    """``RUN_DIR/appliance.log``, opened once start-up succeeded: until then the
    records wait in memory, so a start-up that fails leaves no file behind."""

    def __init__(self, log_dir: str, fmt: str, level: int, stderr: logging.Handler) -> None:
        self.log_dir, self.fmt, self.level, self.stderr = log_dir, fmt, level, stderr
        self.waiting = logging.handlers.MemoryHandler(
            capacity=1 << 30, flushLevel=logging.CRITICAL + 1, target=None, flushOnClose=False)
        self.waiting.setLevel(level)
        logging.getLogger().addHandler(self.waiting)
        self.path: str | None = None

    def open(self) -> str | None:
        """Create (or append to) the file and write what waited.

        Returns:
            Its path; None when it cannot be written (then stderr gets the
            log at the file's level, and a warning says why).
        """
        root = logging.getLogger()
        path = os.path.join(self.log_dir, LOG_FILE)
        try:
            to_file: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:
            self.stderr.setLevel(self.level)
            to_file, path = self.stderr, ""
            logging.getLogger("appliance").warning("no log file in %s: %s", self.log_dir,
                                                   exc.strerror or exc)
        else:
            to_file.setFormatter(formatter(self.fmt))
            to_file.setLevel(self.level)
            root.addHandler(to_file)
        root.removeHandler(self.waiting)
        if to_file is not self.stderr:
            self.waiting.setTarget(to_file)
            self.waiting.flush()
        self.waiting.close()
        self.path = path or None
        return self.path


def setup(level: str, fmt: str, log_dir: str | None, *, loud: bool) -> LogFile | None:
    """Configure the root logger: ``level`` (one of :data:`LEVELS`) for the log
    file ``log_dir/appliance.log`` when ``log_dir`` is given (records wait in
    memory until :meth:`LogFile.open`), and on stderr at that level when
    ``loud`` (or without a file), else WARNING and up.

    Returns:
        The log file to open once start-up succeeded, or None without ``log_dir``.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    want = getattr(logging, level.upper())
    root.setLevel(want)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(formatter(fmt))
    err.setLevel(want if loud or log_dir is None else max(want, logging.WARNING))
    root.addHandler(err)
    return None if log_dir is None else LogFile(log_dir, fmt, want, err)
