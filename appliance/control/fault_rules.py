"""Fault rules: what a rule says and how one is built from control-socket arguments
(no I/O, no clock).

A :class:`FaultRule` names its ``target`` (:class:`FaultTarget`), its ``action``
(one of the target's: :class:`NvmeAction`, :class:`NetAction`), how often it
fires (``count``, ``probability``) and which traffic it matches (NVMe: queue id,
opcode, LBA range, NSID; net: port name and :class:`Direction`).
:meth:`FaultRule.build` checks each field with the control commands' argument
checkers (:mod:`appliance.control.args`) and raises :class:`FaultError` naming
the field; :meth:`FaultRule.state` and :meth:`FaultRule.from_state` carry a rule
and its counts through a live handoff.  Matching and firing are
:class:`appliance.control.faults.FaultSet`'s.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from appliance.control import args as args_mod
from appliance.control.protocol import INT_RANGE, ControlError
from appliance.storage.spec import Command


class FaultTarget(enum.StrEnum):
    """What a rule breaks: the NVMe controller's commands or the net ports' frames."""

    NVME = "nvme"
    NET = "net"


class NvmeAction(enum.StrEnum):
    """What an NVMe rule does to a matching command (docs/faults.md)."""

    STATUS = "status"
    DELAY = "delay"
    HANG = "hang"
    DROP_IRQ = "drop_irq"
    FATAL = "fatal"
    REMOVE = "remove"
    EDIT = "edit"
    CORRUPT_GUARD = "corrupt_guard"
    CORRUPT_REFTAG = "corrupt_reftag"


class NetAction(enum.StrEnum):
    """What a net rule does to a matching frame (docs/faults.md)."""

    DROP = "drop"
    CORRUPT = "corrupt"
    DUPLICATE = "duplicate"
    REORDER = "reorder"
    DELAY = "delay"


class Direction(enum.StrEnum):
    """Which frames of a port a net rule matches."""

    RX = "rx"  # towards the guest
    TX = "tx"  # from the guest
    BOTH = "both"


FaultAction: TypeAlias = NvmeAction | NetAction
ACTIONS: dict[FaultTarget, type[FaultAction]] = {
    FaultTarget.NVME: NvmeAction, FaultTarget.NET: NetAction}
#: Status names accepted by ``status=`` besides numbers (SCT << 8 | SC).
STATUS_NAMES = {
    "unrecovered_read_error": 0x281,
    "write_fault": 0x280,
    "namespace_not_ready": 0x82,
    "internal_error": 0x06,
    "data_transfer_error": 0x04,
    "aborted": 0x07,
    "zone_boundary_error": 0x1B8,
    "zone_is_full": 0x1B9,
    "zone_is_read_only": 0x1BA,
    "zone_is_offline": 0x1BB,
    "zone_invalid_write": 0x1BC,
    "too_many_active_zones": 0x1BD,
    "too_many_open_zones": 0x1BE,
    "invalid_zone_state_transition": 0x1BF,
}
#: what a rule may say besides target and action
FIELDS = frozenset({"count", "probability", "qid", "opcode", "nsid", "lba", "status", "dnr",
                    "delay", "port", "direction", "edit"})
#: submission entry fields an ``edit`` rule may rewrite (not CID: the completion names it)
EDITABLE = {name: (1 << (8 * struct.calcsize(fmt))) - 1 for name, fmt, _ in Command.FIELDS
            if name != "cid"}
U32 = 0xFFFF_FFFF
U64 = (1 << 64) - 1


class FaultError(ValueError):
    """A rule that cannot be built (the message names the field)."""


def _check(checker: args_mod.Checker, name: str, value: Any) -> Any:
    """``value`` through one of the control commands' argument checkers.

    Raises:
        FaultError: the checker's message (it names the field).
    """
    try:
        return checker(name, value)
    except ControlError as exc:
        raise FaultError(exc.message) from None


def checked_int(value: Any, name: str, lo: int = INT_RANGE[0], hi: int = INT_RANGE[1] - 1) -> int:
    """``value`` as an integer in [lo, hi].

    Raises:
        FaultError: not one (the message names the field).
    """
    result: int = _check(args_mod.integer(lo, hi), name, value)
    return result


def _opt_int(args: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    return None if args.get(name) is None else checked_int(args[name], name, lo, hi)


@dataclass
class FaultRule:
    """One armed fault."""

    id: int
    target: FaultTarget
    action: FaultAction
    count: int = 0  # firings left; 0 = unlimited
    probability: float = 1.0
    qid: int | None = None
    opcode: int | None = None
    nsid: int | None = None
    lba: tuple[int, int] | None = None  # first, last (inclusive)
    status: int = 0x281
    dnr: bool = False
    delay: float = 0.0
    port: str | None = None
    direction: Direction = Direction.RX
    #: ``edit``: submission entry field -> the value it gets before execution
    edit: dict[str, int] = field(default_factory=dict)
    #: the OCP Error Injection type of a rule the guest armed (None: the control socket's)
    guest_type: int | None = None
    hits: int = 0
    seen: int = 0

    def __post_init__(self) -> None:
        """Raises: FaultError: a target, action or direction outside its enum
        (an action must be one of its target's)."""
        try:
            self.target = FaultTarget(self.target)
            self.action = ACTIONS[self.target](self.action)
            self.direction = Direction(self.direction)
        except ValueError as exc:
            raise FaultError(str(exc)) from None

    @classmethod
    def build(cls, rule_id: int, args: dict[str, Any]) -> FaultRule:
        """A rule from control-socket arguments.

        Raises:
            FaultError: an unknown target/action/field or a bad value.
        """
        args = dict(args)
        target = args.pop("target", None)
        if target is None:  # "delay" exists for both: a port or direction means net
            action = args.get("action")
            net_only = action in tuple(NetAction) and action not in tuple(NvmeAction)
            target = "net" if net_only or "port" in args or "direction" in args else "nvme"
        action = args.pop("action", None)
        if target not in tuple(FaultTarget):  # == on the strings (enum hashes are names)
            raise FaultError(f"target: {args_mod.shown(target)} is not nvme or net")
        allowed = ACTIONS[FaultTarget(target)]
        if action not in tuple(allowed):
            raise FaultError(f"action: {args_mod.shown(action)} not one of "
                             f"{', '.join(allowed)} for {target}")
        unknown = set(args) - FIELDS
        if unknown:
            raise FaultError(f"unknown field(s): "
                             f"{', '.join(args_mod.shown(n) for n in sorted(unknown))}")
        args = {k: v for k, v in args.items() if v is not None}
        rule = cls(rule_id, FaultTarget(target), allowed(action))
        rule.count = checked_int(args.get("count", 0), "count", 0, U32)
        rule.probability = _check(args_mod.number(0.0, 1.0), "probability",
                                  args.get("probability", 1.0))
        rule.qid, rule.nsid = _opt_int(args, "qid", 0, 0xFFFF), _opt_int(args, "nsid", 0, U32)
        rule.opcode = _opt_int(args, "opcode", 0, 0xFF)
        if args.get("lba") is not None:
            rule.lba = _lba_range(args["lba"])
        status = args.get("status", 0x281)
        if isinstance(status, str) and status in STATUS_NAMES:
            rule.status = STATUS_NAMES[status]
        else:
            rule.status = checked_int(status, "status", 1, 0x7FF)  # SCT << 8 | SC, not success
        rule.dnr = _check(args_mod.flag, "dnr", args.get("dnr", False))
        rule.delay = _check(args_mod.number(0.0, 3600.0), "delay", args.get("delay", 0.0))
        if rule.action in (NvmeAction.DELAY, NetAction.DELAY) and rule.delay <= 0:
            raise FaultError("delay: a delay fault needs delay > 0 (seconds)")
        if "edit" in args:
            rule.edit = _edit_fields(args["edit"])
        if rule.action is NvmeAction.EDIT and not rule.edit:
            raise FaultError("edit: an edit fault needs fields to rewrite, e.g. nsid=5,cdw12=0")
        if "port" in args:
            rule.port = _check(args_mod.text, "port", args["port"])
        rule.direction = Direction(_check(args_mod.choice(*Direction), "direction",
                                          args.get("direction", Direction.RX)))
        return rule

    @property
    def spent(self) -> bool:
        return self.count > 0 and self.hits >= self.count

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "target": self.target, "action": self.action,
                               "count": self.count, "probability": self.probability,
                               "hits": self.hits, "seen": self.seen}
        for name in ("qid", "opcode", "nsid", "port"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.lba is not None:
            out["lba"] = list(self.lba)
        if self.action is NvmeAction.STATUS:
            out["status"] = f"{self.status:#x}"
            out["dnr"] = self.dnr
        if self.action in (NvmeAction.DELAY, NetAction.DELAY):
            out["delay"] = self.delay
        if self.target is FaultTarget.NET:
            out["direction"] = self.direction
        if self.edit:
            out["edit"] = {k: f"{v:#x}" for k, v in self.edit.items()}
        if self.guest_type is not None:
            out["origin"] = "guest"
            out["ocp_type"] = self.guest_type
        return out

    def state(self) -> dict[str, Any]:
        """The rule as :meth:`build` arguments plus its id and counts (JSON-able;
        :meth:`from_state` takes it back)."""
        out = {name: getattr(self, name) for name in (
            "id", "target", "action", "count", "probability", "qid", "opcode", "nsid", "status",
            "dnr", "delay", "port", "direction", "hits", "seen", "guest_type")}
        out["lba"] = None if self.lba is None else list(self.lba)
        out["edit"] = dict(self.edit) or None
        return out

    @classmethod
    def from_state(cls, item: dict[str, Any]) -> FaultRule:
        """The rule :meth:`state` describes, with its id, counts and guest type.

        Raises:
            FaultError: a field that does not fit.
            KeyError, TypeError, ValueError, AttributeError: ``item`` is not a
                rule's state (the caller reports it).
        """
        args = {k: v for k, v in item.items()
                if k not in ("id", "hits", "seen", "guest_type") and v is not None}
        if "lba" in args:
            args["lba"] = list(args["lba"])
        rule = cls.build(checked_int(item["id"], "id"), args)
        rule.hits, rule.seen = checked_int(item["hits"], "hits"), checked_int(item["seen"], "seen")
        if item.get("guest_type") is not None:
            rule.guest_type = checked_int(item["guest_type"], "guest_type", 0, 0xFFFF)
        return rule


def _edit_fields(value: Any) -> dict[str, int]:
    """``edit=``: a JSON object or ``"field=value,..."`` of :data:`EDITABLE` fields.

    Raises:
        FaultError: an unknown field, a value out of the field's range, or
            anything else.
    """
    if isinstance(value, str):
        pairs = [p.partition("=") for p in value.split(",") if p.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise FaultError(f"edit: expected field=value,..., got {args_mod.shown(value)}")
        value = {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict):
        raise FaultError(f"edit: expected field=value,... or an object, got "
                         f"{args_mod.shown(value)}")
    out = {}
    for name, raw in value.items():
        if name not in EDITABLE:
            raise FaultError(f"edit: {args_mod.shown(name)} is not one of {', '.join(EDITABLE)}")
        out[name] = checked_int(raw, f"edit.{name}", 0, EDITABLE[name])
    return out


def _lba_range(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        first, last = checked_int(value[0], "lba", 0, U64), checked_int(value[1], "lba", 0, U64)
    elif isinstance(value, str) and "-" in value:
        a, b = value.split("-", 1)
        first, last = checked_int(a, "lba", 0, U64), checked_int(b, "lba", 0, U64)
    else:
        first = last = checked_int(value, "lba", 0, U64)
    if last < first:
        raise FaultError(f"lba: bad range {args_mod.shown(value)}")
    return first, last
