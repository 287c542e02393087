"""Hostile vfio-user clients against a real ``appliance run``.

The device takes one client at a time: while the hostile client is
connected each case checks the rest of the appliance with
``assert_healthy(vfio_user=False)``, then closes it and checks everything
(a fresh vfio-user client included) with ``assert_healthy()``.
"""

from __future__ import annotations

import errno
import os
import select
import time

import pytest
from hostile import HostileTarget, wait_until

from appliance.client.migrate import dma_logging_start, dma_logging_stop, feature
from appliance.client.vfio_user import VfioUserClient, VfioUserError, new_eventfd
from appliance.vfio_user import wire as w
from appliance.vfio_user.framing import encode

RSS_SLACK = 64 << 20
DISCONNECT_LINE = "replies unread"


def connect(target: HostileTarget) -> VfioUserClient:
    return VfioUserClient.connect(target.nvme_sock, timeout=5.0)


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak RSS since the last reset (clear_refs 5)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_pipelining_client_that_never_reads_is_disconnected(target: HostileTarget) -> None:
    """Thousands of GET_REGION_INFO, no reply read: the loop keeps serving control
    and vhost in time, and the client is dropped once its backlog passes 1 MiB."""
    client = connect(target)
    sock = client.sock
    sock.setblocking(False)
    request = w.RegionInfo(argsz=w.RegionInfo.SIZE, index=w.PciRegion.CONFIG).pack()
    burst = b"".join(encode(w.Header(msg_id=i & 0xFFFF, command=w.Command.DEVICE_GET_REGION_INFO),
                            request) for i in range(5000))  # 48 bytes each, 48-byte replies
    dropped = False
    deadline = time.monotonic() + 60
    while not dropped and time.monotonic() < deadline:
        pending = memoryview(burst)
        while pending:
            if not select.select([], [sock], [], 1.0)[1]:
                break  # the server is behind: check on it, then go on
            try:
                pending = pending[sock.send(pending):]
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
        target.assert_healthy(vfio_user=False)  # control and vhost served while we flood
        dropped = dropped or DISCONNECT_LINE in target.proc.log_text()
    assert wait_until(lambda: DISCONNECT_LINE in target.proc.log_text()), target.proc.log_text()
    lines = [line for line in target.proc.log_text().splitlines() if DISCONNECT_LINE in line]
    assert len(lines) == 1 and "nvme#" in lines[0], lines
    client.close()
    target.assert_healthy()


def test_region_info_with_the_whole_argsz_as_payload_is_answered(target: HostileTarget) -> None:
    with connect(target) as client:
        argsz = 256
        request = w.RegionInfo(argsz=argsz, index=w.PciRegion.BAR0).pack()
        _, payload, fds = client.request(w.Command.DEVICE_GET_REGION_INFO,
                                         request + bytes(argsz - len(request)))
        for fd in fds:
            os.close(fd)
        info = w.RegionInfo.unpack(payload)
        assert info.index == w.PciRegion.BAR0 and info.size > 0
        target.assert_healthy(vfio_user=False)
    target.assert_healthy()


def test_dma_unmap_with_an_fd_closes_it_and_unmaps(target: HostileTarget) -> None:
    with connect(target) as client:
        client.map_memfd(0x100000, 0x10000)
        r, wr = os.pipe()
        try:
            client.request(w.Command.DMA_UNMAP, w.DmaUnmap(address=0x100000, size=0x10000).pack(),
                           [wr])
            os.close(wr)
            readable = select.select([r], [], [], 5.0)[0]
            assert readable and os.read(r, 1) == b"", "the server kept the fd"
        finally:
            os.close(r)
        client.dma_map(0x100000, 0x10000)  # the range was unmapped: free again
        target.assert_healthy(vfio_user=False)
    target.assert_healthy()


def test_tiny_dma_logging_report_for_a_huge_range_stays_bounded(target: HostileTarget) -> None:
    """A 32-byte request for 8 TiB of dirty bits (a 256 MiB bitmap) is refused
    with E2BIG; peak RSS stays within 64 MiB of the baseline."""
    with open(f"/proc/{target.pid}/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    with connect(target) as client:
        dma_logging_start(client, 4096)
        report = w.DmaLoggingReport(iova=0, length=8 << 40, page_size=4096).pack()
        head = w.DeviceFeatureHead(argsz=0xFFFFFFFF, flags=w.FEATURE_GET | w.Feature.DMA_LOGGING_REPORT)
        assert len(head.pack() + report) == 32
        with pytest.raises(VfioUserError) as info:
            client.request(w.Command.DEVICE_FEATURE, head.pack() + report)
        assert info.value.errno == errno.E2BIG
        # The largest report allowed (a 1 MiB bitmap: 32 GiB of 4 KiB pages) is answered.
        bitmap = feature(client, w.FEATURE_GET | w.Feature.DMA_LOGGING_REPORT,
                         w.DmaLoggingReport(iova=0, length=32 << 30, page_size=4096).pack(),
                         reply_data=w.DmaLoggingReport.SIZE + (1 << 20))
        assert len(bitmap) == w.DmaLoggingReport.SIZE + (1 << 20)
        dma_logging_stop(client)
        grown = peak_rss(target.pid) - target.base_rss
        assert grown < RSS_SLACK, f"peak RSS {grown >> 20} MiB above the baseline"
        target.assert_healthy(vfio_user=False)
    target.assert_healthy()


def test_set_irqs_with_a_pipe_fd_is_refused(target: HostileTarget) -> None:
    with connect(target) as client:
        r, wr = os.pipe()
        trigger = w.IrqSetFlag.DATA_EVENTFD | w.IrqSetFlag.ACTION_TRIGGER
        try:
            with pytest.raises(VfioUserError) as info:
                client.request(w.Command.DEVICE_SET_IRQS,
                               w.IrqSet(flags=trigger, index=w.PciIrq.MSIX, start=0, count=1).pack(),
                               [wr])
            assert info.value.errno == errno.EINVAL
            os.close(wr)
            assert os.read(r, 1) == b""  # the server's copy is closed
        finally:
            os.close(r)
        efd = new_eventfd()
        client.set_irq_eventfds(w.PciIrq.MSIX, [efd])  # an eventfd is still taken
        target.assert_healthy(vfio_user=False)
    target.assert_healthy()
