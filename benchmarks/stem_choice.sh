#!/usr/bin/env bash
# Does the small ResNet stem (3x3 conv, no max-pool) buy accuracy over the standard stem on the
# real Kermany data? Same data, seeds and epochs for both; prints the evaluate --compare table.
#   bash benchmarks/stem_choice.sh ../shared/data/chest_xray_224 OUT [SIZE] [EPOCHS] [SEEDS...]
set -euo pipefail
SRC=$1 OUT=$2 SIZE=${3:-32} EPOCHS=${4:-12}
shift $(( $# < 4 ? $# : 4 ))
SEEDS=${*:-0 1}
X=${XRAYGAN:-xraygan}
[ -d "$OUT/data" ] || $X prepare "$SRC" --out "$OUT/data" --size "$SIZE" --imbalance 3
for stem in no yes; do
  for seed in $SEEDS; do
    run="$OUT/runs/stem-$stem-seed$seed"
    [ -f "$run/report/metrics.json" ] && continue
    SECONDS=0
    $X train-classifier "$OUT/data/train" --val "$OUT/data/val" --out "$run" --epochs "$EPOCHS" \
        --small-stem "$stem" --select f1 --seed "$seed" --device "${DEVICE:-auto}" --force
    $X evaluate "$run/classifier.safetensors" "$OUT/data/test" --report "$run/report" --force \
        --label "small-stem-$stem"
    echo "stem-$stem-seed$seed,$SECONDS" >> "$OUT/times.csv"
  done
done
$X evaluate --compare "$OUT/runs" --out "$OUT/table" --force
