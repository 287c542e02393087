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

from appliance.config import Config, NamespaceConfig, PortMode
from appliance.errors import StartupError
from appliance.runtime.listener import ListenerError, check_parent, check_socket_path
from appliance.runtime.nbd import NbdExport


def _mib(n: int) -> str:
    return f"{n} bytes ({n / (1 << 20):g} MiB)"


def socket_keys(cfg: Config, *, listening: bool = False,
                standby: bool = False) -> list[tuple[str, str]]:
    """(config key, path) of every socket.

    ``listening``: only those this process will listen on: not client-mode
    ports (they connect out), nor, in a ``standby`` process, server ports
    (they listen nowhere until a handoff brings the source's listeners).
    """
    keys = [("storage.socket", cfg.storage.socket), ("control.socket", cfg.control.socket)]
    for i, p in enumerate(cfg.net.ports):
        if not listening or (not standby and p.mode is PortMode.SERVER):
            keys.append((f"net.ports[{i}].socket", p.socket))
    return keys


def path_keys(cfg: Config) -> list[tuple[str, str]]:
    """(config key, path) of every path in the configuration."""
    keys = [("data_dir", cfg.data_dir), ("run_dir", cfg.run_dir)]
    keys += [(f"storage.namespaces[{i}].image", ns.image)
             for i, ns in enumerate(cfg.storage.namespaces) if not ns.remote]
    keys += socket_keys(cfg)
    keys += [(f"net.ports[{i}].pcap", p.pcap) for i, p in enumerate(cfg.net.ports) if p.pcap]
    return keys


def keyed(cfg: Config, exc: OSError | ListenerError) -> StartupError:
    """``exc`` as one line that names the key of the path it concerns
    (``start-up:`` when no configured path is concerned)."""
    if isinstance(exc, ListenerError):
        where, what = exc.path, str(exc)
    elif exc.filename is not None:
        where, what = exc.filename, f"cannot open {exc.filename}: {exc.strerror or exc}"
    else:
        return StartupError(f"start-up: {exc}")
    for key, path in path_keys(cfg):
        if os.path.abspath(str(where)) == os.path.abspath(path):
            return StartupError(f"{key}: {what}")
    return StartupError(f"start-up: {what}")


def _stat(key: str, path: str) -> os.stat_result | None:
    """``path``'s status, None when it does not exist (yet).

    Raises:
        StartupError: it lies below something that is not a directory, or
            cannot be looked at.
    """
    try:
        check_parent(path)
        return os.stat(path)
    except FileNotFoundError:
        return None
    except ListenerError as exc:
        raise StartupError(f"{key}: {exc}") from None
    except OSError as exc:
        raise StartupError(f"{key}: {path}: {exc.strerror}") from None


def check_image(key: str, ns: NamespaceConfig) -> None:
    """Refuse an image that cannot be served as configured (``key``: ``storage.namespaces[i]``).

    A missing image is fine (created sparse at ``size``).  An existing one must
    be a regular file we may open, of exactly ``size`` bytes; with ``grow:
    true`` a smaller writable one is extended (never one larger: it is not cut).

    Raises:
        StartupError: one line naming ``KEY.image`` or ``KEY.size``.
    """
    image, size = ns.image, ns.size
    st = _stat(f"{key}.image", image)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{key}.image: {image} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise StartupError(f"{key}.image: {image} is not a regular file")
    wanted = os.R_OK if ns.read_only else os.R_OK | os.W_OK
    if not os.access(image, wanted):
        raise StartupError(f"{key}.image: cannot open {image}: Permission denied")
    have = st.st_size
    if have > size:
        raise StartupError(f"{key}.size: {image} is {_mib(have)}, size is {_mib(size)}: "
                           "refusing to serve it cut (set size to the image's)")
    if have < size and not ns.grow:
        raise StartupError(f"{key}.size: {image} is {_mib(have)}, size is {_mib(size)} "
                           "(set grow: true to extend the image, or size to the image's)")
    if have < size and ns.read_only:
        raise StartupError(f"{key}.grow: {image} is {_mib(have)}, size is {_mib(size)}: "
                           "a read-only image is never grown")


def check(cfg: Config, standby: bool = False) -> None:
    """Every start-up check, in config order; nothing is created or removed.

    Raises:
        StartupError: the first problem, its message starting with the config key.
    """
    for key, path in (("data_dir", cfg.data_dir), ("run_dir", cfg.run_dir)):
        st = _stat(key, path)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise StartupError(f"{key}: {path} is not a directory")
    for i, ns in enumerate(cfg.storage.namespaces):
        if not ns.remote:  # an export is checked when it is connected (connect_exports)
            check_image(f"storage.namespaces[{i}]", ns)
    for key, path in socket_keys(cfg, listening=True, standby=standby):
        try:
            check_socket_path(path)
        except ListenerError as exc:
            raise StartupError(f"{key}: {exc}") from None
    for i, p in enumerate(cfg.net.ports):
        st = _stat(f"net.ports[{i}].pcap", p.pcap) if p.pcap else None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise StartupError(f"net.ports[{i}].pcap: {p.pcap} is not a regular file")


def missing_images(cfg: Config) -> list[tuple[str, int]]:
    """(path, size) of the images that do not exist yet (start-up creates them)."""
    return [(ns.image, ns.size) for ns in cfg.storage.namespaces
            if not ns.remote and not os.path.lexists(ns.image)]


def remove_new_images(created: list[tuple[str, int]]) -> None:
    """After a failed start: remove the images it created, if they are still
    as created (a regular file of that size without a block written)."""
    for path, size in created:
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_blocks == 0:
                os.unlink(path)
        except OSError:
            pass


def make_dirs(cfg: Config) -> None:
    """Create what is missing of the data and run directories (mode 0700), the
    directories of the images and of the sockets (0700).

    Raises:
        StartupError: one cannot be created; the message names its key.
    """
    dirs = [("run_dir", cfg.run_dir, 0o700), ("data_dir", cfg.data_dir, 0o700)]
    dirs += [(f"storage.namespaces[{i}].image", os.path.dirname(os.path.abspath(ns.image)), 0o777)
             for i, ns in enumerate(cfg.storage.namespaces) if not ns.remote]
    dirs += [(key, os.path.dirname(os.path.abspath(path)), 0o700) for key, path in socket_keys(cfg)]
    for key, path, mode in dirs:
        try:
            os.makedirs(path, mode=mode, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"{key}: cannot create {path}: {exc.strerror or exc}") from None


def connect_exports(cfg: Config) -> dict[int, NbdExport]:
    """Connect every NBD-backed namespace's export (by NSID) and check it fits.

    A configured ``size`` must be the export's; the export's minimum block
    size must divide ``block_size``; a read-only export is served read-only.

    Raises:
        StartupError: one line naming ``storage.namespaces[i].image`` (cannot
            connect, refused) or ``.size`` / ``.block_size``; nothing stays
            connected then.
    """
    exports: dict[int, NbdExport] = {}
    try:
        for i, ns in enumerate(cfg.storage.namespaces):
            if not ns.remote:
                continue
            key = f"storage.namespaces[{i}]"
            try:
                export = exports[i + 1] = NbdExport(ns.image)
            except OSError as exc:
                raise StartupError(f"{key}.image: {ns.image}: {exc.strerror or exc}") from None
            if ns.size and ns.size != export.size:
                raise StartupError(f"{key}.size: the export is {_mib(export.size)}, size is "
                                   f"{_mib(ns.size)} (leave size out to take the export's)")
            if export.size < ns.block_size or ns.block_size % export.block_size:
                raise StartupError(f"{key}.block_size: {ns.block_size} does not fit the export "
                                   f"({_mib(export.size)}, minimum block size "
                                   f"{export.block_size})")
    except BaseException:
        for export in exports.values():
            export.close()
        raise
    return exports
