"""Firmware Image Download / Commit, the Firmware Slot Information log, activation at
the next Controller Level Reset and the firmware state in the migration blob; the
NVMe 2.0 Identify and log additions (CNS 07h, 08h, the Supported Log Pages log)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import make_controller, status

from appliance.client.nvme import NvmeDriver
from appliance.errors import LocalProtocolError
from appliance.storage import firmware
from appliance.storage.controller import NvmeController
from appliance.storage.controller_state import (
    FirmwareState,
    apply_controller,
    decode_controller,
    encode_controller,
)
from appliance.storage.identify_spec import IdentifyController, IdentifyNsIndependent
from appliance.storage.migration import NvmeMigratable
from appliance.storage.spec import AdminOpcode, Cns, LogPage, Status
from appliance.testing.nvme import controller_driver

ST = Status
REPLACE, REPLACE_ACTIVATE, ACTIVATE, ACTIVATE_NOW = range(4)


@pytest.fixture
def ctrl(tmp_path: Path) -> Iterator[NvmeController]:
    c = make_controller(tmp_path, namespaces=2, read_only=False)
    yield c
    c.close()


@pytest.fixture
def drv(ctrl: NvmeController) -> NvmeDriver:
    d = controller_driver(ctrl).ready()
    d.identify_namespace(1)
    return d


def image(revision: bytes, size: int = 8192) -> bytes:
    return (revision + bytes(range(256)) * (size // 256 + 1))[:size]


def fr(d: NvmeDriver) -> bytes:
    return bytes(IdentifyController.unpack(d.identify(Cns.CONTROLLER)[1]).fr)


def reset(d: NvmeDriver) -> None:
    """CC.EN 1 -> 0 -> 1, as Linux's reset path does, then the I/O queue again."""
    d.write_reg(0x14, 0)
    d.queues.clear()
    d.ready()


def slots(d: NvmeDriver) -> tuple[int, bytes, bytes]:
    log = d.firmware_log()
    return log.afi, bytes(log.frs1), bytes(log.frs2_7[:8])


def test_identify_and_log_at_power_on(drv: NvmeDriver) -> None:
    ident = IdentifyController.unpack(drv.identify(Cns.CONTROLLER)[1])
    assert (ident.frmw, ident.fwug, ident.ver) == (0x05, 0xFF, 0x20000)  # 2 slots, 1 read-only
    assert ident.oacs & 0x4  # Firmware Commit and Image Download
    assert ident.fr == b"0.1     "
    assert slots(drv) == (1, b"0.1     ", bytes(8))


def test_commit_and_activate_at_the_next_reset(drv: NvmeDriver) -> None:
    assert status(drv.firmware_download(image(b"APPL0002"))) == (ST.SUCCESS, False)
    assert status(drv.firmware_commit(2, REPLACE_ACTIVATE)) == (ST.SUCCESS, False)
    assert slots(drv) == (0x21, b"0.1     ", b"APPL0002")  # running 1, next reset: 2
    assert fr(drv) == b"0.1     "  # not before the reset
    drv.write(1, 7, b"k" * 512)
    reset(drv)
    assert fr(drv) == b"APPL0002" and slots(drv) == (0x02, b"0.1     ", b"APPL0002")
    assert drv.read(1, 7, 1) == b"k" * 512
    # Activate slot 1 again (CA 010b), the factory image.
    assert status(drv.firmware_commit(1, ACTIVATE)) == (ST.SUCCESS, False)
    reset(drv)
    assert fr(drv) == b"0.1     " and slots(drv)[0] == 1


def test_activate_now_asks_for_a_controller_level_reset(drv: NvmeDriver) -> None:
    """CA 011b: FRMW bit 4 is clear, so the commit is done, the slot is activated
    at the next reset and the status says so; the reset (an FLR too) activates it."""
    drv.firmware_download(b"V3  ")  # a 4-byte image: its revision is padded with spaces
    assert status(drv.firmware_commit(2, ACTIVATE_NOW)) == (
        ST.FIRMWARE_NEEDS_CONTROLLER_RESET, True)
    assert fr(drv) == b"0.1     " and slots(drv) == (0x21, b"0.1     ", b"V3      ")
    drv.bus.ctrl.reset_device()  # FLR / DEVICE_RESET: a Controller Level Reset as well
    drv.queues.clear()
    drv.ready()
    assert fr(drv) == b"V3      "


def test_replace_without_activation_then_activate(drv: NvmeDriver) -> None:
    drv.firmware_download(image(b"FIRST001"))
    assert status(drv.firmware_commit(0, REPLACE)) == (ST.SUCCESS, False)  # FS 0: slot 2
    assert slots(drv) == (1, b"0.1     ", b"FIRST001")
    reset(drv)
    assert fr(drv) == b"0.1     "  # nothing was to be activated
    assert status(drv.firmware_commit(2, ACTIVATE)) == (ST.SUCCESS, False)
    reset(drv)
    assert fr(drv) == b"FIRST001"
    # Replacing the running slot's image: the running revision stays until activated.
    drv.firmware_download(image(b"SECOND02"))
    drv.firmware_commit(2, REPLACE)
    assert fr(drv) == b"FIRST001" and slots(drv) == (2, b"0.1     ", b"SECOND02")


def test_pieces_in_any_order_and_the_bound(drv: NvmeDriver) -> None:
    whole = image(b"ORDER001", 12288)
    assert drv.firmware_download(whole[8192:], offset=8192).status == 0
    assert drv.firmware_download(whole[:4096]).status == 0
    assert drv.firmware_download(whole[4096:8192], offset=4096).status == 0
    assert status(drv.firmware_commit(2, REPLACE)) == (ST.SUCCESS, False)
    assert slots(drv)[2] == b"ORDER001"
    # A piece that ends at the largest image size: only a bitmap is kept.
    last = firmware.MAX_IMAGE - 4096
    assert drv.firmware_download(bytes(4096), offset=last).status == 0
    held = drv.bus.ctrl.firmware.image
    assert held.dwords == firmware.MAX_IMAGE // 4 and len(held.head) == 8
    assert vars(held).keys() == {"covered", "head"}


@pytest.mark.parametrize("pieces, want", [
    ([(0, 4096), (2048, 4096)], ST.OVERLAPPING_RANGE),  # the second overlaps the first
    ([(0, 4096), (0, 4)], ST.OVERLAPPING_RANGE),
    ([(firmware.MAX_IMAGE - 4, 8)], ST.INVALID_FIELD),  # past the largest image
    ([(firmware.MAX_IMAGE, 4)], ST.INVALID_FIELD),
])
def test_hostile_downloads(drv: NvmeDriver, pieces: list[tuple[int, int]], want: int) -> None:
    done = None
    for offset, size in pieces:
        done = drv.firmware_download(b"A" * size, offset=offset, piece=size)
    assert done is not None and status(done) == (want, True)


def test_hostile_download_fields(drv: NvmeDriver) -> None:
    # NUMD past MDTS (512 KiB)
    done = drv.admin_command(AdminOpcode.FIRMWARE_DOWNLOAD, cdw10=(1 << 17), prp1=0x1000)
    assert status(done) == (ST.INVALID_FIELD, True)
    # a buffer outside client memory: the transfer fails, nothing is kept
    done = drv.admin_command(AdminOpcode.FIRMWARE_DOWNLOAD, cdw10=0, prp1=0x7_0000_0000)
    assert status(done)[0] == ST.DATA_TRANSFER_ERROR
    assert drv.bus.ctrl.firmware.image.covered == 0


@pytest.mark.parametrize("cdw10, want", [
    (3, ST.INVALID_FIRMWARE_SLOT),  # slot 3 of 2
    (7 | REPLACE_ACTIVATE << 3, ST.INVALID_FIRMWARE_SLOT),
    (1 | REPLACE << 3, ST.INVALID_FIRMWARE_SLOT),  # slot 1 is read-only
    (1 | REPLACE_ACTIVATE << 3, ST.INVALID_FIRMWARE_SLOT),
    (2 | 4 << 3, ST.INVALID_FIELD),  # reserved commit actions
    (2 | 6 << 3, ST.INVALID_FIELD),  # boot partitions: none
    (2 | 7 << 3, ST.INVALID_FIELD),
    (2 | 1 << 31, ST.INVALID_FIELD),  # BPID
    (2 | 1 << 6, ST.INVALID_FIELD),  # reserved
])
def test_hostile_commits(drv: NvmeDriver, cdw10: int, want: int) -> None:
    drv.firmware_download(image(b"GOOD0001"))
    assert status(drv.admin_command(AdminOpcode.FIRMWARE_COMMIT, cdw10=cdw10)) == (want, True)
    assert slots(drv) == (1, b"0.1     ", bytes(8))  # nothing changed


def test_images_that_cannot_be_committed(drv: NvmeDriver) -> None:
    assert status(drv.firmware_commit(2, REPLACE)) == (ST.INVALID_FIRMWARE_IMAGE, True)  # none
    assert status(drv.firmware_commit(2, ACTIVATE)) == (ST.INVALID_FIRMWARE_IMAGE, True)  # empty
    drv.firmware_download(b"GAP00001" + bytes(4088))
    drv.firmware_download(bytes(4096), offset=8192)  # 4096..8191 missing
    assert status(drv.firmware_commit(2, REPLACE)) == (ST.INVALID_FIRMWARE_IMAGE, True)
    drv.firmware_download(bytes(4096), offset=4096)  # the gap filled: now it commits
    assert status(drv.firmware_commit(2, REPLACE)) == (ST.SUCCESS, False)
    drv.firmware_download(b"\x7fBAD\0\0\0\0" + bytes(8))  # revision not printable
    assert status(drv.firmware_commit(2, REPLACE)) == (ST.INVALID_FIRMWARE_IMAGE, True)
    assert status(drv.firmware_commit(2, REPLACE)) == (ST.INVALID_FIRMWARE_IMAGE, True)
    reset(drv)  # a reset forgets a download
    drv.firmware_download(b"        ")  # spaces only: no revision
    assert status(drv.firmware_commit(2, REPLACE)) == (ST.INVALID_FIRMWARE_IMAGE, True)
    assert slots(drv)[2] == b"GAP00001"
    reset(drv)
    assert status(drv.firmware_commit(2, REPLACE)) == (ST.INVALID_FIRMWARE_IMAGE, True)


def test_effects_log_and_supported_logs(drv: NvmeDriver) -> None:
    done, page = drv.log_page(LogPage.COMMANDS_EFFECTS, 4096)
    effects = struct.unpack_from("<256I", page)
    assert effects[AdminOpcode.FIRMWARE_COMMIT] == 0x11 and effects[AdminOpcode.FIRMWARE_DOWNLOAD] == 1
    done, page = drv.log_page(LogPage.SUPPORTED_LOGS, 1024)
    assert status(done) == (ST.SUCCESS, False)
    supported = struct.unpack("<256I", page)
    assert [lid for lid in range(256) if supported[lid]] == [0, 1, 2, 3, 4, 5]
    assert set(supported) == {0, 1}


def test_io_command_set_profile_feature(drv: NvmeDriver) -> None:
    """Feature 19h: index 0 of Identify CNS 1Ch's list is the one combination."""
    def feature(opcode: int, cdw11: int = 0) -> tuple[int, bool, int]:
        done = drv.admin_command(opcode, cdw10=0x19, cdw11=cdw11)
        return done.status, done.dnr, done.dw0

    assert feature(AdminOpcode.GET_FEATURES) == (ST.SUCCESS, False, 0)
    assert feature(AdminOpcode.SET_FEATURES, 0)[:2] == (ST.SUCCESS, False)
    assert feature(AdminOpcode.SET_FEATURES, 1)[:2] == (ST.IOCS_COMBINATION_REJECTED, True)
    assert feature(AdminOpcode.SET_FEATURES, 0x200)[:2] == (ST.INVALID_FIELD, True)
    assert feature(AdminOpcode.GET_FEATURES) == (ST.SUCCESS, False, 0)


def test_write_atomicity_normal_feature(drv: NvmeDriver) -> None:
    """Feature 0Ah: DN is kept (AWUN and NAWUN are 0: one block is atomic either way)."""
    done = drv.admin_command(AdminOpcode.SET_FEATURES, cdw10=0x0A, cdw11=1)
    assert (done.status, done.dnr) == (ST.SUCCESS, False)
    assert drv.admin_command(AdminOpcode.GET_FEATURES, cdw10=0x0A).dw0 == 1
    done = drv.admin_command(AdminOpcode.SET_FEATURES, cdw10=0x0A, cdw11=2)
    assert (done.status, done.dnr) == (ST.INVALID_FIELD, True)


def test_identify_cns_07h_and_08h(tmp_path: Path) -> None:
    from appliance.config import NamespaceConfig, ZonedConfig

    ctrl = NvmeController([
        NamespaceConfig(image=str(tmp_path / "a.img"), size=1 << 20, block_size=512,
                        read_only=True, grow=False),
        NamespaceConfig(image=str(tmp_path / "z.img"), size=4 << 20, block_size=512,
                        read_only=False, grow=False, zoned=ZonedConfig(1 << 20, None, 2, 3))])
    d = controller_driver(ctrl).ready()
    for csi, want in ((0, [1]), (2, [2])):
        done, data = d.identify(Cns.CSI_ACTIVE_NS_LIST, cdw11=csi << 24)
        assert status(done) == (ST.SUCCESS, False)
        assert list(struct.unpack_from("<4I", data)) == want + [0] * (4 - len(want))
    done, data = d.identify(Cns.CSI_ACTIVE_NS_LIST, 1, cdw11=0)  # NSIDs above 1
    assert data[:4] == bytes(4)
    assert status(d.identify(Cns.CSI_ACTIVE_NS_LIST, cdw11=1 << 24)[0]) == (ST.INVALID_FIELD, True)
    assert status(d.identify(Cns.CSI_ACTIVE_NS_LIST, 0xFFFFFFFE)[0]) == (
        ST.INVALID_NAMESPACE, True)
    for nsid, nsattr in ((1, 1), (2, 0)):
        done, data = d.identify(Cns.NS_CS_INDEPENDENT, nsid)
        assert status(done) == (ST.SUCCESS, False)
        ns = IdentifyNsIndependent.unpack(data)
        assert (ns.nstat, ns.nsattr, ns.nmic, ns.anagrpid) == (1, nsattr, 0, 0)  # ready
    assert status(d.identify(Cns.NS_CS_INDEPENDENT, 3)[0]) == (ST.INVALID_NAMESPACE, True)
    ctrl.close()


def test_identify_cns_1ah_and_1bh_with_namespace_management(tmp_path: Path) -> None:
    from appliance.config import NamespaceConfig, ZonedConfig
    from appliance.storage.nsmgmt import NamespaceManagement

    (tmp_path / "images").mkdir()
    ctrl = NvmeController([
        NamespaceConfig(image=str(tmp_path / "a.img"), size=1 << 20, block_size=512,
                        read_only=False, grow=False),
        NamespaceConfig(image=str(tmp_path / "z.img"), size=4 << 20, block_size=512,
                        read_only=False, grow=False, zoned=ZonedConfig(1 << 20, None, 2, 3))],
        management=NamespaceManagement(capacity=16 << 20, max_namespaces=4,
                                       image_dir=str(tmp_path / "images")))
    d = controller_driver(ctrl).ready()
    assert d.attach_namespace(1, detach=True).status == 0  # allocated, not active: listed
    for csi, want in ((0, [1, 0]), (2, [2, 0])):
        done, data = d.identify(Cns.CSI_ALLOCATED_NS_LIST, cdw11=csi << 24)
        assert status(done) == (ST.SUCCESS, False)
        assert list(struct.unpack_from("<2I", data)) == want
    done, data = d.identify(Cns.CSI_ALLOCATED_NAMESPACE, 2, cdw11=2 << 24)
    assert status(done) == (ST.SUCCESS, False) and data != bytes(4096)  # the zoned one
    done, data = d.identify(Cns.CSI_ALLOCATED_NAMESPACE, 1, cdw11=0)
    assert status(done) == (ST.SUCCESS, False) and data == bytes(4096)
    done, data = d.identify(Cns.CSI_ALLOCATED_NAMESPACE, 3, cdw11=0)  # not allocated
    assert status(done) == (ST.SUCCESS, False) and data == bytes(4096)
    assert status(d.identify(Cns.CSI_ALLOCATED_NAMESPACE, 1, cdw11=2 << 24)[0]) == (
        ST.INVALID_FIELD, True)  # not zoned
    assert status(d.identify(Cns.CSI_ALLOCATED_NAMESPACE, 5, cdw11=0)[0]) == (
        ST.INVALID_NAMESPACE, True)
    assert status(d.identify(Cns.CSI_ALLOCATED_NS_LIST, cdw11=1 << 24)[0]) == (
        ST.INVALID_FIELD, True)
    ctrl.close()


def test_identify_cns_1ah_needs_namespace_management(drv: NvmeDriver) -> None:
    for cns in (Cns.CSI_ALLOCATED_NS_LIST, Cns.CSI_ALLOCATED_NAMESPACE):
        assert status(drv.identify(cns, 1)[0]) == (ST.INVALID_FIELD, True)


# ---------------------------------------------------------------- migration
def test_firmware_state_migrates_after_an_activation(drv: NvmeDriver, tmp_path: Path) -> None:
    src = drv.bus.ctrl
    drv.firmware_download(image(b"MIGR0002"))
    drv.firmware_commit(2, REPLACE_ACTIVATE)
    reset(drv)  # running MIGR0002 from slot 2
    drv.firmware_download(image(b"MIGR0003"))
    drv.firmware_commit(2, REPLACE)  # slot 2 now holds 0003, 0002 still runs
    drv.firmware_download(b"NEXT0004" + bytes(4088))  # half an image, in flight
    fingerprint = NvmeMigratable(src).migration_fingerprint()
    (tmp_path / "dst").mkdir()
    dst = make_controller(tmp_path / "dst", namespaces=2)
    assert NvmeMigratable(dst).migration_fingerprint() == fingerprint  # configured fr only
    blob = encode_controller(src)
    apply_controller(dst, decode_controller(dst, blob))
    assert encode_controller(dst) == blob
    assert dst.identify_data == src.identify_data and fr(drv) == b"MIGR0002"
    assert (dst.firmware.running, dst.firmware.slots, dst.firmware.active) == (
        b"MIGR0002", [b"0.1     ", b"MIGR0003"], 2)
    # the download goes on where it stopped, on the destination
    dst.firmware.download(1024, bytes(4096))
    dst.firmware.commit(2, REPLACE_ACTIVATE)
    dst.reset_device()
    assert dst.firmware.running == b"NEXT0004"
    dst.close()


def test_firmware_state_is_checked(drv: NvmeDriver, tmp_path: Path) -> None:
    drv.firmware_download(image(b"CHECK002"))
    drv.firmware_commit(2, REPLACE)
    drv.firmware_download(bytes(8), offset=64)
    blob = encode_controller(drv.bus.ctrl)
    (tmp_path / "dst").mkdir()
    dst = make_controller(tmp_path / "dst", namespaces=2)
    tail = FirmwareState.SIZE + 3  # the state, then a 3-byte bitmap (DWORDs 16, 17)
    state = FirmwareState.unpack(blob, len(blob) - tail)
    assert state.n_bitmap == 3 and blob[-3:] == b"\0\0\x03"
    body = blob[:-tail]
    for bad, why in (
        (state.replace(running=b"\x01bad    ").pack() + blob[-3:], "revisions"),
        # slot 1 is read-only: running from it, the revision is slot 1's own
        (state.replace(running=b"OTHER   ").pack() + blob[-3:], "revisions"),
        (state.replace(slot2=b"x\0      ").pack() + blob[-3:], "revisions"),
        (state.replace(active=3).pack() + blob[-3:], "slots"),
        (state.replace(active=0).pack() + blob[-3:], "slots"),
        (state.replace(active=2, slot2=bytes(8)).pack() + blob[-3:], "slots"),  # empty slot
        (state.replace(next_active=2, slot2=bytes(8)).pack() + blob[-3:], "slots"),
        (state.replace(n_bitmap=4).pack() + blob[-3:], "bitmap"),  # short
        (state.replace(n_bitmap=4).pack() + blob[-3:] + b"\0", "bitmap"),  # not canonical
        (state.replace(reserved=1).pack() + blob[-3:], "bitmap"),
        (state.replace(n_bitmap=firmware.MAX_IMAGE // 32 + 1).pack()
         + bytes(firmware.MAX_IMAGE // 32) + b"\1", "bitmap"),  # past the largest image
        (state.pack() + blob[-3:] + b"\0", "after the last array"),
        (state.pack()[:-1], "ends inside"),
    ):
        with pytest.raises(LocalProtocolError, match=why):
            decode_controller(dst, body + bad)
    dst.close()
