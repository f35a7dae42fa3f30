#!/usr/bin/env bash
# Does rebalancing still look the same when every row's classifier trains the baseline's number of
# optimizer steps? One study with an epoch of one pass over each row's own set (--no-clf-equal-steps),
# then the same study's generators given to classifiers with the baseline's steps (the default), then
# each rebalanced row of the second tested against the same row of the first (its reports
# relabelled `<row>_eq`).
#   bash benchmarks/equal_steps.sh ../shared/data/chest_xray_224 OUT [SIZE]
# Rows, seeds and budgets as in docs/RESULTS.md; ROWS / SEEDS / GAN_STEPS / EPOCHS override them.
set -euo pipefail
SRC=$1 OUT=$2 SIZE=${3:-32}
X=${XRAYGAN:-xraygan}
ROWS=${ROWS:-baseline undersample oversample dcgan cdcgan_a0.5 cdcgan_a0.25 cdcgan_a0.75} SEEDS=${SEEDS:-0 1 2}
SET=(--rows $ROWS --seeds $SEEDS --gan-steps "${GAN_STEPS:-1500}" --clf-epochs "${EPOCHS:-12}" --gan-seeds 0
     --device "${DEVICE:-auto}")
[ -d "$OUT/data" ] || $X prepare "$SRC" --out "$OUT/data" --size "$SIZE" --imbalance 3 --seed 0
$X study "$OUT/data" --out "$OUT/pass" "${SET[@]}" --no-clf-equal-steps
# the generators, their images and audits are done already (-n: rows added later join too)
mkdir -p "$OUT/eq"
[ -f "$OUT/eq/study.json" ] || cp "$OUT/pass/study.json" "$OUT/eq/"
for d in gan synth audit cache; do
  if [ -d "$OUT/pass/$d" ]; then mkdir -p "$OUT/eq/$d" && cp -rn "$OUT/pass/$d/." "$OUT/eq/$d/"; fi
done
$X study "$OUT/data" --out "$OUT/eq" "${SET[@]}" --clf-equal-steps
for run in "$OUT"/eq/runs/*; do
  row=$(basename "$run"); row=${row%-seed*}
  [ "$row" = baseline ] && continue
  rep="$OUT/paired/$(basename "$run")"
  [ -f "$rep/metrics.json" ] || $X evaluate "$run/classifier.safetensors" "$OUT/data/test" --report "$rep" \
      --label "${row}_eq" --device "${DEVICE:-auto}"
done
# each run's epochs and the optimizer steps before its kept checkpoint; and the baseline's
# classifiers, whose set and steps are the same in both studies, compared weight for weight
"${PYTHON:-python}" - "$OUT" <<'PY'
import csv, json, math, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from xraygan.checkpoint import metadata_or_none

out = Path(sys.argv[1])
for study in ("pass", "eq"):
    for run in sorted((out / study / "runs").iterdir()):
        per_epoch = json.loads((run / "config.json").read_text())["images_per_epoch"]
        kept = metadata_or_none(run / "classifier.safetensors")["epoch"]
        epochs = len(list(csv.DictReader(open(run / "log.csv"))))
        print(f"{study:4} {run.name:20} {per_epoch:5} images an epoch, {epochs:2} epochs, kept epoch {kept:2} "
              f"after {kept * math.ceil(per_epoch / 64):4} steps")
for run in sorted((out / "pass" / "runs").glob("baseline-seed*")):
    a, b = (load_file(r / "classifier.safetensors") for r in (run, out / "eq" / "runs" / run.name))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{run.name}: {'the same weights' if same else 'different weights'} in both studies")
PY
refs=$(for r in $ROWS; do [ "$r" = baseline ] || printf '%s,' "$r"; done)
$X compare "$OUT"/pass/runs/*/report "$OUT/paired" --reference "${refs%,}" --out "$OUT/table-paired" --force
