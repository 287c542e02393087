"""``appliance migrate SRC_SOCK DST_SOCK``: the command line of the orchestrator.

Connects to both appliances' vfio-user sockets (an ``ssh://`` one through an
ssh forward, :mod:`appliance.client.ssh`), runs
:func:`appliance.client.migrate.migrate`, and prints a summary (with a
progress bar on stderr when it is a terminal).  Every failure is an
:class:`~appliance.errors.ApplianceError`, which the CLI prints as one line
``appliance: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from appliance.config import Config
from appliance.errors import ApplianceError

BAR_WIDTH = 30


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative size: {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def add_parser(sub: Any) -> None:
    """Register the ``migrate`` subcommand on the CLI's subparsers."""
    p = sub.add_parser("migrate", help="live-migrate the NVMe device from one appliance to another")
    p.add_argument("src", metavar="SRC_SOCK", help="vfio-user socket of the source appliance "
                   "(or ssh://[USER@]HOST[:PORT]/PATH: one on another host, over ssh)")
    p.add_argument("dst", metavar="DST_SOCK", help="vfio-user socket of the destination "
                   "(or ssh://[USER@]HOST[:PORT]/PATH)")
    p.add_argument("--max-rounds", type=_positive, default=8,
                   help="pre-copy rounds at most before stopping the source (default 8)")
    p.add_argument("--converge", type=_size, default=1 << 20, metavar="BYTES",
                   help="stop pre-copy once at most this much is dirty (default 1M; K/M/G)")
    p.add_argument("--shared-storage", action="store_true",
                   help="both appliances use the same images: send device state only")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                   help="an ssh -o option for ssh:// sockets (e.g. IdentityFile=~/.ssh/mig); "
                        "repeatable")
    p.add_argument("--no-ssh-session", action="store_true",
                   help="for ssh:// sockets, do not run the one session ('true', or the key's "
                        "forced command) that makes sshd send small replies without delay")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for each reply (default 30)")
    p.add_argument("--no-data-channel", action="store_true",
                   help="carry everything in MIG_DATA_READ/WRITE, even when both appliances "
                        "offer the data channel")
    p.set_defaults(func=run, config=None, trace=False, verbose=False)


class _Bar:
    """A one-line progress bar on stderr when stderr is a terminal; silent elsewhere
    (stdout keeps only the summary)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.on = out.isatty()
        self.total = 0

    def __call__(self, p: Any) -> None:
        if not self.on:
            return
        self.total = max(self.total, p.bytes + p.pending)
        frac = min(1.0, p.bytes / self.total) if self.total else 0.0
        if p.phase == "done":
            frac = 1.0
        fill = int(frac * BAR_WIDTH)
        self.out.write(f"\r[{'#' * fill}{'.' * (BAR_WIDTH - fill)}] {frac * 100:5.1f}% "
                       f"{p.phase:<9} round {p.rounds:<3} {p.bytes / 2**20:9.1f} MiB  "
                       f"dirty {p.pending / 2**20:8.1f} MiB")
        self.out.flush()

    def end(self) -> None:
        if self.on:
            self.out.write("\n")
            self.out.flush()


def run(cfg: Config, args: argparse.Namespace) -> int:
    """Run the migration; prints the summary.

    Raises:
        ApplianceError: a socket could not be reached or the migration failed
            (both sides rolled back, see the orchestrator).
    """
    from appliance.client.datachannel import ChannelPlan
    from appliance.client.migrate import migrate
    from appliance.client.ssh import SshForward, parse_target
    from appliance.client.vfio_user import VfioUserClient
    from appliance.runtime.allocator import keep_large_buffers

    keep_large_buffers()  # each MIG_DATA chunk passes through a 1 MiB buffer here too
    clients = []
    forwards: list[SshForward] = []
    plan: ChannelPlan | None = None if args.no_data_channel else ChannelPlan()
    try:
        for role, path in (("source", args.src), ("destination", args.dst)):
            target = parse_target(path)
            local = path
            if target is not None:  # another host: ssh forwards its socket here
                forwards.append(SshForward(target, args.ssh_option,
                                           session=not args.no_ssh_session))
                try:
                    local = forwards[-1].open()
                except ApplianceError as exc:
                    raise ApplianceError(f"{role} {path}: {exc}") from None
                if plan is not None:
                    # The destination's channel socket comes over the same ssh
                    # connection; a source elsewhere cannot be handed a socket.
                    plan = ChannelPlan(forward=forwards[-1].forward) if role == "destination" \
                        else None
            try:
                clients.append(VfioUserClient.connect(local, timeout=args.timeout))
            except (OSError, ConnectionError) as exc:
                raise ApplianceError(f"{role} {path}: {exc.strerror or exc}"
                                     if isinstance(exc, OSError) and exc.strerror
                                     else f"{role} {path}: {exc}") from None
        bar = _Bar(sys.stderr)
        try:
            s = migrate(clients[0], clients[1], max_rounds=args.max_rounds,
                        converge_bytes=args.converge, progress=bar,
                        shared_storage=args.shared_storage, data_channel=plan)
        finally:
            bar.end()
    finally:
        for c in clients:
            c.close()
        for f in forwards:
            f.close()
    total = s.bytes + s.channel_bytes
    rate = total / s.seconds / 2**20 if s.seconds > 0 else 0.0
    if args.shared_storage:
        mode = "shared storage, device state only"
    elif s.data_channel:
        mode = f"full copy, data channel ({s.data_channel})"
    elif args.no_data_channel:
        mode = "full copy, standard path (--no-data-channel)"
    else:
        why = s.channel_fallback or "the source is on another host"
        mode = f"full copy, standard path: {why}"
    print(f"migrated {args.src} -> {args.dst} ({mode})")
    print(f"  pre-copy rounds: {s.rounds}")
    channel = f"; {s.channel_bytes} on the data channel" if s.data_channel else ""
    print(f"  bytes: {total} ({total / 2**20:.1f} MiB; {s.precopy_bytes} of the stream while "
          f"running{channel})")
    print(f"  time: {s.seconds:.3f} s, throughput {rate:.1f} MiB/s")
    print(f"  downtime: {s.downtime * 1000:.1f} ms ({s.pending_at_stop} bytes dirty at stop)")
    return 0
