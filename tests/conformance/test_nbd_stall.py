"""An NBD server that stalls on a change must not stall the appliance: Write,
Write Zeroes and Dataset Management deallocate of an NBD-backed namespace run
on the offload workers, so the control socket answers within 100 ms while the
server sits on the request, and the command completes once the server replies."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_hostile_nbd import data_chunk, go_ack, greeting, info_export, opt_reply, simple

from appliance.client.nvme import NvmeDriver
from appliance.client.vfio_user import VfioUserClient
from appliance.nbd import wire as w
from appliance.runtime.control import ControlClient
from appliance.storage import spec
from appliance.testing.process import ApplianceProcess, make_config

SIZE = 1 << 20
ANSWER_WITHIN = 0.1  # seconds the control socket may take while the server stalls
CHANGES = {w.Cmd.WRITE, w.Cmd.WRITE_ZEROES, w.Cmd.TRIM}


class StallingNbdServer:
    """One export on a Unix socket; a change request waits for :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.stalled = threading.Event()  # a change request arrived and waits
        self.go = threading.Event()
        self.seen: list[int] = []  # commands received
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.path}"

    def release(self) -> None:
        """Answer the stalled request; the next change stalls again."""
        self.stalled.clear()
        self.go.set()

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            got = conn.recv(n - len(data))
            if not got:
                raise EOFError
            data += got
        return data

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(greeting())
            self._recv(conn, 4)  # client flags
            opt = w.OptionRequest.unpack(self._recv(conn, w.OptionRequest.SIZE))
            self._recv(conn, opt.length)
            conn.sendall(opt_reply(w.Opt.STRUCTURED_REPLY, w.Rep.ACK))
            opt = w.OptionRequest.unpack(self._recv(conn, w.OptionRequest.SIZE))
            self._recv(conn, opt.length)
            conn.sendall(info_export(SIZE) + go_ack())
            try:
                while True:
                    head = w.Request.unpack(self._recv(conn, w.Request.SIZE))
                    self.seen.append(head.type)
                    if head.type == w.Cmd.DISC:
                        return
                    if head.type == w.Cmd.WRITE:
                        self._recv(conn, head.length)
                    if head.type == w.Cmd.READ:
                        conn.sendall(data_chunk(head.cookie, head.offset, bytes(head.length)))
                        continue
                    if head.type in CHANGES:
                        self.stalled.set()
                        self.go.wait(30)
                        self.go.clear()
                    conn.sendall(simple(head.cookie))
            except (EOFError, OSError):
                return

    def close(self) -> None:
        self.go.set()
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def stalling(tmp_path: Path) -> Iterator[StallingNbdServer]:
    server = StallingNbdServer(tmp_path / "nbd.sock")
    yield server
    server.close()


def deallocate(d: NvmeDriver, lba: int, blocks: int) -> None:
    prp1, _, pages = d.buffer(4096)
    d.put(pages[0], spec.DsmRange(slba=lba, nlb=blocks).pack())
    done = d.command(1, spec.Command(opcode=spec.IoOpcode.DATASET_MANAGEMENT, nsid=1,
                                     prp1=prp1, cdw10=0, cdw11=1 << 2))
    assert done.status == 0


def test_a_stalled_change_does_not_stop_the_control_socket(stalling: StallingNbdServer,
                                                           tmp_path: Path) -> None:
    cfg = make_config(tmp_path, storage={"namespaces": [{"image": stalling.uri}]})
    with ApplianceProcess(cfg, tmp_path / "proc") as proc, \
            ControlClient(proc.config.control.socket) as ctl:
        client = VfioUserClient.connect(proc.config.storage.socket, timeout=30)
        d = NvmeDriver(client)
        d.setup(io_queues=1, depth=8)
        changes: list[tuple[int, Callable[[], object]]] = [
            (w.Cmd.WRITE, lambda: d.write(1, 8, b"\xa5" * 4096)),
            (w.Cmd.WRITE_ZEROES, lambda: d.blocks_command(spec.IoOpcode.WRITE_ZEROES, 1, 8, 8)),
            (w.Cmd.TRIM, lambda: deallocate(d, 8, 8)),
        ]
        try:
            for kind, change in changes:
                errors: list[BaseException] = []

                def run(change: Callable[[], object] = change,
                        errors: list[BaseException] = errors) -> None:
                    try:
                        change()
                    except BaseException as exc:  # noqa: BLE001 - reported by the test
                        errors.append(exc)

                worker = threading.Thread(target=run)
                worker.start()
                assert stalling.stalled.wait(10), f"{kind!r} never reached the server"
                assert stalling.seen[-1] in CHANGES
                start = time.monotonic()
                ctl("status")
                took = time.monotonic() - start
                assert took < ANSWER_WITHIN, f"control socket took {took * 1000:.0f} ms " \
                                             f"while the server stalled on {kind!r}"
                assert worker.is_alive()  # still waiting for the server
                stalling.release()
                worker.join(10)
                assert not worker.is_alive() and not errors, errors
        finally:
            stalling.release()
            d.close()
            client.close()
