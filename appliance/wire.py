"""Wire layer base: fixed-size structures declared once, as data.

Theory of operation
-------------------
A wire structure is a subclass of :class:`Struct` that declares its fields, in
wire order, as annotated class attributes with defaults (``cdw10: U32 = 0``):
the annotation carries both the Python type a type checker sees (``int`` or
``bytes``) and the struct format, so the declaration is the one source of truth.
At class creation the annotations become ``FIELDS`` (``(name, format, default)``
tuples), the packed size is computed once and checked against the size the
specification gives (``SIZE`` keyword), and the defaults are packed once, so a
mistyped field fails at import time rather than on the wire.  Type checkers see
the class as a keyword-only dataclass (``typing.dataclass_transform``):
``Command(cid=1).cdw10`` is an ``int`` and ``Command(bogus=1)`` does not check.
Instances are plain attribute bags; ``pack`` and ``unpack`` are the only codec
entry points.

Packed registers are described by :class:`BitFields`: named sub-fields whose
widths must add up to the container and whose setters refuse oversized values.

This module imports nothing from the rest of the package and does no I/O.
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
import struct
from collections.abc import Callable
from typing import (
    Annotated,
    Any,
    ClassVar,
    Self,
    TypeAlias,
    dataclass_transform,
    get_args,
    get_origin,
)

# Field types: the Python type mypy sees, the struct format the codec packs.
U8: TypeAlias = Annotated[int, "B"]
U16: TypeAlias = Annotated[int, "H"]
U32: TypeAlias = Annotated[int, "I"]
U64: TypeAlias = Annotated[int, "Q"]
I32: TypeAlias = Annotated[int, "i"]
# Byte strings are spelled in place: ``Annotated[bytes, "16s"]``.

_INT_FORMATS = frozenset("BHIQbhiq")
_BYTES_FORMAT = re.compile(r"[1-9][0-9]*s")


class WireError(ValueError):
    """A buffer cannot be decoded into (or a value encoded as) a wire structure."""


@dataclass_transform(kw_only_default=True, eq_default=False)
class Struct:
    """Base of every fixed-size wire structure.

    Subclasses declare their fields, in wire order, as annotated class attributes
    with a default, and pass ``size=`` to assert the spec size::

        class Header(Struct, size=16):
            msg_id: U16 = 0
            command: U16 = 0
            name: Annotated[bytes, "8s"] = b""

    ``FIELDS`` (``(name, format, default)`` tuples) is derived from the
    annotations at class creation; it is never declared by hand.
    """

    FIELDS: ClassVar[tuple[tuple[str, str, Any], ...]] = ()
    BYTE_ORDER: ClassVar[str] = "<"
    SIZE: ClassVar[int] = 0
    _codec: ClassVar[struct.Struct]
    _names: ClassVar[tuple[str, ...]]
    _values: ClassVar[Callable[[Struct], Any]]  # the field values, in order, as a tuple
    _defaults: ClassVar[dict[str, Any]]

    def __init_subclass__(cls, size: int | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "FIELDS" in vars(cls):
            raise TypeError(f"{cls.__name__}: declare fields as annotations, not FIELDS")
        cls.FIELDS = cls.FIELDS + _own_fields(cls)
        fmt = cls.BYTE_ORDER + "".join(f for _, f, _ in cls.FIELDS)
        cls._codec = struct.Struct(fmt)
        cls._names = tuple(n for n, _, _ in cls.FIELDS)
        if len(set(cls._names)) != len(cls._names):
            raise TypeError(f"{cls.__name__}: a field is declared twice (here and in a base)")
        # attrgetter of two or more names returns the tuple in one C call.
        cls._values = (operator.attrgetter(*cls._names) if len(cls._names) > 1
                       else functools.partial(_field_tuple, cls._names))
        cls._defaults = {n: d for n, _, d in cls.FIELDS}
        cls.SIZE = cls._codec.size
        if size is not None and cls.SIZE != size:
            raise TypeError(f"{cls.__name__}: packed size {cls.SIZE} != spec size {size}")
        try:
            cls._codec.pack(*cls._defaults.values())
        except struct.error as exc:
            raise TypeError(f"{cls.__name__}: a default does not fit its field: {exc}") from None

    def __init__(self, **values: Any) -> None:
        """Fields by name; those not given take their declared default.

        Raises:
            TypeError: a name is not a field.
        """
        fields = self._defaults.copy()
        fields.update(values)
        if len(fields) != len(self._defaults):
            unknown = sorted(values.keys() - self._defaults.keys())
            raise TypeError(f"{type(self).__name__}: unknown fields {unknown}")
        self.__dict__.update(fields)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        """Decode ``SIZE`` bytes at ``offset``.

        Raises:
            WireError: the buffer holds fewer than ``SIZE`` bytes past ``offset``.
        """
        if offset < 0 or len(buf) - offset < cls.SIZE:
            raise WireError(f"{cls.__name__}: need {cls.SIZE} bytes, have {len(buf) - offset}")
        obj = cls.__new__(cls)
        obj.__dict__.update(zip(cls._names, cls._codec.unpack_from(buf, offset)))
        return obj

    def pack(self) -> bytes:
        """Encode to exactly ``SIZE`` bytes.

        Raises:
            WireError: a field value does not fit its format.
        """
        try:
            return self._codec.pack(*type(self)._values(self))
        except struct.error as exc:
            raise WireError(f"{type(self).__name__}: {exc}") from None

    def replace(self, **values: Any) -> Self:
        """Return a copy with some fields changed.

        Raises:
            TypeError: a name in ``values`` is not a field.
        """
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


def _field_tuple(names: tuple[str, ...], obj: Struct) -> tuple[Any, ...]:
    """``obj``'s values of ``names`` (what attrgetter gives for two or more names)."""
    return tuple(getattr(obj, n) for n in names)


def _own_fields(cls: type[Struct]) -> tuple[tuple[str, str, Any], ...]:
    """The ``(name, format, default)`` fields ``cls`` itself annotates, in order.

    Raises:
        TypeError: an annotation is not ``Annotated[int, <one of BHIQbhiq>]`` or
            ``Annotated[bytes, "<n>s"]``, a field has no default or one of the
            wrong type or length, or a name starts with ``_`` or
            shadows a ``Struct`` attribute.
    """
    fields = []
    for name, hint in inspect.get_annotations(cls, eval_str=True).items():
        origin: object = get_origin(hint)
        if origin is ClassVar:
            continue
        where = f"{cls.__name__}.{name}"
        args = get_args(hint) if origin is Annotated else ()
        base, fmt = (args[0], args[1]) if len(args) == 2 else (None, None)
        if not ((base is int and fmt in _INT_FORMATS)
                or (base is bytes and isinstance(fmt, str) and _BYTES_FORMAT.fullmatch(fmt))):
            raise TypeError(f"{where}: annotate with U8/U16/U32/U64/I32 or Annotated[bytes, \"<n>s\"]")
        if name in vars(Struct) or name.startswith("_"):
            raise TypeError(f"{where}: a field name may not start with _ or shadow a Struct attribute")
        if name not in vars(cls):
            raise TypeError(f"{where}: a field needs a default")
        default = vars(cls)[name]
        if not isinstance(default, base):
            raise TypeError(f"{where}: default {default!r} is not {base.__name__}")
        if isinstance(default, bytes) and len(default) > int(fmt[:-1]):
            raise TypeError(f"{where}: default {default!r} is longer than {fmt}")
        fields.append((name, fmt, default))
    return tuple(fields)


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
