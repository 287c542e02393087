"""The control commands: one table of name -> (handler, allowed args) (device-facing layer).

Each handler takes the :class:`Target` (what the process exposes to its
operator: the NVMe controller, the net service, the fault set) and the
request's ``args``; it returns a JSON-able result or raises
:class:`~appliance.control.protocol.ControlError`.  :func:`dispatch` checks
the command name and the argument names against the table before calling.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance import config as config_mod
from appliance.control.protocol import (
    BAD_ARGS,
    FAILED,
    UNAVAILABLE,
    UNKNOWN_COMMAND,
    ControlError,
    Request,
)
from appliance.errors import ApplianceError, ConfigError
from appliance.faults import FaultError, FaultSet


@dataclass
class Target:
    """What the commands act on (set up by the runtime)."""

    controller: Any = None  # NvmeController
    net: Any = None  # NetService
    faults: FaultSet | None = None
    links_down: set[str] = field(default_factory=set)
    log_level: int | None = None  # the "appliance" logger's level before the first trace toggle
    handoff_source: Any = None  # appliance.runtime.handoff.HandoffSource
    handoff_sink: Any = None  # appliance.runtime.handoff.HandoffSink


Handler = Callable[[Target, dict[str, Any]], Any]


def _need(value: Any, what: str) -> Any:
    if value is None:
        raise ControlError(UNAVAILABLE, f"no {what} in this process")
    return value


def _flag(args: dict[str, Any], name: str) -> bool:
    value = args.get(name)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "on", "true", "yes", "up"):
        return True
    if str(value).lower() in ("0", "off", "false", "no", "down"):
        return False
    raise ControlError(BAD_ARGS, f"{name}: expected on/off, got {value!r}")


# ---------------------------------------------------------------- handlers
def status(t: Target, args: dict[str, Any]) -> Any:
    out: dict[str, Any] = {}
    c = t.controller
    if c is not None:
        out["nvme"] = {
            "state": c.regs.state.value, "csts": c.regs.csts,
            "namespaces": {nsid: {"image": ns.image, "size": ns.size, "block_size": ns.block_size,
                                  "blocks": ns.nlbas, "read_only": ns.read_only}
                           for nsid, ns in c.namespaces.items()},
            "queues": {"sq": {q.qid: {"size": q.size, "head": q.head, "tail": q.tail, "cqid": q.cqid}
                              for q in c.sqs.values()},
                       "cq": {q.qid: {"size": q.size, "head": q.head, "tail": q.tail,
                                      "vector": q.vector, "backlog": len(q.backlog)}
                              for q in c.cqs.values()}},
            "counters": c.counters, "irq_stats": c.irq_stats,
            "attached": c.memory is not None,
        }
    if t.net is not None:
        out["net"] = t.net.stats()
        out["net"]["links_down"] = sorted(t.links_down)
    if t.faults is not None:
        out["faults"] = t.faults.stats()
    return out


def trace(t: Target, args: dict[str, Any]) -> Any:
    on = _flag(args, "on") if "on" in args else _flag(args, "state")
    top = logging.getLogger("appliance")
    if t.log_level is None:
        t.log_level = top.getEffectiveLevel()
    top.setLevel(logging.DEBUG if on else max(t.log_level, logging.INFO))
    for name, logger in logging.Logger.manager.loggerDict.items():
        if name.startswith("appliance.") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)  # inherit from "appliance"
    root = logging.getLogger()
    if on and root.level > logging.DEBUG:
        for handler in root.handlers:
            handler.setLevel(logging.NOTSET)
    return {"trace": on}


def fault_add(t: Target, args: dict[str, Any]) -> Any:
    faults = _need(t.faults, "fault set")
    if args.get("action") == "remove":  # surprise removal: the REQ irq, now
        ctrl = _need(t.controller, "NVMe controller")
        signalled = ctrl.request_removal()
        faults.counters["nvme.remove"] = faults.counters.get("nvme.remove", 0) + 1
        return {"action": "remove", "signalled": signalled}
    if args.get("action") == "fatal" and str(args.get("now", "")).lower() in ("1", "true", "yes"):
        ctrl = _need(t.controller, "NVMe controller")
        ctrl.fatal("injected fault (now)")
        faults.counters["nvme.fatal"] = faults.counters.get("nvme.fatal", 0) + 1
        return {"action": "fatal", "csts": ctrl.regs.csts}
    args = {k: v for k, v in args.items() if k != "now"}
    try:
        rule = faults.add(args)
    except FaultError as exc:
        raise ControlError(BAD_ARGS, str(exc)) from None
    if rule.target == "net" and rule.port is not None and t.net is not None:
        names = [svc.port.name for svc in t.net.services]
        if rule.port not in names:
            faults.clear(rule.id)
            raise ControlError(BAD_ARGS, f"port: no port {rule.port!r} (have {names})")
    return rule.describe()


def fault_list(t: Target, args: dict[str, Any]) -> Any:
    return _need(t.faults, "fault set").stats()


def fault_clear(t: Target, args: dict[str, Any]) -> Any:
    faults = _need(t.faults, "fault set")
    rule_id = args.get("id")
    if rule_id is not None and (isinstance(rule_id, bool) or not str(rule_id).isdigit()):
        raise ControlError(BAD_ARGS, f"id: expected a rule number, got {rule_id!r}")
    return {"cleared": faults.clear(None if rule_id is None else int(rule_id))}


def link(t: Target, args: dict[str, Any]) -> Any:
    net = _need(t.net, "net service")
    names = [svc.port.name for svc in net.services]
    port = args.get("port", names[0] if len(names) == 1 else None)
    if port not in names:
        raise ControlError(BAD_ARGS, f"port: expected one of {names}, got {port!r}")
    up = _flag(args, "state")
    assert isinstance(port, str)
    if up:
        t.links_down.discard(port)
    else:
        t.links_down.add(port)
    return {"port": port, "link": "up" if up else "down"}


def namespace_resize(t: Target, args: dict[str, Any]) -> Any:
    ctrl = _need(t.controller, "NVMe controller")
    nsid = args.get("nsid", 1)
    ns = ctrl.namespaces.get(int(nsid)) if str(nsid).isdigit() else None
    if ns is None:
        raise ControlError(BAD_ARGS, f"nsid: no namespace {nsid!r}")
    try:
        size = config_mod.size("size", args.get("size"))
    except ConfigError as exc:
        raise ControlError(BAD_ARGS, str(exc)) from None
    if size % ns.block_size or size < ns.size:
        raise ControlError(BAD_ARGS, f"size: {size} must be a multiple of {ns.block_size} "
                                     f"and at least the current {ns.size} (grow only)")
    if ns.read_only:
        raise ControlError(FAILED, f"namespace {ns.nsid} is read-only")
    try:
        if os.fstat(ns.fd).st_size < size:
            os.ftruncate(ns.fd, size)
    except OSError as exc:
        raise ControlError(FAILED, f"cannot grow {ns.image}: {exc.strerror or exc}") from None
    old = ns.size
    ns.size, ns.nlbas = size, size // ns.block_size
    ctrl.notify_namespace_changed(ns.nsid)
    return {"nsid": ns.nsid, "old_size": old, "size": size, "blocks": ns.nlbas}


#: name -> (handler, allowed argument names; None = any)
def handoff(t: Target, args: dict[str, Any]) -> Any:
    """Move every device to the process whose control socket is ``to``; this one exits."""
    source = _need(t.handoff_source, "handoff")
    to = args.get("to")
    if not isinstance(to, str) or not to:
        raise ControlError(BAD_ARGS, "handoff: 'to' must be the destination's control socket path")
    try:
        result = source.run(to)
    except ApplianceError as exc:
        raise ControlError(FAILED, str(exc)) from None
    # The devices live on elsewhere: exit once this reply is written (the
    # control service writes it before the loop runs its timers).
    source.app.loop.call_later(0, source.app.loop.stop)
    return result


def handoff_accept(t: Target, args: dict[str, Any]) -> Any:
    """Destination side of ``handoff`` (sent by the source process, not by people)."""
    sink = _need(t.handoff_sink, "handoff")
    try:
        return sink.accept(args)
    except ApplianceError as exc:
        raise ControlError(FAILED, str(exc)) from None


COMMANDS: dict[str, tuple[Handler, frozenset[str] | None]] = {
    "status": (status, frozenset()),
    "trace": (trace, frozenset({"on", "state"})),
    "fault.add": (fault_add, None),
    "fault.list": (fault_list, frozenset()),
    "fault.clear": (fault_clear, frozenset({"id"})),
    "link": (link, frozenset({"port", "state"})),
    "namespace.resize": (namespace_resize, frozenset({"nsid", "size"})),
    "handoff": (handoff, frozenset({"to"})),
    "handoff.accept": (handoff_accept, frozenset({"version", "fingerprint", "images", "net"})),
}


def dispatch(target: Target, request: Request) -> Any:
    """Run one request.

    Returns:
        The command's result.

    Raises:
        ControlError: an unknown command, unknown argument names, or the
            command's own refusal.
    """
    entry = COMMANDS.get(request.cmd)
    if entry is None:
        raise ControlError(UNKNOWN_COMMAND, f"unknown command {request.cmd!r} "
                                            f"(have {', '.join(sorted(COMMANDS))})")
    handler, allowed = entry
    if allowed is not None:
        extra = set(request.args) - allowed
        if extra:
            raise ControlError(BAD_ARGS, f"{request.cmd}: unknown argument(s) "
                                         f"{', '.join(sorted(extra))}")
    if request.cmd in ("trace",) and not request.args:
        raise ControlError(BAD_ARGS, "trace: give on=on|off")
    if request.cmd == "link" and "state" not in request.args:
        raise ControlError(BAD_ARGS, "link: give state=up|down (and port=NAME)")
    return handler(target, request.args)
