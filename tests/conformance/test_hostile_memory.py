"""Peers that shrink the memory they shared, against a real ``appliance run``.

A page of a shared mapping past the end of its file is a SIGBUS, which no
Python process survives.  The appliance mmaps only files that cannot shrink
(a memfd it sealed with F_SEAL_SHRINK, or one sealed so already) and reaches
any other file through its fd, so a shrink fails the access like an
unreachable guest address: an NVMe Data Transfer Error, a broken virtqueue,
one log line.  Each case ends with :meth:`hostile.HostileTarget.assert_healthy`.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from hostile import HostileTarget, wait_until

from appliance.client.nvme import BAR0, NvmeDriver, NvmeError
from appliance.client.vfio_user import VfioUserClient
from appliance.memory import F_ADD_SEALS, F_SEAL_SEAL
from appliance.net import vhost_wire as vw
from appliance.runtime.control import ControlClient
from appliance.storage import spec

EXTRA = 0x8000_0000  # client address of the extra region, outside the driver's memory
EXTRA_SIZE = 1 << 20
SHRUNK_LOG = "client memory region 0x80000000+0x100000"


def memfd(sealable: bool) -> int:
    fd = os.memfd_create("hostile-guest", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, EXTRA_SIZE)
    return fd


def io(driver: NvmeDriver, opcode: int, lba: int, blocks: int = 8) -> None:
    """One command moving ``blocks`` blocks through the extra region (NvmeError on failure)."""
    driver.run(1, driver.rw_command(opcode, 1, lba, blocks, EXTRA, 0))


# ---------------------------------------------------------------- vfio-user
@pytest.mark.parametrize("kind", ["plain-memfd", "seal-sealed"])
def test_vfio_user_client_shrinks_unsealable_memory(target: HostileTarget, kind: str) -> None:
    """The region is reached through its fd; after a shrink to 0, commands moving
    data through it fail with Data Transfer Error, the controller lives on."""
    fd = memfd(sealable=kind == "seal-sealed")
    if kind == "seal-sealed":  # may never be sealed again, and not against shrinking
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL)
    with VfioUserClient.connect(target.nvme_sock) as client:
        driver = NvmeDriver(client)
        driver.setup(io_queues=1, depth=16)
        client.dma_map(EXTRA, EXTRA_SIZE, fd)
        data = os.urandom(4096)
        os.pwrite(fd, data, 0)
        io(driver, spec.IoOpcode.WRITE, 64)  # reached through the fd: works
        assert driver.read(1, 64, 8) == data
        os.ftruncate(fd, 0)  # the hostile part
        for opcode in (spec.IoOpcode.WRITE, spec.IoOpcode.READ):
            with pytest.raises(NvmeError) as info:
                io(driver, opcode, 64)
            assert (info.value.status, info.value.dnr) == (spec.Status.DATA_TRANSFER_ERROR, False)
        assert os.fstat(fd).st_size == 0  # the READ's data was refused, not grown back
        assert driver.read(1, 64, 8) == data  # the controller goes on
        assert target.proc.log_text().count(SHRUNK_LOG) == 1
        target.assert_healthy(vfio_user=False)
        driver.close()
    os.close(fd)
    target.assert_healthy()


def test_vfio_user_client_shrinks_the_memory_holding_its_queues(
        target: HostileTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's own memory (queues included) made without MFD_ALLOW_SEALING,
    shrunk to 0, then a doorbell: the SQ entry is unreachable, so the controller
    goes CFS (one warning, one CFS line); the process lives."""
    real = os.memfd_create
    monkeypatch.setattr(os, "memfd_create", lambda name, flags=os.MFD_CLOEXEC:
                        real(name, flags & ~os.MFD_ALLOW_SEALING))
    with VfioUserClient.connect(target.nvme_sock) as client:
        driver = NvmeDriver(client)
        driver.setup(io_queues=1, depth=16)
        monkeypatch.undo()
        assert driver.read(1, 0, 1) is not None  # works through the fd
        driver.submit(1, spec.Command(opcode=spec.IoOpcode.FLUSH, nsid=1), ring=False)
        os.ftruncate(driver.area.fd, 0)  # from here on nobody may touch driver.mem
        driver.ring(1)  # a message: the driver's memory is not touched
        assert wait_until(lambda: spec.CSTS.get(client.read32(BAR0, spec.Reg.CSTS), "cfs") == 1)
        log = target.proc.log_text()
        assert log.count("client memory region 0x40000000+0x4000000") == 1
        assert log.count("controller fatal status (CSTS.CFS)") == 1
        target.assert_healthy(vfio_user=False)
        driver.close()  # eventfds only
        driver.mem.release()
    target.assert_healthy()


def test_vfio_user_client_cannot_shrink_sealable_memory(target: HostileTarget) -> None:
    """A memfd that allows sealing is sealed on DMA_MAP: the shrink itself fails
    with EPERM and I/O through the region goes on (mmap'd, zero-copy)."""
    fd = memfd(sealable=True)
    with VfioUserClient.connect(target.nvme_sock) as client:
        driver = NvmeDriver(client)
        driver.setup(io_queues=1, depth=16)
        client.dma_map(EXTRA, EXTRA_SIZE, fd)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        data = os.urandom(4096)
        os.pwrite(fd, data, 0)
        io(driver, spec.IoOpcode.WRITE, 128)
        os.pwrite(fd, bytes(4096), 0)
        io(driver, spec.IoOpcode.READ, 128)
        assert os.pread(fd, 4096, 0) == data
        assert SHRUNK_LOG not in target.proc.log_text()
        target.assert_healthy(vfio_user=False)
        driver.close()
    os.close(fd)
    target.assert_healthy()


def test_doorbell_page_cannot_be_shrunk(tmp_path: Path) -> None:
    """With ``storage.doorbells: mmap`` the client gets our memfd: sealed, EPERM."""
    with HostileTarget(tmp_path, storage={"doorbells": "mmap"}) as target:
        with VfioUserClient.connect(target.nvme_sock) as client:
            reply = client.region_info(0)
            assert reply.fd is not None
            try:
                with pytest.raises(PermissionError):
                    os.ftruncate(reply.fd, 0)
            finally:
                os.close(reply.fd)
            driver = NvmeDriver(client, doorbells="mmap")
            driver.setup(io_queues=1, depth=16)
            driver.write(1, 0, b"x" * 512)
            assert driver.read(1, 0, 1) == b"x" * 512
            driver.close()
        target.assert_healthy()


# ---------------------------------------------------------------- vhost-user
RING = 16
GPA, UVA = 0x100000, 0x7F0000000000
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000  # offsets of TX ring 1's areas in the memfd
BUF = 0x4000


class Frontend:
    """Just enough of a vhost-user front-end, on a blocking socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5.0)
        self.sock.connect(path)

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
             reply: bool = False) -> int | None:
        flags = vw.VERSION | (vw.FLAG_NEED_REPLY if reply else 0)
        data = vw.Header(request=request, flags=flags, size=len(payload)).pack() + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)
        if not reply and request not in (vw.Request.GET_FEATURES, vw.Request.GET_PROTOCOL_FEATURES):
            return None
        head = self._recv(vw.HEADER_SIZE)
        return vw.U64.unpack(self._recv(vw.Header.unpack(head).size)).value

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the appliance closed the connection"
            out += chunk
        return out

    def u64(self, request: int, value: int, **kw: Any) -> int | None:
        return self.send(request, vw.U64(value=value).pack(), **kw)

    def state(self, request: int, index: int, num: int) -> None:
        self.send(request, vw.VringState(index=index, num=num).pack())


def port_status(target: HostileTarget, index: int) -> dict[str, Any]:
    with ControlClient(target.control_sock, timeout=5.0) as ctl:
        status = ctl("status")
    ports = status["net"]["ports"]
    return ports[index] if isinstance(ports, list) else list(ports.values())[index]


@pytest.mark.parametrize("sealable", [False, True], ids=["plain-memfd", "sealable-memfd"])
def test_vhost_front_end_shrinks_its_memory_and_kicks(target: HostileTarget, sealable: bool) -> None:
    """DPDK's ``--no-huge`` memory is a memfd without MFD_ALLOW_SEALING: the rings
    are read through the fd, and after a shrink the kick marks the ring broken.
    A memfd that allows sealing is sealed instead: the shrink fails, frames flow."""
    fd = os.memfd_create("hostile-vhost", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, EXTRA_SIZE)
    mm = mmap.mmap(fd, EXTRA_SIZE)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    fe = Frontend(target.port_sock("p0"))
    try:
        fe.send(vw.Request.SET_OWNER)
        feats = fe.send(vw.Request.GET_FEATURES)
        assert feats is not None
        fe.u64(vw.Request.SET_FEATURES, feats & int(vw.Feature.VERSION_1))
        region = vw.MemoryRegion(guest_phys_addr=GPA, memory_size=EXTRA_SIZE,
                                 userspace_addr=UVA, mmap_offset=0)
        body = vw.MemoryHeader(nregions=1).pack() + region.pack()
        fe.send(vw.Request.SET_MEM_TABLE, body, fds=(fd,))
        fe.state(vw.Request.SET_VRING_NUM, 1, RING)
        fe.state(vw.Request.SET_VRING_BASE, 1, 0)
        fe.send(vw.Request.SET_VRING_ADDR, vw.VringAddr(
            index=1, flags=0, desc_user_addr=UVA + DESC, used_user_addr=UVA + USED,
            avail_user_addr=UVA + AVAIL, log_guest_addr=0).pack())
        fe.u64(vw.Request.SET_VRING_CALL, 1, fds=(call,))
        fe.u64(vw.Request.SET_VRING_KICK, 1, fds=(kick,))
        fe.send(vw.Request.GET_FEATURES)  # a round trip: everything above was handled
        # One transmit buffer: a virtio-net header and a broadcast frame.
        frame = bytes(vw.NET_HDR_LEGACY_SIZE) + b"\xff" * 6 + b"\x52\x54\0\0\0\x99" + b"\x08\x00" + bytes(46)
        mm[BUF:BUF + len(frame)] = frame
        struct.pack_into("<QIHH", mm, DESC, GPA + BUF, len(frame), 0, 0)
        struct.pack_into("<HHH", mm, AVAIL, 0, 1, 0)  # flags, idx 1, ring[0] = head 0
        if sealable:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
        else:
            mm.close()  # the test must not touch its own mapping after the shrink either
            os.ftruncate(fd, 0)
        os.eventfd_write(kick, 1)
        if sealable:
            assert wait_until(lambda: port_status(target, 0)["rx_packets"] == 1)
            assert "broken" not in port_status(target, 0)["queues"][1]
        else:
            assert wait_until(lambda: "broken" in port_status(target, 0)["queues"][1])
            assert "ring memory unreachable" in port_status(target, 0)["queues"][1]["broken"]
            assert target.proc.log_text().count("client memory region 0x100000+0x100000") == 1
        # Still connected, the front-end's fds are still held: no fd check yet (the
        # flag also skips the vfio-user check, done in the final call below).
        target.assert_healthy(vfio_user=False)
    finally:
        fe.sock.close()
        if not mm.closed:
            mm.close()
        for f in (fd, kick, call):
            os.close(f)
    target.assert_healthy()
