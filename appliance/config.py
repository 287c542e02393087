"""Configuration: embedded defaults, a YAML file over them, strict validation.

Every key is declared once in :data:`SCHEMA` with its checker and default.
Unknown keys and bad values raise :class:`~appliance.errors.ConfigError`
whose message starts with the key's path, e.g.
``storage.namespaces[0].block_size: must be one of 512, 4096 (got 1000)``.
Paths (the keys checked by :func:`file_path`) may use ``{data_dir}`` and
``{run_dir}``; any other ``{placeholder}`` is refused; ``~`` is expanded.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from appliance.errors import ConfigError

Checker = Callable[[str, Any], Any]

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", re.IGNORECASE)


def _default_data_dir() -> str:
    return os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"),
                        "appliance")


def _default_run_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "appliance") if base else f"/tmp/appliance-{os.getuid()}"


# ------------------------------------------------------------------ checkers
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


@dataclass
class Table:
    """A mapping with known keys: key -> (checker or nested schema, default)."""

    keys: dict[str, tuple[Any, Any]]


@dataclass
class ListOf:
    item: Table
    default: list[dict[str, Any]] = field(default_factory=list)
    max_items: int = 64


NAMESPACE = Table({
    "image": (file_path, None),
    "size": (size, "1G"),
    "block_size": (one_of(512, 4096), 512),
    "read_only": (boolean, False),
    "grow": (boolean, False),  # extend an existing image smaller than size (never cut one)
})
PORT = Table({
    "socket": (file_path, None),
    "mac": (mac, None),
    "queues": (integer(1, 8), 1),
    "mode": (one_of("server", "client"), "server"),
    "pcap": (file_path, None),
    "mtu": (integer(68, 65535), 1500),  # != 1500: QEMU offers VIRTIO_NET_F_MTU (host_mtu)
})
SCHEMA = Table({
    "data_dir": (file_path, "{default_data_dir}"),
    "run_dir": (file_path, "{default_run_dir}"),
    "trace": (boolean, False),
    "storage": (Table({
        "socket": (file_path, "{run_dir}/nvme.sock"),
        "io_queues": (integer(1, 64), 4),
        "queue_entries": (integer(2, 4096), 1024),
        "serial": (text, "APPLIANCE0001"),
        "dma_layout": (one_of("spec", "u32-count"), "spec"),
        "doorbells": (one_of("message", "mmap"), "message"),  # mmap: BAR0 doorbell page as a memfd
        "max_backlog": (size, "1M"),  # unread vfio-user reply bytes before the client is dropped
        "namespaces": (ListOf(NAMESPACE, [{"image": "{data_dir}/disk0.img", "size": "1G"}], 16), None),
    }), None),
    "net": (Table({
        "ports": (ListOf(PORT, [{"socket": "{run_dir}/net0.sock", "mac": "52:54:00:12:34:56"}], 16), None),
        "responder": (Table({
            "ip": (interface, "10.0.2.2/24"),
            "mac": (mac, "52:54:00:00:02:02"),
            "udp_echo_port": (port, 7),
        }), None),
        "tap": (Table({"name": (ifname, None)}), None),  # name absent: no TAP interface
        "max_backlog": (size, "1M"),  # unsent reply bytes per front-end before it is disconnected
        # mmap guest memory that could still shrink (DPDK's): fast, but a front-end that
        # shrinks it kills the process (SIGBUS); only for trusted front-ends
        "map_unsealed_memory": (boolean, False),
    }), None),
    "control": (Table({"socket": (file_path, "{run_dir}/control.sock"),
                       "idle_timeout": (integer(1, 86400), 300)}), None),  # seconds
})


def _apply(schema: Any, value: Any, path: str) -> Any:
    if isinstance(schema, Table):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'config'}: must be a mapping (got {type(value).__name__})")
        unknown = sorted(set(value) - set(schema.keys))
        if unknown:
            where = f"{path}.{unknown[0]}" if path else str(unknown[0])
            raise ConfigError(f"{where}: unknown key (known: {', '.join(schema.keys)})")
        out = {}
        for key, (sub, default) in schema.keys.items():
            child = f"{path}.{key}" if path else key
            out[key] = _apply(sub, value.get(key, default), child)
        return out
    if isinstance(schema, ListOf):
        if value is None:
            value = schema.default
        if not isinstance(value, list):
            raise ConfigError(f"{path}: must be a list (got {type(value).__name__})")
        if len(value) > schema.max_items:
            raise ConfigError(f"{path}: at most {schema.max_items} entries (got {len(value)})")
        return [_apply(schema.item, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if value is None:
        return None
    return schema(path, value)


def _required(cfg: dict[str, Any]) -> None:
    for i, ns in enumerate(cfg["storage"]["namespaces"]):
        if ns["image"] is None:
            raise ConfigError(f"storage.namespaces[{i}].image: required")
        if ns["size"] % ns["block_size"]:
            raise ConfigError(f"storage.namespaces[{i}].size: must be a multiple of block_size")
    for i, p in enumerate(cfg["net"]["ports"]):
        for key in ("socket", "mac"):
            if p[key] is None:
                raise ConfigError(f"net.ports[{i}].{key}: required")
    sockets: dict[str, str] = {}
    named = [("storage.socket", cfg["storage"]["socket"]), ("control.socket", cfg["control"]["socket"])]
    named += [(f"net.ports[{i}].socket", p["socket"]) for i, p in enumerate(cfg["net"]["ports"])]
    for key, path in named:
        if path in sockets:
            raise ConfigError(f"{key}: same socket path as {sockets[path]}")
        sockets[path] = key


def _expand_path(key: str, value: str, names: dict[str, str]) -> str:
    """``value`` with its ``{name}`` placeholders replaced and ``~`` expanded.

    Raises:
        ConfigError: an unknown placeholder, or a stray ``{`` or ``}`` (``{{`` and
            ``}}`` stand for the braces themselves).
    """
    known = ", ".join(f"{{{n}}}" for n in names if not n.startswith("default_"))
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError:
        raise ConfigError(f"{key}: unbalanced brace in {value!r} (write {{{{ or }}}} for a "
                          "literal one)") from None
    for _, name, spec, conversion in fields:
        if name is not None and (name not in names or spec or conversion):
            raise ConfigError(f"{key}: unknown placeholder {{{name}}} in {value!r} "
                              f"(known: {known or 'none here'})")
    return os.path.expanduser(value.format(**names))


def _expand(schema: Any, value: Any, key: str, names: dict[str, str]) -> Any:
    """``value`` (checked against ``schema``) with every path expanded."""
    if isinstance(schema, Table) and isinstance(value, dict):
        return {k: _expand(schema.keys[k][0], v, f"{key}.{k}" if key else k, names)
                for k, v in value.items()}
    if isinstance(schema, ListOf) and isinstance(value, list):
        return [_expand(schema.item, v, f"{key}[{i}]", names) for i, v in enumerate(value)]
    if schema is file_path and isinstance(value, str):
        return _expand_path(key, value, names)
    return value


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The validated configuration: defaults, then the file, then ``overrides``.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key, bad value.
    """
    raw: Any = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} invalid YAML") from None
        if raw is None:
            raw = {}
    if overrides:
        raw = {**raw, **overrides} if isinstance(raw, dict) else raw
    cfg: dict[str, Any] = _apply(SCHEMA, raw, "")
    names = {"default_data_dir": _default_data_dir(), "default_run_dir": _default_run_dir()}
    cfg["data_dir"] = _expand_path("data_dir", cfg["data_dir"], names)
    cfg["run_dir"] = _expand_path("run_dir", cfg["run_dir"], names)
    names.update(data_dir=cfg["data_dir"], run_dir=cfg["run_dir"])
    cfg = _expand(SCHEMA, cfg, "", names)
    _required(cfg)
    return cfg
