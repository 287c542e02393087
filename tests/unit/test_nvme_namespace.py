"""Namespaces: image creation, zero copy and message-only data paths, deallocation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_memory import message_memory

from appliance.memory import ClientMemory, GuestMemoryError
from appliance.storage.identify_spec import LBAF, IdentifyNamespace
from appliance.storage.namespace import Namespace, fallocate
from appliance.storage.spec import CommandError, Status

BASE = 0x300000


def mapped() -> ClientMemory:
    fd = os.memfd_create("ns")
    os.ftruncate(fd, 1 << 20)
    mem = ClientMemory()
    mem.map(BASE, 1 << 20, fd=fd)
    return mem


def test_created_sparse_and_identified(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    ns = Namespace(1, str(image), 8 << 20, block_size=4096)
    assert image.stat().st_size == 8 << 20 and image.stat().st_blocks == 0
    ident = IdentifyNamespace.unpack(ns.identify())
    assert ident.nsze == ident.ncap == 2048 and ident.flbas == 4  # 4096 bytes, no metadata
    lbaf4 = int.from_bytes(ident.lbaf1_15[12:16], "little")
    assert LBAF.get(lbaf4, "lbads") == 12 and LBAF.get(lbaf4, "ms") == 0
    assert ident.dlfeat == 0x09 and ident.nsattr == 0
    assert ns.descriptors("SN")[:4] == b"\x03\x10\0\0"
    assert ns.descriptors("SN")[20:25] == b"\x04\x01\0\0\0"  # CSI 00h: NVM
    assert ns.descriptors("SN") != Namespace(2, str(tmp_path / "b.img"), 4096).descriptors("SN")
    ns.close()
    ns.close()


def test_bad_geometry(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Namespace(1, str(tmp_path / "x"), 1000, block_size=512)
    with pytest.raises(ValueError):
        Namespace(1, str(tmp_path / "x"), 4096, block_size=1024)


def test_zero_copy_round_trip(tmp_path: Path) -> None:
    ns = Namespace(1, str(tmp_path / "a.img"), 1 << 20)
    mem = mapped()
    mem.write(BASE, b"A" * 512 + b"B" * 1024)
    ns.write(mem, [(BASE, 512), (BASE + 512, 1024)], slba=4)
    ns.read(mem, [(BASE + 8192, 1536)], slba=4)
    assert mem.read(BASE + 8192, 1536) == b"A" * 512 + b"B" * 1024
    assert (tmp_path / "a.img").read_bytes()[2048:2048 + 1536] == b"A" * 512 + b"B" * 1024
    with pytest.raises(GuestMemoryError):
        ns.read(mem, [(0x10, 512)], slba=0)
    ns.close()


def test_message_only_memory(tmp_path: Path) -> None:
    ns = Namespace(1, str(tmp_path / "a.img"), 1 << 20)
    mem, transport = message_memory(1 << 16, BASE)
    transport.data[0:1024] = b"m" * 1024
    ns.write(mem, [(BASE, 1024)], slba=0)
    ns.read(mem, [(BASE + 4096, 512), (BASE + 8192, 512)], slba=1)
    assert transport.data[4096:4608] == b"m" * 512 and transport.calls == 3
    ns.close()


def test_read_only_and_short_image(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(b"z" * 1024)
    ns = Namespace(1, str(image), 1 << 20, read_only=True)
    assert image.stat().st_size == 1024  # a read-only image is never extended
    with pytest.raises(CommandError) as info:
        ns.check_writable()
    assert info.value.status == Status.NS_WRITE_PROTECTED
    mem = mapped()
    mem.write(BASE, b"\xff" * 2048)
    ns.read(mem, [(BASE, 2048)], slba=0)
    assert mem.read(BASE, 2048) == b"z" * 1024 + bytes(1024)  # zeroes past the end
    assert ns.read_bytes(1, 1024) == b"z" * 512 + bytes(512)
    assert IdentifyNamespace.unpack(ns.identify()).nsattr == 1
    ns.flush()
    ns.close()


def test_deallocate_and_zeroes(tmp_path: Path) -> None:
    ns = Namespace(1, str(tmp_path / "a.img"), 1 << 20)
    os.pwrite(ns.fd, b"q" * 65536, 0)
    ns.write_zeroes(8, 8, deallocate=True)
    ns.write_zeroes(16, 8, deallocate=False)
    data = os.pread(ns.fd, 65536, 0)
    assert data == b"q" * 4096 + bytes(8192) + b"q" * (65536 - 12288)
    ns.check_range(2040, 8)
    with pytest.raises(CommandError):
        ns.check_range(2041, 8)
    ns.format()
    assert os.pread(ns.fd, 16, 0) == bytes(16) and os.fstat(ns.fd).st_size == 1 << 20
    ns.close()


def test_fallocate_unsupported_mode_falls_back(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    assert fallocate(fd, 0x7FFF_0000, 0, 4096) is False  # EOPNOTSUPP/EINVAL
    os.close(fd)
