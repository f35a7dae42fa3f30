#!/usr/bin/env bash
# The same study grid at two commits of this repository, alternating, each from scratch: what a
# change to the steps (not to the arithmetic) does to a whole grid's wall time. Also checks
# that both commits made the same tables.
#   bash benchmarks/bench_study_revs.sh OLD_REV NEW_REV DATA [ROUNDS] [study options...]
# e.g. (the evaluation of each run in one process, 4 rows x 3 seeds, 2 epochs):
#   bash benchmarks/bench_study_revs.sh e006c94 e409e22 kermany32 2 \
#       --rows baseline class_weights undersample oversample --clf-epochs 2 --patience 0 --small-stem no
set -euo pipefail
OLD=$1 NEW=$2 DATA=$(realpath "$3") ROUNDS=${4:-2}
shift $(( $# < 4 ? $# : 4 ))
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=$(realpath -s "${PYTHON:-$REPO/.venv/bin/python}")  # -s: keep the venv's link
TMP=$(mktemp -d)
trap 'for t in old new; do git -C "$REPO" worktree remove --force "$TMP/$t" > /dev/null 2>&1 || true; done
      rm -rf "$TMP"' EXIT
git -C "$REPO" worktree add -q --detach "$TMP/old" "$OLD"
git -C "$REPO" worktree add -q --detach "$TMP/new" "$NEW"
# from a folder without xraygan/ in it: `python -m` puts the working folder ahead of PYTHONPATH
cd "$TMP"
for round in $(seq "$ROUNDS"); do
    for tree in old new; do
        rm -rf "$TMP/study-$tree"
        SECONDS=0
        PYTHONPATH="$TMP/$tree" "$PY" -m xraygan study "$DATA" --out "$TMP/study-$tree" --device cpu "$@" \
            > /dev/null 2> "$TMP/$tree.err" || { tail -3 "$TMP/$tree.err"; exit 1; }
        echo "round $round $tree ($([ $tree = old ] && echo "$OLD" || echo "$NEW")): $SECONDS s wall, \
$(awk -F, 'NR > 1 {n++; s += $3} END {printf "%d steps adding up to %.0f s", n, s}' "$TMP/study-$tree/times.csv")"
    done
done
for t in table table-tuned; do
    cmp -s "$TMP/study-old/$t/table.md" "$TMP/study-new/$t/table.md" || { echo "$t/table.md differs"; exit 1; }
done
echo "both commits made the same tables"
