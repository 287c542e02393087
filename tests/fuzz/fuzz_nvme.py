"""Fuzz NVMe submission queue entries, PRP lists and SGLs against a controller
(a conventional namespace 1 and a zoned namespace 2).

The NVMe driver on an in-process controller (appliance.testing.nvme) brings it up
(admin queues, one I/O queue pair) over a memfd guest memory.  The input is:

    byte 0: k, then k little-endian u64 PRP entries written to a guest page
    (the PRP page; an entry with bit 63 clear is an offset into the data area,
    with it set an address as is); then records of 1 control byte + one
    64-byte SQE.

Control bits: 0 submit on I/O queue 1 (else admin); 1 point PRP1 into the
data area; 2 point PRP2 at the PRP page (else left as the fuzzer wrote it);
3 make the data pointer an SGL (PSDT 01b) whose SGL1 is a Segment (bit 4
set) or Last Segment descriptor of ``PRP2 & 0xFF0`` bytes at offset
``PRP1 & 0xFF0`` of the PRP page, whose u64 entries are then read as SGL
descriptors (a descriptor's second u64, with bit 63 set as the fuzzer
should write it, is its length and SGL identifier: types 0h-7h).

Every command completes with some status at once (an Asynchronous Event
Request is held, as the spec has it; once the input configured shadow
doorbells, whose tails it may overwrite, only the rest is checked); the controller never raises, never logs
a caught bug (an Internal Error status), and CSTS.CFS is set only for the
documented reason: a queue entry or shadow buffer outside guest memory.  Each input runs on a
controller on the Python path and again on one with the native I/O queue path
(when it is built): the completions, the data area, CSTS, the counters and the
image must be the same.

    python tests/fuzz/fuzz_nvme.py -max_total_time=20 tests/fuzz/corpus/nvme
"""

from __future__ import annotations

import atexit
import copy
import shutil
import struct
import tempfile
from pathlib import Path

import common

with common.instrumented(__name__):
    from appliance import fastpath
    from appliance.config import NamespaceConfig, ZonedConfig
    from appliance.storage import NvmeController
    from appliance.storage.firmware import FirmwareSlots
    from appliance.storage.native_io import NativeNvme
    from appliance.storage.spec import CC, AdminOpcode, Command, Reg, SglType, Status
    from appliance.testing.nvme import controller_driver

SQE = 64
DATA_SIZE = 64 << 10
_tmp = tempfile.mkdtemp(prefix="fuzz-nvme-")
atexit.register(shutil.rmtree, _tmp, True)


class Rig:
    """A controller (on the Python path, or with the native fast path) and its driver."""

    def __init__(self, name: str, native: NativeNvme | None) -> None:
        (Path(_tmp) / name).mkdir()
        # NSID 1 a conventional namespace, NSID 2 a zoned one (16 zones of 64 KiB, 48 KiB
        # writable, at most 2 open and 3 active: every zone status is in reach).
        self.ctrl = NvmeController([
            NamespaceConfig(image=f"{_tmp}/{name}/ns1.img", size=1 << 20, block_size=512,
                            read_only=False, grow=False),
            NamespaceConfig(image=f"{_tmp}/{name}/ns2.img", size=1 << 20, block_size=512,
                            read_only=False, grow=False, zoned=ZonedConfig(64 << 10, 48 << 10, 2, 3)),
        ], io_queues=2, queue_entries=64)
        self.ctrl.native = native
        self.driver = controller_driver(self.ctrl)
        self.fatal: list[str] = []
        fatal = self.ctrl.fatal

        def record_fatal(why: str) -> None:
            self.fatal.append(why)
            fatal(why)

        self.ctrl.fatal = record_fatal  # type: ignore[method-assign]

    def reset(self) -> tuple[int, int]:
        """Controller reset and a fresh bring-up; returns (PRP page, data area)."""
        d = self.driver
        d.write_reg(Reg.CC, CC.encode(en=0, iosqes=6, iocqes=4))
        d.pages.reset()
        d.queues.clear()
        d.shadow_doorbells = None
        d.ready(io_queues=1)
        for zones in self.ctrl.zones.values():  # zone states outlive a reset: each input starts Empty
            zones.reset_all()
        self.ctrl.firmware = FirmwareSlots(self.ctrl.fr)  # so do firmware slots: start factory
        self.ctrl.identify_changed()
        return d.alloc(4096), d.alloc(DATA_SIZE)


PYTHON = Rig("python", None)
#: the same inputs through the native I/O queue path, when it is built: same outcome
NATIVE = Rig("native", fastpath.module()) if fastpath.available() else None


def record(sqe: Command, control: int = 0) -> bytes:
    """One record of this harness's input (the seed script uses it)."""
    return bytes([control]) + sqe.pack()


def _run(data: bytes) -> None:
    if not data:
        return
    outcome = _run_on(PYTHON, data)
    if NATIVE is not None:
        assert _run_on(NATIVE, data) == outcome, "the native I/O queue path differs from Python"


def _run_on(rig: Rig, data: bytes) -> tuple[object, ...]:
    """Run the input's commands; returns what the two paths must agree on."""
    ctrl, driver = rig.ctrl, rig.driver
    rig.fatal.clear()
    prp_page, data_area = rig.reset()
    k = data[0]
    entries = struct.unpack_from(f"<{len(data[1:1 + 8 * k]) // 8}Q", data, 1)
    # An entry with bit 63 clear is taken as an offset into the data area (so
    # lists name real guest pages); with it set, as the address itself.
    driver.put(prp_page, struct.pack(f"<{len(entries)}Q", *(
        e & ~(1 << 63) if e >> 63 else data_area + e % DATA_SIZE for e in entries)))
    pos = 1 + 8 * k
    completions: list[tuple[int, int, int, bool, int]] = []
    while pos + 1 + SQE <= len(data) and not driver.csts & 0b10:
        control, raw = data[pos], data[pos + 1:pos + 1 + SQE]
        pos += 1 + SQE
        cmd = Command.unpack(raw)
        if control & 2:
            cmd.prp1 = data_area + cmd.prp1 % DATA_SIZE
        if control & 4:
            cmd.prp2 = prp_page + cmd.prp2 % 4096
        if control & 8:
            kind = SglType.SEGMENT if control & 16 else SglType.LAST_SEGMENT
            cmd.flags = (cmd.flags & 0x3F) | 0x40
            cmd.prp1, cmd.prp2 = prp_page + (cmd.prp1 & 0xFF0), (cmd.prp2 & 0xFF0) | kind << 60
        qid = 1 if control & 1 and 1 in driver.queues and 1 in ctrl.sqs else 0
        cid = driver.submit(qid, cmd)
        done = driver.reap(qid)
        completions += [(qid, c.cid, c.status, c.dnr, c.dw0) for c in done]
        for entry in done:
            sc = entry.status
            assert sc != Status.INTERNAL_ERROR, f"Internal Error for {cmd}"
            if qid == 0 and cmd.opcode == AdminOpcode.DOORBELL_BUFFER_CONFIG and sc == 0:
                driver.shadow_doorbells = (cmd.prp1, cmd.prp2)  # the driver writes shadow doorbells now
        if driver.csts & 0b10:
            break
        held = qid == 0 and cmd.opcode == AdminOpcode.ASYNC_EVENT_REQUEST
        # Shadow doorbells the input placed may overlap a queue or data it rewrites:
        # then the tail the controller reads is the input's, not the driver's.
        if not held and qid in ctrl.sqs and driver.shadow_doorbells is None:
            assert cid in [c.cid for c in done], f"no completion for {cmd} on queue {qid}: {done}"
    for why in rig.fatal:
        assert why.startswith("client memory"), f"CSTS.CFS for an undocumented reason: {why}"
    image = Path(ctrl.namespaces[1].image).read_bytes()
    return (completions, driver.get(data_area, DATA_SIZE), driver.csts,
            copy.deepcopy(ctrl.counters), image)


one_input = common.checked(_run)

if __name__ == "__main__":
    common.run_fuzzer(one_input)
