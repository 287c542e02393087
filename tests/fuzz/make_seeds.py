"""Write the structure-aware seed corpus of every harness (tests/fuzz/corpus/<name>/).

    python tests/fuzz/make_seeds.py

Seeds are small valid inputs: a vfio-user session (VERSION, DMA_MAP with an
fd, GET_INFO, SET_IRQS with an eventfd, config and BAR0 accesses, a migration
query), a vhost-user negotiation with a memory table and a started ring, valid
rings with direct, chained and indirect descriptors, valid admin and I/O SQEs
with PRP lists, a valid migration stream, handoff manifests (with and without
a client), control requests.  The output is committed; rerun after a format
change.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable

import common

from appliance.net import vhost_wire as vw
from appliance.net.vhost_protocol import OFFERED_PROTOCOL_FEATURES
from appliance.net.vhost_wire import Request as R
from appliance.storage.spec import AdminOpcode, Command, FeatureId, IoOpcode, LogPage, Reg
from appliance.vfio_user import wire as w
from appliance.vfio_user.framing import encode

CORPUS = common.HERE / "corpus"


# ---------------------------------------------------------------- vfio-user
def vfio_message(msg_id: int, command: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One vfio-user command message."""
    return encode(w.Header(msg_id=msg_id, command=command, flags=flags), payload)


def vfio_version(caps: dict[str, object] | None = None) -> bytes:
    body = json.dumps({"capabilities": caps or {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20,
                                                "migration": {"pgsize": 4096}}}).encode() + b"\0"
    return vfio_message(0, w.Command.VERSION, w.VersionHead().pack() + body)


def vfio_session() -> list[bytes]:
    """The messages of a client that negotiates, maps memory, wires an irq and pokes the device."""
    irq = w.IrqSet(flags=w.IrqSetFlag.DATA_EVENTFD | w.IrqSetFlag.ACTION_TRIGGER,
                   index=w.PciIrq.MSIX, start=0, count=1)
    cc = struct.pack("<I", 0x00460001)
    return [
        vfio_version(),
        vfio_message(1, w.Command.DMA_MAP, w.DmaMap(flags=3, address=0x100000, size=0x10000).pack()),
        vfio_message(2, w.Command.DEVICE_GET_INFO, w.DeviceInfo().pack()),
        vfio_message(3, w.Command.DEVICE_SET_IRQS, irq.pack()),
        vfio_message(4, w.Command.DEVICE_GET_REGION_INFO, w.RegionInfo(argsz=128, index=0).pack()),
        vfio_message(5, w.Command.REGION_READ,
                     w.RegionAccess(offset=0, region=w.PciRegion.CONFIG, count=4).pack()),
        vfio_message(6, w.Command.REGION_WRITE,
                     w.RegionAccess(offset=4, region=w.PciRegion.CONFIG, count=2).pack() + b"\x06\0"),
        vfio_message(7, w.Command.REGION_WRITE,
                     w.RegionAccess(offset=Reg.CC, region=w.PciRegion.BAR0, count=4).pack() + cc),
        vfio_message(8, w.Command.DEVICE_FEATURE, struct.pack("<II", 16, 1 | 1 << 16)),
        vfio_message(9, w.Command.DEVICE_GET_IRQ_INFO, w.IrqInfo(index=w.PciIrq.MSIX).pack()),
        vfio_message(10, w.Command.DMA_UNMAP, w.DmaUnmap(address=0x100000, size=0x10000).pack()),
        vfio_message(11, w.Command.DEVICE_RESET),
    ]


def vfio_seeds() -> dict[str, bytes]:
    msgs = vfio_session()
    # Chunk 0 is VERSION's header, chunk 1 its body, chunk 2 DMA_MAP's header, ...:
    # a memfd on DMA_MAP's body (chunk 3), an eventfd on SET_IRQS's (chunk 7).
    none = common.Chunks.header({})
    huge = w.Header(command=w.Command.REGION_WRITE, size=0x7FFFFFFF).pack()
    return {
        "session": common.Chunks.header({3: 0, 7: 1}) + b"".join(msgs),
        "version-only": none + vfio_version(),
        "get-info": none + vfio_version() + msgs[2],
        "oversized": none + vfio_version() + huge,
    }


# ---------------------------------------------------------------- vhost-user
def vhost_message(request: int, payload: bytes = b"", flags: int = 1) -> bytes:
    return vw.Header(request=request, flags=flags, size=len(payload)).pack() + payload


def vhost_seeds() -> dict[str, bytes]:
    from fuzz_vhost_user import with_image

    u64 = struct.Struct("<Q").pack
    table = struct.pack("<II", 1, 0) + vw.MemoryRegion(
        guest_phys_addr=0, memory_size=64 << 10, userspace_addr=0x7F0000000000,
        mmap_offset=0).pack()
    uva = 0x7F0000000000
    ring = [
        vhost_message(R.SET_OWNER),
        vhost_message(R.SET_MEM_TABLE, table),
        vhost_message(R.GET_FEATURES),
        vhost_message(R.SET_FEATURES, u64(1 << 32 | 1 << 28)),
        vhost_message(R.GET_PROTOCOL_FEATURES),
        vhost_message(R.SET_PROTOCOL_FEATURES, u64(OFFERED_PROTOCOL_FEATURES)),
        vhost_message(R.SET_VRING_NUM, vw.VringState(index=1, num=8).pack()),
        vhost_message(R.SET_VRING_BASE, vw.VringState(index=1, num=0).pack()),
        vhost_message(R.SET_VRING_ADDR, vw.VringAddr(index=1, desc_user_addr=uva,
                                                     avail_user_addr=uva + 0x1000,
                                                     used_user_addr=uva + 0x2000).pack()),
        vhost_message(R.SET_VRING_KICK, u64(1 | 0x100)),  # no fd: polled
        vhost_message(R.SET_VRING_CALL, u64(1 | 0x100)),
        vhost_message(R.SET_VRING_ENABLE, vw.VringState(index=1, num=1).pack()),
    ]
    stop = vhost_message(R.GET_VRING_BASE, vw.VringState(index=1, num=0).pack())
    stream = b"".join(ring)
    # Chunk 0: SET_OWNER's header (no body), 1: SET_MEM_TABLE's header, 2: its
    # body, which carries the memfd (fds ride on the first 8 chunks only).
    # Guest memory (GPA 0 = the ring's UVA): a transmit chain of two descriptors,
    # the virtio-net header then an Ethernet frame, made available once.
    desc = struct.Struct("<QIHH").pack
    frame = bytes.fromhex("ffffffffffff525400000009") + b"\x08\x06" + bytes(28)
    image = bytearray(0x3100)
    image[0:32] = desc(0x3000, vw.NetHdr.SIZE, 1, 1) + desc(0x3040, len(frame), 0, 0)
    image[0x1000:0x1006] = struct.pack("<HHH", 0, 1, 0)
    image[0x3040:0x3040 + len(frame)] = frame
    return {"negotiate-ring": with_image(common.Chunks.header({2: 0}) + stream, bytes(image)),
            "ring-stopped": with_image(common.Chunks.header({2: 0}) + stream + stop),
            "owner-only": with_image(common.Chunks.header({}) + ring[0] + ring[2])}


# ---------------------------------------------------------------- virtqueue
def virtqueue_seeds() -> dict[str, bytes]:
    from fuzz_virtqueue import BUFFERS, layout

    desc = struct.Struct("<QIHH").pack
    next_, write, indirect = 1, 2, 4
    simple = layout(8, 1, [0] * 8, desc(BUFFERS, 64, 0, 0), b"")
    chain = layout(8, 2, [0, 3] + [0] * 6,
                   desc(BUFFERS, 16, next_, 1) + desc(BUFFERS + 16, 16, next_, 2)
                   + desc(BUFFERS + 32, 64, write, 0) + desc(BUFFERS + 96, 32, write, 0), b"")
    table = desc(BUFFERS + 0x100, 12, next_, 1) + desc(BUFFERS + 0x200, 1500, write, 0)
    ind = layout(4, 1, [0] * 4, desc(BUFFERS, len(table), indirect, 0), table)
    # receive rings (flag 8): 12-byte header (16), MRG_RXBUF (32), a dirty log (4); the
    # avail index's low byte is also the frames' length in 8-byte units
    rx = b"".join(desc(BUFFERS + 0x40 * i, 32, write, 0) for i in range(8))
    rx_mrg = layout(8, 4, list(range(8)), rx, b"", flags=1 | 4 | 8 | 16 | 32)
    rx_legacy = layout(8, 3, list(range(8)), rx, b"", flags=1 | 8)
    # a transmit ring switched to another port (flag 64): four frames for that port's
    # MAC (learned), a broadcast and one for an unknown MAC in descriptors 0-3 (the
    # avail index 4 in byte 2), its receive ring's four buffers in descriptors 7-4
    # (byte 3: 4 available, heads mirrored)
    hdr = bytes(12)
    frames = [hdr + bytes.fromhex("525400000011525400aa0001") + b"\x88\xb5" + bytes(46),
              hdr + b"\xff" * 6 + bytes.fromhex("525400aa0001") + b"\x88\xb5" + bytes(46),
              hdr + bytes.fromhex("525400000099525400aa0001") + b"\x88\xb5" + bytes(46),
              hdr + bytes.fromhex("525400000011525400aa0001") + b"\x88\xb5" + bytes(100)]
    tx = b"".join(desc(BUFFERS + 0x100 * i, len(f), 0, 0) for i, f in enumerate(frames))
    rx_bufs = b"".join(desc(BUFFERS + 0x800 + 0x100 * (3 - i), 0x100, write, 0) for i in range(4))
    area = b"".join(f.ljust(0x100, b"\0") for f in frames)
    switched = layout(8, 0x0404, [0, 1, 2, 3, 0, 0, 0, 0], tx + rx_bufs, area, flags=64 | 32)
    return {"simple": simple, "chain": chain, "indirect": ind, "receive-mrg": rx_mrg,
            "receive-legacy": rx_legacy, "switched": switched}


# ---------------------------------------------------------------- nvme
def nvme_seeds() -> dict[str, bytes]:
    from fuzz_nvme import record

    prps = struct.pack("<4Q", 0x1000, 0x2000, 0x3000, 0x4000)  # data area offsets
    ident = record(Command(opcode=AdminOpcode.IDENTIFY, cdw10=1, prp1=0), 2)
    feats = record(Command(opcode=AdminOpcode.GET_FEATURES, cdw10=FeatureId.NUMBER_OF_QUEUES), 0)
    log = record(Command(opcode=AdminOpcode.GET_LOG_PAGE, cdw10=LogPage.SMART | 127 << 16,
                         nsid=0xFFFFFFFF, prp1=0), 2)
    write = record(Command(opcode=IoOpcode.WRITE, nsid=1, cdw12=7, prp1=0, prp2=0), 1 | 2 | 4)
    read = record(Command(opcode=IoOpcode.READ, nsid=1, cdw12=31, prp1=0x200, prp2=0), 1 | 2 | 4)
    create = record(Command(opcode=AdminOpcode.CREATE_CQ, cdw10=(15 << 16) | 2, cdw11=1, prp1=0), 2)
    dbbuf = record(Command(opcode=AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=0x8000, prp2=0), 2 | 4)
    flush = record(Command(opcode=IoOpcode.FLUSH, nsid=1), 1)
    # An SGL in the PRP page: two data blocks (offsets into the data area), a bit bucket.
    top = 1 << 63
    sgl = struct.pack("<6Q", 0x1000, top | 0x800, 0, top | 1 << 60 | 0x200, 0x3000, top | 0x600)
    sgl_read = record(Command(opcode=IoOpcode.READ, nsid=1, cdw12=7, prp1=0, prp2=48), 1 | 8)
    sgl_write = record(Command(opcode=IoOpcode.WRITE, nsid=1, cdw12=6, prp1=0, prp2=48), 1 | 8)  # no bucket
    # The zoned namespace 2: writes at the write pointer, an append, a report, a reset.
    zwrite = record(Command(opcode=IoOpcode.WRITE, nsid=2, cdw12=7, prp1=0, prp2=0), 1 | 2 | 4)
    zappend = record(Command(opcode=IoOpcode.ZONE_APPEND, nsid=2, cdw10=128, cdw12=3, prp1=0),
                     1 | 2)
    zopen = record(Command(opcode=IoOpcode.ZONE_MGMT_SEND, nsid=2, cdw10=256, cdw13=3), 1)
    zreport = record(Command(opcode=IoOpcode.ZONE_MGMT_RECV, nsid=2, cdw12=1023,
                             cdw13=1 << 16, prp1=0), 1 | 2)
    zreset = record(Command(opcode=IoOpcode.ZONE_MGMT_SEND, nsid=2, cdw13=4 | 1 << 8), 1)
    # Firmware: a 4 KiB piece, an overlapping one, a commit to slot 2 (CA 001b), the log.
    fw_piece = record(Command(opcode=AdminOpcode.FIRMWARE_DOWNLOAD, cdw10=1023, prp1=0), 2)
    fw_overlap = record(Command(opcode=AdminOpcode.FIRMWARE_DOWNLOAD, cdw10=3, cdw11=512,
                                prp1=0), 2)
    fw_commit = record(Command(opcode=AdminOpcode.FIRMWARE_COMMIT, cdw10=1 << 3 | 2), 0)
    fw_log = record(Command(opcode=AdminOpcode.GET_LOG_PAGE, cdw10=LogPage.FIRMWARE_SLOT | 127 << 16,
                            prp1=0), 2)
    return {"admin": bytes([4]) + prps + ident + feats + log,
            "firmware": bytes([4]) + prps + fw_piece + fw_overlap + fw_commit + fw_log,
            "zoned": bytes([4]) + prps + zwrite + zappend + zopen + zreport + zreset + zwrite,
            "io-sgl": bytes([6]) + sgl + sgl_write + sgl_read,
            "shadow-doorbells": bytes([4]) + prps + dbbuf + flush + write + flush,
            "io-prp-list": bytes([4]) + prps + write + read,
            "create-queue": b"\0" + create}


# ---------------------------------------------------------------- migration
def migration_seeds() -> dict[str, bytes]:
    from fuzz_migration import source_stream

    stream = source_stream()
    return {"stream-resigned": bytes([0x80 | 3]) + stream, "stream-bytewise": b"\0" + stream}


# ---------------------------------------------------------------- handoff
def handoff_seeds() -> dict[str, bytes]:
    from fuzz_handoff import manifest_example

    bare = manifest_example()
    with_client = json.loads(json.dumps(bare))
    n = with_client["fds"]
    with_client["vfio_user"]["client"] = {"socket": n, "conn": {
        "caps": {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "write_multiple": False},
        "next_id": 5, "regions": [{"address": 0x100000, "size": 0x10000, "fd_offset": 0,
                                   "readable": True, "writable": True, "fd": n + 1}],
        "irq_fds": [[2, 0, n + 2]], "irq_mask_fds": [], "irq_enabled": [[2, 1]],
        "pending": "", "pending_fds": [], "counters": {"messages": 4, "errors": 0}}}
    with_client["fds"] = n + 3
    with_client["control"]["faults"]["rules"] = [
        {"id": 1, "target": "nvme", "action": "status", "count": 2, "probability": 1.0,
         "status": "0x281", "dnr": True, "lba": [0, 7], "hits": 0, "seen": 0}]
    compact = {"separators": (",", ":")}
    return {"bare": bytes([bare["fds"]]) + json.dumps(bare, **compact).encode(),  # type: ignore[arg-type]
            "client": bytes([n + 3]) + json.dumps(with_client, **compact).encode()}  # type: ignore[arg-type]


# ---------------------------------------------------------------- control
def control_seeds() -> dict[str, bytes]:
    lines = [{"id": 1, "cmd": "status"},
             {"id": 2, "cmd": "fault", "args": {"action": "status", "status": "0x281", "count": 1}},
             {"id": 3, "cmd": "fault.list"},
             {"id": 4, "cmd": "fault.clear", "args": {"id": 1}},
             {"id": 5, "cmd": "link", "args": {"port": "p0", "state": "down"}},
             {"id": 6, "cmd": "namespace.resize", "args": {"nsid": 1, "size": "2M"}}]
    qmp = [{"execute": "query-commands"},  # refused: capabilities negotiation first
           {"execute": "qmp_capabilities", "id": "neg"},
           {"execute": "status", "id": 1},
           {"execute": "fault-add", "arguments": {"action": "status", "status": "0x281"}, "id": 2},
           {"execute": "x-query-appliance-schema", "id": [3]},
           {"execute": "namespace-resize", "arguments": {"size": "2M"}, "id": {"n": 4}},
           {"exec-oob": "status", "id": 5},
           {"execute": "fault-clear", "arguments": {"id": 1}, "extra": 6}]
    return {"commands": b"\n".join(json.dumps(line).encode() for line in lines) + b"\n",
            "qmp": b"\n".join(json.dumps(line).encode() for line in qmp) + b"\n",
            # as qemu.qmp sends them: objects back to back, no newlines
            "qmp-stream": b"".join(json.dumps(line).encode() for line in qmp[1:4])}


SEEDS: dict[str, Callable[[], dict[str, bytes]]] = {
    "vfio_user": vfio_seeds, "vhost_user": vhost_seeds, "virtqueue": virtqueue_seeds,
    "nvme": nvme_seeds, "migration": migration_seeds, "handoff": handoff_seeds,
    "control": control_seeds,
}


def main() -> None:
    for name, make in SEEDS.items():
        target = CORPUS / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for seed, data in make().items():
            (target / seed).write_bytes(data)
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    print(f"{CORPUS}: {total} bytes")
    os._exit(0)  # the harness modules keep an appliance and its loop: no teardown needed


if __name__ == "__main__":
    main()
