"""``appliance top``: a live view of a running appliance, refreshed each second.

What ``spdk_top`` is to SPDK: one screen from the control socket's ``status``
(QMP), redrawn every ``--interval`` seconds with plain ANSI escapes (stdlib
only): the NVMe controller (state, IOPS, read and write bandwidth, errors)
and each of its queues (size, commands in flight, completion backlog); each
net port (link, rx/tx packets per second, bandwidth, drops) and its virtqueues;
the fault rules and their hits; the vfio-user migration state and the last
handoff event.  Rates
are the counters' change between two polls divided by the time between them.
``q`` quits (on a terminal); ``--count N`` stops after N screens; without a
terminal on stdout each screen is printed after the previous one, no escapes.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from appliance.config import Config
from appliance.errors import ApplianceError

CLEAR = "\x1b[H\x1b[2J"
BOLD, RESET = "\x1b[1m", "\x1b[0m"
#: events whose latest one is the "migration" line
MIGRATION_EVENTS = ("HANDOFF_PROGRESS", "HANDOFF_COMPLETED", "HANDOFF_FAILED")


@dataclass
class Sample:
    """One ``status`` answer and when it came (monotonic seconds)."""

    status: dict[str, Any]
    at: float
    events: list[dict[str, Any]] = field(default_factory=list)


def _rate(cur: float, prev: float, dt: float) -> float:
    """Per second; 0 for a counter that went backwards (a reset, a new process)."""
    return max(0.0, cur - prev) / dt if dt > 0 else 0.0


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:7.2f} {prefix}{unit}"
    return f"{value:7.0f} {unit}"


def _bytes(value: float) -> str:
    for scale, prefix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= scale:
            return f"{value / scale:7.2f} {prefix}/s"
    return f"{value:7.0f} B/s"


def _io_commands(nvme: dict[str, Any]) -> int:
    return sum(n for name, n in nvme.get("counters", {}).get("commands", {}).items()
               if name.startswith("io."))


def render(prev: Sample, cur: Sample, where: str, last_migration: str) -> list[str]:
    """The screen's lines for the change from ``prev`` to ``cur``."""
    dt = cur.at - prev.at
    st, ps = cur.status, prev.status
    lines = [f"{BOLD}appliance top{RESET}  {where}  every {dt:.1f} s  (q quits)", ""]
    nvme, pnvme = st.get("nvme"), ps.get("nvme") or {}
    if nvme:
        c, pc = nvme.get("counters", {}), pnvme.get("counters", {})
        iops = _rate(_io_commands(nvme), _io_commands(pnvme), dt)
        rd = _rate(c.get("bytes_read", 0), pc.get("bytes_read", 0), dt)
        wr = _rate(c.get("bytes_written", 0), pc.get("bytes_written", 0), dt)
        lines.append(f"{BOLD}NVMe{RESET} {nvme.get('state', '?'):<9} "
                     f"{'attached' if nvme.get('attached') else 'no client'}  "
                     f"IOPS {_si(iops, '')}  read {_bytes(rd)}  write {_bytes(wr)}  "
                     f"errors {c.get('errors', 0)}  media {c.get('media_errors', 0)}  "
                     f"migration {nvme.get('migration') or '-'}")
        lines.append(f"  {'queue':<6} {'size':>5} {'in flight':>9} {'cq backlog':>10}")
        cqs = nvme.get("queues", {}).get("cq", {})
        for qid, sq in sorted(nvme.get("queues", {}).get("sq", {}).items(), key=lambda kv:
                              int(kv[0])):
            size = int(sq.get("size", 0)) or 1
            flight = (int(sq.get("tail", 0)) - int(sq.get("head", 0))) % size
            backlog = cqs.get(str(sq.get("cqid")), {}).get("backlog", 0)
            lines.append(f"  sq{qid:<4} {size:>5} {flight:>9} {backlog:>10}")
        lines.append("")
    ports = st.get("net", {}).get("ports", {})
    pports = (ps.get("net") or {}).get("ports", {})
    if ports:
        lines.append(f"{BOLD}{'port':<8} {'link':<5} {'rx pps':>12} {'rx bw':>13} "
                     f"{'tx pps':>12} {'tx bw':>13} {'drops':>8}{RESET}")
        for name, p in sorted(ports.items()):
            q = pports.get(name, {})

            def r(key: str, p: dict[str, Any] = p, q: dict[str, Any] = q) -> float:
                return _rate(p.get(key, 0), q.get(key, 0), dt)

            drops = p.get("rx_dropped", 0) + p.get("tx_dropped", 0)
            lines.append(f"{name:<8} {p.get('link', '?'):<5} {_si(r('rx_packets'), 'pps'):>12} "
                         f"{_bytes(r('rx_bytes')):>13} {_si(r('tx_packets'), 'pps'):>12} "
                         f"{_bytes(r('tx_bytes')):>13} {drops:>8}")
            pq = {x.get("index"): x for x in q.get("queues", [])}
            for vq in p.get("queues", []):
                old = pq.get(vq.get("index"), {})
                pps = _rate(vq.get("packets", 0), old.get("packets", 0), dt)
                lines.append(f"  vq{vq.get('index')} {vq.get('kind', '?'):<3} "
                             f"{vq.get('state', '?'):<8} {_si(pps, 'pps'):>12} "
                             f"dropped {vq.get('dropped', 0)}")
        lines.append("")
    faults = st.get("faults", {})
    fired = faults.get("fired", {})
    rules = faults.get("rules", [])
    lines.append(f"{BOLD}faults{RESET} {len(rules)} rules; fired: "
                 + (", ".join(f"{k} {v}" for k, v in sorted(fired.items())) or "none"))
    for rule in rules:
        lines.append(f"  #{rule.get('id')} {rule.get('target')} {rule.get('action')} "
                     f"hits {rule.get('hits', 0)}")
    lines.append(f"{BOLD}last handoff event{RESET} {last_migration}")
    return lines


def _describe(event: dict[str, Any]) -> str:
    data = event.get("data", {})
    return f"{event.get('event')} " + " ".join(f"{k}={v}" for k, v in sorted(data.items()))


@contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode when it is a terminal (its fd), else None."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait(fd: int | None, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``q`` is typed. Returns True for ``q``."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready and os.read(fd, 1) in (b"q", b"Q"):
            return True
    return False


def run(cfg: Config, args: argparse.Namespace) -> int:
    """Draw screens until ``q``, ``--count`` screens, or Ctrl-C.

    Raises:
        ApplianceError: the control socket cannot be reached or stops answering.
    """
    from appliance.runtime.control_client import ControlClient

    path = args.socket or cfg.control.socket
    tty = sys.stdout.isatty()
    last_migration = "none seen"
    try:
        with ControlClient(path, timeout=args.timeout) as client, _keys() as keys:
            client.negotiate()
            prev = Sample(client("status"), time.monotonic())
            shown = 0
            while args.count is None or shown < args.count:
                if _wait(keys, args.interval):
                    break
                cur = Sample(client("status"), time.monotonic())
                while client.events:
                    event = client.events.popleft()
                    if event.get("event") in MIGRATION_EVENTS:
                        last_migration = _describe(event)
                lines = render(prev, cur, path, last_migration)
                if tty:
                    sys.stdout.write(CLEAR + "\n".join(lines) + "\n")
                else:
                    sys.stdout.write("\n".join(lines).replace(BOLD, "").replace(RESET, "")
                                     + "\n\n")
                sys.stdout.flush()
                prev = cur
                shown += 1
    except (ConnectionError, TimeoutError) as exc:
        raise ApplianceError(f"control socket {path}: {exc}") from None
    except OSError as exc:
        raise ApplianceError(f"control socket {path}: {exc.strerror or exc}") from None
    return 0


def add_parser(sub: Any) -> None:
    """Register ``appliance top`` on the CLI's subparsers."""
    p = sub.add_parser("top", help="a live view of each device, queue and port of a running "
                                   "appliance (IOPS, bandwidth, pps, drops, faults)")
    p.add_argument("-c", "--config", help="YAML configuration file (its control.socket)")
    p.add_argument("-s", "--socket", help="the control socket (instead of -c's)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between screens (1)")
    p.add_argument("--count", type=int, default=None, help="stop after this many screens")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for each status answer (default 10)")
    p.set_defaults(func=run, trace=False, verbose=False)
