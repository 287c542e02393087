"""Argument checkers of the control commands: the one place a request's values are judged.

Every command declares its arguments as ``name -> checker``
(:data:`appliance.control.commands.COMMANDS`); ``fault.add`` hands its rule
fields to :meth:`appliance.control.faults.FaultSet.add`, which uses the same
checkers.  A checker takes the argument's name and whatever JSON value a client
sent and either returns the value converted or raises
:class:`~appliance.control.protocol.ControlError` with ``bad_args`` and a
message that starts with the name: ``size: expected a size like 128M or
4096, got [1]``.  Nothing else escapes a checker: bools where integers are
expected, floats, lists and objects, strings of unicode digits (``"²"``) or
of thousands of digits are all refused, never passed to ``int()`` to raise
``ValueError``/``OverflowError`` later.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable
from typing import Any

from appliance.config import checkers as config_checkers
from appliance.control.protocol import BAD_ARGS, ControlError
from appliance.errors import ConfigError

Checker = Callable[[str, Any], Any]

#: what each checker accepts, in words (the schema query shows it)
_EXPECTED: weakref.WeakKeyDictionary[Checker, str] = weakref.WeakKeyDictionary()


def expects(checker: Checker) -> str:
    """What ``checker`` accepts, in words (``an integer from 1 to 4``)."""
    return _EXPECTED.get(checker, "any JSON value")


def _accepts(checker: Checker, expected: str) -> Checker:
    _EXPECTED[checker] = expected
    return checker

#: an integer as text: decimal or 0x-hex, ASCII only, short enough for int()
_INT_TEXT = re.compile(r"\s*([+-]?)(?:0[xX]([0-9a-fA-F]{1,16})|([0-9]{1,20}))\s*", re.ASCII)
_FLOAT_TEXT = re.compile(r"\s*[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})"
                         r"(?:[eE][+-]?[0-9]{1,3})?\s*", re.ASCII)
_MAX_SIZE_TEXT = 32  # "128M" and friends; longer strings are refused before any int()
_ON = ("1", "on", "true", "yes", "up")
_OFF = ("0", "off", "false", "no", "down")


def shown(value: Any) -> str:
    """``value`` for an error message: its repr, at most 60 characters (a huge
    integer by its bit length: formatting it could itself raise)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def refuse(name: str, expected: str, value: Any) -> ControlError:
    """The ``bad_args`` error for argument ``name`` (to raise)."""
    return ControlError(BAD_ARGS, f"{name}: expected {expected}, got {shown(value)}")


def integer(lo: int, hi: int) -> Checker:
    """An integer in [lo, hi]: a JSON integer, or a string of ASCII decimal or
    0x-hex digits (``opcode=0x02`` on the command line)."""
    expected = f"an integer from {lo} to {hi}"

    def check(name: str, value: Any) -> int:
        if isinstance(value, str) and (m := _INT_TEXT.fullmatch(value)):
            sign, hexa, dec = m.groups()
            number = int(hexa, 16) if hexa else int(dec, 10)
            number = -number if sign == "-" else number
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise refuse(name, expected, value)
        if not lo <= number <= hi:
            raise refuse(name, expected, value)
        return number
    return _accepts(check, expected)


def number(lo: float, hi: float) -> Checker:
    """A finite number in [lo, hi] (a JSON number or a decimal string), as a float."""
    expected = f"a number from {lo:g} to {hi:g}"

    def check(name: str, value: Any) -> float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value):
            result = float(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            result = float(value) if abs(value) < 1 << 64 else math.inf
        elif isinstance(value, float):
            result = value
        else:
            raise refuse(name, expected, value)
        if not (math.isfinite(result) and lo <= result <= hi):
            raise refuse(name, expected, value)
        return result
    return _accepts(check, expected)


def flag(name: str, value: Any) -> bool:
    """On or off: a JSON bool, 0/1, or on/off, true/false, yes/no, up/down."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)):
        text = str(value).strip().lower() if isinstance(value, str) or value in (0, 1) else ""
        if text in _ON:
            return True
        if text in _OFF:
            return False
    raise refuse(name, "on/off", value)


def text(name: str, value: Any) -> str:
    """A non-empty string."""
    if isinstance(value, str) and value:
        return value
    raise refuse(name, "a non-empty string", value)


def choice(*options: str) -> Checker:
    """One of the strings ``options``."""
    def check(name: str, value: Any) -> str:
        if isinstance(value, str) and value in options:
            return value
        raise refuse(name, f"one of {', '.join(options)}", value)
    return _accepts(check, f"one of {', '.join(options)}")


def size(lo: int, hi: int) -> Checker:
    """A size in bytes in [lo, hi]: an integer or ``128M``-style text (as in the
    configuration file)."""
    expected = f"a size like 128M or 4096, from {lo} to {hi}"

    def check(name: str, value: Any) -> int:
        if isinstance(value, str) and len(value) > _MAX_SIZE_TEXT:
            raise refuse(name, expected, value)
        try:
            result = config_checkers.size(name, value)
        except ConfigError:
            raise refuse(name, expected, value) from None
        if not lo <= result <= hi:
            raise refuse(name, expected, value)
        return result
    return _accepts(check, expected)


_accepts(flag, "on/off (a bool, 0/1 or on/off, true/false, yes/no, up/down)")
_accepts(text, "a non-empty string")


def anything(name: str, value: Any) -> Any:
    """Any JSON value, for the handler to compare (the protocol already bounded
    its nesting and numbers)."""
    return value


def passed_on(expected: str) -> Checker:
    """Any JSON value, handed to code that checks it with the others (``fault.add``'s
    rule fields); ``expected`` says what that code accepts."""
    def check(name: str, value: Any) -> Any:
        return value
    return _accepts(check, expected)


def check_all(spec: dict[str, Checker], args: dict[str, Any], where: str,
              required: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``args`` checked against ``spec``: unknown names are refused, a null value
    counts as absent, every other value goes through its checker, and the
    ``required`` names must be there.

    Returns:
        The converted arguments.

    Raises:
        ControlError: BAD_ARGS naming the first bad argument.
    """
    extra = set(args) - set(spec)
    if extra:
        names = ", ".join(shown(n) for n in sorted(extra))
        raise ControlError(BAD_ARGS, f"{where}: unknown argument(s) {names}")
    out = {name: spec[name](name, value) for name, value in args.items() if value is not None}
    missing = sorted(required - set(out))
    if missing:
        raise ControlError(BAD_ARGS, f"{missing[0]}: required by {where}")
    return out
