"""The health check every hostile-peer case ends with (tests/conformance/test_hostile_*.py).

A :class:`HostileTarget` is a real ``appliance run`` with the NVMe device, two
vhost-user-net ports (``p0`` for hostile front-ends, ``p1`` for the
well-behaved handshake) and the control socket.  After a hostile peer did its
worst, :meth:`HostileTarget.assert_healthy` checks what the issue asks of
every case:

* the process is alive and its log holds no traceback;
* its open fds are back to the baseline taken before the case, and its RSS is
  within 64 MiB of the baseline;
* well-behaved peers are served, each within 100 ms: ``appliance ctl status``
  (the control socket), a fresh vhost-user handshake on ``p1`` (GET_FEATURES
  answered) and a fresh vfio-user client (VERSION answered, then NVMe identify
  and a verified write/read).  The vfio-user device takes one client at a
  time: a case whose hostile peer holds that connection passes
  ``vfio_user=False`` while the peer is connected, and checks it again after.

Waiting is by deadline on an observable condition (fds closed, a reply
arrived), never a fixed sleep.
"""

from __future__ import annotations

import os
import random
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.config import Config
from appliance.net import vhost_wire as vw
from appliance.runtime.control import ControlClient
from appliance.testing.process import ApplianceProcess, make_config

SERVED_WITHIN = 0.100  # seconds: a well-behaved peer's first reply
RSS_SLACK = 64 << 20
SETTLE = 5.0  # seconds to wait for fds to close after a hostile peer left


def wait_until(cond: Callable[[], bool], timeout: float = SETTLE) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passes (select() as the pause)."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        select.select([], [], [], 0.005)


class HostileTarget:
    """A running appliance with a baseline, for hostile-peer cases."""

    def __init__(self, tmp: Path, **overrides: Any) -> None:
        run = tmp / "run"
        ports = [{"socket": str(run / "p0.sock"), "mac": "52:54:00:00:00:10"},
                 {"socket": str(run / "p1.sock"), "mac": "52:54:00:00:00:11"}]
        self.proc = ApplianceProcess(make_config(tmp, net={"ports": ports}, **overrides), tmp / "proc")
        #: the paths the health checks use (the appliance's own, unless a case redirects them)
        self.config: Config = self.proc.config
        self.base_fds = 0
        self.base_rss = 0

    # ------------------------------------------------------------ paths
    @property
    def nvme_sock(self) -> str:
        return self.config.storage.socket

    @property
    def control_sock(self) -> str:
        return self.config.control.socket

    def port_sock(self, name: str) -> str:
        """The socket of port ``p0`` or ``p1``."""
        return str(Path(self.config.run_dir) / f"{name}.sock")

    # ------------------------------------------------------------ life
    def start(self) -> HostileTarget:
        self.proc.start()
        self.check_control()  # warm every path once, then take the baseline
        self.check_vhost("p1")
        settled = self.fds()
        self.check_nvme()
        # the vfio-user client's fds close a loop pass after it left: wait for that
        assert wait_until(lambda: self.fds() <= settled), self.open_fds()
        self.baseline()
        return self

    def stop(self) -> int:
        return self.proc.stop()

    def __enter__(self) -> HostileTarget:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def baseline(self) -> None:
        self.base_fds, self.base_rss = self.fds(), self.rss()

    # ------------------------------------------------------------ checks
    def assert_healthy(self, *, vfio_user: bool = True, peer_fds: int = 0) -> None:
        """The whole post-case check (see the module docstring).

        ``peer_fds``: fds a hostile peer that is still connected legitimately
        makes the appliance hold (its accepted socket, say); the count must
        come back to the baseline plus that many.  ``vfio_user=False`` skips
        the vfio-user client and the fd count (the peer holds the device).
        """
        assert self.proc.alive, f"appliance died: {self.proc.log_text()}"
        self.assert_served(vfio_user=vfio_user)
        if vfio_user:  # else the hostile vfio-user peer still holds its fds
            limit = self.base_fds + peer_fds
            ok = wait_until(lambda: self.fds() <= limit)
            assert ok, f"fds {self.fds()} > baseline {limit}: {self.open_fds()}"
        grown = self.rss() - self.base_rss
        assert grown < RSS_SLACK, f"RSS grew by {grown >> 20} MiB"
        log = self.proc.log_path.read_text(errors="replace")  # the whole log, not its tail
        assert "Traceback" not in log, log[-4000:]

    def open_fds(self) -> list[str]:
        out = []
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{self.pid}/fd/{name}"))
            except OSError:
                pass
        return sorted(out)

    def assert_served(self, *, vfio_user: bool = True) -> None:
        self.check_control()
        self.check_vhost("p1")
        if vfio_user:
            self.check_nvme()

    def check_control(self) -> None:
        t0 = time.monotonic()
        with ControlClient(self.control_sock, timeout=5.0) as ctl:
            status = ctl("status")
        took = time.monotonic() - t0
        assert isinstance(status, dict)
        assert took < SERVED_WITHIN, f"control status took {took * 1e3:.1f} ms"

    def check_vhost(self, port: str) -> None:
        """A fresh front-end's GET_FEATURES is answered in time."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            t0 = time.monotonic()
            s.connect(self.port_sock(port))
            s.sendall(vw.Header(request=vw.Request.GET_FEATURES, flags=vw.VERSION).pack())
            reply = b""
            while len(reply) < vw.HEADER_SIZE + 8:
                chunk = s.recv(64)
                assert chunk, f"port {port} closed the handshake"
                reply += chunk
            took = time.monotonic() - t0
        head = vw.Header.unpack(reply[:vw.HEADER_SIZE])
        assert head.request == vw.Request.GET_FEATURES and head.size == 8
        assert took < SERVED_WITHIN, f"vhost-user GET_FEATURES took {took * 1e3:.1f} ms"

    def check_nvme(self) -> None:
        """A fresh vfio-user client: VERSION in time, identify, a verified write/read."""
        deadline = time.monotonic() + SETTLE  # the previous client's close may be in flight
        while True:
            t0 = time.monotonic()
            client = VfioUserClient.connect(self.nvme_sock, negotiate=False, timeout=5.0)
            try:
                client.negotiate({})
            except OSError:
                client.close()
                if time.monotonic() > deadline:
                    raise
                continue
            break
        took = time.monotonic() - t0
        with client:
            assert took < SERVED_WITHIN, f"vfio-user VERSION took {took * 1e3:.1f} ms"
            driver = NvmeDriver(client)
            try:
                driver.setup(io_queues=1, depth=16)
                assert driver.identity is not None
                data = random.Random(self.pid).randbytes(8192)
                driver.write(1, 100, data)
                assert driver.read(1, 100, len(data) // 512) == data
            finally:
                driver.close()
