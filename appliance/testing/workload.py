"""A verifying write load for migration tests and benchmarks (runtime layer: it blocks).

:class:`VerifiedWriter` drives a :class:`~appliance.client.nvme.NvmeDriver`
with random-block writes, each read back and compared at once, and keeps
the last data written per block so :meth:`VerifiedWriter.verify_all` can
check every block later — on whichever appliance the driver is attached to
by then.  :func:`move_driver` is the switch: it makes the destination
connection look like the source one (:func:`~appliance.client.attach.attach_like`:
same guest memory, same eventfds) and points the driver at it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import xxhash

from appliance.client.attach import attach_like
from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.vfio_user.wire import PciIrq


class VerifyError(AssertionError):
    """What the device returned is not what was written."""


class VerifiedWriter:
    """Random verified writes of ``blocks`` logical blocks each."""

    def __init__(self, driver: NvmeDriver, nsid: int = 1, *, blocks: int = 8,
                 seed: int = 1, qid: int = 1) -> None:
        self.driver = driver
        self.nsid = nsid
        self.blocks = blocks
        self.qid = qid
        self.rng = random.Random(seed)
        self.block_size = driver.block_size[nsid]
        self.slots = driver.ns_blocks[nsid] // blocks
        self.written: dict[int, bytes] = {}  # first LBA -> data last written there
        self.ios = 0

    def step(self, count: int = 1) -> None:
        """Write ``count`` random slots with random data; read each back and compare.

        Raises:
            VerifyError: a read returned other data.
        """
        for _ in range(count):
            lba = self.rng.randrange(self.slots) * self.blocks
            data = self.rng.randbytes(self.blocks * self.block_size)
            self.driver.write(self.nsid, lba, data, qid=self.qid)
            got = self.driver.read(self.nsid, lba, self.blocks, qid=self.qid)
            self.ios += 2
            if got != data:
                raise VerifyError(f"LBA {lba}: read back differs right after the write")
            self.written[lba] = data

    def verify_all(self) -> int:
        """Read every slot written so far and compare; returns how many.

        Raises:
            VerifyError: a slot differs.
        """
        for lba, data in self.written.items():
            got = self.driver.read(self.nsid, lba, self.blocks, qid=self.qid)
            self.ios += 1
            if got != data:
                raise VerifyError(f"LBA {lba}: differs from the last write")
        return len(self.written)


def move_driver(driver: NvmeDriver, dst: VfioUserClient) -> VfioUserClient:
    """Wire ``dst`` like the driver's connection and return the old client.

    Call :func:`prepare_destination` before the destination leaves RESUMING,
    and this after the migration committed (the driver's doorbells then go
    to the destination).
    """
    old, driver.c = driver.c, dst
    return old


def prepare_destination(driver: NvmeDriver, dst: VfioUserClient) -> None:
    """Map the driver's memory and install its MSI-X eventfds on ``dst``."""
    attach_like(driver.c, dst, {PciIrq.MSIX: driver.eventfds} if driver.eventfds else None)


def file_hash(path: str | os.PathLike[str], chunk: int = 4 << 20) -> str:
    """xxh64 of a file's bytes (hex)."""
    h = xxhash.xxh64()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_image(path: Path, size: int, *, seed: int, random_mib: int = 4, fill: int = 0) -> None:
    """A sparse image of ``size`` bytes with ``random_mib`` MiB of random data
    at seed-chosen places and, with ``fill``, a MiB of that byte at 1 MiB."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
        if fill:
            f.seek(1 << 20)
            f.write(bytes([fill]) * (1 << 20))
        for _ in range(random_mib):
            f.seek(rng.randrange(size >> 20) << 20)
            f.write(rng.randbytes(1 << 20))


def pair_configs(tmp: Path, size: int, *, shared: bool = False,
                 dst_size: int | None = None) -> tuple[dict[str, object], dict[str, object]]:
    """Configs of a source and a destination appliance under ``tmp``.

    With ``shared`` both use the source's image; ``dst_size`` gives the
    destination's namespace another size (another device configuration).
    """
    from appliance.testing.process import make_config

    cfgs = []
    for name, nbytes in (("src", size), ("dst", dst_size or size)):
        image = tmp / ("src" if shared else name) / "data" / "disk0.img"
        cfgs.append(make_config(tmp / name, storage={
            "namespaces": [{"image": str(image), "size": f"{nbytes >> 20}M"}]}))
    return cfgs[0], cfgs[1]
