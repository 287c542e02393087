"""Replay every seed (tests/fuzz/corpus/<harness>/*) and every crash found so far
(tests/fuzz/crashes/<harness>-<what>) through its harness's ``one_input``.

A crash file is a regression test: it failed before its fix, and must pass now.
Then a few random mutations of each harness's seeds (hypothesis), so a plain
pytest run exercises every harness beyond its seeds too.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize("name", HARNESSES)
def test_random_mutations_of_the_seeds(name: str) -> None:
    """A quick, uninstrumented taste of fuzzing in every plain pytest run:
    hypothesis flips, cuts and splices each harness's seeds."""
    harness = importlib.import_module(f"fuzz_{name}")
    seeds = [p.read_bytes() for p in sorted((HERE / "corpus" / name).glob("*"))]

    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(seeds), st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)),
                                            max_size=8), st.integers(0, 1 << 20))
    def mutated(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
        data = bytearray(seed)
        for pos, value in flips:
            if data:
                data[pos % len(data)] ^= value
        harness.one_input(bytes(data[:len(data) - cut % 64]) if cut & 1 else bytes(data))

    mutated()
