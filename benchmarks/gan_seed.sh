#!/usr/bin/env bash
# How much of a generator row's result belongs to its one generator? A study trains each GAN once
# (seed 0). This trains the GAN rows of a finished study again from another seed, with the study's
# own commands (its logs' first lines, paths moved to OUT), gives the new images to classifiers
# exactly as the study gave its own (the same seeds, epochs, steps), and tests the new rows,
# labelled `<row>_g<SEED>`, beside the study's.
#   cd DIR_THE_STUDY_RAN_IN && bash benchmarks/gan_seed.sh STUDY [GAN_SEED]
# ROWS (default: dcgan and the three cDCGANs), SEEDS (0 1 2 3 4), JOBS (2 at a time, one thread
# each, as the study runs on two cores), REFERENCE (the rows compared against: baseline,oversample)
# and OUT (STUDY-gan<SEED>) override. Paths may hold any character.
set -euo pipefail
STUDY=${1%/} K=${2:-1}
export X=${XRAYGAN:-xraygan} STUDY K OUT=${OUT:-$STUDY-gan$K}
ROWS=${ROWS:-dcgan cdcgan_a0.25 cdcgan_a0.5 cdcgan_a0.75} SEEDS=${SEEDS:-0 1 2 3 4}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT/logs"

# The study's command for one of its steps (its log's first line, as shlex wrote it), without the
# leading program, with --label's value replaced by LABEL (unless empty) and each path argument
# under OLD moved to NEW (OLD NEW pairs, a whole path component at a time); NUL-separated, so a
# path with spaces or any other character stays one argument.
logged() {
  python3 - "$@" <<'PY'
import shlex, sys
log, label, *pairs = sys.argv[1:]
with open(log) as f:
    argv = shlex.split(f.readline().removeprefix("$ "))[1:]
moves = list(zip(pairs[::2], pairs[1::2]))
out = []
for i, a in enumerate(argv):
    for old, new in moves:
        if a == old or a.startswith(old + "/"):
            a = new + a[len(old):]
    out.append(label if label and i and argv[i - 1] == "--label" else a)
sys.stdout.write("\0".join(out) + "\0")
PY
}
# rerun STEP LABEL OLD NEW ... [-- MORE]: the study's command of STEP, changed as `logged` says, with MORE
rerun() {
  local step=$1 moves=() argv=()
  shift
  while [ $# -gt 0 ] && [ "$1" != -- ]; do moves+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  mapfile -d '' argv < <(logged "$STUDY/logs/$step.log" "${moves[@]}")
  $X "${argv[@]}" "$@"
}
gan() {
  local row=$1 log=$OUT/logs/gan-$1.log
  [ -f "$OUT/synth/$row/generation.json" ] && return
  rerun "train-gan-$row" "" "$STUDY/gan/$row" "$OUT/gan/$row" -- --seed "$K" > "$log" 2>&1
  rerun "generate-$row" "" "$STUDY/gan/$row" "$OUT/gan/$row" "$STUDY/synth/$row" "$OUT/synth/$row" \
      -- --seed "$K" >> "$log" 2>&1
}
classifier() {
  local row=$1 s=$2 name=${1}_g$K-seed$2 log=$OUT/logs/classifier-${1}_g$K-seed$2.log
  [ -f "$OUT/runs/$name/report/metrics.json" ] && return
  local moved=("${row}_g$K" "$STUDY/synth/$row" "$OUT/synth/$row" "$STUDY/balanced/$row-seed$s"
               "$OUT/balanced/$row-seed$s" "$STUDY/runs/$row-seed$s" "$OUT/runs/$name")
  rerun "rebalance-$row-seed-$s" "${moved[@]}" > "$log" 2>&1
  rerun "train-classifier-$row-seed-$s" "${moved[@]}" >> "$log" 2>&1
  rerun "evaluate-$row-seed-$s" "${moved[@]}" >> "$log" 2>&1
}
export -f logged rerun gan classifier
printf '%s\n' $ROWS | xargs -P "${JOBS:-2}" -I{} bash -c 'gan {}'
for row in $ROWS; do for s in $SEEDS; do echo "$row $s"; done; done \
  | xargs -P "${JOBS:-2}" -L 1 bash -c 'classifier "$@"' _
for t in report report-tuned; do
  ls "$OUT"/runs/*/"$t"/metrics.json > /dev/null 2>&1 || continue
  if ! $X compare "$STUDY"/runs/*/"$t" "$OUT"/runs/*/"$t" --reference "${REFERENCE:-baseline,oversample}" \
      --out "$OUT/table${t#report}" --force > "$OUT/logs/compare-$t.log" 2>&1; then
    echo "$OUT/logs/compare-$t.log: $(tail -1 "$OUT/logs/compare-$t.log")" >&2
    exit 1
  fi
  echo "$OUT/table${t#report}/table.md:"
  grep '^Against' "$OUT/table${t#report}/table.md"
done
