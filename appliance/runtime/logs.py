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


def setup(level: str, fmt: str, log_dir: str | None, *, loud: bool) -> str | None:
    """Configure the root logger: ``level`` (one of :data:`LEVELS`) into
    ``log_dir/appliance.log`` when ``log_dir`` is given (created if missing;
    appended to), and on stderr at that level when ``loud``, else WARNING and up.

    Returns the log file's path, or None when there is none (no ``log_dir``,
    or it cannot be written: then stderr gets everything at ``level``).
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    want = getattr(logging, level.upper())
    root.setLevel(want)
    path: str | None = None
    if log_dir is not None:
        try:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, LOG_FILE)
            to_file = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:
            print(f"appliance: warning: no log file in {log_dir}: {exc.strerror or exc}",
                  file=sys.stderr)
            path = None
            loud = True
        else:
            to_file.setFormatter(formatter(fmt))
            to_file.setLevel(want)
            root.addHandler(to_file)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(formatter(fmt))
    err.setLevel(want if loud or path is None else max(want, logging.WARNING))
    root.addHandler(err)
    return path
