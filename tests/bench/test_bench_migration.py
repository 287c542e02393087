"""Migration data path and live handoff, timed by pytest-benchmark.

* MIG_DATA throughput: a full-copy migration (``appliance.client.migrate``,
  no load, no pre-copy round) of a namespace of :data:`SIZE` random bytes; ``extra_info`` has the stream's MiB/s of the best round.
* Handoff pause: ``handoff`` on the source's control socket to a fresh
  destination with no client attached; ``extra_info`` has the pause the
  source measured (ms, best round).

Each round starts a fresh source and destination (pytest-benchmark's
``setup``), so the rounds are few.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.client import migrate as orch
from appliance.client.vfio_user import VfioUserClient
from appliance.runtime.control_client import ControlClient
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.workload import make_image, pair_configs

MiB = 1 << 20
SIZE = 32 * MiB
ROUNDS = 3


@pytest.fixture
def procs() -> Iterator[list[ApplianceProcess]]:
    """Every appliance the rounds started, stopped at teardown."""
    started: list[ApplianceProcess] = []
    try:
        yield started
    finally:
        for p in started:
            p.stop()


def test_mig_data_throughput(benchmark: Any, tmp_path: Path,
                             procs: list[ApplianceProcess]) -> None:
    stats: list[orch.Summary] = []

    def setup() -> tuple[tuple[VfioUserClient, VfioUserClient], dict[str, Any]]:
        root = tmp_path / f"round{len(stats)}-{len(procs)}"
        src_cfg, dst_cfg = pair_configs(root, SIZE)
        image = root / "src" / "data" / "disk0.img"
        image.parent.mkdir(parents=True)
        image.write_bytes(os.urandom(SIZE))  # all of it random: nothing to skip
        for cfg, name in ((src_cfg, "src"), (dst_cfg, "dst")):
            procs.append(ApplianceProcess(cfg, root / name / "proc").start())
        src = VfioUserClient.connect(procs[-2].config.storage.socket)
        dst = VfioUserClient.connect(procs[-1].config.storage.socket)
        return (src, dst), {"converge_bytes": SIZE, "max_rounds": 0}

    def run(src: VfioUserClient, dst: VfioUserClient, **kw: Any) -> None:
        try:
            stats.append(orch.migrate(src, dst, **kw))
        finally:
            src.close()
            dst.close()

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    best = max(s.bytes / s.seconds for s in stats)
    assert all(s.bytes >= SIZE for s in stats)
    benchmark.extra_info["mib_per_s"] = round(best / MiB, 1)
    benchmark.extra_info["stream_mib"] = round(stats[0].bytes / MiB, 1)


def test_handoff_pause(benchmark: Any, tmp_path: Path, procs: list[ApplianceProcess]) -> None:
    pauses: list[float] = []
    image = tmp_path / "disk0.img"
    make_image(image, SIZE, seed=1, random_mib=4)

    def start(name: str) -> ApplianceProcess:
        root = tmp_path / name
        cfg = make_config(root, storage={"namespaces": [{"image": str(image),
                                                         "size": f"{SIZE >> 20}M"}]})
        procs.append(ApplianceProcess(cfg, root / "proc").start())
        return procs[-1]

    def setup() -> tuple[tuple[str, str], dict[str, Any]]:
        n = len(procs)
        src, dst = start(f"s{n}"), start(f"d{n}")
        return (src.config.control.socket, dst.config.control.socket), {}

    def handoff(source: str, to: str) -> None:
        with ControlClient(source, timeout=120) as client:
            pauses.append(float(client("handoff", to=to)["pause_ms"]))

    benchmark.pedantic(handoff, setup=setup, rounds=ROUNDS)
    assert len(pauses) == ROUNDS
    benchmark.extra_info["pause_ms"] = round(min(pauses), 2)
