"""Start-up checks: every path the configuration names, before anything is created (runtime layer).

:func:`check` looks at (and changes nothing of) the data and run
directories, every namespace image and every socket path; the first problem
is a :class:`~appliance.errors.StartupError` whose message starts with the
config key, which ``appliance run`` prints as one line and exits with status
2.  The sockets are claimed for real (and checked again, race-free) when the
services bind them (:mod:`appliance.runtime.listener`); :func:`keyed` names
the key of a path that failed there, or when an image is opened.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from appliance.errors import StartupError
from appliance.runtime.listener import ListenerError, check_parent, check_socket_path


def _mib(n: int) -> str:
    return f"{n} bytes ({n / (1 << 20):g} MiB)"


def socket_keys(cfg: dict[str, Any], standby: bool = False) -> list[tuple[str, str]]:
    """(config key, path) of every socket this process will listen on.

    A standby process's server ports listen nowhere until a handoff brings
    the source's listeners; client ports connect out.
    """
    keys = [("storage.socket", cfg["storage"]["socket"]), ("control.socket", cfg["control"]["socket"])]
    if not standby:
        keys += [(f"net.ports[{i}].socket", p["socket"]) for i, p in enumerate(cfg["net"]["ports"])
                 if p.get("mode", "server") == "server"]
    return keys


def path_keys(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(config key, path) of every path in the configuration."""
    keys = [("data_dir", cfg["data_dir"]), ("run_dir", cfg["run_dir"])]
    keys += [(f"storage.namespaces[{i}].image", ns["image"])
             for i, ns in enumerate(cfg["storage"]["namespaces"])]
    keys += [("storage.socket", cfg["storage"]["socket"]), ("control.socket", cfg["control"]["socket"])]
    for i, p in enumerate(cfg["net"]["ports"]):
        keys.append((f"net.ports[{i}].socket", p["socket"]))
        if p.get("pcap"):
            keys.append((f"net.ports[{i}].pcap", p["pcap"]))
    return keys


def keyed(cfg: dict[str, Any], exc: OSError | ListenerError) -> StartupError:
    """``exc`` as one line that names the key of the path it concerns."""
    where = exc.path if isinstance(exc, ListenerError) else exc.filename
    what = str(exc) if isinstance(exc, ListenerError) else \
        f"cannot open {exc.filename}: {exc.strerror or exc}"
    for key, path in path_keys(cfg):
        if where is not None and os.path.abspath(str(where)) == os.path.abspath(path):
            return StartupError(f"{key}: {what}")
    return StartupError(f"start-up: {what if where is not None else exc}")


def _check_dir(key: str, path: str) -> None:
    try:
        check_parent(path)
        st = os.stat(path)
    except FileNotFoundError:
        return  # created at start
    except ListenerError as exc:
        raise StartupError(f"{key}: {exc}") from None
    except OSError as exc:
        raise StartupError(f"{key}: {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{key}: {path} is not a directory")


def check_image(key: str, ns: dict[str, Any]) -> None:
    """Refuse an image that cannot be served as configured (``key``: ``storage.namespaces[i]``).

    A missing image is fine (created sparse at ``size``).  An existing one must
    be a regular file we may open, of exactly ``size`` bytes; with ``grow:
    true`` a smaller writable one is extended (never one larger: it is not cut).

    Raises:
        StartupError: one line naming ``KEY.image`` or ``KEY.size``.
    """
    image, size = ns["image"], ns["size"]
    try:
        check_parent(image)
        st = os.stat(image)
    except FileNotFoundError:
        return
    except ListenerError as exc:
        raise StartupError(f"{key}.image: {exc}") from None
    except OSError as exc:
        raise StartupError(f"{key}.image: {image}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{key}.image: {image} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise StartupError(f"{key}.image: {image} is not a regular file")
    wanted = os.R_OK if ns.get("read_only") else os.R_OK | os.W_OK
    if not os.access(image, wanted):
        raise StartupError(f"{key}.image: cannot open {image}: Permission denied")
    have = st.st_size
    if have > size:
        raise StartupError(f"{key}.size: {image} is {_mib(have)}, size is {_mib(size)}: "
                           "refusing to serve it cut (set size to the image's)")
    if have < size and not ns.get("grow"):
        raise StartupError(f"{key}.size: {image} is {_mib(have)}, size is {_mib(size)} "
                           "(set grow: true to extend the image, or size to the image's)")
    if have < size and ns.get("read_only"):
        raise StartupError(f"{key}.grow: {image} is {_mib(have)}, size is {_mib(size)}: "
                           "a read-only image is never grown")


def check(cfg: dict[str, Any], standby: bool = False) -> None:
    """Every start-up check, in config order; nothing is created or removed.

    Raises:
        StartupError: the first problem, its message starting with the config key.
    """
    _check_dir("data_dir", cfg["data_dir"])
    _check_dir("run_dir", cfg["run_dir"])
    for i, ns in enumerate(cfg["storage"]["namespaces"]):
        check_image(f"storage.namespaces[{i}]", ns)
    for key, path in socket_keys(cfg, standby):
        try:
            check_socket_path(path)
        except ListenerError as exc:
            raise StartupError(f"{key}: {exc}") from None
    for i, p in enumerate(cfg["net"]["ports"]):
        if p.get("pcap"):
            _check_file(f"net.ports[{i}].pcap", p["pcap"])


def _check_file(key: str, path: str) -> None:
    try:
        check_parent(path)
        st = os.stat(path)
    except FileNotFoundError:
        return
    except ListenerError as exc:
        raise StartupError(f"{key}: {exc}") from None
    except OSError as exc:
        raise StartupError(f"{key}: {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StartupError(f"{key}: {path} is not a regular file")
