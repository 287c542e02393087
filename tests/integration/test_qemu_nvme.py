"""Acceptance: the Linux nvme driver (guest kernel 6.1, QEMU 11.1) uses the appliance as a disk."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
import xxhash
from guests import Guest, GuestFactory

from appliance.testing.qemu import qemu_args

pytestmark = pytest.mark.integration

MIB = 1 << 20
PATTERN_LINE = b"appliance-pattern-0123456789abcdef\n"
WAIT_DEV = "for i in $(seq 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done; [ -b /dev/nvme0n1 ]"


def pattern(size: int) -> bytes:
    """1 MiB of PATTERN_LINE repeated (cut at 1 MiB), repeated: what the guest writes."""
    chunk = (PATTERN_LINE * (MIB // len(PATTERN_LINE) + 1))[:MIB]
    return (chunk * (size // MIB + 1))[:size]


def boot(guest_factory: GuestFactory, appliance: Any, smp: int = 2) -> Guest:
    args = qemu_args(appliance.config, net=False)
    i = args.index("-device")
    g = guest_factory(args=args[i:i + 2], append="qe.shell", smp=smp)
    _, rc = g.run(WAIT_DEV, timeout=120)
    assert rc == 0, g.tail()
    return g


def power_off(g: Guest) -> None:
    g.send("exit\n")
    g.wait_for(r"GUEST-POWEROFF", timeout=60)
    assert g.wait_exit(timeout=30) == 0


def test_linux_nvme_driver_writes_and_reads_back(guest_factory: GuestFactory, appliance_factory: Any) -> None:
    appliance = appliance_factory(storage={"namespaces": [{"image": "{data_dir}/disk0.img", "size": "128M"}],
                                           "io_queues": 4})
    image = Path(appliance.config.storage.namespaces[0].image)
    g = boot(guest_factory, appliance)
    assert g.run("cat /sys/block/nvme0n1/size") == (str(128 * MIB // 512), 0)
    model, _ = g.run("cat /sys/class/nvme/nvme0/model")
    assert model.strip() == "Appliance NVMe"
    queues, rc = g.run("ls /sys/block/nvme0n1/mq | wc -l")
    assert rc == 0 and int(queues) >= 2, queues
    # One MiB of the pattern made once (busybox `yes` writes a line per syscall, slow
    # under TCG), then 64 copies of it to the disk with O_DIRECT.
    write = ("yes appliance-pattern-0123456789abcdef | head -c 1048576 > /tmp/chunk && "
             "for i in $(seq 64); do cat /tmp/chunk; done | "
             "dd of=/dev/nvme0n1 bs=1M count=64 iflag=fullblock oflag=direct 2>&1; sync")
    out, rc = g.run(write, timeout=300)
    assert rc == 0 and "64+0 records out" in out, out
    power_off(g)
    data = image.read_bytes()[:64 * MIB]
    assert xxhash.xxh64(data).hexdigest() == xxhash.xxh64(pattern(64 * MIB)).hexdigest()

    g = boot(guest_factory, appliance)
    out, rc = g.run("dd if=/dev/nvme0n1 bs=1M count=64 iflag=direct 2>/dev/null | sha256sum", timeout=300)
    assert rc == 0 and out.split()[0] == hashlib.sha256(pattern(64 * MIB)).hexdigest(), out
    power_off(g)
    assert appliance.alive


def test_filesystem_survives_reboot(guest_factory: GuestFactory, appliance_factory: Any) -> None:
    appliance = appliance_factory(storage={"namespaces": [{"image": "{data_dir}/disk0.img", "size": "64M"}]})
    g = boot(guest_factory, appliance)
    out, rc = g.run("mke2fs -q /dev/nvme0n1 2>&1 && mkdir -p /mnt && mount -t ext2 /dev/nvme0n1 /mnt "
                    "&& echo kept-across-reboot > /mnt/file && umount /mnt && echo ok", timeout=120)
    assert rc == 0 and out.endswith("ok"), out
    power_off(g)
    g = boot(guest_factory, appliance)
    out, rc = g.run("mkdir -p /mnt && mount -t ext2 /dev/nvme0n1 /mnt && cat /mnt/file", timeout=120)
    assert (out, rc) == ("kept-across-reboot", 0), out
    power_off(g)


def test_guest_memory_without_fd_goes_through_dma_messages(
        guest_factory: GuestFactory, appliance_factory: Any) -> None:
    """QEMU with anonymous guest RAM passes no fd: every DMA is a DMA_READ/WRITE message.

    QEMU answers those under its big lock; the server keeps serving synchronous
    requests (config space, SET_IRQS) while it waits, or both sides stall.
    """
    appliance = appliance_factory(storage={"namespaces": [{"image": "{data_dir}/disk0.img", "size": "64M"}]})
    args = qemu_args(appliance.config, net=False)
    i = args.index("-device")
    g = guest_factory(args=args[i:i + 2], append="qe.nvmetest", share=False)
    g.wait_for(r"GUEST-NVME-PRESENT sectors=131072", timeout=240)
    g.wait_for(r"GUEST-NVME-RW-OK", timeout=120)
    assert g.wait_exit(timeout=60) == 0
    assert not [x for x in g.lines() if "vfio" in x], g.tail()
    log = appliance.log_path.read_text()
    assert " DMA_READ 0x" in log and " DMA_WRITE 0x" in log
    assert "CSTS.CFS" not in log, log[-2000:]


@pytest.mark.parametrize("doorbells", ["message", "mmap"])
def test_linux_nvme_driver_copies_64m_with_each_doorbell_mode(
        guest_factory: GuestFactory, appliance_factory: Any, doorbells: str) -> None:
    """storage.doorbells: with ``mmap`` QEMU maps BAR0's doorbell page from the region fd
    (a sparse mmap area): the guest's doorbell writes land in it with no message and the
    controller's poll timer notices them.  The guest copies 64 MiB with direct I/O from
    the first half of the disk to the second (64 MiB of reads, 64 MiB of writes); the
    host checks the image.  (A copy needs no pattern generator or hash in the guest,
    which take tens of seconds under TCG.)"""
    appliance = appliance_factory(storage={
        "namespaces": [{"image": "{data_dir}/disk0.img", "size": "128M"}],
        "io_queues": 2, "doorbells": doorbells})
    image = Path(appliance.config.storage.namespaces[0].image)
    data = random.Random(3).randbytes(64 * MIB)
    with open(image, "r+b") as f:
        f.write(data)
    g = boot(guest_factory, appliance)

    def region_writes() -> int:
        return appliance.log_path.read_text().count(" REGION_WRITE ")

    before = region_writes()
    out, rc = g.run("dd if=/dev/nvme0n1 of=/dev/nvme0n1 bs=1M count=64 seek=64 "
                    "iflag=direct oflag=direct 2>&1", timeout=120)
    assert rc == 0 and "64+0 records out" in out, out
    during = region_writes() - before
    power_off(g)
    copied = image.read_bytes()[64 * MIB:128 * MIB]
    assert xxhash.xxh64(copied).hexdigest() == xxhash.xxh64(data).hexdigest()
    if doorbells == "mmap":  # every doorbell went through the page: no register write at all
        assert during == 0, during
    else:  # >= 128 commands of 512 KiB (MDTS); with shadow doorbells (Linux uses
        # Doorbell Buffer Config) about one MMIO doorbell write each
        assert during >= 64, during
    assert "CSTS.CFS" not in appliance.log_path.read_text()
    assert appliance.alive
