"""Well-formed vfio-user exchanges, checked against the spec and QEMU 11.1's expectations."""

from __future__ import annotations

import json
import os

from appliance.client.vfio_user import DEFAULT_CAPS, VfioUserClient, eventfd_count, new_eventfd
from appliance.vfio_user import wire as w

QEMU_CAPS = DEFAULT_CAPS  # the capability set QEMU 11.1 proposes


def test_version_reply_is_a_compact_subset(sock_path: str) -> None:
    c = VfioUserClient.connect(sock_path, negotiate=False)
    body = w.VersionHead().pack() + json.dumps({"capabilities": QEMU_CAPS}).encode() + b"\0"
    c.send(w.Command.VERSION, body)
    reply = c.receive(timeout=5)
    assert reply is not None and not reply.header.flags & w.MsgFlag.ERROR
    # QEMU refuses a reply larger than its own request, and wants a trailing NUL.
    assert reply.header.size <= w.HEADER_SIZE + len(body)
    assert reply.payload.endswith(b"\0")
    head = w.VersionHead.unpack(reply.payload)
    assert (head.major, head.minor) == (0, 0)
    caps = json.loads(reply.payload[4:-1])["capabilities"]
    assert set(caps) <= set(QEMU_CAPS)
    assert caps["max_msg_fds"] <= 16 and caps["pgsizes"] & 4096
    assert caps["migration"]["pgsize"] == 4096
    c.close()


def test_only_proposed_capabilities_come_back(sock_path: str) -> None:
    with VfioUserClient.connect(sock_path, caps={"max_msg_fds": 4}) as c:
        assert set(c.server_caps) == {"max_msg_fds"}


def test_device_info(client: VfioUserClient) -> None:
    info = client.device_info()
    assert info.flags == w.DeviceFlag.PCI | w.DeviceFlag.RESET
    assert (info.num_regions, info.num_irqs) == (9, 5)


def test_region_info_argsz_retry(client: VfioUserClient) -> None:
    # QEMU asks with argsz=32 first; a region with caps answers the size it needs.
    _, payload, fds = client.request(w.Command.DEVICE_GET_REGION_INFO, w.RegionInfo(index=0).pack())
    first = w.RegionInfo.unpack(payload)
    assert len(payload) == 32 and not fds
    full = client.region_info(0, argsz=first.argsz)
    assert full.info.size >= 0x4000 and full.info.size & (full.info.size - 1) == 0
    assert full.info.flags & (w.RegionFlag.READ | w.RegionFlag.WRITE)
    if full.fd is not None:
        os.close(full.fd)


def test_config_region_and_header(client: VfioUserClient) -> None:
    info = client.region_info(w.PciRegion.CONFIG).info
    assert info.size == 4096
    cfg = client.region_read(w.PciRegion.CONFIG, 0, 4096)  # QEMU reads it in one go
    class_code = int.from_bytes(cfg[9:12], "little")
    assert class_code == 0x010802
    assert cfg[0x0E] & 0x7F == 0  # type-0 header
    assert cfg[0x06] & 0x10  # capability list
    # Walk the capability chain: MSI-X and PCI Express must be there.
    ids = []
    ptr = cfg[0x34]
    while ptr and len(ids) < 48:
        ids.append(cfg[ptr])
        ptr = cfg[ptr + 1]
    assert 0x11 in ids and 0x10 in ids


def test_bar_sizing_and_absent_upper_half(client: VfioUserClient) -> None:
    size = client.region_info(0).info.size
    assert client.region_info(1).info.size == 0  # upper half of the 64-bit BAR0
    client.write32(w.PciRegion.CONFIG, 0x10, 0xFFFFFFFF)
    low = client.read32(w.PciRegion.CONFIG, 0x10)
    assert low & 0x6 == 0x4  # 64-bit memory BAR
    assert (~(low & ~0xF) + 1) & 0xFFFFFFFF == size


def test_irq_info(client: VfioUserClient) -> None:
    assert client.irq_info(w.PciIrq.INTX).count == 1
    assert client.irq_info(w.PciIrq.MSIX).count >= 2
    assert client.irq_info(w.PciIrq.ERR).count == 1
    assert client.irq_info(w.PciIrq.REQ).count == 1


def test_client_triggered_irq_reaches_eventfd(client: VfioUserClient) -> None:
    efd = new_eventfd()
    client.set_irq_eventfds(w.PciIrq.ERR, [os.dup(efd)])
    client.set_irqs(w.PciIrq.ERR, 0, 1, w.IrqSetFlag.DATA_NONE | w.IrqSetFlag.ACTION_TRIGGER)
    assert eventfd_count(efd) == 1
    # DATA_EVENTFD with no fds tears the vector down (QEMU's -1 run).
    client.set_irqs(w.PciIrq.ERR, 0, 1, w.IrqSetFlag.DATA_EVENTFD | w.IrqSetFlag.ACTION_TRIGGER)
    client.set_irqs(w.PciIrq.ERR, 0, 1, w.IrqSetFlag.DATA_NONE | w.IrqSetFlag.ACTION_TRIGGER)
    assert eventfd_count(efd) == 0
    os.close(efd)


def test_reset(client: VfioUserClient) -> None:
    client.region_write(w.PciRegion.CONFIG, 0x4, b"\x02\x00")
    client.reset()
    assert client.region_read(w.PciRegion.CONFIG, 0x4, 2) == b"\x00\x00"


def test_no_reply_region_info_keeps_the_device_fd(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Regression: a GET_REGION_INFO sent with No_reply closed the memfd the device lends."""
    from appliance.client.nvme import NvmeDriver
    from appliance.testing.process import ApplianceProcess, make_config

    cfg = make_config(tmp_path, storage={"doorbells": "mmap",
                                         "namespaces": [{"image": str(tmp_path / "d.img"), "size": "16M"}]})
    with ApplianceProcess(cfg, tmp_path / "proc") as proc:
        path = proc.config.storage.socket
        with VfioUserClient.connect(path) as c:
            c.send(w.Command.DEVICE_GET_REGION_INFO, w.RegionInfo(argsz=256, index=0).pack(),
                   flags=w.MsgFlag.NO_REPLY)
            assert c.region_info(0).fd is not None
        # The doorbell page still works through a fresh mapping of the lent fd.
        with VfioUserClient.connect(path) as c:
            d = NvmeDriver(c, doorbells="mmap")
            d.setup(io_queues=1, depth=16)
            data = os.urandom(4096)
            d.write(1, 8, data)
            assert d.read(1, 8, 8) == data
            d.close()
        assert proc.alive
