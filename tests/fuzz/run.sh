#!/bin/bash
# tests/fuzz/run.sh [SECONDS] - run every fuzz harness for SECONDS each (default 20).
#
# Each harness starts from a scratch copy of its committed seed corpus
# (tests/fuzz/corpus/NAME), so the committed corpus never grows by itself.
# A finding is written to tests/fuzz/crashes/NAME-crash-<sha1> (replayed by
# tests/fuzz/test_fuzz_seeds.py once renamed after what it shows) and the run
# fails.  Set PYTHON to choose the interpreter.
set -uo pipefail

SECONDS_EACH=${1:-20}
HERE=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

failed=()
for harness in "$HERE"/fuzz_*.py; do
    name=$(basename "$harness" .py); name=${name#fuzz_}
    mkdir -p "$WORK/$name" "$HERE/crashes"
    cp "$HERE/corpus/$name"/* "$WORK/$name/" 2>/dev/null
    echo "==> fuzz $name for ${SECONDS_EACH}s"
    if ! "$PY" "$harness" -max_total_time="$SECONDS_EACH" -max_len=65536 -rss_limit_mb=2048 \
            -print_final_stats=1 -artifact_prefix="$HERE/crashes/$name-" \
            "$WORK/$name" >"$WORK/$name.log" 2>&1; then
        tail -40 "$WORK/$name.log"
        failed+=("$name")
    else
        grep -E '^(stat::number_of_executed_units|Done)' "$WORK/$name.log" | tail -1
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (inputs in tests/fuzz/crashes/)" >&2
    exit 1
fi
echo "fuzz: no findings"
