"""``appliance run`` logs at INFO into RUN_DIR/appliance.log; --log-format json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.control import events as ev
from appliance.runtime.control import _event_level
from appliance.runtime.logs import JsonFormatter
from appliance.testing.process import ApplianceProcess, make_config


def test_json_formatter_writes_one_object_per_record() -> None:
    rec = logging.LogRecord("appliance.x", logging.INFO, __file__, 1, "hello %s", ("a",), None)
    out = json.loads(JsonFormatter().format(rec))
    assert (out["level"], out["logger"], out["message"]) == ("INFO", "appliance.x", "hello a")
    assert out["ts"].endswith("Z")


def test_fault_fired_is_logged_at_info_on_first_hit_and_powers_of_ten() -> None:
    info = [h for h in range(1, 1001) if _event_level(ev.FAULT_FIRED, {"hits": h}) == logging.INFO]
    assert info == [1, 10, 100, 1000]
    assert _event_level(ev.LINK_STATE, {"port": "net0", "link": "up"}) == logging.INFO


def _run_and_connect(tmp_path: Path, *extra: str) -> str:
    proc = ApplianceProcess(make_config(tmp_path), tmp_path, extra_args=extra)
    with proc:
        assert any(line.startswith("appliance: log: ") for line in proc.stdout_lines)
        with VfioUserClient.connect(proc.config.storage.socket) as client:
            driver = NvmeDriver(client)
            driver.setup(io_queues=1, depth=16)
            driver.close()
    return (tmp_path / "run" / "appliance.log").read_text()


def test_run_logs_connections_at_info_into_the_run_dir(tmp_path: Path) -> None:
    text = _run_and_connect(tmp_path)
    assert "appliance.vfio_user INFO nvme: client connected on" in text
    assert 'INFO event CLIENT_DISCONNECTED {"device": "nvme"' in text
    assert "INFO nvme: I/O CQ 1 created: 16 entries, vector 1" in text
    assert "INFO nvme: I/O SQ 1 created: 16 entries, CQ 1" in text
    # stderr (the process's own log) keeps only warnings
    assert "client connected" not in (tmp_path / "appliance.log").read_text()


def test_log_format_json(tmp_path: Path) -> None:
    text = _run_and_connect(tmp_path, "--log-format", "json")
    records = [json.loads(line) for line in text.splitlines()]
    assert any("client connected" in r["message"] and r["level"] == "INFO" for r in records)
