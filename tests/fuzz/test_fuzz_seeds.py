"""Replay every seed (tests/fuzz/corpus/<harness>/*) and every crash found so far
(tests/fuzz/crashes/<harness>-<what>) through its harness's ``one_input``.

A crash file is a regression test: it failed before its fix, and must pass now.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HARNESSES = sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))


def _cases() -> list[tuple[str, Path]]:
    cases = [(name, path) for name in HARNESSES
             for path in sorted((HERE / "corpus" / name).glob("*"))]
    for path in sorted((HERE / "crashes").glob("*")):
        name = next((n for n in HARNESSES if path.name.startswith(n + "-")), None)
        assert name is not None, f"{path.name}: no harness named by its prefix"
        cases.append((name, path))
    return cases


CASES = _cases()


def test_every_harness_has_seeds() -> None:
    assert HARNESSES
    for name in HARNESSES:
        assert any((HERE / "corpus" / name).glob("*")), f"no seed corpus for {name}"


@pytest.mark.parametrize("name, path", CASES, ids=[f"{n}/{p.parent.name}/{p.name}" for n, p in CASES])
def test_replay(name: str, path: Path) -> None:
    harness = importlib.import_module(f"fuzz_{name}")
    harness.one_input(path.read_bytes())
