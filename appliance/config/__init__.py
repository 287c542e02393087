"""Configuration: embedded defaults, a YAML file over them, strict validation.

Every key is declared once in :data:`SCHEMA` with its checker and default;
each table of the schema names the frozen dataclass it becomes
(:class:`Config` at the top, :class:`StorageConfig`, :class:`NamespaceConfig`,
:class:`NetConfig`, :class:`PortConfig`, :class:`ResponderConfig`,
:class:`TapConfig`, :class:`ControlConfig` below it; lists become tuples).
:func:`load` reads a YAML file, :meth:`Config.from_dict` checks a mapping of
the same form, :meth:`Config.to_dict` gives one back (what a child process's
YAML file holds).

Unknown keys and bad values raise :class:`~appliance.errors.ConfigError`
whose message starts with the key's path, e.g.
``storage.namespaces[0].block_size: must be one of 512, 4096 (got 1000)``.
The value checkers are in :mod:`appliance.config.checkers`.
Paths (the keys checked by its ``file_path``) may use ``{data_dir}`` and
``{run_dir}``; any other ``{placeholder}`` is refused; ``~`` is expanded.

The layer: above the devices (the value sets of :class:`DoorbellMode` and
:class:`DmaLayout` are theirs), below the runtime and the control plane,
which read it.  Devices never import it: the runtime passes them values (a
namespace entry as :class:`appliance.storage.namespace.NamespaceSettings`).
"""

from __future__ import annotations

import enum
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from appliance.config.checkers import (
    boolean,
    file_path,
    ifname,
    image_source,
    integer,
    interface,
    mac,
    member_of,
    namespace_size,
    one_of,
    port,
    size,
    text,
)
from appliance.errors import ConfigError
from appliance.nbd.uri import is_nbd_uri
from appliance.storage.doorbells import DoorbellMode
from appliance.vfio_user.connection_state import DmaLayout

__all__ = [
    "SCHEMA", "Config", "ConfigError", "ControlConfig", "DmaLayout", "DoorbellMode",
    "NamespaceConfig", "NetConfig", "PortConfig", "PortMode", "RawConfig", "ResponderConfig",
    "StorageConfig", "TapConfig", "ZonedConfig", "load",
]

#: A configuration's raw form: a YAML file's mapping (:meth:`Config.from_dict` checks one).
RawConfig = dict[str, Any]
DEFAULT_NAMESPACE_SIZE = 1 << 30  # a file image's size when none is given


def _default_data_dir() -> str:
    return os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"),
                        "appliance")


def _default_run_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "appliance") if base else f"/tmp/appliance-{os.getuid()}"


class PortMode(enum.StrEnum):
    """How a net port reaches its vhost-user front-end (``net.ports[i].mode``)."""

    SERVER = "server"  # it listens on its socket
    CLIENT = "client"  # it connects to the front-end's socket, and again after a disconnect


# ------------------------------------------------------------------ the typed tree
@dataclass(frozen=True)
class ZonedConfig:
    """``storage.namespaces[i].zoned``: the namespace is zoned (host-managed)."""

    zone_size: int  # bytes, a multiple of block_size dividing the namespace size
    zone_capacity: int | None  # bytes writable per zone; None: zone_size
    max_open: int  # zones open at a time; 0: no limit
    max_active: int  # zones open or closed at a time; 0: no limit


@dataclass(frozen=True)
class NamespaceConfig:
    """``storage.namespaces[i]``: one image served as NSID i + 1."""

    image: str  # a file path, or an NBD URI (see remote)
    size: int  # bytes, a multiple of block_size; 0: the NBD export's size
    block_size: int  # 512 or 4096
    read_only: bool
    grow: bool  # extend an existing image smaller than size (never cut one)
    zoned: ZonedConfig | None = None  # None: a conventional namespace
    metadata: int = 0  # bytes of metadata per block: 0, 8, 16 or 64
    pi: int = 0  # end-to-end protection information type 0-3 (0: none)

    @property
    def remote(self) -> bool:
        """Whether the image is an NBD export (its ``image`` an NBD URI)."""
        return is_nbd_uri(self.image)


@dataclass(frozen=True)
class StorageConfig:
    """``storage``: the vfio-user NVMe controller."""

    socket: str
    io_queues: int
    queue_entries: int
    serial: str
    dma_layout: DmaLayout
    doorbells: DoorbellMode
    max_backlog: int  # unread vfio-user reply bytes before the client is dropped
    namespaces: tuple[NamespaceConfig, ...]
    guest_faults: bool  # the guest may arm faults (OCP Error Injection, Set Features C0h)
    # Namespace Management: the total capacity (TNVMCAP, bytes; None: not offered), the
    # most namespaces at once (NN), a deleted created namespace's image: "keep"/"remove"
    capacity: int | None = None
    max_namespaces: int = 16
    namespace_images: str = "keep"


@dataclass(frozen=True)
class PortConfig:
    """``net.ports[i]``: one vhost-user-net port."""

    socket: str
    mac: str  # lower case
    queues: int  # queue pairs
    mode: PortMode
    pcap: str | None  # None: no capture
    mtu: int


@dataclass(frozen=True)
class ResponderConfig:
    """``net.responder``: the address that answers ARP, ping and UDP echo."""

    ip: str  # address with prefix, e.g. 10.0.2.2/24
    mac: str
    udp_echo_port: int


@dataclass(frozen=True)
class TapConfig:
    """``net.tap``: the host TAP interface on the switch."""

    name: str | None  # None: no TAP interface


@dataclass(frozen=True)
class NetConfig:
    """``net``: the ports, their switch and what stands behind it."""

    ports: tuple[PortConfig, ...]
    responder: ResponderConfig
    tap: TapConfig
    max_backlog: int  # unsent reply bytes per front-end before it is disconnected
    map_unsealed_memory: bool


@dataclass(frozen=True)
class ControlConfig:
    """``control``: the control socket."""

    socket: str
    idle_timeout: int  # seconds


@dataclass(frozen=True)
class Config:
    """The whole configuration, checked, defaults filled in and paths expanded."""

    data_dir: str
    run_dir: str
    trace: bool
    fastpath: bool  # the native data path when it is built (appliance/fastpath.py)
    storage: StorageConfig
    net: NetConfig
    control: ControlConfig

    @classmethod
    def from_dict(cls, raw: Any) -> Config:
        """``raw`` (a YAML file's form) checked like a file: defaults filled in,
        paths expanded.

        Raises:
            ConfigError: an unknown key or a bad value; the message starts with its path.
        """
        return _resolve(raw)

    def to_dict(self) -> RawConfig:
        """The mapping :meth:`from_dict` turns into this configuration again (lists
        for tuples, values for enum members, braces in paths doubled)."""
        out: RawConfig = _raw(SCHEMA, self)
        return out


# ------------------------------------------------------------------ the schema
@dataclass
class Table:
    """A mapping with known keys: key -> (checker or nested schema, default);
    checked, it becomes a ``kind`` (its fields are the keys)."""

    kind: type
    keys: dict[str, tuple[Any, Any]]


@dataclass
class OptionalTable:
    """A table that may be left out (then its value is None)."""

    table: Table


@dataclass
class ListOf:
    item: Table
    default: list[dict[str, Any]] = field(default_factory=list)
    max_items: int = 64


NAMESPACE = Table(NamespaceConfig, {
    "image": (image_source, None),
    "size": (namespace_size, None),  # _required: 1G for a file, 0 (the export's) for NBD
    "block_size": (one_of(512, 4096), 512),
    "read_only": (boolean, False),
    "grow": (boolean, False),
    "metadata": (one_of(0, 8, 16, 64), 0),
    "pi": (integer(0, 3), 0),
    "zoned": (OptionalTable(Table(ZonedConfig, {
        "zone_size": (size, None),
        "zone_capacity": (size, None),
        "max_open": (integer(0, 0xFFFFFFFF), 0),
        "max_active": (integer(0, 0xFFFFFFFF), 0),
    })), None),
})
PORT = Table(PortConfig, {
    "socket": (file_path, None),
    "mac": (mac, None),
    "queues": (integer(1, 8), 1),
    "mode": (member_of(PortMode), "server"),
    "pcap": (file_path, None),
    "mtu": (integer(68, 65535), 1500),  # != 1500: QEMU offers VIRTIO_NET_F_MTU (host_mtu)
})
SCHEMA = Table(Config, {
    "data_dir": (file_path, "{default_data_dir}"),
    "run_dir": (file_path, "{default_run_dir}"),
    "trace": (boolean, False),
    # false: the pure-Python data path even when the native one is built
    "fastpath": (boolean, True),
    "storage": (Table(StorageConfig, {
        "socket": (file_path, "{run_dir}/nvme.sock"),
        "io_queues": (integer(1, 64), 4),
        "queue_entries": (integer(2, 4096), 1024),
        "serial": (text, "APPLIANCE0001"),
        "dma_layout": (member_of(DmaLayout), "spec"),
        "doorbells": (member_of(DoorbellMode), "message"),  # mmap: BAR0 doorbell page as a memfd
        "max_backlog": (size, "1M"),
        "namespaces": (ListOf(NAMESPACE, [{"image": "{data_dir}/disk0.img", "size": "1G"}], 16), None),
        "guest_faults": (boolean, False),
        "capacity": (size, None),  # unset: no Namespace Management
        "max_namespaces": (integer(1, 1024), 16),
        "namespace_images": (one_of("keep", "remove"), "keep"),
    }), None),
    "net": (Table(NetConfig, {
        "ports": (ListOf(PORT, [{"socket": "{run_dir}/net0.sock", "mac": "52:54:00:12:34:56"}], 16), None),
        "responder": (Table(ResponderConfig, {
            "ip": (interface, "10.0.2.2/24"),
            "mac": (mac, "52:54:00:00:02:02"),
            "udp_echo_port": (port, 7),
        }), None),
        "tap": (Table(TapConfig, {"name": (ifname, None)}), None),
        "max_backlog": (size, "1M"),
        # mmap guest memory that could still shrink (DPDK's): fast, but a front-end that
        # shrinks it kills the process (SIGBUS); only for trusted front-ends
        "map_unsealed_memory": (boolean, False),
    }), None),
    "control": (Table(ControlConfig, {"socket": (file_path, "{run_dir}/control.sock"),
                                      "idle_timeout": (integer(1, 86400), 300)}), None),
})


def _apply(schema: Any, value: Any, path: str) -> Any:
    if isinstance(schema, OptionalTable):
        return None if value is None else _apply(schema.table, value, path)
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
            given = value.get(key)
            out[key] = _apply(sub, default if given is None else given, child)  # null: the default
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


def _capacity(storage: dict[str, Any]) -> None:
    """With Namespace Management (``capacity`` set) the configured namespaces fit
    in the capacity and the NSID limit.

    Raises:
        ConfigError: naming ``storage.capacity`` or ``storage.max_namespaces``.
    """
    if storage["capacity"] is None:
        return
    taken = sum(ns["size"] for ns in storage["namespaces"])
    if storage["capacity"] < taken:
        raise ConfigError(f"storage.capacity: must be at least the namespaces' {taken} bytes "
                          f"(got {storage['capacity']})")
    if storage["max_namespaces"] < len(storage["namespaces"]):
        raise ConfigError(f"storage.max_namespaces: must be at least the "
                          f"{len(storage['namespaces'])} configured namespaces")


def _required(checked: dict[str, Any]) -> None:
    """What the keys cannot check alone: required values, a size that fits the
    block size, one socket per path.

    Raises:
        ConfigError: the first problem, naming its key.
    """
    for i, ns in enumerate(checked["storage"]["namespaces"]):
        if ns["image"] is None:
            raise ConfigError(f"storage.namespaces[{i}].image: required")
        if ns["size"] is None:
            ns["size"] = 0 if is_nbd_uri(ns["image"]) else DEFAULT_NAMESPACE_SIZE
        if ns["size"] % ns["block_size"]:
            raise ConfigError(f"storage.namespaces[{i}].size: must be a multiple of block_size")
        if ns["pi"] and ns["metadata"] < 8:
            raise ConfigError(f"storage.namespaces[{i}].pi: protection information needs "
                              f"metadata of at least 8 bytes per block")
        if ns["metadata"] and (ns["zoned"] is not None or is_nbd_uri(ns["image"])):
            raise ConfigError(f"storage.namespaces[{i}].metadata: only for a conventional "
                              f"namespace in an image file (not zoned, not NBD)")
        if ns["zoned"] is not None:
            _zoned(f"storage.namespaces[{i}].zoned", ns["zoned"], ns["size"], ns["block_size"])
    _capacity(checked["storage"])
    for i, p in enumerate(checked["net"]["ports"]):
        for key in ("socket", "mac"):
            if p[key] is None:
                raise ConfigError(f"net.ports[{i}].{key}: required")
    sockets: dict[str, str] = {}
    named = [("storage.socket", checked["storage"]["socket"]),
             ("control.socket", checked["control"]["socket"])]
    named += [(f"net.ports[{i}].socket", p["socket"])
              for i, p in enumerate(checked["net"]["ports"])]
    for key, path in named:
        if path in sockets:
            raise ConfigError(f"{key}: same socket path as {sockets[path]}")
        sockets[path] = key


def _zoned(path: str, zoned: dict[str, Any], size: int, block: int) -> None:
    """A zoned namespace's geometry: whole blocks, whole zones, the limits in order.

    Raises:
        ConfigError: the first problem, naming its key.
    """
    zone = zoned["zone_size"]
    if zone is None:
        raise ConfigError(f"{path}.zone_size: required")
    if zone == 0 or zone % block or size % zone:
        raise ConfigError(f"{path}.zone_size: must be a multiple of block_size ({block}) "
                          f"that divides the namespace size ({size})")
    capacity = zoned["zone_capacity"]
    if capacity is not None and (capacity == 0 or capacity % block or capacity > zone):
        raise ConfigError(f"{path}.zone_capacity: must be a multiple of block_size ({block}) "
                          f"up to zone_size ({zone})")
    if zoned["max_open"] and zoned["max_active"] and zoned["max_open"] > zoned["max_active"]:
        raise ConfigError(f"{path}.max_open: must not exceed max_active ({zoned['max_active']})")


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
    if isinstance(schema, OptionalTable):
        schema = schema.table
    if isinstance(schema, Table) and isinstance(value, dict):
        return {k: _expand(schema.keys[k][0], v, f"{key}.{k}" if key else k, names)
                for k, v in value.items()}
    if isinstance(schema, ListOf) and isinstance(value, list):
        return [_expand(schema.item, v, f"{key}[{i}]", names) for i, v in enumerate(value)]
    if (schema is file_path or schema is image_source) and isinstance(value, str):
        return value if is_nbd_uri(value) else _expand_path(key, value, names)
    return value


def _build(schema: Any, value: Any) -> Any:
    """The checked, expanded ``value`` as ``schema``'s dataclasses (lists as tuples)."""
    if isinstance(schema, OptionalTable):
        return None if value is None else _build(schema.table, value)
    if isinstance(schema, Table):
        return schema.kind(**{k: _build(sub, value[k]) for k, (sub, _) in schema.keys.items()})
    if isinstance(schema, ListOf):
        return tuple(_build(schema.item, v) for v in value)
    return value


def _raw(schema: Any, value: Any) -> Any:
    """``value`` (``schema``'s dataclass) as the mapping that checks back into it."""
    if isinstance(schema, OptionalTable):
        return None if value is None else _raw(schema.table, value)
    if isinstance(schema, Table):
        return {k: _raw(sub, getattr(value, k)) for k, (sub, _) in schema.keys.items()}
    if isinstance(schema, ListOf):
        return [_raw(schema.item, v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if schema is namespace_size and value == 0:
        return None  # the export's size, again
    if (schema is file_path or schema is image_source and not is_nbd_uri(value)) and \
            isinstance(value, str):
        return value.replace("{", "{{").replace("}", "}}")  # expanded again: as it is now
    return value


def _resolve(raw: Any) -> Config:
    """``raw`` checked, defaults filled in, paths expanded, as a :class:`Config`.

    Raises:
        ConfigError: an unknown key or a bad value.
    """
    checked: dict[str, Any] = _apply(SCHEMA, raw, "")
    names = {"default_data_dir": _default_data_dir(), "default_run_dir": _default_run_dir()}
    checked["data_dir"] = _expand_path("data_dir", checked["data_dir"], names)
    checked["run_dir"] = _expand_path("run_dir", checked["run_dir"], names)
    names.update(data_dir=checked["data_dir"], run_dir=checked["run_dir"])
    checked = {k: v if k in ("data_dir", "run_dir") else  # (expanded once, just above)
               _expand(SCHEMA.keys[k][0], v, k, names) for k, v in checked.items()}
    _required(checked)
    cfg: Config = _build(SCHEMA, checked)
    return cfg


def load(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """The validated configuration: defaults, then the file, then ``overrides``
    (top-level keys, each replacing the file's).

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
    return _resolve(raw)
