"""Zoned namespaces through the one driver on an in-process controller: Identify
for the Zoned Namespace command set, the zone state machine, write pointer
rules, Zone Append, zone reports, the open/active limits."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.config import Config, ConfigError, NamespaceConfig, ZonedConfig
from appliance.errors import LocalProtocolError
from appliance.storage import NvmeController
from appliance.storage.controller_state import (
    STATE_VERSION,
    CtrlStateHead,
    FirmwareState,
    ZoneEntry,
    decode_controller,
    encode_controller,
)
from appliance.storage.identify_spec import NsIdDescriptor
from appliance.storage.migration import NvmeMigratable
from appliance.storage.spec import CC, Cns, Command, CommandError, IoOpcode, LogPage, Reg, Status
from appliance.storage.zns_spec import (
    IdentifyControllerZoned,
    IdentifyNamespaceZoned,
    ZoneReportFilter,
    ZoneSendAction,
)
from appliance.storage.zones import (
    NO_WRITE_POINTER,
    TRANSITIONS,
    ZoneEvent,
    ZoneRecord,
    ZoneState,
    ZoneTable,
)
from appliance.testing.nvme import controller_driver
from tests.unit.test_nvme_driver import status

ST, ZSA, ZS = Status, ZoneSendAction, ZoneState
ZONE = 64  # blocks of 512 bytes per zone
CAP = 48  # writable blocks per zone
ZONES = 16


def zoned_controller(tmp_path: Path, max_open: int = 0, max_active: int = 0,
                     capacity: int = CAP) -> NvmeController:
    zoned = ZonedConfig(zone_size=ZONE * 512, zone_capacity=capacity * 512, max_open=max_open,
                        max_active=max_active)
    return NvmeController([
        NamespaceConfig(image=str(tmp_path / "zns.img"), size=ZONES * ZONE * 512, block_size=512,
                        read_only=False, grow=False, zoned=zoned),
        NamespaceConfig(image=str(tmp_path / "nvm.img"), size=1 << 20, block_size=512,
                        read_only=False, grow=False),
    ])


@pytest.fixture
def drv(tmp_path: Path) -> Iterator[NvmeDriver]:
    ctrl = zoned_controller(tmp_path)
    d = controller_driver(ctrl)
    d.setup(io_queues=1)
    d.identify_namespace(1)
    d.identify_namespace(2)
    yield d
    ctrl.close()


def limited(tmp_path: Path, max_open: int, max_active: int) -> NvmeDriver:
    d = controller_driver(zoned_controller(tmp_path, max_open, max_active))
    d.setup(io_queues=1)
    d.identify_namespace(1)
    return d


def ok(done: object) -> None:
    assert status(done) == (ST.SUCCESS, False)  # type: ignore[arg-type]


def write(d: NvmeDriver, lba: int, nlb: int = 1, nsid: int = 1, fill: int = 0xA5) -> object:
    done, _ = d.io(IoOpcode.WRITE, lba, nlb, nsid=nsid, data=bytes([fill]) * (nlb * 512))
    return done


def states(d: NvmeDriver, count: int = ZONES) -> list[tuple[ZoneState, int]]:
    _, zones = d.report_zones(1, count=count)
    return [(ZoneState(z.zs >> 4), z.wp) for z in zones]


# ---------------------------------------------------------------- identify
def test_identify_the_zoned_command_set(drv: NvmeDriver) -> None:
    done, data = drv.identify(Cns.NS_ID_DESCRIPTORS, 1)
    ok(done)
    csi = NsIdDescriptor.unpack(data, 4 + 16)
    assert (csi.nidt, csi.nidl, data[24]) == (4, 1, 2)
    assert drv.identify(Cns.NS_ID_DESCRIPTORS, 2)[1][24] == 0  # the NVM namespace
    done, data = drv.identify(Cns.CSI_NAMESPACE, 1, cdw11=2 << 24)
    ok(done)
    zns = IdentifyNamespaceZoned.unpack(data)
    assert (zns.zoc, zns.ozcs, zns.mar, zns.mor) == (0, 0, 0xFFFFFFFF, 0xFFFFFFFF)
    assert zns.lbafe0_zsze == ZONE and zns.lbafe0_zdes == 0
    done, data = drv.identify(Cns.CSI_CONTROLLER, cdw11=2 << 24)
    ok(done)
    assert IdentifyControllerZoned.unpack(data).zasl == 0


def test_identify_reports_the_limits(tmp_path: Path) -> None:
    d = limited(tmp_path, max_open=2, max_active=3)
    zns = IdentifyNamespaceZoned.unpack(d.identify(Cns.CSI_NAMESPACE, 1, cdw11=2 << 24)[1])
    assert (zns.mor, zns.mar) == (1, 2)  # 0-based


def test_effects_log_per_command_set(drv: NvmeDriver) -> None:
    done, page = drv.log_page(LogPage.COMMANDS_EFFECTS, 4096, cdw14=2 << 24)
    ok(done)
    io = struct.unpack_from("<256I", page, 1024)
    assert io[IoOpcode.ZONE_MGMT_SEND] == 0b11 and io[IoOpcode.ZONE_APPEND] == 0b11
    assert io[IoOpcode.ZONE_MGMT_RECV] == 1 and io[IoOpcode.WRITE] == 0b11
    _, page = drv.log_page(LogPage.COMMANDS_EFFECTS, 4096)  # CSI 0: NVM
    assert struct.unpack_from("<256I", page, 1024)[IoOpcode.ZONE_APPEND] == 0
    done, _ = drv.log_page(LogPage.COMMANDS_EFFECTS, 4096, cdw14=3 << 24)
    assert status(done) == (ST.INVALID_FIELD, True)


def test_zoned_opcodes_only_on_zoned_namespaces(drv: NvmeDriver) -> None:
    done = drv.zone_mgmt_send(2, 0, ZSA.OPEN)
    assert status(done) == (ST.INVALID_OPCODE, True)
    done = drv.zone_append(2, 0, bytes(512))
    assert status(done) == (ST.INVALID_OPCODE, True)


# ---------------------------------------------------------------- writes and the write pointer
def test_sequential_writes_move_the_write_pointer(drv: NvmeDriver) -> None:
    ok(write(drv, 0, 8))
    assert states(drv, 2) == [(ZS.IMPLICITLY_OPENED, 8), (ZS.EMPTY, ZONE)]
    assert status(write(drv, 4)) == (ST.ZONE_INVALID_WRITE, True)
    assert status(write(drv, 9)) == (ST.ZONE_INVALID_WRITE, True)
    assert status(write(drv, 8, CAP)) == (ST.ZONE_BOUNDARY_ERROR, True)
    ok(write(drv, 8, CAP - 8))
    assert states(drv, 1) == [(ZS.FULL, NO_WRITE_POINTER)]
    assert status(write(drv, CAP)) == (ST.ZONE_IS_FULL, True)
    assert drv.read(1, 0, 8) == b"\xa5" * 4096


def test_write_zeroes_and_copy_follow_the_zone_rules(drv: NvmeDriver) -> None:
    ok(write(drv, 0, 4))
    done = drv.blocks_command(IoOpcode.WRITE_ZEROES, 1, 2, 2)
    assert status(done) == (ST.ZONE_INVALID_WRITE, True)
    ok(drv.blocks_command(IoOpcode.WRITE_ZEROES, 1, 4, 4))
    ok(drv.copy(1, 8, [(0, 4)]))
    assert states(drv, 1) == [(ZS.IMPLICITLY_OPENED, 12)]
    assert status(drv.copy(1, 0, [(0, 4)])) == (ST.ZONE_INVALID_WRITE, True)
    assert drv.read(1, 8, 4) == b"\xa5" * 2048


def test_reads_stay_inside_a_zone(drv: NvmeDriver) -> None:
    done, _ = drv.io(IoOpcode.READ, ZONE - 1, 2, nsid=1)
    assert status(done) == (ST.ZONE_BOUNDARY_ERROR, True)
    done, data = drv.io(IoOpcode.READ, ZONE, 4, nsid=1)  # unwritten: zeroes
    ok(done)
    assert data == bytes(2048)
    done = drv.blocks_command(IoOpcode.VERIFY, 1, ZONE - 1, 2)
    assert status(done) == (ST.ZONE_BOUNDARY_ERROR, True)


def test_zone_append_returns_the_lba(drv: NvmeDriver) -> None:
    done = drv.zone_append(1, ZONE, b"\x11" * 1024)
    ok(done)
    assert done.result == ZONE  # type: ignore[attr-defined]
    done = drv.zone_append(1, ZONE, b"\x22" * 512, cdw12=1 << 30)  # FUA
    ok(done)
    assert done.result == ZONE + 2  # type: ignore[attr-defined]
    assert drv.read(1, ZONE, 3) == b"\x11" * 1024 + b"\x22" * 512
    assert status(drv.zone_append(1, ZONE + 1, bytes(512))) == (ST.INVALID_FIELD, True)
    assert status(drv.zone_append(1, ZONES * ZONE, bytes(512))) == (ST.LBA_OUT_OF_RANGE, True)
    assert status(drv.zone_append(1, 0, bytes(512), cdw12=1 << 16)) == (ST.INVALID_FIELD, True)
    ok(drv.zone_mgmt_send(1, ZONE, ZSA.FINISH))
    assert status(drv.zone_append(1, ZONE, bytes(512))) == (ST.ZONE_IS_FULL, True)
    assert status(drv.zone_append(1, 0, bytes(512 * (CAP + 1)))) == (ST.ZONE_BOUNDARY_ERROR, True)


def test_zone_append_past_4g_blocks_uses_dword_1() -> None:
    from appliance.client.nvme_queues import Completion
    assert Completion(cid=0, status=0, dnr=False, dw0=5, dw1=1).result == (1 << 32) | 5


# ---------------------------------------------------------------- zone management
def test_open_close_finish_reset(drv: NvmeDriver) -> None:
    ok(drv.zone_mgmt_send(1, 0, ZSA.OPEN))
    ok(drv.zone_mgmt_send(1, 0, ZSA.OPEN))  # already open: nothing to do
    ok(write(drv, 0, 2))
    assert states(drv, 1) == [(ZS.EXPLICITLY_OPENED, 2)]  # a write keeps it explicit
    ok(drv.zone_mgmt_send(1, 0, ZSA.CLOSE))
    assert states(drv, 1) == [(ZS.CLOSED, 2)]
    ok(write(drv, 2))
    assert states(drv, 1) == [(ZS.IMPLICITLY_OPENED, 3)]
    ok(drv.zone_mgmt_send(1, 0, ZSA.FINISH))
    assert states(drv, 1) == [(ZS.FULL, NO_WRITE_POINTER)]
    ok(drv.zone_mgmt_send(1, 0, ZSA.RESET))
    assert states(drv, 1) == [(ZS.EMPTY, 0)]
    assert drv.read(1, 0, 3) == bytes(1536)  # a reset zone reads as zeroes
    ok(write(drv, 0))


def test_transitions_the_table_lacks(drv: NvmeDriver) -> None:
    bad = ST.INVALID_ZONE_STATE_TRANSITION
    assert status(drv.zone_mgmt_send(1, 0, ZSA.CLOSE)) == (bad, True)  # Empty
    assert status(drv.zone_mgmt_send(1, 0, ZSA.OFFLINE)) == (bad, True)
    ok(drv.zone_mgmt_send(1, 0, ZSA.FINISH))
    assert status(drv.zone_mgmt_send(1, 0, ZSA.OPEN)) == (bad, True)  # Full
    assert status(drv.zone_mgmt_send(1, 0, ZSA.CLOSE)) == (bad, True)
    assert status(drv.zone_mgmt_send(1, 1, ZSA.RESET)) == (ST.INVALID_FIELD, True)
    assert status(drv.zone_mgmt_send(1, ZONES * ZONE, ZSA.RESET)) == (ST.LBA_OUT_OF_RANGE, True)
    assert status(drv.zone_mgmt_send(1, 0, 0x10)) == (ST.INVALID_FIELD, True)  # no extensions
    assert status(drv.zone_mgmt_send(1, 0, 0x06)) == (ST.INVALID_FIELD, True)
    assert status(drv.zone_mgmt_send(1, 0, ZSA.RESET, cdw13=1 << 9)) == (ST.INVALID_FIELD, True)
    assert status(drv.zone_mgmt_send(1, 0, ZSA.RESET, cdw12=1)) == (ST.INVALID_FIELD, True)


def test_read_only_and_offline_zones(drv: NvmeDriver) -> None:
    ok(write(drv, ZONE, 2))
    drv.bus.ctrl.zones[1].make_read_only(1)  # type: ignore[attr-defined]
    assert status(write(drv, ZONE + 2)) == (ST.ZONE_IS_READ_ONLY, True)
    ok(drv.io(IoOpcode.READ, ZONE, 2, nsid=1)[0])
    ok(drv.zone_mgmt_send(0 + 1, 0, ZSA.OFFLINE, select_all=True))
    assert states(drv, 2)[1] == (ZS.OFFLINE, NO_WRITE_POINTER)
    assert status(drv.io(IoOpcode.READ, ZONE, 2, nsid=1)[0]) == (ST.ZONE_IS_OFFLINE, True)
    assert status(write(drv, ZONE + 2)) == (ST.ZONE_IS_OFFLINE, True)
    assert status(drv.zone_mgmt_send(1, ZONE, ZSA.RESET)) == (
        ST.INVALID_ZONE_STATE_TRANSITION, True)


def test_select_all(drv: NvmeDriver) -> None:
    for zone in (0, 1, 2):
        ok(write(drv, zone * ZONE, 1))
    ok(drv.zone_mgmt_send(1, 0, ZSA.CLOSE, select_all=True))
    assert [s for s, _ in states(drv, 4)] == [ZS.CLOSED] * 3 + [ZS.EMPTY]
    ok(drv.zone_mgmt_send(1, 0, ZSA.OPEN, select_all=True))
    assert [s for s, _ in states(drv, 4)] == [ZS.EXPLICITLY_OPENED] * 3 + [ZS.EMPTY]
    ok(drv.zone_mgmt_send(1, 12345, ZSA.FINISH, select_all=True))  # SLBA ignored
    assert [s for s, _ in states(drv, 4)] == [ZS.FULL] * 3 + [ZS.EMPTY]
    ok(drv.zone_mgmt_send(1, 0, ZSA.RESET, select_all=True))
    assert [s for s, _ in states(drv, 4)] == [ZS.EMPTY] * 4


# ---------------------------------------------------------------- reports
def test_report_filters_and_partial_reports(drv: NvmeDriver) -> None:
    ok(write(drv, 0, 1))
    ok(drv.zone_mgmt_send(1, ZONE, ZSA.OPEN))
    ok(drv.zone_mgmt_send(1, 3 * ZONE, ZSA.FINISH))
    total, zones = drv.report_zones(1, count=ZONES)
    assert total == ZONES and [z.zslba for z in zones] == [i * ZONE for i in range(ZONES)]
    assert all(z.zt == 2 and z.zcap == CAP for z in zones)
    total, zones = drv.report_zones(1, slba=ZONE + 5, count=2, partial=False)
    assert total == ZONES - 1 and [z.zslba for z in zones] == [ZONE, 2 * ZONE]
    total, zones = drv.report_zones(1, slba=ZONE + 5, count=2, partial=True)
    assert total == 2
    total, zones = drv.report_zones(1, report_filter=ZoneReportFilter.EMPTY, partial=False)
    assert total == ZONES - 3 and zones[0].zslba == 2 * ZONE
    for wanted, zslba in ((ZoneReportFilter.IMPLICITLY_OPENED, 0),
                          (ZoneReportFilter.EXPLICITLY_OPENED, ZONE),
                          (ZoneReportFilter.FULL, 3 * ZONE)):
        total, zones = drv.report_zones(1, report_filter=wanted)
        assert total == 1 and zones[0].zslba == zslba
    total, _ = drv.report_zones(1, report_filter=ZoneReportFilter.OFFLINE)
    assert total == 0
    done, data = drv.zone_mgmt_recv(1, 0, 32)  # shorter than the header: what fits
    ok(done)
    assert struct.unpack_from("<Q", data)[0] == ZONES


def test_hostile_report_fields(drv: NvmeDriver) -> None:
    def recv(**kw: int) -> tuple[int, bool]:
        slba = kw.pop("slba", 0)
        return status(drv.zone_mgmt_recv(1, slba, 4096, **kw)[0])

    assert recv(cdw13=1) == (ST.INVALID_FIELD, True)  # extended report
    assert recv(report_filter=8) == (ST.INVALID_FIELD, True)
    assert recv(cdw13=1 << 17) == (ST.INVALID_FIELD, True)
    assert recv(slba=ZONES * ZONE) == (ST.LBA_OUT_OF_RANGE, True)
    done, _ = drv.zone_mgmt_recv(1, 0, 1 << 20)  # past MDTS (512 KiB)
    assert status(done) == (ST.INVALID_FIELD, True)


# ---------------------------------------------------------------- limits
def test_open_limit(tmp_path: Path) -> None:
    d = limited(tmp_path, max_open=2, max_active=3)
    ok(d.zone_mgmt_send(1, 0, ZSA.OPEN))
    ok(d.zone_mgmt_send(1, ZONE, ZSA.OPEN))
    assert status(d.zone_mgmt_send(1, 2 * ZONE, ZSA.OPEN)) == (ST.TOO_MANY_OPEN_ZONES, True)
    assert status(write(d, 2 * ZONE)) == (ST.TOO_MANY_OPEN_ZONES, True)
    ok(d.zone_mgmt_send(1, ZONE, ZSA.CLOSE))
    ok(write(d, 2 * ZONE))  # implicitly opened: two open, three active
    assert status(write(d, 3 * ZONE)) == (ST.TOO_MANY_ACTIVE_ZONES, True)
    ok(d.zone_mgmt_send(1, ZONE, ZSA.FINISH))  # one active fewer
    ok(write(d, 3 * ZONE))  # the implicitly opened zone 2 is closed to make room
    assert [s for s, _ in states(d, 4)] == [ZS.EXPLICITLY_OPENED, ZS.FULL, ZS.CLOSED,
                                            ZS.IMPLICITLY_OPENED]
    ok(d.zone_mgmt_send(1, 3 * ZONE, ZSA.CLOSE))
    assert status(d.zone_mgmt_send(1, 0, ZSA.OPEN, select_all=True)) == (
        ST.TOO_MANY_OPEN_ZONES, True)  # 1 open + 2 closed > 2
    d.bus.ctrl.close()  # type: ignore[attr-defined]


def test_format_empties_every_zone(drv: NvmeDriver) -> None:
    ok(write(drv, 0, 4))
    ok(drv.admin_command(0x80, nsid=1))
    assert states(drv, 1) == [(ZS.EMPTY, 0)]


# ---------------------------------------------------------------- the table itself
def table(max_open: int = 0, max_active: int = 0) -> ZoneTable:
    return ZoneTable(1, ZONES * ZONE, 9, ZonedConfig(ZONE * 512, CAP * 512, max_open, max_active))


@pytest.mark.parametrize("state", list(ZoneState))
def test_every_pair_the_table_lacks_is_an_invalid_transition(state: ZoneState) -> None:
    for event in ZoneEvent:
        t = table()
        t.states[0] = state
        if event in TRANSITIONS[state]:
            continue
        with pytest.raises(CommandError) as err:
            t._move(0, event)
        assert err.value.status == ST.INVALID_ZONE_STATE_TRANSITION
        assert "zone 0" in str(err.value) and "not allowed" in str(err.value)


def test_restore_checks_before_adopting() -> None:
    t = table(max_open=1, max_active=2)
    good = [ZoneRecord(0, ZS.IMPLICITLY_OPENED, 5), ZoneRecord(1, ZS.CLOSED, ZONE),
            ZoneRecord(2, ZS.FULL, 2 * ZONE + CAP), ZoneRecord(3, ZS.OFFLINE, 3 * ZONE)]
    t.restore(good)
    assert t.state() == good and t.open == {0} and t.closed == {1}
    for bad in ([ZoneRecord(ZONES, ZS.FULL, 0)],
                [ZoneRecord(0, ZS.CLOSED, 1), ZoneRecord(0, ZS.CLOSED, 1)],
                [ZoneRecord(0, ZS.IMPLICITLY_OPENED, CAP)],  # at capacity: Full, not open
                [ZoneRecord(1, ZS.CLOSED, 0)],  # below its zone
                [ZoneRecord(0, ZS.EMPTY, 3)],
                [ZoneRecord(0, ZS.FULL, 3)],
                [ZoneRecord(0, ZS.EXPLICITLY_OPENED, 0), ZoneRecord(1, ZS.IMPLICITLY_OPENED, ZONE)],
                [ZoneRecord(i, ZS.CLOSED, i * ZONE) for i in range(3)]):
        with pytest.raises(ValueError):
            t.restore(bad)
        assert t.state() == good  # unchanged


def test_geometry_is_checked() -> None:
    with pytest.raises(ValueError, match="whole zones"):
        ZoneTable(1, ZONES * ZONE + 1, 9, ZonedConfig(ZONE * 512, None, 0, 0))
    with pytest.raises(ValueError, match="capacity"):
        ZoneTable(1, ZONES * ZONE, 9, ZonedConfig(ZONE * 512, (ZONE + 1) * 512, 0, 0))
    with pytest.raises(ValueError, match="max_open"):
        ZoneTable(1, ZONES * ZONE, 9, ZonedConfig(ZONE * 512, None, 3, 2))


# ---------------------------------------------------------------- configuration
def storage(zoned: object, size: str = "64M", block_size: int = 512) -> dict[str, object]:
    return {"storage": {"namespaces": [{"image": "/tmp/z.img", "size": size,
                                        "block_size": block_size, "zoned": zoned}]}}


def test_zoned_config() -> None:
    cfg = Config.from_dict(storage({"zone_size": "1M", "zone_capacity": "768K", "max_open": 4,
                                    "max_active": 8}))
    assert cfg.storage.namespaces[0].zoned == ZonedConfig(1 << 20, 768 << 10, 4, 8)
    assert Config.from_dict(cfg.to_dict()) == cfg
    plain = Config.from_dict(storage(None))
    assert plain.storage.namespaces[0].zoned is None
    assert Config.from_dict(plain.to_dict()) == plain


@pytest.mark.parametrize(("zoned", "message"), [
    ({}, "storage.namespaces[0].zoned.zone_size: required"),
    ({"zone_size": "1000"}, "zoned.zone_size: must be a multiple of block_size (512)"),
    ({"zone_size": "3M"}, "that divides the namespace size"),
    ({"zone_size": "1M", "zone_capacity": "2M"}, "zoned.zone_capacity: must be a multiple"),
    ({"zone_size": "1M", "zone_capacity": 100}, "zoned.zone_capacity: must be a multiple"),
    ({"zone_size": "1M", "max_open": 3, "max_active": 2},
     "zoned.max_open: must not exceed max_active (2)"),
    ({"zone_size": "1M", "max_open": -1}, "zoned.max_open"),
    ({"zone_size": "1M", "sizes": 1}, "zoned.sizes: unknown key"),
    ("yes", "zoned: must be a mapping"),
])
def test_zoned_config_errors(zoned: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config.from_dict(storage(zoned))
    assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- migration
def test_a_zoned_namespace_migrates_with_its_write_pointers(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    src = zoned_controller(tmp_path / "src", max_open=4, max_active=6)
    dst = zoned_controller(tmp_path / "dst", max_open=4, max_active=6)
    d = controller_driver(src)
    d.setup(io_queues=1)
    d.identify_namespace(1)
    ok(write(d, 0, 5))
    ok(d.zone_mgmt_send(1, ZONE, ZSA.OPEN))
    ok(d.zone_append(1, 2 * ZONE, b"\x33" * 1024))
    ok(d.zone_mgmt_send(1, 2 * ZONE, ZSA.CLOSE))
    ok(d.zone_mgmt_send(1, 3 * ZONE, ZSA.FINISH))
    src.zones[1].make_read_only(4)
    source = NvmeMigratable(src)
    source.start_tracking()
    records = source.precopy_records(1 << 30)
    source.migration_stop()
    records += source.save_state()
    target = NvmeMigratable(dst)
    assert target.migration_fingerprint() == source.migration_fingerprint()
    target.load_records(records)
    assert dst.zones[1].state() == []  # checked, not adopted yet
    target.commit_restore()
    assert dst.zones[1].state() == src.zones[1].state() == [
        ZoneRecord(0, ZS.IMPLICITLY_OPENED, 5), ZoneRecord(1, ZS.EXPLICITLY_OPENED, ZONE),
        ZoneRecord(2, ZS.CLOSED, 2 * ZONE + 2), ZoneRecord(3, ZS.FULL, 3 * ZONE + CAP),
        ZoneRecord(4, ZS.READ_ONLY, 4 * ZONE)]
    assert (dst.zones[1].open, dst.zones[1].closed) == ({0, 1}, {2})
    assert dst.namespaces[1].read_bytes(0, 5 * 512) == b"\xa5" * 2560
    whole = encode_controller(src)
    blob, slots = whole[:-FirmwareState.SIZE], whole[-FirmwareState.SIZE:]  # zones, firmware
    head = CtrlStateHead.unpack(blob)
    entry = ZoneEntry.unpack(blob, len(blob) - 5 * ZoneEntry.SIZE)
    for bad, why in (
        (blob[:-5 * 24] + entry.replace(wp=CAP).pack() + blob[-4 * 24:], "write pointer"),
        (blob[:-5 * 24] + entry.replace(nsid=2).pack() + blob[-4 * 24:], "namespace 2"),
        (blob[:-5 * 24] + entry.replace(state=9).pack() + blob[-4 * 24:], "state 0x9"),
        (blob[:-5 * 24] + entry.replace(zone=ZONES).pack() + blob[-4 * 24:], "zone 16"),
        (head.replace(version=2).pack() + blob[CtrlStateHead.SIZE:],
         f"controller state version 2, this appliance reads version {STATE_VERSION}"),
        (head.replace(n_zones=6).pack() + blob[CtrlStateHead.SIZE:], "ends inside"),
    ):
        with pytest.raises(LocalProtocolError, match=why):
            decode_controller(dst, bad + slots)
    other = NvmeController([NamespaceConfig(
        image=str(tmp_path / "o.img"), size=ZONES * ZONE * 512, block_size=512, read_only=False,
        grow=False, zoned=ZonedConfig(ZONE * 512, None, 4, 6))])
    assert NvmeMigratable(other).migration_fingerprint() != source.migration_fingerprint()
    for c in (src, dst, other):
        c.close()


def test_the_nvm_command_set_alone_leaves_the_zoned_namespace_inactive(tmp_path: Path) -> None:
    from appliance.client.nvme import CC_ENABLE

    ctrl = zoned_controller(tmp_path)
    d = controller_driver(ctrl)
    d.enable(cc=CC_ENABLE)  # CC.CSS 000b: the NVM command set only
    d.create_queue_pair(1)
    assert d.active_namespaces() == [2]
    assert status(d.identify(Cns.NAMESPACE, 1)[0]) == (ST.INVALID_NAMESPACE, True)
    assert status(write(d, 0, nsid=1)) == (ST.INVALID_NAMESPACE, True)
    assert status(d.zone_mgmt_send(1, 0, ZSA.OPEN)) == (ST.INVALID_NAMESPACE, True)
    ok(d.run(1, Command(opcode=IoOpcode.FLUSH, nsid=0xFFFFFFFF)))
    d.enable()  # as Linux: CC.CSS 110b once CAP.CSS announces I/O command sets
    assert CC.get(d.read_reg(Reg.CC), "css") == 0b110
    assert d.active_namespaces() == [1, 2]
    ctrl.close()
