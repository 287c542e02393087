"""Malformed and out-of-range vfio-user input, against the running server over a real socket.

Each case gets the spec's error (an error reply carrying an errno), or the
connection is closed when the stream can no longer be framed; after every
case the server still serves (a fresh connection negotiates and works).
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from appliance.client.vfio_user import VfioUserClient, VfioUserError, new_eventfd
from appliance.vfio_user import wire as w


def still_serving(sock_path: str) -> None:
    with VfioUserClient.connect(sock_path) as c:
        assert c.device_info().num_regions == w.PCI_NUM_REGIONS


def expect_error(client: VfioUserClient, command: int, payload: bytes = b"", fds: list[int] | None = None,
                 err: int = errno.EINVAL, flags: int = 0) -> None:
    with pytest.raises(VfioUserError) as info:
        client.request(command, payload, fds, flags=flags)
    assert info.value.errno == err, os.strerror(info.value.errno or 0)


# ------------------------------------------------------------------ framing
def test_short_header_then_close(sock_path: str) -> None:
    c = VfioUserClient.connect(sock_path, negotiate=False)
    c.send_bytes(b"\x01\x00\x01")
    c.close()
    still_serving(sock_path)


def test_size_below_header_closes_connection(sock_path: str) -> None:
    c = VfioUserClient.connect(sock_path)
    c.send(w.Command.DEVICE_GET_INFO, w.DeviceInfo().pack(), size=8)
    assert c.receive(timeout=5) is None  # closed: the stream cannot be framed
    c.close()
    still_serving(sock_path)


def test_huge_size_without_body_gets_error_then_close(sock_path: str) -> None:
    c = VfioUserClient.connect(sock_path)
    c.send(w.Command.REGION_WRITE, b"", size=0x7FFFFFFF)
    reply = c.receive(timeout=5)
    assert reply is not None and reply.header.flags & w.MsgFlag.ERROR
    assert reply.header.error == errno.EMSGSIZE
    assert c.receive(timeout=5) is None
    c.close()
    still_serving(sock_path)


def test_unknown_command(client: VfioUserClient, sock_path: str) -> None:
    expect_error(client, 99)
    expect_error(client, 14)  # a hole in the command table
    assert client.device_info().flags & w.DeviceFlag.PCI


def test_reply_sent_by_client(client: VfioUserClient) -> None:
    expect_error(client, w.Command.DEVICE_GET_INFO, w.DeviceInfo().pack(), flags=w.MsgFlag.REPLY)


def test_reserved_header_flags_and_error_field(client: VfioUserClient) -> None:
    expect_error(client, w.Command.DEVICE_GET_INFO, w.DeviceInfo().pack(), flags=0x100)


def test_server_to_client_commands_refused(client: VfioUserClient) -> None:
    expect_error(client, w.Command.DMA_READ, w.DmaAccess(address=0, count=4).pack())


def test_fds_on_message_that_takes_none_are_closed(client: VfioUserClient) -> None:
    # A stray fd is closed and the command answered (it used to be refused with
    # EINVAL; libvfio-user closes such fds and serves the command, and so do we).
    r, wr = os.pipe()
    _, payload, _ = client.request(w.Command.DEVICE_GET_INFO, w.DeviceInfo().pack(), [wr])
    assert w.DeviceInfo.unpack(payload).num_regions == w.PCI_NUM_REGIONS
    os.close(wr)
    # Every write end is closed (ours and the server's copy): the read end sees EOF.
    assert os.read(r, 1) == b""
    os.close(r)


def test_dma_unmap_with_an_fd_closes_it_and_unmaps(client: VfioUserClient) -> None:
    client.map_memfd(0x200000, 0x10000)
    r, wr = os.pipe()
    _, payload, _ = client.request(w.Command.DMA_UNMAP,
                                   w.DmaUnmap(address=0x200000, size=0x10000).pack(), [wr])
    assert w.DmaUnmap.unpack(payload).size == 0x10000
    os.close(wr)
    assert os.read(r, 1) == b""  # the server's copy is closed too
    os.close(r)
    # Unmapped: the range is free for a new map.
    client.dma_map(0x200000, 0x10000)
    client.dma_unmap(0x200000, 0x10000)


@pytest.mark.parametrize("command, request_struct", [
    (w.Command.DEVICE_GET_INFO, w.DeviceInfo()),
    (w.Command.DEVICE_GET_REGION_INFO, w.RegionInfo(argsz=w.RegionInfo.SIZE + 64, index=0)),
    (w.Command.DEVICE_GET_IRQ_INFO, w.IrqInfo(index=w.PciIrq.MSIX)),
    (w.Command.DEVICE_GET_REGION_IO_FDS, w.RegionIoFds(index=w.PciRegion.BAR0)),
    (w.Command.REGION_READ, w.RegionAccess(offset=0, region=w.PciRegion.CONFIG, count=4)),
], ids=lambda v: getattr(v, "name", ""))
def test_request_longer_than_its_structure_is_read_by_it(
        client: VfioUserClient, command: w.Command, request_struct: w.Struct) -> None:
    # A client may send its whole argsz buffer (structure first, zeros after), as
    # a real NVMe driver does; the trailing bytes are ignored (libvfio-user too).
    def answer(payload: bytes) -> bytes:
        _, reply, fds = client.request(command, payload)
        for fd in fds:
            os.close(fd)
        return reply

    assert answer(request_struct.pack() + b"\0" * 64) == answer(request_struct.pack())


def test_dma_map_and_reset_with_trailing_bytes(client: VfioUserClient) -> None:
    # Read by their structure too: DMA_MAP (argsz >= 32), DMA_UNMAP, DEVICE_RESET.
    mapping = w.DmaMap(argsz=w.DmaMap.SIZE + 8, flags=3, address=0x500000, size=0x1000)
    client.request(w.Command.DMA_MAP, mapping.pack() + b"\0" * 8)
    client.request(w.Command.DMA_UNMAP, w.DmaUnmap(address=0x500000, size=0x1000).pack() + b"\0" * 8)
    client.request(w.Command.DEVICE_RESET, b"\0" * 8)
    assert client.device_info().num_regions == w.PCI_NUM_REGIONS


def test_commands_before_version(sock_path: str) -> None:
    with VfioUserClient.connect(sock_path, negotiate=False) as c:
        expect_error(c, w.Command.DEVICE_GET_INFO, w.DeviceInfo().pack())
        c.negotiate({})
        assert c.device_info().num_irqs == w.PCI_NUM_IRQS


@pytest.mark.parametrize("body", [
    w.VersionHead(major=1, minor=0).pack() + b"{}\0",
    w.VersionHead().pack() + b"{not json\0",
    w.VersionHead().pack() + b"[1]\0",
    w.VersionHead().pack() + json.dumps({"capabilities": {"max_msg_fds": -1}}).encode() + b"\0",
    w.VersionHead().pack() + json.dumps({"capabilities": {"pgsizes": 8192}}).encode() + b"\0",
    b"\x00",
], ids=["major", "json", "not-object", "bad-cap", "no-4k-pages", "short"])
def test_bad_version_gets_error_and_close(sock_path: str, body: bytes) -> None:
    c = VfioUserClient.connect(sock_path, negotiate=False)
    c.send(w.Command.VERSION, body)
    reply = c.receive(timeout=5)
    assert reply is not None and reply.header.flags & w.MsgFlag.ERROR
    assert c.receive(timeout=5) is None
    c.close()
    still_serving(sock_path)


def test_second_version_refused(client: VfioUserClient) -> None:
    expect_error(client, w.Command.VERSION, w.VersionHead().pack() + b"{}\0")


# ------------------------------------------------------------------ regions
def test_region_out_of_range(client: VfioUserClient) -> None:
    def read(region: int, offset: int, count: int) -> bytes:
        return w.RegionAccess(offset=offset, region=region, count=count).pack()

    expect_error(client, w.Command.REGION_READ, read(w.PciRegion.CONFIG, 4094, 4))
    expect_error(client, w.Command.REGION_READ, read(w.PciRegion.CONFIG, (1 << 64) - 2, 4))
    expect_error(client, w.Command.REGION_READ, read(9, 0, 4))
    expect_error(client, w.Command.REGION_READ, read(w.PciRegion.BAR2, 0, 4))  # absent BAR
    expect_error(client, w.Command.REGION_READ, read(w.PciRegion.CONFIG, 0, 0))
    expect_error(client, w.Command.REGION_READ, read(w.PciRegion.CONFIG, 0, 4)[:12])  # short
    # A read with bytes after its structure is served (it used to be refused; see
    # test_request_longer_than_its_structure_is_read_by_it); a write must carry
    # exactly its count of data, as libvfio-user requires.
    # A write whose count disagrees with its data.
    expect_error(client, w.Command.REGION_WRITE,
                 w.RegionAccess(offset=0x4, region=w.PciRegion.CONFIG, count=4).pack() + b"\0\0")
    assert len(client.region_read(w.PciRegion.CONFIG, 0, 4096)) == 4096


def test_region_info_bad_index_and_argsz(client: VfioUserClient) -> None:
    expect_error(client, w.Command.DEVICE_GET_REGION_INFO, w.RegionInfo(index=9).pack())
    expect_error(client, w.Command.DEVICE_GET_REGION_INFO, w.RegionInfo(argsz=8, index=0).pack())
    expect_error(client, w.Command.DEVICE_GET_INFO, w.DeviceInfo(argsz=8).pack())
    expect_error(client, w.Command.DEVICE_GET_INFO, w.DeviceInfo().pack()[:8])  # short
    # DeviceInfo().pack() + trailing bytes used to be refused; now it is read by
    # its structure (test_request_longer_than_its_structure_is_read_by_it).


# ------------------------------------------------------------------ DMA maps
def test_dma_map_errors(client: VfioUserClient) -> None:
    client.map_memfd(0x100000, 0x10000)
    fd = os.memfd_create("x")
    os.ftruncate(fd, 0x10000)
    try:
        # Overlapping an existing map.
        expect_error(client, w.Command.DMA_MAP,
                     w.DmaMap(flags=3, address=0x108000, size=0x10000).pack(), [os.dup(fd)], errno.EEXIST)
        # Unaligned address / size, reserved flags, bad argsz, two fds.
        expect_error(client, w.Command.DMA_MAP, w.DmaMap(flags=3, address=0x300001, size=0x1000).pack())
        expect_error(client, w.Command.DMA_MAP, w.DmaMap(flags=3, address=0x300000, size=0x100).pack())
        expect_error(client, w.Command.DMA_MAP, w.DmaMap(flags=0x13, address=0x300000, size=0x1000).pack())
        expect_error(client, w.Command.DMA_MAP,
                     w.DmaMap(argsz=16, flags=3, address=0x300000, size=0x1000).pack())
        expect_error(client, w.Command.DMA_MAP, w.DmaMap(flags=3, address=0x300000, size=0x1000).pack(),
                     [os.dup(fd), os.dup(fd)])
        # An fd that cannot be mapped that large (past the end of the file).
        expect_error(client, w.Command.DMA_MAP,
                     w.DmaMap(flags=3, address=0x400000, size=0x100000, offset=0x1000000).pack(),
                     [os.dup(fd)])
    finally:
        os.close(fd)
    # Unmapping what is not mapped, or only part of a map.
    expect_error(client, w.Command.DMA_UNMAP, w.DmaUnmap(address=0x900000, size=0x1000).pack(),
                 err=errno.ENOENT)
    expect_error(client, w.Command.DMA_UNMAP, w.DmaUnmap(address=0x100000, size=0x1000).pack(),
                 err=errno.ENOENT)
    client.dma_unmap(0x100000, 0x10000)
    client.dma_map(0x100000, 0x10000)  # the range is free again (message-only this time)


# ------------------------------------------------------------------ irqs
def test_irq_errors(client: VfioUserClient) -> None:
    trig = w.IrqSetFlag.DATA_EVENTFD | w.IrqSetFlag.ACTION_TRIGGER
    efd = new_eventfd()
    try:
        expect_error(client, w.Command.DEVICE_GET_IRQ_INFO, w.IrqInfo(index=7).pack())
        expect_error(client, w.Command.DEVICE_SET_IRQS,
                     w.IrqSet(flags=trig, index=7, start=0, count=1).pack(), [os.dup(efd)])
        expect_error(client, w.Command.DEVICE_SET_IRQS,
                     w.IrqSet(flags=trig, index=w.PciIrq.MSIX, start=1000, count=1).pack(), [os.dup(efd)])
        # Two data flags, no action flag, argsz mismatch, fd count mismatch, bool without data.
        both = w.IrqSetFlag.DATA_NONE | w.IrqSetFlag.DATA_BOOL | w.IrqSetFlag.ACTION_TRIGGER
        expect_error(client, w.Command.DEVICE_SET_IRQS, w.IrqSet(flags=both, index=2, count=1).pack())
        expect_error(client, w.Command.DEVICE_SET_IRQS,
                     w.IrqSet(flags=w.IrqSetFlag.DATA_NONE, index=2, count=1).pack())
        expect_error(client, w.Command.DEVICE_SET_IRQS,
                     w.IrqSet(argsz=24, flags=trig, index=2, count=1).pack(), [os.dup(efd)])
        expect_error(client, w.Command.DEVICE_SET_IRQS,
                     w.IrqSet(flags=trig, index=2, count=2).pack(), [os.dup(efd)])
        boolf = w.IrqSetFlag.DATA_BOOL | w.IrqSetFlag.ACTION_MASK
        expect_error(client, w.Command.DEVICE_SET_IRQS, w.IrqSet(flags=boolf, index=2, count=2).pack())
        # Only eventfds: a pipe is refused with EINVAL, and the server's copy is closed.
        r, wr = os.pipe()
        expect_error(client, w.Command.DEVICE_SET_IRQS,
                     w.IrqSet(flags=trig, index=w.PciIrq.MSIX, start=0, count=1).pack(), [wr])
        os.close(wr)
        assert os.read(r, 1) == b""
        os.close(r)
        # Bytes after an EVENTFD request (counted in its argsz) are ignored.
        padded = w.IrqSet(argsz=w.IrqSet.SIZE + 4, flags=trig, index=w.PciIrq.MSIX, start=0, count=1)
        client.request(w.Command.DEVICE_SET_IRQS, padded.pack() + b"\0" * 4, [os.dup(efd)])
        # And a good one still works.
        client.set_irq_eventfds(w.PciIrq.MSIX, [os.dup(efd)])
    finally:
        os.close(efd)


# ------------------------------------------------------------------ posted writes, the rest
def test_no_reply_error_gets_no_reply(client: VfioUserClient) -> None:
    bad = w.RegionAccess(offset=1 << 40, region=w.PciRegion.BAR0, count=4).pack() + b"\0" * 4
    client.send(w.Command.REGION_WRITE, bad, flags=w.MsgFlag.NO_REPLY)
    # The next reply we see is the one to our next request, not an error for the posted write.
    assert client.device_info().num_regions == w.PCI_NUM_REGIONS


def test_write_multi(sock_path: str) -> None:
    with VfioUserClient.connect(sock_path, caps={"write_multiple": False}) as c:
        expect_error(c, w.Command.REGION_WRITE_MULTI, w.WriteMultiHead(wr_cnt=0).pack(), err=errno.ENOTSUP)
    with VfioUserClient.connect(sock_path) as c:
        entry = w.WriteMultiEntry(offset=0x4, region=w.PciRegion.CONFIG, count=3, data=b"\0" * 8)
        expect_error(c, w.Command.REGION_WRITE_MULTI, w.WriteMultiHead(wr_cnt=1).pack() + entry.pack())
        expect_error(c, w.Command.REGION_WRITE_MULTI, w.WriteMultiHead(wr_cnt=2).pack() + entry.pack())
        good = entry.replace(count=2, data=(0x0006).to_bytes(2, "little") + b"\0" * 6)
        _, payload, _ = c.request(w.Command.REGION_WRITE_MULTI, w.WriteMultiHead(wr_cnt=1).pack() + good.pack())
        assert w.WriteMultiHead.unpack(payload).wr_cnt == 1
        assert c.region_read(w.PciRegion.CONFIG, 0x4, 2) == (0x0006).to_bytes(2, "little")


def test_migration_commands_in_the_wrong_state(client: VfioUserClient) -> None:
    # PROBE answers with the request itself; an unknown feature gets ENOTTY, as the
    # kernel's VFIO_DEVICE_FEATURE does.
    probe = w.DeviceFeatureHead(flags=w.FEATURE_GET | w.FEATURE_PROBE | 1).pack()
    _, payload, _ = client.request(w.Command.DEVICE_FEATURE, probe)
    assert payload == probe
    expect_error(client, w.Command.DEVICE_FEATURE, w.DeviceFeatureHead(flags=w.FEATURE_GET | 99).pack(),
                 err=errno.ENOTTY)
    # Migration data makes no sense while RUNNING: refused with the spec's error.
    expect_error(client, w.Command.MIG_DATA_READ, w.MigDataHead(argsz=8 + 4096, size=4096).pack())
    expect_error(client, w.Command.MIG_DATA_WRITE, w.MigDataHead(argsz=8, size=4).pack() + b"abcd")


def test_second_client_refused_while_first_connected(client: VfioUserClient, sock_path: str) -> None:
    other = VfioUserClient.connect(sock_path, negotiate=False)
    assert other.receive(timeout=5) is None
    other.close()
    assert client.device_info().num_regions == w.PCI_NUM_REGIONS


def test_disconnect_leaves_device_in_reset_state(sock_path: str) -> None:
    with VfioUserClient.connect(sock_path) as c:
        c.region_write(w.PciRegion.CONFIG, 0x4, (0x0006).to_bytes(2, "little"))  # MEM | BUS_MASTER
        assert c.region_read(w.PciRegion.CONFIG, 0x4, 2) == b"\x06\x00"
    with VfioUserClient.connect(sock_path) as c:
        assert c.region_read(w.PciRegion.CONFIG, 0x4, 2) == b"\x00\x00"
