"""The metadata side file: what was written reads back, holes read FFh."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.storage.metadata import MetadataFile, side_file


def test_side_file_is_named_after_the_image(tmp_path: Path) -> None:
    assert side_file(str(tmp_path / "ns1.img")) == str(tmp_path / "ns1.img.md")


def test_unwritten_blocks_read_escape_values(tmp_path: Path) -> None:
    md = MetadataFile(str(tmp_path / "a.md"), nlbas=16, metadata=8)
    try:
        assert md.read(0, 16) == b"\xff" * 128
        assert os.path.getsize(md.path) == 128
    finally:
        md.close()


def test_written_metadata_reads_back_and_stays(tmp_path: Path) -> None:
    path = str(tmp_path / "a.md")
    md = MetadataFile(path, nlbas=8, metadata=16)
    md.write(2, bytes(range(32)))
    md.write(7, bytes(16))
    md.flush()
    assert md.read(2, 2) == bytes(range(32))
    assert md.read(7, 1) == bytes(16)
    assert md.read(1, 1) == b"\xff" * 16
    md.close()
    md.close()  # idempotent
    again = MetadataFile(path, nlbas=8, metadata=16, read_only=True)
    try:
        assert again.read(2, 2) == bytes(range(32))
        again.flush()  # read-only: nothing to sync
    finally:
        again.close()


def test_deallocate_and_erase(tmp_path: Path) -> None:
    md = MetadataFile(str(tmp_path / "a.md"), nlbas=1024, metadata=8)
    try:
        md.write(0, bytes(8 * 1024))
        md.deallocate(512, 1)
        assert md.read(512, 1) == b"\xff" * 8
        assert md.read(511, 1) == bytes(8) and md.read(513, 1) == bytes(8)
        md.erase()
        assert md.read(0, 1024) == b"\xff" * 8192
    finally:
        md.close()


def test_read_only_without_a_side_file_reads_holes(tmp_path: Path) -> None:
    md = MetadataFile(str(tmp_path / "ro.md"), nlbas=4, metadata=8, read_only=True)
    try:
        assert md.read(0, 4) == b"\xff" * 32
        assert not (tmp_path / "ro.md").exists()  # nothing written for a read-only namespace
    finally:
        md.close()


@pytest.mark.parametrize(("nlbas", "metadata"), [(0, 8), (8, 0)])
def test_empty_layout_is_refused(tmp_path: Path, nlbas: int, metadata: int) -> None:
    with pytest.raises(ValueError, match="metadata bytes"):
        MetadataFile(str(tmp_path / "a.md"), nlbas=nlbas, metadata=metadata)
