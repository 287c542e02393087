"""Fault control from inside the guest: OCP Error Injection entries as fault rules.

Theory of operation
-------------------
:class:`GuestFaults` is the controller's
:class:`~appliance.storage.error_injection.GuestFaultHook`, installed by the
runtime when ``storage.guest_faults`` is on.  It keeps no state of its own:
the rules a guest armed live in the process's :class:`FaultSet` beside the
control socket's, marked with their OCP error type (``guest_type``), so
``fault.list`` shows them (``origin: guest``), ``fault.clear`` removes them
and a live handoff carries them.  A Set Features replaces the guest's rules
only; the control socket's stay.

Each enabled entry becomes one rule on I/O commands (:data:`RULES`); the
single-instance flag makes it fire once (``count=1``), otherwise it fires on
every match.  Injected statuses carry DNR: the medium is broken, a retry
would fail the same way (and a driver that retries would hide the fault).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.control.fault_rules import FaultError
from appliance.control.faults import MAX_RULES, FaultSet
from appliance.storage.error_injection import (
    FLAG_ENABLE,
    FLAG_SINGLE,
    ErrorInjectionEntry,
    ErrorType,
)
from appliance.storage.spec import CommandError, IoOpcode, Status

#: OCP error type -> the fault rule it arms (docs/faults.md)
RULES: dict[int, dict[str, Any]] = {
    ErrorType.CONTROLLER_HANG: {"action": "hang"},
    ErrorType.NAND_HANG: {"action": "hang", "opcode": IoOpcode.READ},
    ErrorType.LOGICAL_FIRMWARE_ERROR: {"action": "fatal"},
    ErrorType.NAND_CORRUPTION: {"action": "status", "status": "unrecovered_read_error",
                                "opcode": IoOpcode.READ, "dnr": True},
    ErrorType.HW_MALFUNCTION: {"action": "status", "status": "internal_error", "dnr": True},
}


def _refuse(why: str) -> CommandError:
    return CommandError(Status.INVALID_FIELD, f"error injection: {why}")


def rule_args(index: int, entry: ErrorInjectionEntry) -> dict[str, Any]:
    """The :meth:`FaultSet.add` arguments of one enabled entry.

    Raises:
        CommandError: Invalid Field for a type the appliance does not map or a
            type-specific field it does not implement (NRTDP, the rest).
    """
    args = RULES.get(entry.type)
    if args is None:
        raise _refuse(f"entry {index}: type {entry.type:#x} not one of "
                      f"{', '.join(f'{t:#x}' for t in RULES)}")
    if entry.nrtdp or entry.specific.strip(b"\0"):
        raise _refuse(f"entry {index}: type-specific fields (NRTDP {entry.nrtdp}) not supported")
    return {**args, "count": 1 if entry.single else 0}


@dataclass
class GuestFaults:
    """The guest's view of a :class:`FaultSet` (OCP Error Injection)."""

    faults: FaultSet

    def inject(self, entries: list[ErrorInjectionEntry]) -> None:
        """Replace the guest's rules by those of the enabled ``entries`` (all or
        nothing).

        Raises:
            CommandError: Invalid Field for an entry that does not map, or when
                the rules would not fit beside the control socket's.
        """
        wanted = [(e.type, rule_args(i, e)) for i, e in enumerate(entries) if e.enabled]
        kept = [r for r in self.faults.rules if r.guest_type is None]
        if len(kept) + len(wanted) > MAX_RULES:
            raise _refuse(f"{len(wanted)} injections do not fit beside {len(kept)} rules")
        for rule in [r for r in self.faults.rules if r.guest_type is not None]:
            self.faults.clear(rule.id)
        for error_type, args in wanted:
            try:
                rule = self.faults.add(args)
            except FaultError as exc:  # the table's arguments are valid: a bug
                raise AssertionError(f"error injection type {error_type:#x}: {exc}") from None
            rule.guest_type = error_type

    def injections(self) -> list[ErrorInjectionEntry]:
        """The guest's rules as entries: enable clear once a single one fired."""
        return [ErrorInjectionEntry(flags=(0 if r.spent else FLAG_ENABLE)
                                    | (FLAG_SINGLE if r.count == 1 else 0),
                                    type=r.guest_type)
                for r in self.faults.rules if r.guest_type is not None]
