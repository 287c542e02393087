"""A namespace on a BlockExport (what the runtime's NBD connection offers), driven
in-process through the one NVMe driver: size and read-only from the export, every
command mapped to its request, a failed request to the file's NVMe status."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from appliance.client.nvme import NvmeDriver, NvmeError
from appliance.config import NamespaceConfig
from appliance.storage import NvmeController
from appliance.storage.identify_spec import NSATTR_WRITE_PROTECTED
from appliance.storage.namespace import Namespace
from appliance.storage.spec import IoOpcode, Status
from appliance.testing.nvme import controller_driver

SIZE = 1 << 20


class FakeExport:
    """A BlockExport over a bytearray that records requests and can fail them."""

    def __init__(self, size: int = SIZE, read_only: bool = False, block_size: int = 1) -> None:
        self.data = bytearray(size)
        self.size, self.read_only, self.block_size = size, read_only, block_size
        self.calls: list[tuple[str, int, int, bool]] = []
        self.fail: int | None = None
        self.closed = False

    def _check(self, what: str, offset: int, length: int, flag: bool = False) -> None:
        self.calls.append((what, offset, length, flag))
        if self.fail is not None:
            raise OSError(self.fail, f"{what} failed")

    def pread(self, length: int, offset: int) -> bytes:
        self._check("read", offset, length)
        return bytes(self.data[offset:offset + length])

    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        self._check("write", offset, len(data), fua)
        self.data[offset:offset + len(data)] = data

    def flush(self) -> None:
        self._check("flush", 0, 0)

    def write_zeroes(self, offset: int, length: int, deallocate: bool,
                     fua: bool = False) -> None:
        self._check("zero", offset, length, deallocate)
        self.data[offset:offset + length] = bytes(length)

    def close(self) -> None:
        self.closed = True


def controller(export: FakeExport, size: int = 0, block_size: int = 512) -> NvmeController:
    cfg = NamespaceConfig(image="nbd+unix:///disk?socket=/nowhere", size=size,
                          block_size=block_size, read_only=False, grow=False)
    return NvmeController([cfg], exports={1: export})


@pytest.fixture
def export() -> FakeExport:
    return FakeExport()


@pytest.fixture
def driver(export: FakeExport) -> Iterator[NvmeDriver]:
    ctrl = controller(export)
    d = controller_driver(ctrl)
    d.setup(io_queues=1, depth=16)
    yield d
    d.close()
    ctrl.close()
    assert export.closed  # the controller owns its exports


def test_size_and_io_go_to_the_export(driver: NvmeDriver, export: FakeExport) -> None:
    assert driver.ns_blocks[1] == SIZE // 512
    driver.write(1, 8, b"\xab" * 4096)
    assert export.data[4096:8192] == b"\xab" * 4096
    assert driver.read(1, 8, 8) == b"\xab" * 4096
    driver.write(1, 16, b"\x01" * 512, fua=True)  # FUA: the write, then a flush
    assert export.calls[-2:] == [("write", 8192, 512, False), ("flush", 0, 0, False)]
    driver.flush(1)
    assert export.calls[-1][0] == "flush"


def test_zeroing_keeps_reads_zero(driver: NvmeDriver, export: FakeExport) -> None:
    export.data[:] = b"\xff" * SIZE
    for deac, dealloc in ((0, False), (1 << 25, True)):
        done, _ = driver.io(IoOpcode.WRITE_ZEROES, 0, 8, cdw12=deac)
        assert done.status == 0 and export.calls[-1] == ("zero", 0, 4096, dealloc)
    assert driver.read(1, 0, 8) == bytes(4096)


def test_a_failing_export_fails_the_command_not_the_controller(driver: NvmeDriver,
                                                               export: FakeExport) -> None:
    export.fail = errno.EIO
    for call, status in ((lambda: driver.read(1, 0, 8), Status.UNRECOVERED_READ_ERROR),
                         (lambda: driver.write(1, 0, bytes(4096)), Status.WRITE_FAULT),
                         (lambda: driver.flush(1), Status.WRITE_FAULT)):
        with pytest.raises(NvmeError) as err:
            call()
        assert err.value.status == status and not err.value.dnr
    export.fail = None
    driver.write(1, 0, b"\x07" * 512)  # the next command works again
    assert driver.read(1, 0, 1) == b"\x07" * 512


def test_a_read_only_export_is_write_protected() -> None:
    export = FakeExport(read_only=True)
    ctrl = controller(export)
    d = controller_driver(ctrl)
    try:
        d.setup(io_queues=1, depth=16)
        assert d.identify_namespace(1).nsattr & NSATTR_WRITE_PROTECTED
        with pytest.raises(NvmeError) as err:
            d.write(1, 0, bytes(512))
        assert err.value.status == Status.NS_WRITE_PROTECTED
        assert not [c for c in export.calls if c[0] != "read"]
    finally:
        d.close()
        ctrl.close()


def test_geometry_against_the_export() -> None:
    assert Namespace(1, "nbd://h/x", 0, 4096, export=FakeExport(SIZE + 100)).size == SIZE
    with pytest.raises(ValueError, match="the export has"):
        Namespace(1, "nbd://h/x", SIZE // 2, 512, export=FakeExport())
    with pytest.raises(ValueError, match="minimum block size 4096"):
        Namespace(1, "nbd://h/x", 0, 512, export=FakeExport(block_size=4096))
    with pytest.raises(ValueError, match="smaller than one"):
        Namespace(1, "nbd://h/x", 0, 4096, export=FakeExport(size=1000))
    ns = Namespace(1, "nbd://h/x", SIZE, 512, export=FakeExport())
    with pytest.raises(ValueError, match="remote"):
        ns.replace_image("/tmp/x")
