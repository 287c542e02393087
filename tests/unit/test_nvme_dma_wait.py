"""Commands whose data lives in memory mapped without an fd wait for DMA messages
without blocking the device: meanwhile it serves everything else, and when the
client's reply comes, the waiting command re-checks what changed.

The client side of :class:`~appliance.vfio_user.dma.DmaMessages` is played by
:class:`Client`: it records each DMA message and answers it on demand, from its
own bytes (the "message-only" guest memory at ``MSG``).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nvme_driver import make_controller, status

from appliance.client.nvme import NvmeDriver, QueuePair
from appliance.memory import DmaScope
from appliance.pci.config import COMMAND, PciCommand
from appliance.storage.request import RequestState
from appliance.storage.spec import Command, IoOpcode, Reg, Status
from appliance.testing.nvme import controller_driver
from appliance.vfio_user import wire as w
from appliance.vfio_user.dma import DmaMessages
from appliance.vfio_user.framing import Frame
from appliance.vfio_user.wire import PciIrq, PciRegion

MSG, MSG_SIZE = 0x8000_0000, 1 << 20


class Client:
    """Answers DMA_READ / DMA_WRITE messages from ``ram`` when told to."""

    def __init__(self) -> None:
        self.ram = bytearray(MSG_SIZE)
        self.sent: list[tuple[int, w.Command, int, bytes | int]] = []
        self._next = 0
        self.dma = DmaMessages(self._send, self._reply_data, lambda: 4096)

    def _send(self, command: w.Command, address: int, data: bytes | int) -> int:
        self._next += 1
        self.sent.append((self._next, command, address, data))
        return self._next

    @staticmethod
    def _reply_data(frame: Frame, count: int) -> bytes:
        return frame.payload[w.DmaAccess.SIZE:w.DmaAccess.SIZE + count]

    def answer(self, refuse: bool = False) -> int:
        """Answer every message sent so far (and those the answers cause); how many."""
        n = 0
        while self.sent:
            msg_id, command, address, data = self.sent.pop(0)
            off = address - MSG
            if refuse:
                header = w.Header(msg_id=msg_id, command=command,
                                  flags=w.MSG_TYPE_REPLY | w.MsgFlag.ERROR, error=errno.EFAULT)
                self.dma.on_reply(Frame(header, b""))
            elif command == w.Command.DMA_READ:
                assert isinstance(data, int)
                body = w.DmaAccess(address=address, count=data).pack() + bytes(
                    self.ram[off:off + data])
                self.dma.on_reply(Frame(w.Header(msg_id=msg_id, command=command,
                                                 flags=w.MSG_TYPE_REPLY), body))
            else:
                assert isinstance(data, bytes)
                self.ram[off:off + len(data)] = data
                self.dma.on_reply(Frame(w.Header(msg_id=msg_id, command=command,
                                                 flags=w.MSG_TYPE_REPLY), b""))
            n += 1
        return n


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[NvmeDriver, Client]]:
    ctrl = make_controller(tmp_path, io_queues=2, queue_entries=64)
    d = controller_driver(ctrl).ready()
    client = Client()
    d.bus.memory.transport = client.dma
    d.bus.memory.map(MSG, MSG_SIZE)  # no fd: reached by DMA messages only
    yield d, client
    ctrl.close()


def write_from_message_memory(d: NvmeDriver, client: Client, data: bytes, slba: int) -> int:
    client.ram[:len(data)] = data
    nlb = len(data) // 512
    return d.submit(1, Command(opcode=IoOpcode.WRITE, nsid=1, prp1=MSG, prp2=0, cdw10=slba,
                               cdw12=nlb - 1))


def image_block(d: NvmeDriver, lba: int, n: int = 512) -> bytes:
    with open(d.bus.ctrl.namespaces[1].image, "rb") as f:
        f.seek(lba * 512)
        return f.read(n)


def set_bus_master(d: NvmeDriver, on: bool) -> None:
    cmd = PciCommand.MEMORY | (PciCommand.BUS_MASTER if on else 0)
    d.bus.ctrl.region_write(PciRegion.CONFIG, COMMAND, int(cmd).to_bytes(2, "little"))


def test_a_waiting_command_does_not_block_the_queue(rig: tuple[NvmeDriver, Client]) -> None:
    d, client = rig
    cid = write_from_message_memory(d, client, b"\xab" * 512, slba=5)
    assert d.reap(1) == [] and [c for _, c, _, _ in client.sent] == [w.Command.DMA_READ]
    waiting = d.bus.ctrl.held_request(1, cid)
    assert waiting is not None and waiting.state is RequestState.WAITING
    # meanwhile the device serves the rest: a read from shared memory completes first
    done, _ = d.io(IoOpcode.READ, slba=0, nlb=1)
    assert status(done) == (Status.SUCCESS, False)
    assert image_block(d, 5) == bytes(512)  # nothing written before the data came
    client.answer()
    finished = d.reap(1)
    assert [c.cid for c in finished] == [cid] and status(finished[0]) == (Status.SUCCESS, False)
    assert image_block(d, 5) == b"\xab" * 512
    assert d.bus.ctrl.counters["commands"]["io.write"] == 1  # counted once, though run twice


def test_bus_master_off_while_waiting_holds_the_command_until_it_is_on(
        rig: tuple[NvmeDriver, Client]) -> None:
    d, client = rig
    cid = write_from_message_memory(d, client, b"\x01" * 512, slba=7)
    set_bus_master(d, False)
    client.answer()
    assert d.reap(1) == []  # no DMA (the CQ entry) without Bus Master
    set_bus_master(d, True)
    d.bus.ctrl.poll()
    finished = d.reap(1)
    assert [c.cid for c in finished] == [cid] and status(finished[0]) == (Status.SUCCESS, False)


def test_set_irqs_while_waiting_signals_the_new_configuration(rig: tuple[NvmeDriver, Client]) -> None:
    d, client = rig
    write_from_message_memory(d, client, b"\x02" * 512, slba=9)
    d.bus.interrupts.take()
    d.bus.ctrl.set_irq_count(PciIrq.MSIX, 0)  # SET_IRQS: MSI-X off, INTx instead
    d.bus.ctrl.set_irq_count(PciIrq.INTX, 1)
    d.bus.ctrl.irqs_configured(PciIrq.INTX)
    client.answer()
    assert [status(c) for c in d.reap(1)] == [(Status.SUCCESS, False)]
    assert (PciIrq.INTX, 0) in d.bus.interrupts.take()


def test_controller_reset_while_waiting_drops_the_command(rig: tuple[NvmeDriver, Client]) -> None:
    d, client = rig
    cid = write_from_message_memory(d, client, b"\x03" * 512, slba=11)
    req = d.bus.ctrl.held_request(1, cid)
    assert req is not None
    d.write_reg(Reg.CC, 0)  # CC.EN = 0: reset
    assert req.state is RequestState.DROPPED and d.bus.ctrl.waiting == []
    client.answer()  # the late reply changes nothing
    assert image_block(d, 11) == bytes(512)
    d.ready()
    assert status(d.io(IoOpcode.READ, slba=0, nlb=1)[0]) == (Status.SUCCESS, False)


def test_read_completes_after_its_data_writes_are_acknowledged(rig: tuple[NvmeDriver, Client]) -> None:
    d, client = rig
    assert status(d.io(IoOpcode.WRITE, slba=3, nlb=2, data=b"\x5c" * 1024)[0]) == \
        (Status.SUCCESS, False)
    cid = d.submit(1, Command(opcode=IoOpcode.READ, nsid=1, prp1=MSG, prp2=0, cdw10=3, cdw12=1))
    assert d.reap(1) == []  # the data is on its way: no completion before it landed
    assert {c for _, c, _, _ in client.sent} == {w.Command.DMA_WRITE}
    client.answer()
    finished = d.reap(1)
    assert [c.cid for c in finished] == [cid] and status(finished[0]) == (Status.SUCCESS, False)
    assert bytes(client.ram[:1024]) == b"\x5c" * 1024


@pytest.mark.parametrize("opcode", [IoOpcode.WRITE, IoOpcode.READ])
def test_refused_dma_fails_the_command_with_data_transfer_error(
        rig: tuple[NvmeDriver, Client], opcode: IoOpcode) -> None:
    d, client = rig
    cid = d.submit(1, Command(opcode=opcode, nsid=1, prp1=MSG, prp2=0, cdw10=0, cdw12=0))
    client.answer(refuse=True)
    finished = d.reap(1)
    assert [c.cid for c in finished] == [cid]
    assert status(finished[0]) == (Status.DATA_TRANSFER_ERROR, False)


def test_abort_finds_a_waiting_command(rig: tuple[NvmeDriver, Client]) -> None:
    d, client = rig
    cid = write_from_message_memory(d, client, b"\x04" * 512, slba=13)
    done = d.admin_command(0x08, cdw10=cid << 16 | 1)  # Abort
    assert done.dw0 & 1 == 0
    aborted = d.reap(1)
    assert [c.cid for c in aborted] == [cid]
    assert status(aborted[0]) == (Status.ABORT_REQUESTED, False)
    client.answer()
    assert d.reap(1) == [] and image_block(d, 13) == bytes(512)


def test_a_client_gone_fails_every_waiting_scope_once() -> None:
    client = Client()
    scopes = [DmaScope(on_ready=lambda: None) for _ in range(3)]
    for i, scope in enumerate(scopes):
        with pytest.raises(Exception, match="DMA_READ"):
            client.dma.dma_read(MSG + i * 4096, 8192, scope)
    assert len(client.dma.outstanding()) == 6
    client.dma.close()
    assert client.dma.outstanding() == frozenset()
    assert all(s.error == "client gone" and not s.busy for s in scopes)


def test_interrupt_follows_the_acknowledged_completion_entry(rig: tuple[NvmeDriver, Client]) -> None:
    """A CQ in message-only memory: its entry goes out as DMA_WRITEs, and the
    interrupt waits until the client acknowledged them (else the host could look
    at the CQ before the entry is there)."""
    d, client = rig
    cq, sq = MSG + 0x10000, d.alloc(16 * 64)
    assert status(d.admin_command(0x05, prp1=cq, cdw10=15 << 16 | 2, cdw11=2 << 16 | 0x3)) == \
        (Status.SUCCESS, False)  # Create I/O CQ 2, vector 2, in message memory
    assert status(d.admin_command(0x01, prp1=sq, cdw10=15 << 16 | 2, cdw11=2 << 16 | 0x1)) == \
        (Status.SUCCESS, False)  # Create I/O SQ 2 on it, in shared memory
    d.queues[2] = QueuePair(2, 16, sq, cq, 2, None)  # the driver tracks SQ 2
    d.bus.interrupts.take()
    d.submit(2, Command(opcode=IoOpcode.FLUSH, nsid=1))
    assert {c for _, c, _, _ in client.sent} == {w.Command.DMA_WRITE}
    assert (PciIrq.MSIX, 2) not in d.bus.interrupts.take()
    client.answer()
    assert d.bus.interrupts.take() == [(PciIrq.MSIX, 2)]
    entry = client.ram[0x10000:0x10010]
    assert entry[14] & 1 == 1 and int.from_bytes(entry[14:16], "little") >> 1 == 0  # phase 1, OK
