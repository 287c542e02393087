"""Socket churn leaks nothing: 1,000 connect/disconnect cycles on each socket
kind of a real ``appliance run`` (control, vfio-user, vhost-user), each kind
followed by :meth:`hostile.HostileTarget.assert_healthy` (fds back to the
baseline, RSS flat, well-behaved peers served)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from hostile import HostileTarget, wait_until

from appliance.client.vfio_user import VfioUserClient
from appliance.net import vhost_wire as vw
from appliance.runtime.control import ControlClient

CYCLES = 1000
WARM_UP = 100  # cycles before the RSS reference is taken (allocator pools fill up)
RSS_FLAT = 8 << 20  # growth allowed over the remaining cycles


def churn(target: HostileTarget, cycle: Callable[[], None]) -> None:
    """``CYCLES`` cycles; fds and RSS after the warm-up and at the end stay level.

    (The fd reference may count the one connection still being closed: a
    leak of one fd per cycle would show as hundreds.)
    """
    t0 = time.monotonic()
    for i in range(CYCLES):
        if i == WARM_UP:
            rss, fds = target.rss(), target.fds()
        cycle()
    assert wait_until(lambda: target.fds() <= fds), f"fds {target.fds()} > {fds} after churn"
    grown = target.rss() - rss
    assert grown < RSS_FLAT, f"RSS grew by {grown >> 10} KiB over {CYCLES - WARM_UP} cycles"
    assert time.monotonic() - t0 < 60
    target.assert_healthy()


def test_control_connect_request_close(target: HostileTarget) -> None:
    def cycle() -> None:
        with ControlClient(target.control_sock, timeout=5.0) as ctl:
            assert "return" in ctl.request("fault.list")

    churn(target, cycle)


def test_vfio_user_connect_version_close(target: HostileTarget) -> None:
    def cycle() -> None:
        with VfioUserClient.connect(target.nvme_sock, negotiate=False, timeout=5.0) as client:
            client.negotiate({})

    churn(target, cycle)


def test_vhost_user_connect_get_features_close(target: HostileTarget) -> None:
    get_features = vw.Header(request=vw.Request.GET_FEATURES, flags=vw.VERSION).pack()

    def cycle() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(target.port_sock("p0"))
            s.sendall(get_features)
            reply = b""
            while len(reply) < vw.HEADER_SIZE + 8:
                chunk = s.recv(64)
                assert chunk, "port p0 closed the handshake"
                reply += chunk
        assert vw.Header.unpack(reply[:vw.HEADER_SIZE]).request == vw.Request.GET_FEATURES

    churn(target, cycle)
