"""The control commands: one table of name -> (handler, argument checkers) (device-facing layer).

Each handler takes the :class:`Target` (what the process exposes to its
operator: the NVMe controller, the net service, the fault set) and the
request's ``args``; it returns a JSON-able result or raises
:class:`~appliance.control.protocol.ControlError`.  :func:`dispatch` checks
the command name, then every argument with its checker from
:mod:`appliance.control.args` (unknown names and bad values are ``bad_args``
naming the argument; null counts as absent), so a handler sees only values
of the type and range it declared.  ``fault.add`` is the one command whose
arguments depend on each other (the action decides which fields apply): it
passes them to :meth:`~appliance.control.faults.FaultSet.add`, which checks each with
the same checkers.

Every command has a QMP name too: its name with dots as dashes (``fault.add``
is ``fault-add``, ``handoff.accept`` is ``handoff-accept``; :data:`QMP_NAMES`);
a QMP request names the command by it.  ``query-commands`` lists the QMP names
and ``x-query-appliance-schema`` every command's arguments and every event.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.control import args as a
from appliance.control import events as ev
from appliance.control.fault_rules import FIELDS, FaultError, FaultTarget
from appliance.control.faults import FaultSet
from appliance.control.protocol import (
    BAD_ARGS,
    FAILED,
    QMP_CAPABILITIES,
    UNAVAILABLE,
    UNKNOWN_COMMAND,
    ControlError,
    Deferred,
    Request,
)
from appliance.errors import ApplianceError
from appliance.storage.nsmgmt import unallocated_bytes


@dataclass
class Target:
    """What the commands act on (set up by the runtime)."""

    controller: Any = None  # NvmeController
    net: Any = None  # NetService
    faults: FaultSet | None = None
    links_down: set[str] = field(default_factory=set)
    log_level: int | None = None  # the "appliance" logger's level before the first trace toggle
    handler_levels: dict[logging.Handler, int] | None = None  # the root's handlers' before it
    handoff_source: Any = None  # appliance.runtime.handoff.HandoffSource
    handoff_sink: Any = None  # appliance.runtime.handoff.HandoffSink
    busy: str = ""  # why commands that change the devices are refused now (a handoff runs)
    emit: ev.Emit = ev.ignore  # the runtime's: queues a QMP event for the clients
    #: the vfio-user client's migration state (RUNNING, PRE_COPY, ...), None without one
    migration_state: Callable[[], str | None] = lambda: None


Handler = Callable[[Target, dict[str, Any]], Any]


def _need(value: Any, what: str) -> Any:
    if value is None:
        raise ControlError(UNAVAILABLE, f"no {what} in this process")
    return value


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
            "migration": t.migration_state(),
        }
    if t.net is not None:
        out["net"] = t.net.stats()
        out["net"]["links_down"] = sorted(t.links_down)
    if t.faults is not None:
        out["faults"] = t.faults.stats()
    return out


def trace(t: Target, args: dict[str, Any]) -> Any:
    on = args.get("on", args.get("state"))
    if on is None:
        raise ControlError(BAD_ARGS, "trace: give on=on|off")
    top = logging.getLogger("appliance")
    if t.log_level is None:
        t.log_level = top.getEffectiveLevel()
    top.setLevel(logging.DEBUG if on else max(t.log_level, logging.INFO))
    for name, logger in logging.Logger.manager.loggerDict.items():
        if name.startswith("appliance.") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)  # inherit from "appliance"
    root = logging.getLogger()
    if on and root.level > logging.DEBUG:
        if t.handler_levels is None:  # what "off" puts back (stderr: warnings only)
            t.handler_levels = {h: h.level for h in root.handlers}
        for handler in root.handlers:
            handler.setLevel(logging.NOTSET)
    elif not on and t.handler_levels is not None:
        for handler, level in t.handler_levels.items():
            handler.setLevel(level)
        t.handler_levels = None
    return {"trace": on}


def fault_add(t: Target, args: dict[str, Any]) -> Any:
    faults = _need(t.faults, "fault set")
    if args.get("action") == "remove":  # surprise removal: the REQ irq, now
        ctrl = _need(t.controller, "NVMe controller")
        signalled = ctrl.request_removal()
        faults.counters["nvme.remove"] = faults.counters.get("nvme.remove", 0) + 1
        return {"action": "remove", "signalled": signalled}
    if args.get("action") == "fatal" and args.get("now"):
        ctrl = _need(t.controller, "NVMe controller")
        ctrl.fatal("injected fault (now)")
        faults.counters["nvme.fatal"] = faults.counters.get("nvme.fatal", 0) + 1
        return {"action": "fatal", "csts": ctrl.regs.csts}
    args = {k: v for k, v in args.items() if k != "now"}
    try:
        rule = faults.add(args)
    except FaultError as exc:
        raise ControlError(BAD_ARGS, str(exc)) from None
    if rule.target is FaultTarget.NET and rule.port is not None and t.net is not None:
        names = [svc.port.name for svc in t.net.services]
        if rule.port not in names:
            faults.clear(rule.id)
            raise ControlError(BAD_ARGS, f"port: no port {rule.port!r} (have {names})")
    return rule.describe()


def fault_list(t: Target, args: dict[str, Any]) -> Any:
    return _need(t.faults, "fault set").stats()


def fault_clear(t: Target, args: dict[str, Any]) -> Any:
    faults = _need(t.faults, "fault set")
    return {"cleared": faults.clear(args.get("id"))}


def link(t: Target, args: dict[str, Any]) -> Any:
    net = _need(t.net, "net service")
    names = [svc.port.name for svc in net.services]
    port = args.get("port", names[0] if len(names) == 1 else None)
    if not isinstance(port, str) or port not in names:
        raise a.refuse("port", f"one of {names}", port)
    up = args["state"]
    if up:
        t.links_down.discard(port)
    else:
        t.links_down.add(port)
    t.emit(ev.LINK_STATE, {"port": port, "link": "up" if up else "down"})
    return {"port": port, "link": "up" if up else "down"}


def namespace_resize(t: Target, args: dict[str, Any]) -> Any:
    ctrl = _need(t.controller, "NVMe controller")
    nsid = args.get("nsid", 1)
    ns = ctrl.namespaces.get(nsid)
    if ns is None:
        raise ControlError(BAD_ARGS, f"nsid: no namespace {nsid}")
    size = args["size"]
    if size % ns.block_size or size < ns.size:
        raise ControlError(BAD_ARGS, f"size: {size} must be a multiple of {ns.block_size} "
                                     f"and at least the current {ns.size} (grow only)")
    if ns.read_only:
        raise ControlError(FAILED, f"namespace {ns.nsid} is read-only")
    if ns.nsid in ctrl.zones:
        raise ControlError(FAILED, f"namespace {ns.nsid} is zoned: its zones are fixed")
    if ctrl.ns_mgmt.enabled and size - ns.size > unallocated_bytes(ctrl):
        raise ControlError(FAILED, f"size: {size - ns.size} more bytes do not fit in the "
                                   f"{unallocated_bytes(ctrl)} unallocated (storage.capacity)")
    try:
        if os.fstat(ns.fd).st_size < size:
            os.ftruncate(ns.fd, size)
    except OSError as exc:
        raise ControlError(FAILED, f"size: cannot grow {ns.image} to {size}: "
                                   f"{exc.strerror or exc}") from None
    old = ns.size
    ns.size, ns.nlbas = size, size // ns.block_size
    ctrl.identify_changed()  # UNVMCAP
    ctrl.notify_namespace_changed(ns.nsid)
    return {"nsid": ns.nsid, "old_size": old, "size": size, "blocks": ns.nlbas}


def handoff(t: Target, args: dict[str, Any]) -> Any:
    """Move every device to the process whose control socket is ``to``; this one exits.

    The answer is deferred: the handoff runs in the event loop (the devices
    serve on while it pre-copies) and answers when the destination has
    decided.  Once the devices live on elsewhere, this process stops.
    """
    source = _need(t.handoff_source, "handoff")
    answer = Deferred()

    def finished(result: dict[str, Any] | None, error: ApplianceError | None) -> None:
        if error is not None:
            t.emit(ev.HANDOFF_FAILED, {"error": str(error)})
            answer.fail(FAILED, str(error))
            return
        t.emit(ev.HANDOFF_COMPLETED, dict(result or {}))
        answer.resolve(result)  # (the reply goes out now, before the loop stops)
        source.app.loop.stop()

    try:
        if "timeout" in args:
            source.start(args["to"], finished, timeout=args["timeout"])
        else:
            source.start(args["to"], finished)
    except ApplianceError as exc:
        t.emit(ev.HANDOFF_FAILED, {"error": str(exc)})
        raise ControlError(FAILED, str(exc)) from None
    return answer


def handoff_accept(t: Target, args: dict[str, Any]) -> Any:
    """Destination side of ``handoff`` (sent by the source process, not by people)."""
    sink = _need(t.handoff_sink, "handoff")
    try:
        return sink.accept(args)
    except ApplianceError as exc:
        raise ControlError(FAILED, str(exc)) from None


MAX_SIZE = (1 << 63) - 1  # the largest file size Linux can address (off_t)
ON_OFF: dict[str, a.Checker] = {"on": a.flag, "state": a.flag}
#: seconds the other process of a handoff may make no progress
HANDOFF_TIMEOUT = a.number(0.1, 3600.0)


#: fault.add: ``now`` is the command's own, the rest go to FaultSet.add as they are
FAULT_ARGS: dict[str, a.Checker] = {
    **dict.fromkeys(FIELDS | {"target", "action", "seed"},
                    a.passed_on("a fault rule field, checked with the others (docs/control.md)")),
    "now": a.flag}


def query_commands(t: Target, args: dict[str, Any]) -> Any:
    """The QMP names of every command (QMP's ``query-commands``)."""
    return [{"name": name} for name in sorted([*QMP_NAMES, QMP_CAPABILITIES])]


def query_schema(t: Target, args: dict[str, Any]) -> Any:
    """Every command (QMP name) with its arguments, and every event with its data."""
    commands = []
    for qmp_name, name in sorted(QMP_NAMES.items()):
        command = COMMANDS[name]
        commands.append({
            "name": qmp_name, "read-only": name in READ_ONLY,
            "arguments": [{"name": arg, "type": a.expects(checker),
                           "required": arg in command.required}
                          for arg, checker in sorted(command.args.items())]})
    return {"commands": commands,
            "events": [{"name": name, "data": list(data)} for name, data in ev.EVENTS.items()]}


@dataclass(frozen=True)
class Command:
    """A handler, its arguments (name -> checker) and which of them it needs."""

    handler: Handler
    args: dict[str, a.Checker]
    required: frozenset[str] = frozenset()


#: name -> the command (handler and argument checkers)
COMMANDS: dict[str, Command] = {
    "status": Command(status, {}),
    "trace": Command(trace, ON_OFF),
    "fault.add": Command(fault_add, FAULT_ARGS),
    "fault.list": Command(fault_list, {}),
    "fault.clear": Command(fault_clear, {"id": a.integer(1, (1 << 63) - 1)}),
    "link": Command(link, {"port": a.text, "state": a.flag}, frozenset({"state"})),
    "namespace.resize": Command(namespace_resize, {"nsid": a.integer(1, 0xFFFF_FFFE),
                                                  "size": a.size(1, MAX_SIZE)},
                                frozenset({"size"})),
    "handoff": Command(handoff, {"to": a.text, "timeout": HANDOFF_TIMEOUT}, frozenset({"to"})),
    "handoff.accept": Command(handoff_accept, {"version": a.integer(0, 0xFFFF_FFFF),
                                               "fingerprint": a.text, "images": a.anything,
                                               "net": a.flag, "timeout": HANDOFF_TIMEOUT}),
    "query-commands": Command(query_commands, {}),
    "x-query-appliance-schema": Command(query_schema, {}),
}

#: QMP name -> command name (dots become dashes)
QMP_NAMES: dict[str, str] = {name.replace(".", "-"): name for name in COMMANDS}


#: what a process answers while a live handoff runs (everything else would change
#: state that is on its way to, or arriving from, the other process)
READ_ONLY = frozenset({"status", "fault.list", "query-commands", "x-query-appliance-schema"})


def dispatch(target: Target, request: Request) -> Any:
    """Run one request.

    Returns:
        The command's result.

    Raises:
        ControlError: an unknown command, an unknown argument or a bad value
            (BAD_ARGS naming it), or the command's own refusal.
    """
    name = QMP_NAMES.get(request.cmd) if request.qmp else request.cmd
    command = COMMANDS.get(name) if name is not None else None
    if command is None or name is None:
        have = QMP_NAMES if request.qmp else COMMANDS
        raise ControlError(UNKNOWN_COMMAND, f"unknown command {a.shown(request.cmd)} "
                                            f"(have {', '.join(sorted(have))})")
    args = a.check_all(command.args, request.args, request.cmd, command.required)
    if target.busy and name not in READ_ONLY:
        raise ControlError(UNAVAILABLE, f"{request.cmd}: {target.busy}")
    return command.handler(target, args)
