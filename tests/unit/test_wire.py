"""Round-trip tables for the struct base and the vfio-user declarations."""

import os
from pathlib import Path
from typing import Annotated

import mypy.api
import pytest

from appliance.vfio_user import wire as w
from appliance.wire import I32, U8, U32, BitFields, Struct, WireError

# (struct instance, exact bytes): each must encode to and decode from the other.
CASES = [
    (w.Header(msg_id=0x1234, command=w.Command.DMA_MAP, size=48, flags=0x10, error=0),
     bytes.fromhex("3412 0200 30000000 10000000 00000000")),
    (w.DmaMap(argsz=32, flags=3, offset=0x1000, address=0x2000, size=0x3000),
     bytes.fromhex("20000000 03000000") + (0x1000).to_bytes(8, "little")
     + (0x2000).to_bytes(8, "little") + (0x3000).to_bytes(8, "little")),
    (w.RegionAccess(offset=0x1008, region=0, count=4),
     (0x1008).to_bytes(8, "little") + bytes.fromhex("00000000 04000000")),
    (w.QemuDmaAccess(address=0x10, count=7), (0x10).to_bytes(8, "little") + (7).to_bytes(4, "little")),
    (w.IrqSet(argsz=20, flags=0x24, index=2, start=0, count=3),
     bytes.fromhex("14000000 24000000 02000000 00000000 03000000")),
]


@pytest.mark.parametrize(("obj", "raw"), CASES, ids=lambda x: type(x).__name__)
def test_round_trip(obj: Struct, raw: bytes) -> None:
    assert obj.pack() == raw
    assert type(obj).unpack(raw) == obj


def test_spec_sizes() -> None:
    sizes = {w.Header: 16, w.DmaMap: 32, w.DmaUnmap: 24, w.DeviceInfo: 16, w.RegionInfo: 32,
             w.IrqInfo: 16, w.IrqSet: 20, w.RegionAccess: 16, w.DmaAccess: 16,
             w.WriteMultiEntry: 24, w.SubRegionIoFd: 40, w.SparseMmapArea: 16}
    for cls, size in sizes.items():
        assert cls.SIZE == size, cls.__name__


def test_size_assertion_at_class_creation() -> None:
    with pytest.raises(TypeError, match="spec size"):
        class Bad(Struct, size=3):
            a: U32 = 0


def test_fields_come_from_annotations_in_order() -> None:
    class Base(Struct):
        BYTE_ORDER = ">"
        kind: U8 = 7

    class Both(Base, size=9):
        tag: Annotated[bytes, "4s"] = b"ab"
        delta: I32 = -1

    assert Both.FIELDS == (("kind", "B", 7), ("tag", "4s", b"ab"), ("delta", "i", -1))
    assert Both().pack() == b"\x07ab\0\0\xff\xff\xff\xff"
    assert Both.unpack(Both(delta=5).pack()) == Both(tag=b"ab\0\0", delta=5)
    assert Both(kind=1).delta == -1

    class One(Struct, size=1):
        only: U8 = 3

    assert One().pack() == b"\x03" and One.unpack(b"\x09").only == 9
    with pytest.raises(TypeError, match="twice"):
        type("Again", (Both,), {"__annotations__": {"kind": U8}, "kind": 1})


# Each class body is wrong in one way; each fails when the class is created.
ROOT = Path(__file__).resolve().parents[2]

BAD_BODIES: dict[str, dict[str, object]] = {
    "no default": {"__annotations__": {"a": U32}},
    "plain int": {"__annotations__": {"a": int}, "a": 0},
    "unknown format": {"__annotations__": {"a": Annotated[int, "x"]}, "a": 0},
    "bytes without length": {"__annotations__": {"a": Annotated[bytes, "s"]}, "a": b""},
    "int format on bytes": {"__annotations__": {"a": Annotated[bytes, "I"]}, "a": b""},
    "default of the wrong type": {"__annotations__": {"a": U32}, "a": b""},
    "default too big": {"__annotations__": {"a": U8}, "a": 256},
    "default too long": {"__annotations__": {"a": Annotated[bytes, "2s"]}, "a": b"abc"},
    "shadows a method": {"__annotations__": {"pack": U8}, "pack": 0},
    "private name": {"__annotations__": {"_a": U8}, "_a": 0},
    "FIELDS by hand": {"FIELDS": (("a", "I", 0),)},
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_declaration_fails_at_class_creation(body: dict[str, object]) -> None:
    with pytest.raises(TypeError):
        type("Bad", (Struct,), dict(body))


def test_fields_are_typed_for_mypy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "from appliance.storage.spec import Command\n"
        "reveal_type(Command(cid=1).cdw10)\n"
        "reveal_type(Command.unpack(b'').prp1)\n"
        "Command(bogus=1)\n"
        "Command(cid='1')\n"
    )
    monkeypatch.setenv("MYPYPATH", str(ROOT))
    out, _, _ = mypy.api.run(["--no-incremental", "--strict", "--config-file", os.devnull,
                              str(snippet)])
    found = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(str(snippet))]
    assert found == [
        'note: Revealed type is "int"',
        'note: Revealed type is "int"',
        'error: Unexpected keyword argument "bogus" for "Command"  [call-arg]',
        'error: Argument "cid" to "Command" has incompatible type "str"; expected "int"  [arg-type]',
    ], out


def test_unknown_field_at_construction() -> None:
    with pytest.raises(TypeError, match="bogus"):
        w.Header(bogus=1)


def test_short_buffer_and_overflow() -> None:
    with pytest.raises(WireError):
        w.Header.unpack(b"\0" * 15)
    with pytest.raises(WireError):
        w.Header(msg_id=1 << 16).pack()


def test_bitfields_cover_and_refuse_oversized() -> None:
    cc = BitFields(32, reserved=0xFF00000E, en=(0, 1), css=(4, 3), mps=(7, 4), ams=(11, 3),
                   shn=(14, 2), iosqes=(16, 4), iocqes=(20, 4))
    v = cc.encode(en=1, iosqes=6, iocqes=4)
    assert v == 0x00460001
    assert cc.decode(v)["iosqes"] == 6
    with pytest.raises(WireError):
        cc.set(v, "shn", 4)
    with pytest.raises(TypeError):
        BitFields(8, a=(0, 4))  # does not cover the container


def test_reserved_masks_are_nonzero() -> None:
    # Regression: ~ on an IntFlag complements within its members and gave 0.
    assert w.MSG_FLAGS_RESERVED == 0xFFFFFFC0
    assert w.DMA_MAP_FLAGS_RESERVED == 0xFFFFFFFC
    assert w.IRQ_SET_FLAGS_RESERVED == 0xFFFFFFC0
