"""The native fast path: built, switched off by the environment or the config, and
announced by ``appliance run``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastpath_support import require_native

from appliance import fastpath
from appliance.config import Config, ConfigError
from appliance.testing.process import ApplianceProcess, make_config


def test_the_extension_is_built() -> None:
    """Fails (never skips) where the build is missing: the suite tests what runs."""
    native = require_native()
    assert fastpath.available() and fastpath.module() is native
    for name in ("pop_chains", "drain", "publish"):
        assert callable(getattr(native, name))


def test_enabled_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fastpath.ENV, raising=False)
    native = require_native()
    cfg = Config.from_dict({})
    assert cfg.fastpath is True
    assert fastpath.enabled(cfg) and fastpath.walker(cfg) is native
    assert fastpath.describe(cfg).startswith("native fast path")


def test_environment_switches_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    require_native()
    monkeypatch.setenv(fastpath.ENV, "0")
    assert not fastpath.enabled(Config.from_dict({})) and fastpath.walker() is None
    assert fastpath.describe() == "pure Python (APPLIANCE_FASTPATH=0)"
    monkeypatch.setenv(fastpath.ENV, "1")
    assert fastpath.enabled()


def test_config_switches_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    require_native()
    monkeypatch.delenv(fastpath.ENV, raising=False)
    cfg = Config.from_dict({"fastpath": False})
    assert not fastpath.enabled(cfg) and fastpath.walker(cfg) is None
    assert fastpath.describe(cfg) == "pure Python (fastpath: false in the configuration)"
    assert cfg.to_dict()["fastpath"] is False


def test_config_value_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"^fastpath: must be true or false \(got 'yes'\)"):
        Config.from_dict({"fastpath": "yes"})


@pytest.mark.parametrize(("env", "cfg_value", "line"), [
    ("", True, "native fast path"),
    ("0", True, "pure Python (APPLIANCE_FASTPATH=0)"),
    ("", False, "pure Python (fastpath: false in the configuration)"),
])
def test_run_prints_the_data_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str,
                                  cfg_value: bool, line: str) -> None:
    require_native()
    if env:
        monkeypatch.setenv(fastpath.ENV, env)
    else:
        monkeypatch.delenv(fastpath.ENV, raising=False)
    with ApplianceProcess(make_config(tmp_path, fastpath=cfg_value), tmp_path / "w") as app:
        printed = [text for text in app.stdout_lines if text.startswith("appliance: data path: ")]
    assert len(printed) == 1 and line in printed[0], app.stdout_lines


def test_arguments_that_describe_no_queue_are_refused() -> None:
    """The caller's mistakes (never the guest's) raise; a valid empty ring gives nothing."""
    native = require_native()
    desc, avail, used = (memoryview(bytearray(n)) for n in (16 * 8, 6 + 2 * 8, 6 + 8 * 8))
    region = (0x1000, memoryview(bytearray(0x1000)), True, True)

    def walk(*, d: Any = desc, used_area: Any = used, regions: Any = (region,), size: int = 8,
             last: int = 0) -> Any:
        return native.pop_chains(d, avail, used_area, regions, size, last, 0, True, 100, 100, 4)

    assert walk() == ([], 0, 0, 0, None, None)
    with pytest.raises(ValueError, match="not a power of two"):
        walk(size=6)
    with pytest.raises(ValueError, match="too small"):
        walk(d=desc[:64])
    with pytest.raises(ValueError, match="16 bits"):
        walk(last=0x10000)
    with pytest.raises(BufferError):
        walk(used_area=bytes(70))  # the used ring must be writable
    with pytest.raises(ValueError, match="address order"):
        walk(regions=(region, (0x1800, memoryview(bytearray(16)), True, True)))
    with pytest.raises(TypeError, match="a region is"):
        walk(regions=((0x1000,),))


def test_switch_arguments_that_describe_no_switch_are_refused() -> None:
    """switch_tx's and switch_frames' own arguments: the caller's mistakes raise
    before anything is taken from the ring (a valid empty ring gives nothing)."""
    native = require_native()
    desc, avail, used = (memoryview(bytearray(n)) for n in (16 * 8, 6 + 2 * 8, 6 + 8 * 8))
    region = (0x1000, memoryview(bytearray(0x1000)), True, True)

    def switch(*, hdr_len: int = 12, src: int = 0, table: bytes = b"",
               ports: tuple[Any, ...] = (None,)) -> Any:
        return native.switch_tx(desc, avail, used, (region,), 8, 0, 0, True, 100, 0, 4, hdr_len,
                                True, src, table, ports)

    assert switch()[0] == (0, 0, 0, 0, None, None, 0, 0, 0)
    for hdr_len in (0, 1, 11, 13):  # the transmit ring's virtio-net header is 10 or 12 bytes
        with pytest.raises(ValueError, match="10 or 12"):
            switch(hdr_len=hdr_len)
    with pytest.raises(ValueError, match="source port"):
        switch(src=1)
    with pytest.raises(ValueError, match="8-byte records"):
        switch(table=bytes(7))
    mac_a, mac_b = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")
    assert switch(table=mac_a + b"\x00\x03" + mac_b + b"\xff\x00")[0] is not None
    for table in (mac_b + b"\x00\x00" + mac_a + b"\x00\x00",  # not sorted: lookups miss
                  mac_a + b"\x00\x00" + mac_a + b"\x00\x00",  # twice
                  mac_a + b"\x00\x04"):                         # a state that is no flags
        with pytest.raises(ValueError, match="8-byte records"):
            switch(table=table)
    with pytest.raises(TypeError, match="a port is"):
        switch(ports=(None, bytes(5)))
