"""pytest plugin: appliances, NVMe drivers, guests and control clients as fixtures.

Registered as the ``appliance`` pytest11 entry point (``pyproject.toml``), so a
project that installs this package gets the fixtures without a conftest; or
load it explicitly with ``-p appliance.testing.plugin``.  docs/fixture.md is
the guide; in short:

Options (``pytest --help``, group *appliance*; each has an ini key of the same
name with ``_`` for ``-``, the command line wins):

* ``--appliance-qemu-env DIR`` -- the QEMU environment (else
  ``$APPLIANCE_QEMU_ENV``, else ``~/.cache/appliance/qemu-env``).
* ``--appliance-keep`` -- keep the directories (images, config, logs) of
  passed tests too; by default only a failed test's stay.
* ``--appliance-log-level LEVEL`` -- ``appliance run --log-level`` (info).
* ``--appliance-report-lines N`` -- log and console lines in a failure report (60).

Fixtures (everything they start is stopped at teardown, also on failure):

* ``appliance`` -- an :class:`~appliance.testing.process.ApplianceProcess`
  (a real ``appliance run``) on the test's temporary directory, configured by
  ``@pytest.mark.appliance_config(**overrides)`` or an indirect
  parametrisation (keys of :func:`~appliance.testing.process.make_config`).
* ``appliance_ctl`` -- a :class:`~appliance.runtime.control_client.ControlClient`
  on its control socket: ``appliance_ctl("fault-add", action="hang")``.
* ``appliance_nvme_driver`` -- an :class:`~appliance.client.nvme.NvmeDriver`
  over vfio-user, set up (2 I/O queues of 64 entries).  ``nvme_driver`` is
  its deprecated alias (warns :class:`ApplianceDeprecationWarning`).
* ``appliance_guest`` -- a booted QEMU guest attached to ``appliance``
  (``@pytest.mark.appliance_guest(append=, smp=, net=, wait_nvme=, image=,
  args=)``); ``guest.run("cmd") -> (output, rc)``.
* ``appliance_factory`` / ``appliance_guest_factory`` -- several appliances
  (``appliance_factory(**overrides)``) and guests
  (``appliance_guest_factory(proc, **guest_options)``) in one test.
* ``appliance_shared`` / ``appliance_guest_shared`` (with
  ``appliance_shared_ctl``) -- one appliance and one guest for a whole module
  (``--appliance-shared-scope session``: the whole session), reset before each
  test: fault rules cleared, the guest's page cache dropped, a dead guest
  booted again.

Errors a test may see: :class:`~appliance.control.protocol.ControlError`
(``.code``, ``.message``: the appliance refused a control command),
:class:`~appliance.client.nvme.NvmeError` (``.status``, ``.dnr``: an NVMe
command failed), ``TimeoutError`` (a guest command, an event or the appliance's
start took too long), ``RuntimeError`` (the appliance exited at start-up, its
log in the message), :class:`~appliance.testing.qemu_environment.QemuUnavailable` (no QEMU
environment: guest tests skip, or fail with ``APPLIANCE_REQUIRE_INTEGRATION=1``).

When a test fails, its report has sections with each appliance's log tail,
its fault list and each guest's console tail (:mod:`appliance.testing.report`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from appliance.testing import report
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.report import GUEST_KEY

__all__ = ["GUEST_KEY", "REPORT_TAIL_LINES", "ApplianceDeprecationWarning"]

#: Console and log lines in a failure report (``--appliance-report-lines``).
REPORT_TAIL_LINES = 60

WAIT_NVME = ("for i in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done; "
             "[ -b /dev/nvme0n1 ]")
#: what a shared guest runs before each test: flush and forget cached blocks
GUEST_RESET = "sync; echo 3 > /proc/sys/vm/drop_caches"
#: the ``appliance_guest`` marker's options and their defaults
GUEST_DEFAULTS: dict[str, Any] = {"append": "", "smp": 1, "net": True, "wait_nvme": True,
                                  "image": "busybox", "args": ()}

OPTIONS: tuple[tuple[str, Literal["string", "bool"], Any, str], ...] = (
    # (name, kind, default, help); the ini key is the name with "_"
    ("appliance-qemu-env", "string", None,
     ("the QEMU environment directory (default $APPLIANCE_QEMU_ENV, "
      "else ~/.cache/appliance/qemu-env)")),
    ("appliance-keep", "bool", False,
     ("keep the appliance and guest directories of passed tests too (default: only "
      "a failed test's)")),
    ("appliance-log-level", "string", "info",
     "the appliances' --log-level: debug, info, warning or error (default info)"),
    ("appliance-report-lines", "string", str(REPORT_TAIL_LINES),
     "log and console lines in a failed test's report (default 60)"),
    ("appliance-shared-scope", "string", "module",
     "the scope of appliance_shared and appliance_guest_shared: module or session"),
)


class ApplianceDeprecationWarning(DeprecationWarning):
    """A fixture name or option of this plugin that a later release removes."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("appliance", "appliance fixtures (appliance.testing.plugin)")
    for name, kind, default, text in OPTIONS:
        dest = name.replace("-", "_")
        if kind == "bool":
            group.addoption(f"--{name}", action="store_true", default=None, dest=dest, help=text)
        else:
            group.addoption(f"--{name}", default=None, dest=dest, help=text)
        parser.addini(dest, text, type=kind, default=default)


def option(config: pytest.Config, name: str) -> Any:
    """The value of one of :data:`OPTIONS`: the command line's, else the ini file's."""
    dest = name.replace("-", "_")
    value = config.getoption(dest)
    return config.getini(dest) if value is None else value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "appliance_config(**overrides): configuration of the `appliance` fixture")
    config.addinivalue_line(
        "markers", "appliance_guest(append='', smp=1, net=True, wait_nvme=True, "
                   "image='busybox', args=()): how the `appliance_guest` fixture boots")
    env = option(config, "appliance-qemu-env")
    if env:
        from appliance.testing.qemu_environment import ENV_VAR

        os.environ[ENV_VAR] = str(Path(env).expanduser().resolve())
    level = option(config, "appliance-log-level")
    if level not in ("debug", "info", "warning", "error"):
        raise pytest.UsageError(f"--appliance-log-level: debug, info, warning or error, "
                                f"not {level!r}")
    if option(config, "appliance-shared-scope") not in ("module", "session"):
        raise pytest.UsageError("--appliance-shared-scope: module or session")


def _overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    marker = request.node.get_closest_marker("appliance_config")
    if marker is not None:
        overrides.update(*marker.args, **marker.kwargs)
    param = getattr(request, "param", None)
    if isinstance(param, dict):
        overrides.update(param)
    return overrides


def _guest_options(request: pytest.FixtureRequest, **given: Any) -> dict[str, Any]:
    opts = dict(GUEST_DEFAULTS)
    marker = request.node.get_closest_marker("appliance_guest")
    if marker is not None:
        opts.update(marker.kwargs)
    opts.update(given)
    unknown = set(opts) - set(GUEST_DEFAULTS)
    if unknown:
        raise pytest.UsageError(f"appliance_guest: unknown options {sorted(unknown)}")
    return opts


def _start_appliance(config: pytest.Config, root: Path, overrides: dict[str, Any]
                     ) -> ApplianceProcess:
    """An appliance on ``root`` with ``overrides`` (``trace_log=True``: ``--trace``),
    started; stopped again if it fails to start."""
    overrides = dict(overrides)
    trace = bool(overrides.pop("trace_log", False))
    proc = ApplianceProcess(make_config(root, **overrides), root, trace=trace,
                            log_level=None if trace else option(config, "appliance-log-level"))
    try:
        proc.start()
    except BaseException:
        proc.stop()
        raise
    return proc


def _boot_guest(appliance: ApplianceProcess, opts: dict[str, Any], workdir: Path,
                name: str) -> Any:
    """A started guest attached to ``appliance`` (killed again if booting fails).

    Raises:
        pytest.UsageError: an unknown image.
        AssertionError: the guest has no /dev/nvme0n1 (with ``wait_nvme``).
    """
    from appliance.testing.qemu import Guest, qemu_args
    from appliance.testing.qemu_environment import qemu_env

    env = qemu_env()
    cfg = appliance.config
    args = qemu_args(cfg, net=bool(opts["net"]) and bool(cfg.net.ports))
    # the Guest brings its own memory backend: keep only the devices
    devices = [*args[args.index("-device"):], *opts["args"]]
    if opts["image"] == "debian":
        from appliance.testing.debian import debian_guest, debian_image

        guest = debian_guest(env, debian_image(env), workdir, args=devices,
                             append=str(opts["append"]), smp=int(opts["smp"]), name=name)
    elif opts["image"] == "busybox":
        guest = Guest(env, workdir, args=devices, append=f"qe.shell {opts['append']}".strip(),
                      smp=int(opts["smp"]), name=name)
    else:
        raise pytest.UsageError(f"appliance_guest: image must be busybox or debian, "
                                f"not {opts['image']!r}")
    try:
        guest.start()
        if opts["wait_nvme"]:
            _, rc = guest.run(WAIT_NVME, timeout=180)
            assert rc == 0, f"no /dev/nvme0n1 in the guest:\n{guest.tail()}"
    except BaseException:
        guest.kill()
        raise
    return guest


#: the longest file name the appliance puts in its run directory (a socket's lock)
LONGEST_RUN_FILE = "control.sock.lock"


def _short_root(root: Path) -> Path:
    """``root``, or when a socket path under it would pass the 107 bytes a unix
    socket allows (a long test name, xdist's worker directory), a short
    directory in /tmp that ``root`` links to."""
    from appliance.runtime.listener import MAX_PATH

    if len(os.fsencode(root / "run" / LONGEST_RUN_FILE)) <= MAX_PATH:
        return root
    short = Path(tempfile.mkdtemp(prefix="appliance-", dir="/tmp"))
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(short, target_is_directory=True)
    return short


def _passed(request: pytest.FixtureRequest) -> bool:
    reps = [getattr(request.node, f"rep_{when}", None) for when in ("setup", "call")]
    return all(r is not None and r.passed for r in reps)


def _tidy(request: pytest.FixtureRequest, root: Path) -> None:
    """Remove ``root`` after a passed test unless ``--appliance-keep``."""
    if _passed(request) and not option(request.config, "appliance-keep"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def _appliance_maker(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> Iterator[Callable[..., ApplianceProcess]]:
    # the factory behind `appliance_factory` and `appliance`, under a name a
    # project's own conftest does not override
    procs: list[ApplianceProcess] = []
    links: list[Path] = []  # tmp_path/NAME -> a short root in /tmp

    def make(name: str | None = None, **overrides: Any) -> ApplianceProcess:
        wanted = tmp_path / (name or f"appliance{len(procs) or ''}")
        root = _short_root(wanted)
        if root != wanted:
            links.append(wanted)
        proc = _start_appliance(request.config, root, overrides)
        procs.append(proc)
        report.track(request.node, proc)
        return proc

    try:
        yield make
    finally:
        for proc in procs:
            proc.stop()
        for proc in procs:
            _tidy(request, proc.workdir)
        for link in links:
            if not link.exists():  # its short root was removed
                link.unlink()


@pytest.fixture
def appliance_factory(_appliance_maker: Callable[..., ApplianceProcess]
                      ) -> Callable[..., ApplianceProcess]:
    """``appliance_factory(name=None, **overrides) -> ApplianceProcess``: started
    appliances, each in its own directory (``tmp_path/NAME``), all stopped at teardown."""
    return _appliance_maker


@pytest.fixture
def appliance(request: pytest.FixtureRequest,
              _appliance_maker: Callable[..., ApplianceProcess]) -> ApplianceProcess:
    """A running appliance (``appliance run``) with the marker's / param's config."""
    return _appliance_maker(**_overrides(request))


@pytest.fixture
def appliance_ctl(appliance: ApplianceProcess) -> Iterator[Any]:
    """A QMP client of ``appliance``'s control socket: ``appliance_ctl(cmd, **args)``."""
    from appliance.runtime.control_client import ControlClient

    with ControlClient(appliance.config.control.socket) as client:
        yield client


@pytest.fixture
def appliance_nvme_driver(appliance: ApplianceProcess) -> Iterator[Any]:
    """An NvmeDriver on ``appliance``'s NVMe socket, enabled, with 2 I/O queues."""
    from appliance.client.nvme import NvmeDriver
    from appliance.client.vfio_user import VfioUserClient

    with VfioUserClient.connect(appliance.config.storage.socket) as client:
        driver = NvmeDriver(client)
        try:
            driver.setup(io_queues=2, depth=64)
            yield driver
        finally:
            driver.close()


@pytest.fixture
def nvme_driver(appliance_nvme_driver: Any) -> Any:
    """Deprecated: ``appliance_nvme_driver`` (the same driver)."""
    warnings.warn("the nvme_driver fixture is now appliance_nvme_driver; the old name goes "
                  "in a later release", ApplianceDeprecationWarning, stacklevel=2)
    return appliance_nvme_driver


@pytest.fixture
def _appliance_guest_maker(request: pytest.FixtureRequest, tmp_path: Path
                           ) -> Iterator[Callable[..., Any]]:
    # the factory behind `appliance_guest_factory` and `appliance_guest`
    guests: list[Any] = []

    def make(proc: ApplianceProcess, **given: Any) -> Any:
        name = f"guest{len(guests) or ''}"
        guest = _boot_guest(proc, _guest_options(request, **given), tmp_path, name)
        guests.append(guest)
        report.track(request.node, guest)
        return guest

    try:
        yield make
    finally:
        for guest in guests:
            guest.kill()


@pytest.fixture
def appliance_guest_factory(_appliance_guest_maker: Callable[..., Any]) -> Callable[..., Any]:
    """``appliance_guest_factory(proc, **options) -> Guest``: guests attached to
    appliances (options as the ``appliance_guest`` marker's), killed at teardown."""
    return _appliance_guest_maker


@pytest.fixture
def appliance_guest(request: pytest.FixtureRequest, appliance: ApplianceProcess,
                    _appliance_guest_maker: Callable[..., Any]) -> Any:
    """A QEMU guest attached to ``appliance`` (NVMe, and net ports unless net=False)."""
    return _appliance_guest_maker(appliance)


def _shared_scope(fixture_name: str, config: pytest.Config) -> Any:
    return option(config, "appliance-shared-scope")


class _Shared:
    """The appliance and guest one module (or the session) shares."""

    def __init__(self, request: pytest.FixtureRequest, root: Path) -> None:
        self.request = request
        self.root = root
        self.proc: ApplianceProcess | None = None
        self.guest: Any = None
        self.boots = 0

    def appliance(self) -> ApplianceProcess:
        if self.proc is None or not self.proc.alive:
            if self.proc is not None:
                self.proc.stop()
            self.proc = _start_appliance(self.request.config,
                                         _short_root(self.root / "appliance"),
                                         _overrides(self.request))
        return self.proc

    def guest_for(self) -> Any:
        proc = self.appliance()
        if self.guest is None or self.guest.returncode is not None:
            if self.guest is not None:
                self.guest.kill()
            self.boots += 1
            self.guest = _boot_guest(proc, _guest_options(self.request), self.root,
                                     f"guest-boot{self.boots}")
        return self.guest

    def reset(self) -> None:
        """Clear the fault rules (counters stay)."""
        from appliance.runtime.control_client import ControlClient

        assert self.proc is not None
        with ControlClient(self.proc.config.control.socket) as client:
            client("fault-clear")

    def close(self) -> None:
        if self.guest is not None:
            self.guest.kill()
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture(scope=_shared_scope)
def _appliance_shared_state(request: pytest.FixtureRequest,
                            tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Shared]:
    shared = _Shared(request, tmp_path_factory.mktemp("shared"))
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture
def appliance_shared(request: pytest.FixtureRequest,
                     _appliance_shared_state: _Shared) -> ApplianceProcess:
    """The module's (or session's) appliance, its fault rules cleared; config from
    the module's ``pytestmark`` ``appliance_config`` marker."""
    proc = _appliance_shared_state.appliance()
    _appliance_shared_state.reset()
    report.track(request.node, proc)
    return proc


@pytest.fixture
def appliance_shared_ctl(appliance_shared: ApplianceProcess) -> Iterator[Any]:
    """A QMP client of ``appliance_shared``'s control socket."""
    from appliance.runtime.control_client import ControlClient

    with ControlClient(appliance_shared.config.control.socket) as client:
        yield client


@pytest.fixture
def appliance_guest_shared(request: pytest.FixtureRequest, appliance_shared: ApplianceProcess,
                           _appliance_shared_state: _Shared) -> Any:
    """The module's (or session's) guest on ``appliance_shared``: booted again if
    it died, its page cache dropped before each test."""
    guest = _appliance_shared_state.guest_for()
    report.track(request.node, guest)
    _, rc = guest.run(GUEST_RESET, timeout=60)
    assert rc == 0, f"the shared guest did not reset:\n{guest.tail()}"
    return guest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed and rep.when in ("setup", "call"):
        config = getattr(item, "config", None)
        lines = (REPORT_TAIL_LINES if config is None
                 else int(option(config, "appliance-report-lines")))
        rep.sections.extend(report.sections(item, lines))
    return rep
