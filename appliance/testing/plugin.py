"""pytest plugin: an appliance, a driver, a guest and a control client as fixtures.

Registered as the ``appliance`` pytest11 entry point (``pyproject.toml``), so a
project that installs this package gets the fixtures without a conftest; or
load it explicitly with ``-p appliance.testing.plugin``.  See docs/fixture.md.

Fixtures (function scope; everything they start is stopped at teardown, also
when the test fails):

* ``appliance`` -- an :class:`~appliance.testing.process.ApplianceProcess`
  (a real ``appliance run`` subprocess) on a temporary directory.  Config
  overrides come from ``@pytest.mark.appliance_config(**overrides)`` or from
  an indirect parametrisation (``@pytest.mark.parametrize("appliance",
  [{...}], indirect=True)``); keys are those of
  :func:`~appliance.testing.process.make_config`.
* ``appliance_ctl`` -- a :class:`~appliance.runtime.control.ControlClient`
  on its control socket: ``appliance_ctl("fault.add", action="hang")``.
* ``nvme_driver`` -- an :class:`~appliance.client.nvme.NvmeDriver`
  connected over vfio-user, set up (2 I/O queues of 64 entries).
* ``appliance_guest`` -- a booted QEMU guest (TCG, kernel 6.1, busybox shell)
  attached to the appliance's NVMe controller and net ports, ready when its
  ``/dev/nvme0n1`` exists.  ``guest.run("cmd") -> (output, rc)``.
  Kernel arguments and vCPUs come from ``@pytest.mark.appliance_guest(append=,
  smp=, net=, wait_nvme=)``; ``image="debian"`` boots the Debian guest (bash,
  fio, nvme-cli, mkfs of ext4/xfs/btrfs/f2fs; :mod:`appliance.testing.debian`)
  instead of busybox, and ``args=[...]`` adds QEMU options (another disk).
  When a test using it fails, the guest's last console lines are a section of
  the report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.testing.process import ApplianceProcess, make_config

#: Where the ``appliance_guest`` fixture keeps its guest for the failure report.
GUEST_KEY = pytest.StashKey[Any]()
#: Console lines in the failure report.
REPORT_TAIL_LINES = 60

WAIT_NVME = ("for i in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done; "
             "[ -b /dev/nvme0n1 ]")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "appliance_config(**overrides): configuration of the `appliance` fixture")
    config.addinivalue_line(
        "markers", "appliance_guest(append='', smp=1, net=True, wait_nvme=True, "
                   "image='busybox', args=()): "
                   "how the `appliance_guest` fixture boots")


def _overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    marker = request.node.get_closest_marker("appliance_config")
    if marker is not None:
        overrides.update(*marker.args, **marker.kwargs)
    param = getattr(request, "param", None)
    if isinstance(param, dict):
        overrides.update(param)
    return overrides


@pytest.fixture
def appliance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApplianceProcess]:
    """A running appliance (``appliance run``) with the marker's / param's config."""
    overrides = _overrides(request)
    trace = bool(overrides.pop("trace_log", False))
    root = tmp_path / "appliance"
    proc = ApplianceProcess(make_config(root, **overrides), root, trace=trace)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"appliance log: {proc.log_path}")


@pytest.fixture
def appliance_ctl(appliance: ApplianceProcess) -> Iterator[Any]:
    """A control-socket client of ``appliance``: ``appliance_ctl(cmd, **args) -> result``."""
    from appliance.runtime.control import ControlClient

    client = ControlClient(appliance.config.control.socket)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def nvme_driver(appliance: ApplianceProcess) -> Iterator[Any]:
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
def appliance_guest(request: pytest.FixtureRequest, appliance: ApplianceProcess,
                    tmp_path: Path) -> Iterator[Any]:
    """A QEMU guest attached to ``appliance`` (NVMe, and net ports unless net=False)."""
    from appliance.testing.qemu import Guest, qemu_args, qemu_env

    opts: dict[str, Any] = {"append": "", "smp": 1, "net": True, "wait_nvme": True,
                            "image": "busybox", "args": ()}
    marker = request.node.get_closest_marker("appliance_guest")
    if marker is not None:
        opts.update(marker.kwargs)
    env = qemu_env()
    cfg = appliance.config
    args = qemu_args(cfg, net=bool(opts["net"]) and bool(cfg.net.ports))
    # the Guest brings its own memory backend: keep only the devices
    devices = [*args[args.index("-device"):], *opts["args"]]
    if opts["image"] == "debian":
        from appliance.testing.debian import debian_guest, debian_image

        guest = debian_guest(env, debian_image(env), tmp_path, args=devices,
                             append=str(opts["append"]), smp=int(opts["smp"]), name="guest")
    elif opts["image"] == "busybox":
        guest = Guest(env, tmp_path, args=devices, append=f"qe.shell {opts['append']}".strip(),
                      smp=int(opts["smp"]), name="guest")
    else:
        raise pytest.UsageError(f"appliance_guest: image must be busybox or debian, "
                                f"not {opts['image']!r}")
    request.node.stash[GUEST_KEY] = guest
    try:
        guest.start()
        if opts["wait_nvme"]:
            _, rc = guest.run(WAIT_NVME, timeout=180)
            assert rc == 0, f"no /dev/nvme0n1 in the guest:\n{guest.tail()}"
        yield guest
    finally:
        guest.kill()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"guest console log: {guest.log_path}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    guest = item.stash.get(GUEST_KEY, None)
    if rep.failed and guest is not None and guest.proc is not None:
        title = f"guest console (last {REPORT_TAIL_LINES} lines, log {guest.log_path})"
        rep.sections.append((title, guest.tail(REPORT_TAIL_LINES)))
    return rep
