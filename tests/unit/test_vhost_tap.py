"""The TAP port: frames between a (fake) kernel interface and the switch.

The kernel side is one end of a SOCK_SEQPACKET socketpair, which keeps frame
boundaries as a TAP fd does; the real /dev/net/tun is exercised by
tests/integration/test_net_tap.py.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import config
from appliance.config import NetConfig, TapConfig
from appliance.errors import ApplianceError, ConfigError
from appliance.runtime.loop import EventLoop
from appliance.runtime.tap import open_tap
from appliance.runtime.vhost_user import NetService

HOST_MAC = bytes.fromhex("020000aabbcc")
RESP_MAC = bytes.fromhex("525400000202")


def net_cfg(name: str | None = "aptest0") -> NetConfig:
    return config.load(overrides={"net": {"ports": [], "tap": {"name": name}}}).net


def pump(loop: EventLoop, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        loop.run_once(0.01)


def arp_request(target: bytes) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, HOST_MAC, bytes([10, 0, 2, 1]),
                      b"\0" * 6, target)
    return b"\xff" * 6 + HOST_MAC + b"\x08\x06" + arp + b"\0" * 18


@pytest.fixture
def kernel() -> Iterator[tuple[socket.socket, Callable[[str], int]]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    names: list[str] = []

    def opener(name: str) -> int:
        names.append(name)
        fd = os.dup(ours.fileno())
        os.set_blocking(fd, False)
        return fd

    yield theirs, opener
    assert names == ["aptest0"]
    ours.close()
    theirs.close()


def test_arp_through_the_switch_to_the_responder(kernel: Any) -> None:
    host, opener = kernel
    loop = EventLoop()
    svc = NetService(loop, net_cfg(), tap_opener=opener)
    try:
        host.send(arp_request(bytes([10, 0, 2, 2])))
        host.setblocking(False)
        got: list[bytes] = []

        def replied() -> bool:
            try:
                got.append(host.recv(65536))
            except BlockingIOError:
                return False
            return True

        pump(loop, replied)
        reply = got[0]
        assert reply[0:6] == HOST_MAC and reply[6:12] == RESP_MAC and reply[12:14] == b"\x08\x06"
        st = svc.stats()["tap"]
        assert st["interface"] == "aptest0"
        assert st["rx_packets"] == 1 and st["rx_bytes"] == 60
        assert st["tx_packets"] == 1 and st["tx_dropped"] == 0
        assert svc.switch.lookup(HOST_MAC) is svc.tap.port  # type: ignore[union-attr]
    finally:
        svc.close()
        loop.close()


def test_full_kernel_queue_drops_and_counts(kernel: Any) -> None:
    host, opener = kernel
    loop = EventLoop()
    svc = NetService(loop, net_cfg(), tap_opener=opener)
    try:
        assert svc.tap is not None
        port = svc.tap.port
        frame = b"\xff" * 6 + RESP_MAC + b"\x88\xb5" + bytes(1000)
        for _ in range(10_000):  # nobody reads the host end: the queue fills up
            port.deliver(frame)
            if port.counters["tx_dropped"]:
                break
        c = port.counters
        assert c["tx_dropped"] == 1 and c["tx_packets"] > 0
        assert c["tx_bytes"] == 1014 * c["tx_packets"]
        host.setblocking(False)
        assert len(host.recv(65536)) == 1014  # what was written arrived whole
    finally:
        svc.close()
        loop.close()


def test_runt_from_the_kernel_is_dropped(kernel: Any) -> None:
    host, opener = kernel
    loop = EventLoop()
    svc = NetService(loop, net_cfg(), tap_opener=opener)
    try:
        host.send(b"\x01\x02\x03")
        pump(loop, lambda: svc.stats()["tap"]["rx_dropped"] == 1)
        assert svc.switch.counters["frames"] == 0
    finally:
        svc.close()
        loop.close()


def test_open_errors_name_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(ApplianceError, match=r"^net\.tap\.name: cannot create TAP interface "
                                             r"'x0': .*/missing: No such file"):
        open_tap("x0", str(tmp_path / "missing"))
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    with pytest.raises(ApplianceError, match=r"^net\.tap\.name: .*TUNSETIFF: "):
        open_tap("x0", str(plain))  # not a tun device: the ioctl fails


def test_net_service_without_tap_opens_nothing() -> None:
    loop = EventLoop()

    def opener(name: str) -> int:
        raise AssertionError("no TAP configured")

    svc = NetService(loop, net_cfg(None), tap_opener=opener)
    assert svc.tap is None and "tap" not in svc.stats()
    svc.close()
    loop.close()


@pytest.mark.parametrize("bad", ["", "a" * 16, "a/b", "a b", "eth:0", 5])
def test_config_rejects_bad_interface_names(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"^net\.tap\.name: must be an interface name"):
        config.load(None, {"net": {"tap": {"name": bad}}})


def test_config_tap_default_and_value() -> None:
    assert config.load(None).net.tap == TapConfig(name=None)
    assert config.load(None, {"net": {"tap": {"name": "aptap1"}}}).net.tap.name == "aptap1"
