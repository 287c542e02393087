"""Wire layer base: fixed-size structures declared once, as data.

Theory of operation
-------------------
A wire structure is a subclass of :class:`Struct` that lists its fields as
``(name, struct-format, default)`` tuples in ``FIELDS``.  The class computes its
packed size once, at class creation, and checks it against the size the
specification gives (``SIZE`` keyword), so a mistyped field fails at import
time rather than on the wire.  Instances are plain attribute bags; ``pack``
and ``unpack`` are the only codec entry points.

Packed registers are described by :class:`BitFields`: named sub-fields whose
widths must add up to the container and whose setters refuse oversized values.

This module imports nothing from the rest of the package and does no I/O.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Self


class WireError(ValueError):
    """A buffer cannot be decoded into (or a value encoded as) a wire structure."""


class Struct:
    """Base of every fixed-size wire structure.

    Subclasses declare ``FIELDS`` and pass ``size=`` to assert the spec size::

        class Header(Struct, size=16):
            FIELDS = (("msg_id", "H", 0), ("command", "H", 0), ...)
    """

    FIELDS: ClassVar[tuple[tuple[str, str, Any], ...]] = ()
    BYTE_ORDER: ClassVar[str] = "<"
    SIZE: ClassVar[int] = 0
    _codec: ClassVar[struct.Struct]
    _names: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, size: int | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        fmt = cls.BYTE_ORDER + "".join(f for _, f, _ in cls.FIELDS)
        cls._codec = struct.Struct(fmt)
        cls._names = tuple(n for n, _, _ in cls.FIELDS)
        cls.SIZE = cls._codec.size
        if size is not None and cls.SIZE != size:
            raise TypeError(f"{cls.__name__}: packed size {cls.SIZE} != spec size {size}")

    def __init__(self, **values: Any) -> None:
        for name, _, default in self.FIELDS:
            setattr(self, name, values.pop(name, default))
        if values:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(values)}")

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        """Decode ``SIZE`` bytes at ``offset``.

        Raises:
            WireError: the buffer holds fewer than ``SIZE`` bytes past ``offset``.
        """
        if offset < 0 or len(buf) - offset < cls.SIZE:
            raise WireError(f"{cls.__name__}: need {cls.SIZE} bytes, have {len(buf) - offset}")
        obj = cls.__new__(cls)
        for name, value in zip(cls._names, cls._codec.unpack_from(buf, offset)):
            setattr(obj, name, value)
        return obj

    def pack(self) -> bytes:
        """Encode to exactly ``SIZE`` bytes.

        Raises:
            WireError: a field value does not fit its format.
        """
        try:
            return self._codec.pack(*(getattr(self, n) for n in self._names))
        except struct.error as exc:
            raise WireError(f"{type(self).__name__}: {exc}") from None

    def replace(self, **values: Any) -> Self:
        """Return a copy with some fields changed."""
        current = {n: getattr(self, n) for n in self._names}
        current.update(values)
        return type(self)(**current)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self._names
        )

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._names)
        return f"{type(self).__name__}({body})"

    # Declared fields are set dynamically; these tell type checkers so.
    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


class BitFields:
    """Named bit sub-fields of a packed register.

    ``BitFields(32, en=(0, 1), css=(4, 3), ...)`` declares fields by
    ``(lowest bit, width)``; the declared widths plus ``reserved`` bits must
    cover the container exactly, so every bit is accounted for.
    """

    def __init__(self, width: int, reserved: int = 0, **fields: tuple[int, int]) -> None:
        self.width = width
        self.fields = dict(fields)
        used = 0
        for name, (lo, w) in fields.items():
            mask = ((1 << w) - 1) << lo
            if w <= 0 or lo + w > width or used & mask:
                raise TypeError(f"bit field {name} overlaps or exceeds {width} bits")
            used |= mask
        if used & reserved or (used | reserved) != (1 << width) - 1:
            raise TypeError("bit fields plus reserved bits must cover the container exactly")
        self.reserved_mask = reserved
        self.defined_mask = used

    def get(self, value: int, name: str) -> int:
        """Extract sub-field ``name`` from ``value``."""
        lo, w = self.fields[name]
        return (value >> lo) & ((1 << w) - 1)

    def set(self, value: int, name: str, field: int) -> int:
        """Return ``value`` with sub-field ``name`` replaced by ``field``.

        Raises:
            WireError: ``field`` does not fit the sub-field's width.
        """
        lo, w = self.fields[name]
        if field < 0 or field >> w:
            raise WireError(f"{name}: {field} does not fit {w} bits")
        mask = ((1 << w) - 1) << lo
        return (value & ~mask) | (field << lo)

    def decode(self, value: int) -> dict[str, int]:
        """All sub-fields of ``value`` by name."""
        return {n: self.get(value, n) for n in self.fields}

    def encode(self, **fields: int) -> int:
        """Build a register value from sub-fields (unnamed ones are zero)."""
        value = 0
        for name, field in fields.items():
            value = self.set(value, name, field)
        return value
