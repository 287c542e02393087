"""The configuration's value checkers: each takes a key's path and a value from the
YAML file and returns the value as the configuration keeps it.

Returns: the checked value (a size in bytes, the enum member, a lower-case MAC).
Raises: :class:`~appliance.errors.ConfigError` whose message starts with the path,
e.g. ``storage.io_queues: must be an integer from 1 to 64 (got 0)``.

:data:`appliance.config.SCHEMA` names one for every key; the control plane's
argument checkers reuse :func:`size`.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable
from typing import Any, TypeVar

from appliance.errors import ConfigError
from appliance.nbd.uri import is_nbd_uri
from appliance.nbd.uri import parse as parse_nbd_uri

Checker = Callable[[str, Any], Any]
_E = TypeVar("_E", bound=enum.Enum)

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", re.IGNORECASE)

def size(path: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{path}: must be a size like 1G or 4096 (got {value!r})")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        n = int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()]
    else:
        raise ConfigError(f"{path}: must be a size like 1G or 4096 (got {value!r})")
    if n <= 0:
        raise ConfigError(f"{path}: must be positive (got {value!r})")
    return n


def integer(lo: int, hi: int) -> Checker:
    def check(path: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{path}: must be an integer from {lo} to {hi} (got {value!r})")
        return value
    return check


def one_of(*choices: Any) -> Checker:
    def check(path: str, value: Any) -> Any:
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            shown = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{path}: must be one of {shown} (got {value!r})")
        return value
    return check


def member_of(kind: type[_E]) -> Callable[[str, Any], _E]:
    """A checker for one of ``kind``'s values; returns the member.  The message is
    :func:`one_of`'s."""
    def check(path: str, value: Any) -> _E:
        for member in kind:
            if not isinstance(value, bool) and value == member.value:
                return member
        shown = ", ".join(str(m.value) for m in kind)
        raise ConfigError(f"{path}: must be one of {shown} (got {value!r})")
    return check


def boolean(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: must be true or false (got {value!r})")
    return value


def text(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: must be a non-empty string (got {value!r})")
    return value


def file_path(key: str, value: Any) -> str:
    """A file system path: a non-empty string, where ``{data_dir}``/``{run_dir}`` are
    expanded once every value is known (:func:`_expand`)."""
    return text(key, value)


def image_source(key: str, value: Any) -> str:
    """A namespace's image: a file path (expanded as :func:`file_path`'s) or an NBD
    URI (``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``), kept as
    written."""
    text(key, value)
    if is_nbd_uri(value):
        try:
            parse_nbd_uri(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc} (got {value!r})") from None
    return str(value)


def namespace_size(path: str, value: Any) -> int:
    """A namespace's size (:func:`size`); absent: 1G for a file, the export's for NBD."""
    return size(path, value)


def ifname(path: str, value: Any) -> str:
    """A Linux network interface name: 1-15 bytes, no '/', ':' or whitespace."""
    if (not isinstance(value, str) or not 0 < len(value.encode()) < 16 or value in (".", "..")
            or any(ch in value for ch in "/: \t\n")):
        raise ConfigError(f"{path}: must be an interface name of 1-15 characters (got {value!r})")
    return value


def mac(path: str, value: Any) -> str:
    if not isinstance(value, str) or not _MAC.match(value):
        raise ConfigError(f"{path}: must be a MAC address like 52:54:00:12:34:56 (got {value!r})")
    if int(value[:2], 16) & 1:
        raise ConfigError(f"{path}: must be a unicast MAC address (got {value!r})")
    return value.lower()


def interface(path: str, value: Any) -> str:
    try:
        iface = ipaddress.IPv4Interface(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: must be an IPv4 address with prefix like 10.0.2.2/24 (got {value!r})") from None
    return str(iface)


def port(path: str, value: Any) -> int:
    return int(integer(1, 65535)(path, value))
