"""Regression found by fuzzing the migration stream (tests/fuzz/fuzz_migration.py):
a controller state whose temperature thresholds hold only some of their keys
was accepted, after which Get Features and the SMART log completed with
Internal Error.  Both thresholds must come, or the state is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_nvme_driver import make_controller

from appliance.errors import LocalProtocolError
from appliance.storage.admin import smart_log
from appliance.storage.controller_state import CtrlStateHead, FirmwareState, KeyValue
from appliance.storage.migration import NvmeMigratable
from appliance.storage.spec import AdminOpcode, FeatureId
from appliance.testing.nvme import controller_driver
from appliance.vfio_user.migration_stream import (
    DeviceKind,
    Record,
    RecordType,
    device_state,
    parse_device_state,
)


def saved(tmp_path: Path) -> list[Record]:
    (tmp_path / "src").mkdir()
    src = make_controller(tmp_path / "src")
    try:
        d = controller_driver(src).ready(io_queues=1)
        d.admin_command(AdminOpcode.SET_FEATURES, cdw10=FeatureId.TEMPERATURE_THRESHOLD, cdw11=330)
        mig = NvmeMigratable(src)
        mig.migration_stop()
        return mig.save_state()
    finally:
        src.close()


def with_thresholds(records: list[Record], keep: dict[int, int]) -> list[Record]:
    """The records with the controller state's thresholds replaced by ``keep``."""
    out = []
    for record in records:
        if record.type == RecordType.DEVICE_STATE:
            _, _, blob = parse_device_state(record)
            head = CtrlStateHead.unpack(blob)
            # (no uncorrectable ranges or zones here; the firmware slots come last)
            tail = head.n_tler * KeyValue.SIZE + head.n_no_coalescing * 4 + FirmwareState.SIZE
            start = len(blob) - tail - head.n_thresholds * KeyValue.SIZE
            pairs = b"".join(KeyValue(key=k, value=v).pack() for k, v in keep.items())
            blob = (head.replace(n_thresholds=len(keep)).pack() + blob[CtrlStateHead.SIZE:start]
                    + pairs + blob[len(blob) - tail:])
            record = device_state(DeviceKind.NVME_CONTROLLER, blob)
        out.append(record)
    return out


@pytest.mark.parametrize("keep", [{0: 330}, {1: 0}, {}, {0: 330, 1: 0, 2: 5}])
def test_thresholds_missing_a_key_are_refused(tmp_path: Path, keep: dict[int, int]) -> None:
    records = with_thresholds(saved(tmp_path), keep)
    (tmp_path / "dst").mkdir()
    dst = make_controller(tmp_path / "dst")
    mig = NvmeMigratable(dst)
    with pytest.raises(LocalProtocolError, match="temperature thresholds"):
        mig.load_records(records)
        mig.commit_restore()
    mig.abort_restore()
    dst.close()


def test_thresholds_in_any_order_restore_over_and_under(tmp_path: Path) -> None:
    records = with_thresholds(saved(tmp_path), {1: 10, 0: 330})  # under first
    (tmp_path / "dst").mkdir()
    dst = make_controller(tmp_path / "dst")
    mig = NvmeMigratable(dst)
    mig.load_records(records)
    mig.commit_restore()
    assert dst.features.thresholds == {0: 330, 1: 10}
    assert dst.features.get(FeatureId.TEMPERATURE_THRESHOLD, 0, 0) == 330
    assert dst.features.get(FeatureId.TEMPERATURE_THRESHOLD, 1 << 20, 0) == 10
    assert smart_log(dst)[0] == 0  # the sensor is between under and over: no warning
    dst.close()
