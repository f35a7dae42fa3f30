#!/usr/bin/env bash
# Does running study steps in parallel pay on this machine? The same small grid with --jobs 1
# and --jobs N (each step then gets cores/N threads), on the real sample shipped with xraygan.
#   bash benchmarks/bench_study_jobs.sh [N] [SIZE] [extra study options...]
# Default grid: baseline and oversample, seeds 0 1, 2 epochs, no audit (many short steps).
set -euo pipefail
N=${1:-2} SIZE=${2:-32}
shift $(( $# < 2 ? $# : 2 ))
GRID=("$@")
[ ${#GRID[@]} -gt 0 ] || GRID=(--rows baseline oversample --seeds 0 1 --clf-epochs 2 --no-audit)
X=${XRAYGAN:-xraygan}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$X prepare --sample --size "$SIZE" --out "$TMP/data" > /dev/null 2>&1
for jobs in 1 "$N"; do
    SECONDS=0
    $X study "$TMP/data" --out "$TMP/study-j$jobs" --small-stem no --device cpu --jobs "$jobs" "${GRID[@]}" \
        > /dev/null 2>&1
    echo "--jobs $jobs: $SECONDS s wall; sum of step times $(awk -F, 'NR > 1 {s += $3} END {printf "%.0f", s}' \
        "$TMP/study-j$jobs/times.csv") s"
done
