"""The Python NVMe driver against the running appliance, over a real vfio-user socket."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from appliance.client.nvme import NvmeDriver, NvmeError
from appliance.client.vfio_user import VfioUserClient
from appliance.storage import spec
from appliance.testing.process import ApplianceProcess, make_config
from appliance.vfio_user.wire import PciRegion, RegionFlag


@pytest.fixture
def driver(sock_path: str) -> Iterator[NvmeDriver]:
    with VfioUserClient.connect(sock_path) as c:
        d = NvmeDriver(c)
        d.setup(io_queues=2, depth=64)
        yield d
        d.close()


def image_path(appliance: ApplianceProcess) -> Path:
    return Path(appliance.config.storage.namespaces[0].image)


def test_identify_and_queues(driver: NvmeDriver) -> None:
    assert driver.identity is not None
    assert driver.identity.mn.rstrip(b" \0") == b"Appliance NVMe"
    assert set(driver.queues) == {0, 1, 2}
    assert driver.block_size[1] == 512 and driver.ns_blocks[1] == (64 << 20) // 512


def test_write_verify_lands_in_image(driver: NvmeDriver, appliance: ApplianceProcess) -> None:
    rng = random.Random(7)
    data = rng.randbytes(4 << 20)
    for off in range(0, len(data), 128 << 10):
        driver.write(1, 2048 + off // 512, data[off:off + (128 << 10)], qid=1 + (off >> 17) % 2)
    driver.flush(1)
    for off in range(0, len(data), 64 << 10):
        assert driver.read(1, 2048 + off // 512, (64 << 10) // 512, qid=2) == data[off:off + (64 << 10)]
    with open(image_path(appliance), "rb") as f:
        f.seek(2048 * 512)
        assert xxhash.xxh64(f.read(len(data))).digest() == xxhash.xxh64(data).digest()


def test_queue_depth_32(driver: NvmeDriver) -> None:
    prp1, _, _ = driver.buffer(32 * 4096)
    for i in range(32):
        cmd = driver.rw_command(spec.IoOpcode.READ, 1, i * 8, 8, prp1 + i * 4096, 0)
        driver.submit(1, cmd, context=i, ring=False)
    driver.ring(1)
    done = driver.wait(1, 32)
    assert sorted(c.context for c in done) == list(range(32)) and all(c.status == 0 for c in done)


@pytest.mark.parametrize(("cmd", "status", "dnr"), [
    (spec.Command(opcode=0x7F, nsid=1), spec.Status.INVALID_OPCODE, True),
    (spec.Command(opcode=spec.IoOpcode.READ, nsid=1, cdw10=(64 << 20) // 512, cdw12=0),
     spec.Status.LBA_OUT_OF_RANGE, True),
    (spec.Command(opcode=spec.IoOpcode.READ, nsid=9, cdw12=0), spec.Status.INVALID_NAMESPACE, True),
    # A transfer to unmapped memory is a (retryable) Data Transfer Error.
    (spec.Command(opcode=spec.IoOpcode.READ, nsid=1, prp1=0x7_0000_0000, cdw12=0),
     spec.Status.DATA_TRANSFER_ERROR, False),
    # PRP1's offset must be dword aligned (NVMe 1.4 section 4.3).
    (spec.Command(opcode=spec.IoOpcode.READ, nsid=1, prp1=0x4000_0003, cdw12=0),
     spec.Status.INVALID_PRP_OFFSET, True),
], ids=["opcode", "lba-range", "nsid", "unmapped-prp", "misaligned-prp"])
def test_bad_io_commands(driver: NvmeDriver, cmd: spec.Command, status: spec.Status, dnr: bool) -> None:
    with pytest.raises(NvmeError) as info:
        driver.run(1, cmd)
    assert (info.value.status, info.value.dnr) == (status, dnr)
    assert driver.read(1, 0, 1) is not None  # and the controller keeps working


@pytest.mark.parametrize(("cmd", "status"), [
    (spec.Command(opcode=spec.AdminOpcode.IDENTIFY, prp1=0x4000_0000, cdw10=0x55), spec.Status.INVALID_FIELD),
    (spec.Command(opcode=spec.AdminOpcode.CREATE_SQ, prp1=0x4000_0000, cdw10=(63 << 16) | 9, cdw11=(9 << 16) | 1),
     spec.Status.INVALID_QUEUE_IDENTIFIER),
    (spec.Command(opcode=spec.AdminOpcode.CREATE_CQ, prp1=0x4000_0000, cdw10=(0xFFFF << 16) | 3, cdw11=1),
     spec.Status.INVALID_QUEUE_SIZE),
    (spec.Command(opcode=spec.AdminOpcode.CREATE_CQ, prp1=0x4000_0000, cdw10=(63 << 16) | 1, cdw11=1),
     spec.Status.INVALID_QUEUE_IDENTIFIER),
    (spec.Command(opcode=spec.AdminOpcode.DELETE_CQ, cdw10=1), spec.Status.INVALID_QUEUE_DELETION),
], ids=["cns", "sq-qid-range", "cq-size", "cq-exists", "cq-in-use"])
def test_bad_admin_commands(driver: NvmeDriver, cmd: spec.Command, status: spec.Status) -> None:
    with pytest.raises(NvmeError) as info:
        driver.admin(cmd)
    assert info.value.status == status
    driver.identify_controller()


def test_sq_on_missing_cq(driver: NvmeDriver) -> None:
    driver.admin(spec.Command(opcode=spec.AdminOpcode.DELETE_SQ, cdw10=2))
    with pytest.raises(NvmeError) as info:
        driver.admin(spec.Command(opcode=spec.AdminOpcode.CREATE_SQ, prp1=0x4000_0000,
                                  cdw10=(63 << 16) | 2, cdw11=(9 << 16) | 1))
    assert info.value.status == spec.Status.COMPLETION_QUEUE_INVALID


def test_without_shared_memory_uses_dma_messages(sock_path: str) -> None:
    with VfioUserClient.connect(sock_path) as c:
        d = NvmeDriver(c, share_memory=False, interrupts=False)
        d.setup(io_queues=1, depth=16)
        data = os.urandom(8192)
        d.write(1, 100, data)
        assert d.read(1, 100, 16) == data
        assert c.dma_requests > 0


def test_dma_messages_respect_client_max_data_xfer_size(sock_path: str) -> None:
    caps = {"max_data_xfer_size": 4096, "max_msg_fds": 16, "pgsizes": 4096}
    with VfioUserClient.connect(sock_path, caps=caps) as c:
        d = NvmeDriver(c, share_memory=False, interrupts=False)
        d.setup(io_queues=1, depth=16)
        data = os.urandom(64 << 10)
        d.write(1, 300, data)
        assert d.read(1, 300, len(data) // 512) == data
        assert 0 < c.dma_largest <= 4096


# ---------------------------------------------------------------- storage.doorbells: mmap
@pytest.fixture(scope="module")
def mmap_appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    tmp = tmp_path_factory.mktemp("appl-mmap")
    with ApplianceProcess(make_config(tmp, storage={"doorbells": "mmap"}), tmp / "proc") as proc:
        yield proc
        assert proc.alive, proc.log_text()


def test_mmap_doorbell_page_is_offered(mmap_appliance: ApplianceProcess) -> None:
    with VfioUserClient.connect(mmap_appliance.config.storage.socket) as c:
        reply = c.region_info(PciRegion.BAR0)
        assert reply.info.flags & RegionFlag.MMAP and reply.sparse_areas == [(0x1000, 0x1000)]
        assert reply.fd is not None
        os.close(reply.fd)


@pytest.mark.parametrize("interrupts", [True, False], ids=["msix", "polled"])
def test_mmap_doorbells_write_verify(mmap_appliance: ApplianceProcess, interrupts: bool) -> None:
    """Doorbells are stores into the driver's own mapping of the region fd: no message."""
    with VfioUserClient.connect(mmap_appliance.config.storage.socket) as c:
        writes: list[tuple[int, int]] = []
        region_write = c.region_write

        def spy(index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
            writes.append((index, offset))
            region_write(index, offset, data, posted=posted)

        c.region_write = spy  # type: ignore[method-assign]
        d = NvmeDriver(c, doorbells="mmap", interrupts=interrupts)
        d.setup(io_queues=2, depth=64)
        data = random.Random(11).randbytes(2 << 20)
        for off in range(0, len(data), 128 << 10):
            d.write(1, 4096 + off // 512, data[off:off + (128 << 10)], qid=1 + (off >> 17) % 2)
        prp1, _, _ = d.buffer(32 * 4096)
        for i in range(32):  # QD32: one doorbell store for 32 commands
            d.submit(2, d.rw_command(spec.IoOpcode.READ, 1, 4096 + i * 8, 8, prp1 + i * 4096, 0),
                     context=i, ring=False)
        d.ring(2)
        assert sorted(x.context for x in d.wait(2, 32)) == list(range(32))
        assert d.get(prp1, 32 * 4096) == data[:32 * 4096]
        d.flush(1)
        d.close()
    assert writes and not [w for w in writes if w[0] == PciRegion.BAR0 and w[1] >= 0x1000]
    with open(image_path(mmap_appliance), "rb") as f:
        f.seek(4096 * 512)
        assert f.read(len(data)) == data
