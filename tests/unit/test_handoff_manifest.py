"""The typed live-handoff manifest: every part goes to JSON and back unchanged, and
every kind of bad field is refused by the HANDOFF record's parser with the
handoff's own error, naming the field."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from test_handoff_protocol import connection, exported

from appliance.control.faults import FaultSet
from appliance.runtime.handoff import frames as ho
from appliance.runtime.handoff.manifest import (
    ClientEntry,
    ControlState,
    DoorbellPageState,
    Manifest,
    VfioUserState,
)
from appliance.runtime.handoff.net import NetState, PortState, RegionState, RingState, SessionState
from appliance.storage.doorbells import PAGE_SIZE
from appliance.vfio_user import wire as w
from appliance.vfio_user.handoff_state import MAX_PENDING, ClientCaps, ConnectionState
from appliance.vfio_user.handoff_state import RegionState as DmaRegion
from appliance.vfio_user.migration_stream import Record, RecordType

MSIX = int(w.PciIrq.MSIX)
RING_COUNTS = {"packets": 3, "bytes": 180, "dropped": 0, "malformed": 0}


def ring(kick: int | None, call: int | None) -> RingState:
    return RingState(num=256, desc=0x1000, avail=0x2000, used=0x3000, log=0, flags=0,
                     last_avail_idx=7, used_idx=7, sync_used=False, started=True, enable=True,
                     polled=False, kick=kick, call=call, err=None)


def full_manifest() -> Manifest:
    """A manifest with every part and every optional value present (13 fds)."""
    conn = ConnectionState(
        caps=ClientCaps(8, 1 << 20, True), next_id=9,
        regions=(DmaRegion(0x10000, 0x4000, 3, 0x1000, True, True),
                 DmaRegion(0x40000, 0x1000, None, 0, True, False)),
        irq_fds=((MSIX, 1, 4),), irq_mask_fds=((int(w.IrqSetFlag.ACTION_MASK), MSIX, 0, 5),),
        irq_enabled=((MSIX, 4), (int(w.PciIrq.INTX), 0)),
        pending=w.Header(msg_id=3, command=w.Command.DEVICE_RESET, size=w.HEADER_SIZE).pack()[:10],
        pending_fds=(6,), counters=(("messages", 40), ("errors", 1)))
    session = SessionState(
        socket=9, state="owned", features=1 << 32, protocol_features=0x1, protocol_negotiated=True,
        counters={"messages": 12, "rejected": 0, "nacks": 0},
        regions=(RegionState(0, 0x10000, 0x7F0000000000, 0, 10),), log_fd=None,
        partial=b"\x01\x00", partial_fds=(), status=0xF, mtu=1500, mtu_told=False,
        vrings=(ring(11, 12), ring(None, None)))
    port = PortState(name="p0", mac="52:54:00:00:00:10", queues=1, mode="server",
                     socket="/run/p0.sock", listener=7, lock=8,
                     counters={"connections": 1, "rarps": 0, "tx_no_queue": 0,
                               "vrings": [dict(RING_COUNTS), dict(RING_COUNTS)]},
                     session=session)
    net = NetState(ports=(port,), switch_counters={"forwarded": 5},
                   table=((bytes.fromhex("525400000010"), "p0", 1.5),),
                   responder={"ip": "10.0.0.1", "mac": "52:54:00:00:00:fe", "ident": 3,
                              "counters": {"replies": 2}}, tap=None)
    faults = FaultSet(clock=lambda: 0.0)
    faults.add({"action": "status", "count": 1})
    return Manifest(
        version=ho.HANDOFF_VERSION, fds=13,
        vfio_user=VfioUserState("/run/nvme.sock", 0, 1, 2, ClientEntry(2, conn)),
        doorbell_page=DoorbellPageState(fd=12, seen=bytes(range(256)) * (PAGE_SIZE // 256)),
        net=net, control=ControlState(json.loads(json.dumps(faults.export_state())), ("p0",)))


def through_record(manifest: Manifest) -> Manifest:
    return ho.parse_handoff(ho.handoff_record(manifest), manifest.fds)


# ------------------------------------------------------------ round trips
def test_a_full_manifest_goes_to_json_and_back_unchanged() -> None:
    manifest = full_manifest()
    assert through_record(manifest) == manifest
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json())), 13) == manifest


def test_a_bare_manifest_goes_to_json_and_back_unchanged() -> None:
    bare = Manifest(ho.HANDOFF_VERSION, 2, VfioUserState("/run/nvme.sock", 0, 1, 0, None),
                    None, None, None)
    assert through_record(bare) == bare


def test_an_exported_connection_goes_to_json_and_back_unchanged() -> None:
    src, state, fds, memfd = exported()
    assert ConnectionState.from_json(json.loads(json.dumps(state.to_json())), len(fds)) == state
    src.close()
    os.close(memfd)


def test_the_adopted_connection_exports_what_it_adopted() -> None:
    """Replaying the requests rebuilds the very state: export(adopt(s)) == s."""
    src, state, fds, memfd = exported()
    dst = connection()
    dst.handoff_adopt(state, fds)
    again: list[int] = []
    assert dst.handoff_export(again) == state
    assert len(again) == len(fds)
    src.handoff_release()
    dst.close()
    os.close(memfd)


# ------------------------------------------------------------ refusals, one per field kind
Edit = Callable[[dict[str, Any]], Any]


def at(*path: Any, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def drop(*path: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return edit


CONN = ("vfio_user", "client", "conn")
SESSION = ("net", "ports", 0, "session")
REFUSALS: list[tuple[str, Edit, str]] = [
    ("version", at("version", value=1), "manifest version 1, this side speaks 2"),
    ("fd count", at("fds", value=12), "names 12 fds, 13 came"),
    ("missing", drop("vfio_user", "client"), r"vfio_user\.client: missing"),
    ("object", at("vfio_user", "client", value=5), r"vfio_user\.client: not an object"),
    ("integer type", at("vfio_user", "connections", value="2"), "'2' is not an integer"),
    ("bool is no integer", at(*CONN, "next_id", value=True), r"next_id: True is not an integer"),
    ("integer range", at(*CONN, "next_id", value=1 << 16), r"next_id: 65536 is not an integer in 0..0xffff"),
    ("boolean", at(*CONN, "regions", 0, "readable", value=1), r"regions\[0\]\.readable: 1 is not a boolean"),
    ("string", at("vfio_user", "path", value=5), r"vfio_user\.path: 5 is not a string"),
    ("choice", at(*SESSION, "state", value="closed"), r"session\.state: 'closed' is not one of"),
    ("number", at("net", "switch", "table", 0, 2, value="old"), r"table\[0\]\[2\]: 'old' is not a number"),
    ("hex", at("doorbell_page", "seen", value="zz"), r"doorbell_page\.seen: not hex"),
    ("hex length", at(*CONN, "pending", value="00" * MAX_PENDING), r"pending: not a hex string of at most"),
    ("exact length", at("doorbell_page", "seen", value="00"), "1 bytes, not one page"),
    ("fd index", at("vfio_user", "listener", value=13), r"vfio_user\.listener: fd index 13 out of range \(0\.\.12\)"),
    ("list", at(*CONN, "regions", value={}), r"conn\.regions: expected a list"),
    ("list length", at(*SESSION, "vrings", value=[]), r"session\.vrings: expected a list of 2"),
    ("list bound", at(*CONN, "pending_fds", value=[6] * 300), "expected a list of at most"),
    ("row width", at(*CONN, "irq_fds", 0, value=[MSIX, 1]), r"irq_fds\[0\]: expected a list of 3"),
    ("counters", at(*CONN, "counters", "messages", value=-1), r"counters\.messages: -1 is not an integer"),
    ("named counters", drop(*SESSION, "counters", "nacks"), r"session\.counters\.nacks: missing"),
    ("capabilities", at(*CONN, "caps", "max_msg_fds", value=0), "capability max_msg_fds=0 out of range"),
    ("irq index", at(*CONN, "irq_enabled", 0, 0, value=w.PCI_NUM_IRQS), r"irq_enabled\[0\]\[0\]"),
    ("irq enabled twice", at(*CONN, "irq_enabled", 1, 0, value=MSIX), "enabled twice"),
    ("irq fd not enabled", at(*CONN, "irq_fds", 0, 1, value=4), rf"irq {MSIX}\.4 out of range: 4 enabled"),
    ("mask action", at(*CONN, "irq_mask_fds", 0, 0, value=1), "mask action 1 out of range"),
    ("pending fds alone", at(*CONN, "pending", value=""), "pending fds without a pending message"),
    ("pending framing", at(*CONN, "pending", value="0000000008000000" + "00" * 8), "below the header size"),
    ("fault state", at("control", "faults", "rules", 0, "count", value="x"), r"handoff manifest: control\.faults: count: expected an integer"),
    ("link name", at("control", "links_down", 0, value=1), r"links_down\[0\]: 1 is not a string"),
    ("net version", at("net", "version", value=9), "net handoff state version 9"),
    ("MAC", at("net", "switch", "table", 0, 0, value="5254"), r"table\[0\]\[0\]: bad MAC"),
]


@pytest.mark.parametrize(("edit", "why"), [(e, w) for _, e, w in REFUSALS],
                         ids=[name for name, _, _ in REFUSALS])
def test_each_kind_of_bad_field_is_a_handoff_error_naming_it(edit: Edit, why: str) -> None:
    doc = json.loads(json.dumps(full_manifest().to_json()))
    edit(doc)
    with pytest.raises(ho.HandoffError, match=why):
        ho.parse_handoff(Record(RecordType.HANDOFF, json.dumps(doc).encode()), 13)


def test_not_an_object_is_refused() -> None:
    with pytest.raises(ho.HandoffError, match="not an object"):
        ho.parse_handoff(Record(RecordType.HANDOFF, b"[]"), 0)
