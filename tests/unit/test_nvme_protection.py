"""End-to-end protection: the CRC-16/T10-DIF guard, PI tuples and the PRCHK checks."""

from __future__ import annotations

import pytest

from appliance.storage.protection import (
    PRACT,
    PRCHK_APP,
    PRCHK_GUARD,
    PRCHK_REF,
    PRINFO_SHIFT,
    PiType,
    Protection,
    ProtectionError,
    TagCheck,
    crc16_t10dif,
    pack_tuple,
)
from appliance.storage.spec import CommandError, Status

ALL_CHECKS = PRCHK_GUARD | PRCHK_APP | PRCHK_REF


@pytest.mark.parametrize(("data", "crc"), [
    (b"123456789", 0xD0DB),  # the catalogued check value of CRC-16/T10-DIF
    (bytes(32), 0x0000),
    (b"\xff" * 32, 0xA293),
    (bytes(range(32)), 0x0224),
    (b"\xff\xff" + bytes(30), 0x21B8),
    (bytes(range(255, 223, -1)), 0xA0B7),
    (b"", 0x0000),
    (b"\x01", 0x8BB7),  # one set bit at the end: the polynomial itself
])
def test_crc_known_vectors(data: bytes, crc: int) -> None:
    assert crc16_t10dif(data) == crc


def test_crc_odd_lengths_and_continuation_agree_with_bitwise() -> None:
    def bitwise(data: bytes) -> int:
        crc = 0
        for byte in data:
            crc ^= byte << 8
            for _ in range(8):
                crc = ((crc << 1) ^ 0x8BB7 if crc & 0x8000 else crc << 1) & 0xFFFF
        return crc

    data = bytes((i * 37 + 11) & 0xFF for i in range(517))
    for n in (1, 2, 3, 255, 516, 517):
        assert crc16_t10dif(data[:n]) == bitwise(data[:n])
    assert crc16_t10dif(data[101:], crc16_t10dif(data[:101])) == bitwise(data)
    assert crc16_t10dif(memoryview(bytearray(data))) == bitwise(data)


def test_protection_layout() -> None:
    assert Protection(PiType.TYPE1, 8).dps == 0x9
    assert Protection(PiType.TYPE3, 16, pi_first=False).dps == 0x3
    assert Protection(PiType.TYPE3, 16, pi_first=False).tuple_offset == 8
    assert Protection(PiType.NONE, 64).dps == 0
    with pytest.raises(ValueError, match="at least 8"):
        Protection(PiType.TYPE2, 0)
    assert Protection(PiType.TYPE1, 8).strips(PRACT)
    assert not Protection(PiType.TYPE1, 16).strips(PRACT)
    assert not Protection(PiType.TYPE1, 8).strips(PRCHK_GUARD)


def test_fields_from_dwords_are_masked() -> None:
    check = TagCheck.from_dwords(0xFFFFFFFF, 0x1_2345_6789, 0xABCD_1234)
    assert check == TagCheck(prinfo=0xF, ilbrt=0x23456789, lbat=0x1234, lbatm=0xABCD)
    assert TagCheck.from_dwords(PRCHK_GUARD << PRINFO_SHIFT, 0, 0).prinfo == PRCHK_GUARD


def _blocks(n: int, size: int = 512) -> memoryview:
    return memoryview(bytes((lba * 7 + i) & 0xFF for lba in range(n) for i in range(size)))


@pytest.mark.parametrize("pi_type", [PiType.TYPE1, PiType.TYPE2, PiType.TYPE3])
def test_generated_tuples_verify(pi_type: PiType) -> None:
    prot = Protection(pi_type, 8)
    check = TagCheck(ALL_CHECKS | PRACT, ilbrt=100, lbat=0x5A5A, lbatm=0xFFFF)
    data = _blocks(4)
    tuples = check.generate(prot, data, 512)
    assert len(tuples) == 32
    ref_tags = [int.from_bytes(tuples[i * 8 + 4:i * 8 + 8], "big") for i in range(4)]
    assert ref_tags == ([100] * 4 if pi_type == PiType.TYPE3 else [100, 101, 102, 103])
    assert tuples[:2] == crc16_t10dif(data[:512]).to_bytes(2, "big")
    check.verify(prot, data, memoryview(tuples), 512, slba=100)


def _corrupt(tuples: bytes, block: int, offset: int) -> memoryview:
    raw = bytearray(tuples)
    raw[block * 8 + offset] ^= 0x01
    return memoryview(raw)


@pytest.mark.parametrize(("prchk", "offset", "status"), [
    (PRCHK_GUARD, 0, Status.GUARD_CHECK_ERROR),
    (PRCHK_APP, 3, Status.APPLICATION_TAG_CHECK_ERROR),
    (PRCHK_REF, 7, Status.REFERENCE_TAG_CHECK_ERROR),
])
def test_each_check_fails_on_its_field_only(prchk: int, offset: int, status: Status) -> None:
    prot = Protection(PiType.TYPE1, 8)
    data = _blocks(3)
    good = TagCheck(PRACT, ilbrt=10, lbat=0x00F0, lbatm=0xFFFF).generate(prot, data, 512)
    bad = _corrupt(good, 2, offset)
    with pytest.raises(ProtectionError) as err:
        TagCheck(prchk, ilbrt=10, lbat=0x00F0, lbatm=0xFFFF).verify(prot, data, bad, 512, 10)
    assert err.value.status == status and err.value.lba == 12
    # the other checks do not look at that field
    TagCheck(ALL_CHECKS & ~prchk, ilbrt=10, lbat=0x00F0, lbatm=0xFFFF).verify(
        prot, data, bad, 512, 10)


def test_guard_is_checked_before_the_tags() -> None:
    prot = Protection(PiType.TYPE2, 8)
    data = _blocks(1)
    bad = memoryview(pack_tuple(0, 1, 2))
    with pytest.raises(ProtectionError) as err:
        TagCheck(ALL_CHECKS, ilbrt=3, lbat=0, lbatm=0xFFFF).verify(prot, data, bad, 512, 0)
    assert err.value.status == Status.GUARD_CHECK_ERROR


def test_application_tag_mask_limits_the_compare() -> None:
    prot = Protection(PiType.TYPE1, 8)
    data = _blocks(1)
    tup = memoryview(pack_tuple(crc16_t10dif(data), 0x12FF, 0))
    TagCheck(PRCHK_APP, 0, lbat=0x1200, lbatm=0xFF00).verify(prot, data, tup, 512, 0)
    TagCheck(PRCHK_APP, 0, lbat=0x0000, lbatm=0x0000).verify(prot, data, tup, 512, 0)
    with pytest.raises(ProtectionError):
        TagCheck(PRCHK_APP, 0, lbat=0x1300, lbatm=0xFF00).verify(prot, data, tup, 512, 0)


def test_escape_values_turn_checks_off() -> None:
    data = _blocks(1)
    garbage_app_escape = memoryview(pack_tuple(0xDEAD, 0xFFFF, 0x77))
    for pi_type in (PiType.TYPE1, PiType.TYPE2):
        TagCheck(ALL_CHECKS, 0, 0, 0xFFFF).verify(
            Protection(pi_type, 8), data, garbage_app_escape, 512, 0)
    type3 = Protection(PiType.TYPE3, 8)
    with pytest.raises(ProtectionError):  # type 3 needs both escapes
        TagCheck(ALL_CHECKS, 0, 0, 0xFFFF).verify(type3, data, garbage_app_escape, 512, 0)
    TagCheck(ALL_CHECKS, 0, 0, 0xFFFF).verify(
        type3, data, memoryview(pack_tuple(0xDEAD, 0xFFFF, 0xFFFFFFFF)), 512, 0)


def test_type3_never_checks_the_reference_tag() -> None:
    prot = Protection(PiType.TYPE3, 8)
    data = _blocks(2)
    tuples = memoryview(pack_tuple(crc16_t10dif(data[:512]), 0, 0x1234)
                        + pack_tuple(crc16_t10dif(data[512:]), 0, 0x9999))
    TagCheck(ALL_CHECKS, ilbrt=0, lbat=0, lbatm=0xFFFF).verify(prot, data, tuples, 512, 0)


def test_reference_tag_wraps_at_32_bits() -> None:
    prot = Protection(PiType.TYPE2, 8)
    data = _blocks(2)
    check = TagCheck(ALL_CHECKS | PRACT, ilbrt=0xFFFFFFFF, lbat=0, lbatm=0)
    tuples = check.generate(prot, data, 512)
    assert tuples[12:16] == bytes(4)
    check.verify(prot, data, memoryview(tuples), 512, 0)


def test_validate_type1_ilbrt_must_match_slba() -> None:
    type1 = Protection(PiType.TYPE1, 8)
    TagCheck(PRCHK_REF, ilbrt=0x5, lbat=0, lbatm=0).validate(type1, 0x1_0000_0005)
    with pytest.raises(CommandError) as err:
        TagCheck(PRCHK_REF, ilbrt=0x6, lbat=0, lbatm=0).validate(type1, 5)
    assert err.value.status == Status.INVALID_PROTECTION_INFORMATION and err.value.dnr
    # without the reference tag check, or for type 2, any ILBRT goes
    TagCheck(PRCHK_GUARD, ilbrt=0x6, lbat=0, lbatm=0).validate(type1, 5)
    TagCheck(PRCHK_REF, ilbrt=0x6, lbat=0, lbatm=0).validate(Protection(PiType.TYPE2, 8), 5)


def test_validate_refuses_prinfo_without_pi() -> None:
    TagCheck(0, 0, 0, 0).validate(Protection(PiType.NONE, 0), 0)
    with pytest.raises(CommandError) as err:
        TagCheck(PRACT, 0, 0, 0).validate(Protection(PiType.NONE, 8), 0)
    assert err.value.status == Status.INVALID_FIELD


def test_short_tuple_buffer_is_a_caller_bug() -> None:
    prot = Protection(PiType.TYPE1, 8)
    with pytest.raises(ValueError, match="8 tuple bytes for 2 blocks"):
        TagCheck(PRCHK_GUARD, 0, 0, 0).verify(prot, _blocks(2), memoryview(bytes(8)), 512, 0)
