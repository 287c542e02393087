"""A zoned namespace of the running appliance over a real vfio-user socket: the
zoned commands with valid and hostile fields, a fault rule on a zoned opcode,
and the zone state after a client reconnects."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.runtime.control import ControlClient
from appliance.storage.spec import Cns, Command, IoOpcode, Status
from appliance.storage.zns_spec import IdentifyNamespaceZoned, ZoneSendAction
from appliance.storage.zones import ZoneState
from appliance.testing.process import ApplianceProcess, make_config
from appliance.testing.workload import pair_configs

ST, ZSA = Status, ZoneSendAction
ZONE = 2048  # 1 MiB zones of 512-byte blocks
CAP = 1536  # 768 KiB writable


@pytest.fixture(scope="module")
def zoned_appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    tmp: Path = tmp_path_factory.mktemp("zoned")
    cfg = make_config(tmp, storage={"namespaces": [
        {"image": str(tmp / "data" / "zns.img"), "size": "16M",
         "zoned": {"zone_size": "1M", "zone_capacity": "768K", "max_open": 2, "max_active": 3}},
        {"image": str(tmp / "data" / "nvm.img"), "size": "4M"}]})
    with ApplianceProcess(cfg, tmp / "proc") as proc:
        yield proc
        assert proc.alive, proc.log_text()
        assert "Traceback" not in proc.log_text()


@pytest.fixture(params=[True, False], ids=["shared", "dma-messages"])
def driver(zoned_appliance: ApplianceProcess, request: pytest.FixtureRequest
           ) -> Iterator[NvmeDriver]:
    with VfioUserClient.connect(zoned_appliance.config.storage.socket) as c:
        d = NvmeDriver(c, share_memory=request.param, interrupts=request.param)
        d.setup(io_queues=1, depth=32)
        d.identify_namespace(1)
        assert d.zone_mgmt_send(1, 0, ZSA.RESET, select_all=True).status == 0
        yield d
        d.close()


def result(done: object) -> tuple[int, bool]:
    return done.status, done.dnr  # type: ignore[attr-defined]


def test_zoned_identify_and_report(driver: NvmeDriver) -> None:
    done, data = driver.identify(Cns.CSI_NAMESPACE, 1, cdw11=2 << 24)
    assert result(done) == (ST.SUCCESS, False)
    zns = IdentifyNamespaceZoned.unpack(data)
    assert (zns.lbafe0_zsze, zns.mor, zns.mar) == (ZONE, 1, 2)
    total, zones = driver.report_zones(1, count=16)
    assert total == 16 and {z.zcap for z in zones} == {CAP}
    assert {z.zs >> 4 for z in zones} == {ZoneState.EMPTY}


def test_sequential_writes_appends_and_reset(driver: NvmeDriver) -> None:
    data = os.urandom(128 << 10)
    driver.write(1, 0, data)
    done = driver.zone_append(1, 0, data[:4096])
    assert result(done) == (ST.SUCCESS, False) and done.result == 256
    done = driver.zone_append(1, ZONE, data, sgl=True)
    assert result(done) == (ST.SUCCESS, False) and done.result == ZONE
    assert driver.read(1, 0, 264) == data + data[:4096]
    done = driver.zone_append(1, ZONE, data[:512], cdw12=1 << 30)  # FUA: synced off the loop
    assert result(done) == (ST.SUCCESS, False) and done.result == ZONE + 256
    done, _ = driver.io(IoOpcode.WRITE, 100, 8, nsid=1, data=bytes(4096))
    assert result(done) == (ST.ZONE_INVALID_WRITE, True)
    _, zones = driver.report_zones(1, count=2)
    assert [(z.zs >> 4, z.wp) for z in zones] == [(ZoneState.IMPLICITLY_OPENED, 264),
                                                   (ZoneState.IMPLICITLY_OPENED, ZONE + 257)]
    assert result(driver.zone_mgmt_send(1, 0, ZSA.RESET)) == (ST.SUCCESS, False)
    assert driver.read(1, 0, 8) == bytes(4096)


def test_limits_over_the_socket(driver: NvmeDriver) -> None:
    for zone in (0, 1):
        assert result(driver.zone_mgmt_send(1, zone * ZONE, ZSA.OPEN)) == (ST.SUCCESS, False)
    assert result(driver.zone_mgmt_send(1, 2 * ZONE, ZSA.OPEN)) == (ST.TOO_MANY_OPEN_ZONES, True)
    assert result(driver.zone_mgmt_send(1, 0, ZSA.CLOSE)) == (ST.SUCCESS, False)
    done, _ = driver.io(IoOpcode.WRITE, 2 * ZONE, 1, nsid=1, data=bytes(512))
    assert result(done) == (ST.SUCCESS, False)
    done, _ = driver.io(IoOpcode.WRITE, 3 * ZONE, 1, nsid=1, data=bytes(512))
    assert result(done) == (ST.TOO_MANY_ACTIVE_ZONES, True)


@pytest.mark.parametrize("name", ["append not at a zone start", "append reserved bits",
                                  "append past capacity", "send reserved cdw13",
                                  "send unknown action", "send past the namespace",
                                  "recv extended", "recv filter", "recv past mdts",
                                  "recv unmapped", "zoned opcode on nvm namespace",
                                  "read across zones"])
def test_hostile_zoned_fields(driver: NvmeDriver, name: str) -> None:
    buf = driver.alloc(4096)
    send, recv, append = IoOpcode.ZONE_MGMT_SEND, IoOpcode.ZONE_MGMT_RECV, IoOpcode.ZONE_APPEND
    cases = {
        "append not at a zone start": (Command(opcode=append, nsid=1, prp1=buf, cdw10=8),
                                       ST.INVALID_FIELD),
        "append reserved bits": (Command(opcode=append, nsid=1, prp1=buf, cdw12=1 << 20),
                                 ST.INVALID_FIELD),
        "append past capacity": (Command(opcode=append, nsid=1, prp1=buf, cdw12=CAP),
                                 ST.INVALID_FIELD),  # past MDTS before the zone check
        "send reserved cdw13": (Command(opcode=send, nsid=1, cdw13=ZSA.RESET | 1 << 12),
                                ST.INVALID_FIELD),
        "send unknown action": (Command(opcode=send, nsid=1, cdw13=0x7F), ST.INVALID_FIELD),
        "send past the namespace": (Command(opcode=send, nsid=1, cdw10=16 * ZONE,
                                            cdw13=ZSA.OPEN), ST.LBA_OUT_OF_RANGE),
        "recv extended": (Command(opcode=recv, nsid=1, prp1=buf, cdw12=1023, cdw13=1),
                          ST.INVALID_FIELD),
        "recv filter": (Command(opcode=recv, nsid=1, prp1=buf, cdw12=1023, cdw13=0xFF00),
                        ST.INVALID_FIELD),
        "recv past mdts": (Command(opcode=recv, nsid=1, prp1=buf, cdw12=0xFFFFFFFF),
                           ST.INVALID_FIELD),
        "recv unmapped": (Command(opcode=recv, nsid=1, prp1=0x7_0000_0000, cdw12=1023),
                          ST.DATA_TRANSFER_ERROR),
        "zoned opcode on nvm namespace": (Command(opcode=send, nsid=2, cdw13=ZSA.OPEN),
                                          ST.INVALID_OPCODE),
        "read across zones": (Command(opcode=IoOpcode.READ, nsid=1, prp1=buf, cdw10=ZONE - 1,
                                      cdw12=1), ST.ZONE_BOUNDARY_ERROR),
    }
    cmd, expected = cases[name]
    done = driver.command(1, cmd)
    assert done.status == expected, name
    _, zones = driver.report_zones(1, count=1)  # nothing moved
    assert (zones[0].zs >> 4, zones[0].wp) == (ZoneState.EMPTY, 0)


def test_a_fault_rule_on_zone_append(zoned_appliance: ApplianceProcess,
                                     driver: NvmeDriver) -> None:
    with ControlClient(zoned_appliance.config.control.socket) as ctl:
        ctl("fault.add", action="status", opcode=int(IoOpcode.ZONE_APPEND),
            status="zone_is_full", count=1)
        done = driver.zone_append(1, 0, bytes(512))
        assert result(done) == (ST.ZONE_IS_FULL, False)
        done = driver.zone_append(1, 0, bytes(512))
        assert result(done) == (ST.SUCCESS, False) and done.result == 0
        ctl("fault.add", action="status", opcode=int(IoOpcode.ZONE_MGMT_SEND), lba=ZONE,
            status="invalid_zone_state_transition", dnr=True, count=1)
        assert result(driver.zone_mgmt_send(1, 0, ZSA.FINISH)) == (ST.SUCCESS, False)
        assert result(driver.zone_mgmt_send(1, ZONE, ZSA.FINISH)) == (
            ST.INVALID_ZONE_STATE_TRANSITION, True)
        ctl("fault.clear")


def test_zone_state_moves_with_a_live_handoff(tmp_path: Path) -> None:
    """Write pointers and zone states of a zoned namespace mid-way survive the
    handoff: the driver on the moved connection carries on at the write pointers."""
    src_cfg, dst_cfg = pair_configs(tmp_path, 16 << 20)
    for cfg in (src_cfg, dst_cfg):
        cfg["storage"]["namespaces"][0]["zoned"] = {  # type: ignore[index]
            "zone_size": "1M", "zone_capacity": "768K", "max_open": 2, "max_active": 3}
    src = ApplianceProcess(src_cfg, tmp_path / "src" / "proc").start()
    dst = ApplianceProcess(dst_cfg, tmp_path / "dst" / "proc").start()
    try:
        d = NvmeDriver(VfioUserClient.connect(src.config.storage.socket), mem_size=8 << 20)
        d.setup(io_queues=1, depth=32)
        d.identify_namespace(1)
        d.write(1, 0, b"a" * 4096)
        assert d.zone_append(1, ZONE, b"b" * 1024).status == 0
        assert d.zone_mgmt_send(1, ZONE, ZSA.CLOSE).status == 0
        assert d.zone_mgmt_send(1, 2 * ZONE, ZSA.OPEN).status == 0
        assert d.zone_mgmt_send(1, 3 * ZONE, ZSA.FINISH).status == 0
        _, before = d.report_zones(1, count=16)
        done = subprocess.run([sys.executable, "-m", "appliance", "handoff", "--from",
                               src.config.control.socket, "--to", dst.config.control.socket],
                              check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert src.proc is not None and src.proc.wait(timeout=30) == 0
        _, after = d.report_zones(1, count=16)
        assert [(z.zs, z.wp) for z in after] == [(z.zs, z.wp) for z in before]
        assert [z.zs >> 4 for z in after[:4]] == [ZoneState.IMPLICITLY_OPENED, ZoneState.CLOSED,
                                                  ZoneState.EXPLICITLY_OPENED, ZoneState.FULL]
        done_w, _ = d.io(IoOpcode.WRITE, 0, 1, nsid=1, data=bytes(512))
        assert result(done_w) == (ST.ZONE_INVALID_WRITE, True)
        d.write(1, 8, b"c" * 512)  # at the write pointer
        assert d.zone_append(1, ZONE, b"d" * 512).result == ZONE + 2
        assert d.read(1, 0, 9) == b"a" * 4096 + b"c" * 512
        assert d.read(1, ZONE, 3) == b"b" * 1024 + b"d" * 512
        d.c.close()
    finally:
        for p in (src, dst):
            p.stop()
        assert "Traceback" not in dst.log_text(), dst.log_text()


def test_a_zoned_namespace_is_not_resized(zoned_appliance: ApplianceProcess) -> None:
    from appliance.control.protocol import ControlError

    with ControlClient(zoned_appliance.config.control.socket) as ctl, \
            pytest.raises(ControlError, match="namespace 1 is zoned: its zones are fixed"):
        ctl("namespace.resize", nsid=1, size=32 << 20)


def test_zone_state_moves_with_a_vfio_user_migration(tmp_path: Path) -> None:
    """The vfio-user migration protocol (the client-side orchestrator, as QEMU's
    migration drives it) carries the zones; they survive the destination's next
    controller reset, as media state does."""
    from appliance.client import migrate as orch

    procs = []
    for name in ("src", "dst"):
        cfg = make_config(tmp_path / name, storage={"namespaces": [
            {"image": str(tmp_path / name / "data" / "zns.img"), "size": "16M",
             "zoned": {"zone_size": "1M", "zone_capacity": "768K"}}]})
        procs.append(ApplianceProcess(cfg, tmp_path / name / "proc").start())
    try:
        d = NvmeDriver(VfioUserClient.connect(procs[0].config.storage.socket), mem_size=8 << 20)
        d.setup(io_queues=1, depth=32)
        d.identify_namespace(1)
        d.write(1, 0, b"m" * 8192)
        assert d.zone_mgmt_send(1, 5 * ZONE, ZSA.FINISH).status == 0
        assert d.zone_append(1, 7 * ZONE, b"n" * 512).result == 7 * ZONE
        _, before = d.report_zones(1, count=16)
        dst = VfioUserClient.connect(procs[1].config.storage.socket)
        orch.migrate(d.c, dst, converge_bytes=0)
        dst.close()
        d.close()
        e = NvmeDriver(VfioUserClient.connect(procs[1].config.storage.socket), mem_size=8 << 20)
        e.setup(io_queues=1, depth=32)  # a controller reset: the zones stay
        e.identify_namespace(1)
        _, after = e.report_zones(1, count=16)
        assert [(z.zs, z.wp) for z in after] == [(z.zs, z.wp) for z in before]
        assert e.read(1, 0, 16) == b"m" * 8192
        e.write(1, 16, b"o" * 512)  # at the migrated write pointer
        e.close()
    finally:
        for p in procs:
            p.stop()
            assert "Traceback" not in p.log_text(), p.log_text()
