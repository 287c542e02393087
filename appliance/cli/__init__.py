"""appliance: a vfio-user NVMe device and vhost-user-net ports in one process.

commands:
  run        serve the devices (embedded defaults without -c)
  qemu-args  print the QEMU options that attach a guest to the appliance
  ctl        send one command to a running appliance's control socket (QMP), or
             wait for an event: `appliance ctl wait-event NAME`
  boot       boot a QEMU guest on this terminal, attached to the appliance
  handoff    move the live devices of a running appliance to another on this host
  migrate    live-migrate the NVMe device from one appliance to another
  image      build or describe QEMU and the test guest image
  top        a live view of each device, queue and port (IOPS, bandwidth, pps,
             drops, faults), refreshed each second from the control socket

`appliance COMMAND --help` lists a command's options; `appliance --version`
prints the version. Bad input (an unknown option, a bad config) ends with one
line on stderr, `appliance: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from appliance import config as config_mod
from appliance import fastpath
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.runtime import logs
from appliance.runtime.logs import LEVELS


def _cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.runtime.allocator import keep_large_buffers
    from appliance.runtime.app import Appliance
    from appliance.testing.qemu import qemu_args

    keep_large_buffers()  # MIG_DATA's 1 MiB buffers without a page fault per page each
    app = Appliance(cfg, standby=args.standby)
    app.start()
    # the log file only once start-up succeeded: a failed one leaves nothing behind
    log_path = args.log_file.open() if args.log_file is not None else None
    print(f"appliance: serving NVMe on {cfg.storage.socket}", flush=True)
    for ns in app.controller.namespaces.values() if app.controller else ():
        print(f"appliance: namespace {ns.image} ({ns.size} bytes, {ns.block_size}-byte blocks)",
              flush=True)
    for p in app.net_ports():
        print(f"appliance: {'standing by for' if args.standby else 'serving'} vhost-user-net on {p}",
              flush=True)
    print(f"appliance: data path: {fastpath.describe(cfg)}", flush=True)
    if log_path:
        print(f"appliance: log: {log_path}", flush=True)
    if args.standby and cfg.net.tap.name:
        print(f"appliance: standing by for TAP interface {cfg.net.tap.name}", flush=True)
    print("appliance: attach QEMU with:\n  qemu-system-x86_64 -machine q35 -m 512M "
          + " ".join(shlex.quote(a) for a in qemu_args(cfg, net=app.net_enabled)) + " ...", flush=True)
    print("appliance: ready", flush=True)
    try:
        app.run()
    finally:
        app.close()
    return 0


def _cmd_qemu_args(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.testing.qemu import qemu_args

    print(" ".join(shlex.quote(a) for a in qemu_args(cfg, net=not args.no_net)))
    return 0


def _ctl_value(text: str) -> Any:
    """A ``key=value`` value: JSON if it parses (numbers, true, lists), else the string
    (also when nested too deep to parse: the appliance judges it)."""
    from appliance.control.protocol import too_deep

    if too_deep(text.encode()):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cmd_ctl(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.control.protocol import ControlError
    from appliance.runtime.control_client import ControlClient

    path = args.socket or cfg.control.socket
    if args.cmd == "wait-event":
        if len(args.params) != 1 or "=" in args.params[0]:
            raise ApplianceError("ctl: wait-event takes one event name, e.g. FAULT_FIRED")
        return _wait_event(path, args.params[0], args.timeout)
    params: dict[str, Any] = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ApplianceError(f"ctl: expected key=value, got {item!r}")
        params[key] = _ctl_value(value)
    try:
        with ControlClient(path, timeout=args.timeout) as client:
            result = client(args.cmd, **params)
    except ControlError as exc:
        raise ApplianceError(f"{args.cmd}: {exc.code}: {exc.message}") from None
    except ConnectionError as exc:
        raise ApplianceError(f"control socket {path}: {exc}") from None
    except OSError as exc:
        raise ApplianceError(f"control socket {path}: {exc.strerror or exc}") from None
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _wait_event(path: str, name: str, timeout: float) -> int:
    """Print the next event called ``name`` as JSON (one line on stderr once waiting)."""
    from appliance.runtime.control_client import ControlClient

    try:
        with ControlClient(path, timeout=timeout) as client:
            client.negotiate()
            print(f"appliance: waiting for {name}", file=sys.stderr, flush=True)
            event = client.wait_event(name, timeout)
    except TimeoutError:
        raise ApplianceError(f"wait-event: no {name} event within {timeout:g} s") from None
    except ConnectionError as exc:
        raise ApplianceError(f"control socket {path}: {exc}") from None
    except OSError as exc:
        raise ApplianceError(f"control socket {path}: {exc.strerror or exc}") from None
    print(json.dumps(event, sort_keys=True), flush=True)
    return 0


def _cmd_handoff(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.control.protocol import ControlError
    from appliance.runtime.control_client import ControlClient

    source = args.source or cfg.control.socket
    to = os.path.abspath(args.to)
    try:
        with ControlClient(source, timeout=args.timeout) as client:
            result = client("handoff", to=to)
    except ControlError as exc:
        raise ApplianceError(f"handoff: {exc.message}") from None
    except ConnectionError as exc:
        raise ApplianceError(f"control socket {source}: {exc}") from None
    except OSError as exc:
        raise ApplianceError(f"control socket {source}: {exc.strerror or exc}") from None
    print(f"appliance: handed off to {to} ({result['mode']}): pause {result['pause_ms']:.1f} ms, "
          f"{result['fds']} fds, {result['stream_bytes']} stream bytes, "
          f"{result['rounds']} pre-copy rounds; the source process exits")
    return 0


def _cmd_boot(cfg: Config, args: argparse.Namespace) -> int:
    from appliance.testing.boot import boot

    return boot(cfg, args.config, append=args.append, smp=args.smp, keep=args.keep,
                dry_run=args.dry_run, guest_image=args.guest)


def build_parser() -> argparse.ArgumentParser:
    # The module docstring is the top-level help: one line per command (the
    # subparsers' own list is suppressed so it is not printed twice).
    parser = argparse.ArgumentParser(prog="appliance", usage="%(prog)s [-h] COMMAND ...",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from appliance import __version__

    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help=argparse.SUPPRESS)
    run = sub.add_parser("run", help="serve the devices (embedded defaults without -c)")
    run.add_argument("-c", "--config", help="YAML configuration file")
    run.add_argument("--trace", action="store_true",
                     help="log every protocol message (--log-level debug, also on stderr)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="the log on stderr too, not only in the log file")
    run.add_argument("--log-level", choices=LEVELS, default=None,
                     help="what the log file RUN_DIR/appliance.log gets (default info; "
                          "stderr gets warnings and errors unless -v)")
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="text lines, or one JSON object per line for machines")
    run.add_argument("--standby", action="store_true",
                     help="a handoff destination: net ports and the TAP wait for `appliance handoff`")
    run.set_defaults(func=_cmd_run)
    qa = sub.add_parser("qemu-args", help="print the QEMU options that attach a guest")
    qa.add_argument("-c", "--config", help="YAML configuration file")
    qa.add_argument("--no-net", action="store_true", help="leave out the vhost-user net ports")
    qa.set_defaults(func=_cmd_qemu_args, trace=False, verbose=False)
    ctl = sub.add_parser("ctl", help="send one command to a running appliance's control socket")
    ctl.add_argument("cmd", help="a QMP command name (status, fault-add, fault-list, "
                                 "fault-clear, link, namespace-resize, query-commands, ...; "
                                 "fault.add and the other dotted names work too: "
                                 "docs/control.md), or wait-event NAME")
    ctl.add_argument("params", nargs="*", metavar="key=value",
                     help="command arguments (for wait-event: the event name)")
    ctl.add_argument("-c", "--config", help="YAML configuration file (its control.socket)")
    ctl.add_argument("-s", "--socket", help="the control socket (instead of -c's)")
    ctl.add_argument("--timeout", type=float, default=10.0,
                     help="seconds to wait for the answer or the event (default 10)")
    ctl.set_defaults(func=_cmd_ctl, trace=False, verbose=False)
    bt = sub.add_parser("boot", help="a QEMU guest on this terminal, attached to the appliance "
                                     "(started if not running)")
    bt.add_argument("-c", "--config", help="YAML configuration file")
    bt.add_argument("--append", default="", help="more guest kernel arguments")
    bt.add_argument("--smp", type=int, default=1, help="guest vCPUs")
    bt.add_argument("--guest", choices=("busybox", "debian"), default="busybox",
                    help="the guest image (debian: `appliance image build --guest debian`)")
    bt.add_argument("--keep", action="store_true",
                    help="leave an appliance this command started running after QEMU exits")
    bt.add_argument("--dry-run", action="store_true", help="print the commands, start nothing")
    bt.set_defaults(func=_cmd_boot, trace=False, verbose=False)
    ho = sub.add_parser("handoff", help="move the live devices of a running appliance to another "
                                        "one on this host (docs/migration.md)")
    ho.add_argument("--to", required=True, metavar="CONTROL_SOCK",
                    help="the destination appliance's control socket")
    ho.add_argument("--from", dest="source", metavar="CONTROL_SOCK",
                    help="the source's control socket (default: control.socket of -c)")
    ho.add_argument("-c", "--config", help="YAML configuration file of the source")
    ho.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the figures")
    ho.set_defaults(func=_cmd_handoff, trace=False, verbose=False)
    from appliance.cli.migrate import add_parser as add_migrate_parser

    add_migrate_parser(sub)  # `appliance migrate SRC_SOCK DST_SOCK` (docs/migration.md)
    from appliance.cli.images import add_parser as add_image_parser

    add_image_parser(sub)  # `appliance image build|info` (images/README.md)
    from appliance.cli.top import add_parser as add_top_parser

    add_top_parser(sub)  # `appliance top`: a live view from the control socket
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except ApplianceError as exc:
        print(f"appliance: error: {exc}", file=sys.stderr)
        return 2
    trace = args.trace or cfg.trace
    if args.func is _cmd_run:  # the service: INFO into RUN_DIR/appliance.log
        level = args.log_level or ("debug" if trace else "info")
        args.log_file = logs.setup(level, args.log_format, cfg.run_dir,
                                   loud=args.verbose or trace)
    else:
        level = "debug" if trace else "info" if args.verbose else "warning"
        logs.setup(level, "text", None, loud=True)
    try:
        return int(args.func(cfg, args))
    except ApplianceError as exc:
        print(f"appliance: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
