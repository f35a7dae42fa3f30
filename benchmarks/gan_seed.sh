#!/usr/bin/env bash
# How much of a generator row's result belongs to its one generator? A study trains each GAN once
# (seed 0). This trains the GAN rows of a finished study again from another seed, with the study's
# own commands (its logs' first lines, paths moved to OUT), gives the new images to classifiers
# exactly as the study gave its own (the same seeds, epochs, steps), and tests the new rows,
# labelled `<row>_g<SEED>`, beside the study's.
#   cd DIR_THE_STUDY_RAN_IN && bash benchmarks/gan_seed.sh STUDY [GAN_SEED]
# ROWS (default: dcgan and the three cDCGANs), SEEDS (0 1 2 3 4), JOBS (2 at a time, one thread
# each, as the study runs on two cores) and OUT (STUDY-gan<SEED>) override.
set -euo pipefail
STUDY=${1%/} K=${2:-1}
export X=${XRAYGAN:-xraygan} STUDY K OUT=${OUT:-$STUDY-gan$K}
ROWS=${ROWS:-dcgan cdcgan_a0.25 cdcgan_a0.5 cdcgan_a0.75} SEEDS=${SEEDS:-0 1 2 3 4}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT/logs"

# the study's command for one of its steps, without the leading "$ xraygan"
logged() { head -1 "$STUDY/logs/$1.log" | sed 's/^\$ xraygan //'; }
gan() {
  local row=$1 log=$OUT/logs/gan-$1.log
  [ -f "$OUT/synth/$row/generation.json" ] && return
  $X $(logged "train-gan-$row" | sed "s#$STUDY/gan/$row#$OUT/gan/$row#") --seed "$K" > "$log" 2>&1
  $X $(logged "generate-$row" | sed "s#$STUDY/gan/$row#$OUT/gan/$row#; s#$STUDY/synth/$row#$OUT/synth/$row#") \
      --seed "$K" >> "$log" 2>&1
}
classifier() {
  local row=$1 s=$2 name=${1}_g$K-seed$2 log=$OUT/logs/classifier-${1}_g$K-seed$2.log
  [ -f "$OUT/runs/$name/report/metrics.json" ] && return
  local moved="s#$STUDY/synth/$row#$OUT/synth/$row#g; s#$STUDY/balanced/$row-seed$s#$OUT/balanced/$row-seed$s#g"
  moved="$moved; s#$STUDY/runs/$row-seed$s#$OUT/runs/$name#g; s#--label $row\$#--label ${row}_g$K#"
  moved="$moved; s#--label $row #--label ${row}_g$K #"
  $X $(logged "rebalance-$row-seed-$s" | sed "$moved") > "$log" 2>&1
  $X $(logged "train-classifier-$row-seed-$s" | sed "$moved") >> "$log" 2>&1
  $X $(logged "evaluate-$row-seed-$s" | sed "$moved") >> "$log" 2>&1
}
export -f logged gan classifier
printf '%s\n' $ROWS | xargs -P "${JOBS:-2}" -I{} bash -c 'gan {}'
for row in $ROWS; do for s in $SEEDS; do echo "$row $s"; done; done \
  | xargs -P "${JOBS:-2}" -L 1 bash -c 'classifier "$@"' _
for t in report report-tuned; do
  ls "$OUT"/runs/*/"$t"/metrics.json > /dev/null 2>&1 || continue
  $X compare "$STUDY"/runs/*/"$t" "$OUT"/runs/*/"$t" --reference baseline,oversample \
      --out "$OUT/table${t#report}" --force > "$OUT/logs/compare-$t.log" 2>&1
  echo "$OUT/table${t#report}/table.md:"
  grep '^Against' "$OUT/table${t#report}/table.md"
done
