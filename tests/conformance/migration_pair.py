"""Two real appliance processes for the migration tests: a source whose image
holds random data and a destination whose image holds other data, both
stopped (and their logs checked for tracebacks) when the test ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from appliance.testing.process import ApplianceProcess
from appliance.testing.workload import make_image, pair_configs


def running_pair(tmp_path: Path, size: int) -> Iterator[tuple[ApplianceProcess, ApplianceProcess]]:
    """Yields (source, destination); a fixture's body (``yield from``)."""
    src_cfg, dst_cfg = pair_configs(tmp_path, size)
    # Holes travel as ZEROES records without being read: the random data sets how
    # many full reads (and load steps between them) round 0 takes.
    make_image(tmp_path / "src" / "data" / "disk0.img", size, seed=1, random_mib=24)
    make_image(tmp_path / "dst" / "data" / "disk0.img", size, seed=2, random_mib=4, fill=9)
    src = ApplianceProcess(src_cfg, tmp_path / "src" / "proc").start()
    dst = ApplianceProcess(dst_cfg, tmp_path / "dst" / "proc").start()
    try:
        yield src, dst
    finally:
        for p in (src, dst):
            p.stop()
        assert "Traceback" not in src.log_text() + dst.log_text()


def image(p: ApplianceProcess) -> str:
    return p.config.storage.namespaces[0].image


def sock(p: ApplianceProcess) -> str:
    return p.config.storage.socket
