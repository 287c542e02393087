"""Fuzz the migration stream reader and restoring an NVMe controller from it.

The input is a migration stream.  Byte 0: bits 0-6 pick the chunk size the
transport cuts it into; bit 7 has the harness re-sign the records first
(:func:`resign`: sequence numbers, checksums and the END digest made right),
so mutations reach the record parsers and the restore checks instead of
stopping at the checksum every time.  The reader must return only verified records or raise its
StreamError; the destination stages each record, and a stream it accepts
(``commit_restore``) must leave a controller that serves: Get Features of every
feature, Get Log Page of every log page and Identify complete with a status
(never an exception, never Internal Error).  A refused stream leaves nothing
staged and no fd open.

    python tests/fuzz/fuzz_migration.py -max_total_time=20 tests/fuzz/corpus/migration
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import common
import xxhash

with common.instrumented(__name__):
    from test_nvme_driver import make_controller

    from appliance.errors import LocalProtocolError, StreamRefused
    from appliance.memory import GuestMemoryError
    from appliance.storage import admin
    from appliance.storage.migration import NvmeMigratable
    from appliance.storage.spec import (
        AdminOpcode,
        Command,
        CommandError,
        FeatureId,
        IoOpcode,
        LogPage,
    )
    from appliance.testing.nvme import controller_driver
    from appliance.vfio_user.migration import DEVICE_RECORDS
    from appliance.vfio_user.migration_stream import (
        EndPayload,
        RecordHead,
        RecordType,
        StreamReader,
        StreamWriter,
        record_checksum,
    )

_tmp = Path(tempfile.mkdtemp(prefix="fuzz-migration-"))
atexit.register(shutil.rmtree, _tmp, True)
(_tmp / "dst").mkdir()
DST = make_controller(_tmp / "dst", io_queues=2, queue_entries=64, size=64 << 10)
DRIVER = controller_driver(DST)
MIG = NvmeMigratable(DST)
FINGERPRINT = MIG.migration_fingerprint()


def source_stream() -> bytes:
    """A valid stream from a controller in use (I/O queue, features, data, an AER held)."""
    (_tmp / "src").mkdir(exist_ok=True)
    src = make_controller(_tmp / "src", io_queues=2, queue_entries=64, size=64 << 10)
    try:
        d = controller_driver(src).ready(io_queues=1)
        d.admin_command(AdminOpcode.SET_FEATURES, cdw10=FeatureId.TEMPERATURE_THRESHOLD, cdw11=300)
        d.io(IoOpcode.WRITE, 0, 2, data=b"\x5a" * 1024)
        d.submit(0, Command(opcode=AdminOpcode.ASYNC_EVENT_REQUEST))
        mig = NvmeMigratable(src)
        writer = StreamWriter(mig.migration_fingerprint())
        mig.migration_stop()
        mig.start_tracking()
        while records := mig.precopy_records(1 << 20):
            writer.add_all(records)
        mig.stop_tracking()
        writer.add_all(mig.save_state())
        writer.finish()
        return writer.read(writer.pending)
    finally:
        src.close()


def resign(data: bytes) -> bytes:
    """``data`` cut into records by their heads, each given its right seq and
    checksum, END its right count and digest (the magic and the rest stay)."""
    out = bytearray()
    pos = seq = 0
    digest = xxhash.xxh3_64()
    while pos + RecordHead.SIZE <= len(data):
        head = RecordHead.unpack(data, pos)
        pos += RecordHead.SIZE
        payload = data[pos:pos + head.length]
        pos += len(payload)
        if head.type == RecordType.END:
            payload = EndPayload(records=seq, digest=digest.intdigest()).pack()
        head = head.replace(length=len(payload), seq=seq, checksum=0)
        head.checksum = record_checksum(head.pack(), payload)
        raw = head.pack() + payload
        digest.update(raw)
        out += raw
        seq += 1
    return bytes(out + data[pos:])


def _exercise() -> None:
    """Commands whose answers come from restored state (none may break)."""
    buf = DRIVER.alloc(4096)
    cmds = [Command(opcode=AdminOpcode.GET_FEATURES, cdw10=fid, prp1=buf) for fid in FeatureId]
    cmds += [Command(opcode=AdminOpcode.GET_LOG_PAGE, cdw10=lid | 127 << 16, prp1=buf,
                     nsid=0xFFFFFFFF) for lid in LogPage]
    cmds += [Command(opcode=AdminOpcode.IDENTIFY, cdw10=cns, nsid=1, prp1=buf) for cns in (0, 1, 2)]
    for cmd in cmds:
        try:
            admin.execute(DST, cmd)
        except (CommandError, GuestMemoryError):
            pass
    DST.poll()


def _restore(data: bytes) -> None:
    if not data:
        return
    DST.reset()
    DRIVER.pages.reset()
    cut = 1 + (data[0] & 0x7F) * 67
    if data[0] & 0x80:
        data = data[:1] + resign(data[1:])
    reader = StreamReader(FINGERPRINT)
    MIG.migration_stop()
    try:
        for pos in range(1, len(data), cut):
            records = reader.feed(data[pos:pos + cut])
            MIG.load_records([r for r in records if r.type in DEVICE_RECORDS])
        reader.check_complete()
        MIG.commit_restore()
    except (LocalProtocolError, StreamRefused):  # the device refused its state, the stream itself
        MIG.abort_restore()
        return
    finally:
        MIG.migration_run()
    _exercise()


one_input = common.checked(_restore)

if __name__ == "__main__":
    common.run_fuzzer(one_input)
