"""The NBD client (appliance.runtime.nbd over appliance.nbd.protocol) against real
servers: qemu-storage-daemon and nbdkit, each exporting an image file on a Unix
socket.  What the client wrote is checked in the image file itself."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.nbd import wire as w
from appliance.runtime.nbd import NbdExport
from appliance.testing.nbd import SERVERS, NbdServer

SIZE = 48 << 20


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NbdServer]:
    image = tmp_path / "export.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    with NbdServer(request.param, image, tmp_path / "nbd.sock") as srv:
        yield srv


def file_bytes(server: NbdServer, offset: int, length: int) -> bytes:
    with open(server.image, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize("structured", [True, False])
def test_handshake_reports_the_export(server: NbdServer, structured: bool) -> None:
    export = NbdExport(server.uri, structured_replies=structured)
    try:
        info = export.info
        assert info.size == SIZE and not export.read_only
        assert info.structured is structured
        assert info.can(w.TF_SEND_FLUSH) and info.can(w.TF_SEND_FUA)
        assert info.can(w.TF_SEND_WRITE_ZEROES) and info.can(w.TF_SEND_TRIM)
        assert info.minimum <= 512 and info.maximum >= 1 << 20
    finally:
        export.close()


@pytest.mark.parametrize("structured", [True, False])
def test_writes_land_in_the_image_and_read_back(server: NbdServer, structured: bool) -> None:
    export = NbdExport(server.uri, structured_replies=structured)
    try:
        cases = [(0, 512), (4096, 1 << 20), (SIZE - 8192, 8192), (12345 * 512, 3 * 4096)]
        for offset, length in cases:
            data = os.urandom(length)
            export.pwrite(data, offset)
            assert export.pread(length, offset) == data
        export.pwrite(b"\xa5" * 4096, 1 << 20, fua=True)  # durable before the reply
        assert file_bytes(server, 1 << 20, 4096) == b"\xa5" * 4096
        export.flush()
        for offset, length in cases:
            assert file_bytes(server, offset, length) == export.pread(length, offset)
    finally:
        export.close()


def test_a_read_past_the_maximum_is_split(server: NbdServer) -> None:
    export = NbdExport(server.uri)
    try:
        data = os.urandom(export.info.maximum + 8192)
        export.pwrite(data, 4096)
        assert export.pread(len(data), 4096) == data
    finally:
        export.close()


@pytest.mark.parametrize("deallocate", [True, False])
def test_write_zeroes_reads_back_zeroes(server: NbdServer, deallocate: bool) -> None:
    export = NbdExport(server.uri)
    try:
        export.pwrite(os.urandom(1 << 20), 0)
        export.write_zeroes(4096, 64 << 10, deallocate=deallocate, fua=True)
        assert export.pread(64 << 10, 4096) == bytes(64 << 10)
        assert file_bytes(server, 4096, 64 << 10) == bytes(64 << 10)
        assert export.pread(4096, 0) != bytes(4096)  # the rest untouched
        export.trim(1 << 20, 1 << 20)  # advisory: accepted
    finally:
        export.close()


def test_holes_read_as_zeroes(server: NbdServer) -> None:
    export = NbdExport(server.uri)
    try:  # the sparse image: servers may answer with OFFSET_HOLE chunks
        assert export.pread(4 << 20, 16 << 20) == bytes(4 << 20)
    finally:
        export.close()


def test_requests_outside_the_export_are_refused_before_the_wire(server: NbdServer) -> None:
    export = NbdExport(server.uri)
    try:
        for call in (lambda: export.pread(4096, SIZE), lambda: export.pwrite(b"x" * 512, SIZE),
                     lambda: export.write_zeroes(SIZE - 512, 1024, True)):
            with pytest.raises(OSError) as err:
                call()
            assert err.value.errno == errno.EINVAL
        assert export.pread(512, 0) == bytes(512)  # the connection is still sound
    finally:
        export.close()


def test_a_read_only_export_is_honoured(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(b"\x42" * (1 << 20))
    for kind in SERVERS:
        with NbdServer(kind, image, tmp_path / f"{kind}.sock", read_only=True) as srv:
            export = NbdExport(srv.uri)
            try:
                assert export.read_only
                assert export.pread(4096, 0) == b"\x42" * 4096
                with pytest.raises(OSError) as err:
                    export.pwrite(b"\0" * 512, 0)
                assert err.value.errno == errno.EINVAL and "read-only" in str(err.value)
                export.flush()  # nothing to flush on a read-only export: no request
            finally:
                export.close()
        assert image.read_bytes() == b"\x42" * (1 << 20)


def test_an_unknown_export_is_refused_with_the_servers_reason(server: NbdServer) -> None:
    uri = server.uri.replace("/disk?", "/nosuch?")
    with pytest.raises(OSError) as err:
        NbdExport(uri)
    assert err.value.errno == errno.ENOENT and "nosuch" in str(err.value)


def test_a_server_that_goes_away_breaks_the_connection_for_good(server: NbdServer) -> None:
    export = NbdExport(server.uri)
    try:
        assert export.pread(512, 0) == bytes(512)
        server.stop(signal.SIGKILL)
        for _ in range(2):
            with pytest.raises(OSError) as err:
                export.pread(512, 0)
            assert err.value.errno == errno.EIO
    finally:
        export.close()
