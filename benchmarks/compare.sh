#!/bin/bash
# benchmarks/compare.sh - before/after figures in one run.
#
#   benchmarks/compare.sh REV [BENCHMARK.py ...]
#
# Checks REV out into a throwaway git worktree under /tmp, then runs each
# benchmark with --quick for REV and for this working tree (uncommitted
# changes included) back to back, before then after, one benchmark at a time
# (so a change in the machine's load hits both sides of a pair alike), each
# with PYTHONPATH pointing at its own tree so each run imports its own
# appliance.  Default benchmarks: nvme.py net.py migration.py hostile.py; one
# missing from REV is run for this tree only, with a note.
#
# Prints everything (figures are never asserted).  Deletes nothing but its
# own /tmp worktree (git worktree remove).  Exit status: 2 for a bad REV,
# 1 if any benchmark run failed, else 0.
set -uo pipefail

case ${1:-} in
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") echo "usage: benchmarks/compare.sh REV [BENCHMARK.py ...]" >&2; exit 2 ;;
esac
REV=$1; shift
ROOT=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
PY=${PYTHON:-python3}
BENCHES=("$@")
[ ${#BENCHES[@]} -gt 0 ] || BENCHES=(nvme.py net.py migration.py hostile.py)

commit=$(git -C "$ROOT" rev-parse --verify --quiet "$REV^{commit}") || {
    echo "compare.sh: $REV: not a revision of $ROOT" >&2; exit 2; }
BEFORE=$(mktemp -d /tmp/appliance-compare-XXXXXX)
cleanup() {
    git -C "$ROOT" worktree remove --force "$BEFORE" 2>/dev/null || rmdir "$BEFORE" 2>/dev/null
}
trap cleanup EXIT
git -C "$ROOT" worktree add --quiet --detach "$BEFORE" "$commit" || {
    echo "compare.sh: git worktree add $BEFORE $commit failed" >&2; exit 2; }

head=$(git -C "$ROOT" rev-parse --short HEAD)
dirty=$([ -n "$(git -C "$ROOT" status --porcelain)" ] && echo " + uncommitted changes")
echo "compare.sh: before = $REV ($(git -C "$ROOT" log -1 --format='%h %s' "$commit" | cut -c1-80))"
echo "compare.sh: after  = working tree $ROOT (HEAD $head$dirty)"
echo "compare.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"

failed=()
run() {  # run LABEL TREE BENCH
    local label=$1 tree=$2 bench=$3 t0 rc
    echo
    echo "==================== $label: benchmarks/$bench --quick ($tree)"
    if [ ! -f "$tree/benchmarks/$bench" ]; then
        echo "(benchmarks/$bench does not exist in this tree)"
        return
    fi
    t0=$SECONDS
    (cd "$tree" && PYTHONPATH="$tree" "$PY" "benchmarks/$bench" --quick) 2>&1
    rc=$?
    echo "---- $label: benchmarks/$bench exit $rc, $(( SECONDS - t0 )) s"
    [ "$rc" -eq 0 ] || failed+=("$label $bench (exit $rc)")
}
for bench in "${BENCHES[@]}"; do
    run "BEFORE $REV" "$BEFORE" "$bench"
    run "AFTER $head$dirty" "$ROOT" "$bench"
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "compare.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
