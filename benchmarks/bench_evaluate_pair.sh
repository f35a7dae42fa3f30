#!/usr/bin/env bash
# A study's evaluation of one classifier at both operating points (threshold 0.5, and tuned on
# the validation split): two evaluate processes, as `xraygan study` ran them before, against one
# with --untuned-report, alternating in the same run, one thread each (as a study step on two
# cores gets). Both write the same two reports (checked at the end).
#   bash benchmarks/bench_evaluate_pair.sh CLF_DIR DATA [ROUNDS]
# e.g. bash benchmarks/bench_evaluate_pair.sh study32/runs/augment-seed0 kermany32 5
set -euo pipefail
CLF=$(realpath "$1") DATA=$(realpath "$2") ROUNDS=${3:-3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
ev() { OMP_NUM_THREADS=1 "$PY" -m xraygan evaluate "$CLF/classifier.safetensors" "$DATA/test" --device cpu \
    --force "$@" > /dev/null 2>&1; }
now() { date +%s.%N; }
for _ in $(seq "$ROUNDS"); do
    start=$(now)
    ev --report "$TMP/two/report"
    ev --report "$TMP/two/report-tuned" --tune-on "$DATA/val"
    echo "two $(echo "$(now) - $start" | bc)"
    start=$(now)
    ev --report "$TMP/one/report-tuned" --tune-on "$DATA/val" --untuned-report "$TMP/one/report"
    echo "one $(echo "$(now) - $start" | bc)"
done | awk '{s[$1] += $2; n[$1]++} END {printf "two processes %.2f s, one process %.2f s (mean of %d): %.2fx\n", \
    s["two"] / n["two"], s["one"] / n["one"], n["one"], s["two"] / s["one"]}'
for r in report report-tuned; do
    cmp -s "$TMP/two/$r/metrics.json" "$TMP/one/$r/metrics.json" && cmp -s "$TMP/two/$r/predictions.csv" \
        "$TMP/one/$r/predictions.csv" || { echo "$r differs"; exit 1; }
done
echo "the same metrics.json and predictions.csv both ways"
