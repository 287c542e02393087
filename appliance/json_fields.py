"""Checked reads of a JSON value another process sent (a live-handoff manifest).

Every state a peer process hands over arrives as JSON and is turned into a
frozen value before any of it is used.  :class:`Fields` (an object) and
:class:`Field` (one value in it) are the one set of checkers for that: each
reader checks the type, the range or length, and for an fd index that it is
below the number of fds that came, and raises the caller's error with the
value's path (``net.ports[0].session.vrings[1].kick: fd index 999 out of
range (0..4)``).  ``bool`` is never an integer here, and a float is a number
only where a number is asked for.

Stdlib and :mod:`appliance.errors` only, so every layer above may use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

U8, U16, U32, U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1

T = TypeVar("T")
ErrorFactory = Callable[[str], Exception]


@dataclass(frozen=True)
class Field:
    """One value of a received JSON document, with its path for messages."""

    value: Any
    where: str
    nfds: int
    error: ErrorFactory

    def fail(self, what: str) -> Exception:
        """The caller's error, naming this value's path and ``what`` is wrong."""
        return self.error(f"{self.where}: {what}")

    @property
    def is_null(self) -> bool:
        return self.value is None

    def uint(self, top: int = U64, low: int = 0) -> int:
        """An integer in ``low..top``.

        Raises:
            the caller's error: another type (a bool too) or out of range.
        """
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= top:
            raise self.fail(f"{v!r} is not an integer in {low}..{top:#x}")
        return v

    def number(self) -> float:
        """A finite number (integer or float).

        Raises:
            the caller's error: another type, infinite or NaN.
        """
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(f"{v!r} is not a number")
        return float(v)

    def flag(self) -> bool:
        """Raises: the caller's error unless a JSON boolean."""
        if not isinstance(self.value, bool):
            raise self.fail(f"{self.value!r} is not a boolean")
        return self.value

    def text(self, choices: tuple[str, ...] | None = None) -> str:
        """A string (one of ``choices`` when given).

        Raises:
            the caller's error: another type or not one of ``choices``.
        """
        if not isinstance(self.value, str):
            raise self.fail(f"{self.value!r} is not a string")
        if choices is not None and self.value not in choices:
            raise self.fail(f"{self.value!r} is not one of {', '.join(choices)}")
        return self.value

    def hex(self, max_bytes: int) -> bytes:
        """The bytes of a hex string of at most ``max_bytes`` bytes.

        Raises:
            the caller's error: not a string, too long, or not hex.
        """
        if not isinstance(self.value, str) or len(self.value) > 2 * max_bytes:
            raise self.fail(f"not a hex string of at most {max_bytes} bytes")
        try:
            return bytes.fromhex(self.value)
        except ValueError:
            raise self.fail("not hex") from None

    def fd(self) -> int:
        """An index into the fds that came (``0..nfds-1``).

        Raises:
            the caller's error: not an integer, or no such fd came.
        """
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.nfds:
            raise self.fail(f"fd index {v!r} out of range (0..{self.nfds - 1})")
        return v

    def obj(self) -> Fields:
        """This value as an object.  Raises: the caller's error unless an object."""
        return Fields(self.value, self.where, self.nfds, self.error)

    def items(self, count: int | None = None, most: int | None = None) -> list[Field]:
        """The elements of a list (exactly ``count``, at most ``most`` when given).

        Raises:
            the caller's error: not a list, or of another length.
        """
        v = self.value
        if not isinstance(v, list) or (count is not None and len(v) != count) \
                or (most is not None and len(v) > most):
            want = ("a list" if count is None else f"a list of {count}") + (
                f" of at most {most}" if most is not None else "")
            raise self.fail(f"expected {want}")
        return [Field(x, f"{self.where}[{i}]", self.nfds, self.error) for i, x in enumerate(v)]

    def counters(self, names: tuple[str, ...] | None = None) -> dict[str, int]:
        """An object of counters: exactly ``names`` (any names with None), each an integer.

        Raises:
            the caller's error: not an object, a name missing, a value not a count.
        """
        f = self.obj()
        return {name: f[name].uint() for name in (tuple(f.data) if names is None else names)}


class Fields:
    """One JSON object of a received document: its members as :class:`Field`."""

    def __init__(self, data: Any, where: str, nfds: int, error: ErrorFactory) -> None:
        """Raises: ``error`` when ``data`` is not a JSON object."""
        if not isinstance(data, dict):
            raise error(f"{where}: not an object")
        self.data: dict[str, Any] = data
        self.where, self.nfds, self.error = where, nfds, error

    def __getitem__(self, key: str) -> Field:
        """Member ``key``.  Raises: the caller's error when it is missing."""
        where = f"{self.where}.{key}" if self.where else key  # "": the document's top
        if key not in self.data:
            raise self.error(f"{where}: missing")
        return Field(self.data[key], where, self.nfds, self.error)

    def maybe(self, key: str, read: Callable[[Field], T]) -> T | None:
        """``read(member)``, or None when ``key`` is null (it must be present).

        Raises:
            the caller's error: missing, or what ``read`` refuses.
        """
        field = self[key]
        return None if field.is_null else read(field)
