"""The LBA format table reported in Identify Namespace."""

from __future__ import annotations

import pytest

from appliance.storage.formats import (
    LBA_FORMATS,
    NLBAF,
    flbas,
    format_index,
    lbaf_fields,
)
from appliance.storage.identify_spec import LBAF, IdentifyNamespace


def test_formats_cover_both_block_sizes_with_each_metadata_size() -> None:
    assert NLBAF == 7
    assert [(f.block_size, f.metadata) for f in LBA_FORMATS] == [
        (512, 0), (512, 8), (512, 16), (512, 64),
        (4096, 0), (4096, 8), (4096, 16), (4096, 64)]
    assert format_index(512, 0) == 0 and format_index(4096, 0) == 4
    assert format_index(4096, 8) == 5


@pytest.mark.parametrize(("block", "ms"), [(1024, 0), (512, 32), (4096, -8)])
def test_unknown_format_is_refused(block: int, ms: int) -> None:
    with pytest.raises(ValueError, match="no LBA format"):
        format_index(block, ms)


def test_identify_namespace_carries_every_format() -> None:
    nlbaf, lbaf0, lbaf1_15 = lbaf_fields()
    raw = IdentifyNamespace(nlbaf=nlbaf, lbaf0=lbaf0, lbaf1_15=lbaf1_15).pack()
    ident = IdentifyNamespace.unpack(raw)
    assert ident.nlbaf == 7
    words = [ident.lbaf0] + [int.from_bytes(ident.lbaf1_15[i:i + 4], "little")
                             for i in range(0, 28, 4)]
    got = [(1 << LBAF.get(w, "lbads"), LBAF.get(w, "ms"), LBAF.get(w, "rp")) for w in words]
    assert got == [(f.block_size, f.metadata, 0) for f in LBA_FORMATS]
    assert ident.lbaf1_15[28:] == bytes(32)  # formats 8-15: not offered


def test_flbas_bits() -> None:
    assert flbas(5, extended=False) == 0x05
    assert flbas(5, extended=True) == 0x15
