#!/usr/bin/env bash
# Wall time of the commands a study runs after each classifier (evaluate at 0.5 with a report,
# gradcam), at two commits of this repository, alternating, one thread each (as a study step on
# two cores gets). Their cost is mostly start-up: imports and loading, not the model.
#   bash benchmarks/bench_commands.sh CLF_DIR DATA/test [OLD_REV] [ROUNDS]
# e.g. bash benchmarks/bench_commands.sh study32/runs/augment-seed0 kermany32/test 05432dc 3
set -euo pipefail
CLF=$(realpath "$1") TEST=$(realpath "$2") OLD=${3:-HEAD~1} ROUNDS=${4:-3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=$(realpath -s "${PYTHON:-$REPO/.venv/bin/python}")  # -s: keep the venv's link
TMP=$(mktemp -d)
trap 'git -C "$REPO" worktree remove --force "$TMP/old" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
git -C "$REPO" worktree add -q --detach "$TMP/old" "$OLD"
# run from a folder without xraygan/ in it: `python -m` puts the working folder ahead of
# PYTHONPATH, so started from the repository both trees would run the checkout's code
cd "$TMP"
for _ in $(seq "$ROUNDS"); do
    for tree in "$TMP/old" "$REPO"; do
        for cmd in evaluate gradcam; do
            if [ $cmd = evaluate ]; then args=(--report "$TMP/report" --force); else args=(--out "$TMP/cams" --force); fi
            start=$(date +%s.%N)
            OMP_NUM_THREADS=1 PYTHONPATH=$tree "$PY" -m xraygan $cmd "$CLF/classifier.safetensors" "$TEST" \
                "${args[@]}" --device cpu > /dev/null 2>&1
            echo "$([ "$tree" = "$REPO" ] && echo new || echo "$OLD") $cmd $(echo "$(date +%s.%N) - $start" | bc)"
        done
    done
done | awk '{k = $1 " " $2; s[k] += $3; n[k]++} END {for (k in s) printf "%-10s %-9s %.2f s (mean of %d)\n", \
    substr(k, 1, index(k, " ") - 1), substr(k, index(k, " ") + 1), s[k] / n[k], n[k]}' | sort -k2,2 -k1,1
