"""``appliance top``: rates from two status answers, and a real run without a terminal."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from appliance.cli.top import Sample, render
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.testing.process import ApplianceProcess, make_config


def _status(io: int, rx: int, txb: int, hits: int) -> dict[str, Any]:
    return {
        "nvme": {"state": "ready", "attached": True,
                 "counters": {"commands": {"io.read": io, "admin.identify": 3},
                              "bytes_read": io * 4096, "bytes_written": 0, "errors": 0},
                 "queues": {"sq": {"1": {"size": 64, "head": 2, "tail": 7, "cqid": 1}},
                            "cq": {"1": {"backlog": 1}}}},
        "net": {"ports": {"net0": {"link": "up", "rx_packets": rx, "rx_bytes": rx * 64,
                                   "tx_packets": 0, "tx_bytes": txb, "rx_dropped": 2,
                                   "tx_dropped": 1,
                                   "queues": [{"index": 1, "kind": "tx", "state": "running",
                                               "packets": rx, "dropped": 0}]}}},
        "faults": {"rules": [{"id": 1, "target": "net0", "action": "drop", "hits": hits}],
                   "fired": {"net0.drop": hits}},
    }


def test_rates_are_the_counters_change_per_second() -> None:
    prev = Sample(_status(io=100, rx=1000, txb=0, hits=1), at=10.0)
    cur = Sample(_status(io=2100, rx=501000, txb=0, hits=4), at=12.0)
    text = "\n".join(render(prev, cur, "ctl.sock", "none seen"))
    assert re.search(r"IOPS\s+1\.00 k", text), text               # 2000 I/O in 2 s
    assert re.search(r"read\s+3\.91 MiB/s", text), text           # 1000 * 4 KiB per s
    assert re.search(r"sq1\s+64\s+5\s+1", text), text             # 5 in flight, backlog 1
    net0 = next(line for line in text.splitlines() if line.startswith("net0"))
    assert re.search(r"up\s+250\.00 kpps", net0) and net0.rstrip().endswith(" 3"), net0
    assert "net0.drop 4" in text and "#1 net0 drop hits 4" in text


def test_a_counter_that_went_back_reads_as_zero() -> None:
    prev = Sample(_status(io=500, rx=10, txb=0, hits=0), at=0.0)
    cur = Sample(_status(io=0, rx=0, txb=0, hits=0), at=1.0)
    assert re.search(r"IOPS\s+0 ", "\n".join(render(prev, cur, "s", "-")))


def test_top_without_a_terminal_prints_screens_with_the_io_rate(tmp_path: Path) -> None:
    proc = ApplianceProcess(make_config(tmp_path), tmp_path)
    with proc, VfioUserClient.connect(proc.config.storage.socket) as client:
        driver = NvmeDriver(client)
        driver.setup(io_queues=1, depth=16)
        top = subprocess.Popen([sys.executable, "-m", "appliance", "top", "-s",
                                proc.config.control.socket, "--count", "3",
                                "--interval", "0.3"], stdout=subprocess.PIPE, text=True)
        done = threading.Event()

        def load() -> None:
            lba = 0
            while not done.is_set():
                driver.write(1, lba % 1024, b"w" * 512)
                lba += 1

        worker = threading.Thread(target=load)
        worker.start()
        try:
            out, _ = top.communicate(timeout=30)
        finally:
            done.set()
            worker.join(10)
            driver.close()
    assert top.returncode == 0
    assert "\x1b[" not in out  # no escapes without a terminal
    screens = [s for s in out.split("appliance top ") if s]
    assert len(screens) == 3, out
    rates = [float(m.group(1)) * (1000 if m.group(2) == "k" else 1)
             for m in re.finditer(r"IOPS\s+([\d.]+) (k?)", out)]
    assert max(rates) > 0, out
    assert "migration RUNNING" in out  # the connected client's vfio-user migration state
