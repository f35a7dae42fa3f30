#!/usr/bin/env bash
# The GPU figures still open, in one prepared run for a GPU machine lent for a short time (about
# 15 minutes of device time in all, start-up included): train-gan end to end against its bare
# step, the 64 px study grid with the GPU's utilisation sampled beside it, and (given a third
# argument, a 128 px prepared set) the 128 px generator comparison: the DCGAN default against
# the R1 penalty and against spectral norm + hinge, on the same steps, audited with the same
# feature classifier.
#
# On the CPU machine, once (the data and wheels travel in an ignored folder; ../shared/GPU.md):
#   echo /.gpu/ >> .git/info/exclude
#   xraygan prepare ../shared/data/chest_xray_224 --out .gpu/kermany64 --size 64 --imbalance 3 --seed 0
#   xraygan prepare ../shared/data/chest_xray_224 --out .gpu/kermany128 --size 128 --imbalance 3 --seed 0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
#       imbalanced-learn sklearn-compat
#   PYTHON=.venv/bin/python DEVICE=cpu BENCH_STEPS=2 E2E_STEPS=4 GAN_STEPS=2 CLF_EPOCHS=1 SEEDS=0 STUDY_ARGS="--rows baseline dcgan" \
#       STEPS128=2 AUDIT_CLASSIFIER=none bash benchmarks/gpu_check.sh .gpu/kermany64 /tmp/try .gpu/kermany128
# (the last line tries the script on the CPU with tiny settings first). Then, with the device
# tool, carry [".gpu"] and run:
#   SITE=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --target "$SITE" .gpu/whl/*.whl \
#     && export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 \
#     && bash benchmarks/gpu_check.sh .gpu/kermany64 "$OUT" .gpu/kermany128
# What comes back: $OUT/log.txt (everything printed), bench_gan.txt, table.md, study.err,
# gpu_util.csv, results.tgz (times.csv, the tables, every run's metrics), estimate.txt (study
# --estimate beside the grid's times.csv) and gan128.txt (the generator comparison's audits).
set -u
DATA=$1 DEST=$2 DATA128=${3:-}
DEVICE=${DEVICE:-cuda} JOBS=${JOBS:-8} PY=${PYTHON:-python3}
GAN_STEPS=${GAN_STEPS:-3000} CLF_EPOCHS=${CLF_EPOCHS:-20} SEEDS=${SEEDS:-0 1 2}
BENCH_STEPS=${BENCH_STEPS:-100} E2E_STEPS=${E2E_STEPS:-600 3000}  # 600: as docs/performance.md; 3,000: the study's
STEPS128=${STEPS128:-600 3000} AUDIT_CLASSIFIER=${AUDIT_CLASSIFIER:-auto}
mkdir -p "$DEST"
exec > >(tee "$DEST/log.txt") 2>&1
WORK=$(mktemp -d)
"$PY" -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cores', os.cpu_count())"
MON=
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    (nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 2 > "$DEST/gpu_util.csv" 2>&1) &
    MON=$!
fi

for E2E in $E2E_STEPS; do
    echo "== bare step vs train-gan end to end over $E2E steps, 32 and 64 px, batch 64"
    timeout -s INT "${BENCH_LIMIT:-150}" "$PY" benchmarks/bench_gan.py --device "$DEVICE" --sizes 32 64 \
        --steps "$BENCH_STEPS" --rounds 1 --e2e-steps "$E2E" | tee -a "$DEST/bench_gan.txt"
    echo "bench_gan exit ${PIPESTATUS[0]}"
done

# one generator a row (--gan-seeds 0): the grid of the 5-minute target and of the 325 s in docs/performance.md
echo "== the 64 px grid, seeds $SEEDS, one generator a row, $GAN_STEPS GAN steps, $CLF_EPOCHS epochs, --jobs $JOBS"
/usr/bin/time -f "study wall %e s" timeout -s INT "${STUDY_LIMIT:-380}" "$PY" -m xraygan study "$DATA" \
    --out "$WORK/study64" --seeds $SEEDS --gan-steps "$GAN_STEPS" --clf-epochs "$CLF_EPOCHS" --jobs "$JOBS" \
    --device "$DEVICE" --gan-seeds 0 ${STUDY_ARGS:-} > "$DEST/table.md" 2> "$DEST/study.err"
echo "study exit $?"
tail -3 "$DEST/study.err"
echo "steps that waited for GPU memory: $(grep -c '^wait ' "$DEST/study.err")"  # (the study's peaks, stepmemory.py)
[ -n "$MON" ] && kill "$MON" 2> /dev/null
( cd "$WORK" && tar czf "$DEST/results.tgz" --ignore-failed-read study64/table study64/table-tuned \
    study64/times.csv study64/study.json study64/audit/*/audit.json study64/runs/*/report*/metrics.json \
    study64/runs/*/cams/gradcam.json study64/runs/*/log.csv study64/gan/*/log.csv 2> /dev/null )
"$PY" - "$WORK/study64/times.csv" <<'PY'
import csv, collections, sys
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
except OSError:
    sys.exit("no times.csv: the study did not start")
agg = collections.defaultdict(list)
for r in rows:
    agg[r["step"].split()[0] + (" tuned" if r["step"].endswith("tuned") else "")].append(float(r["seconds"]))
print("step kind, count, mean s, sum s")
for k, v in sorted(agg.items(), key=lambda kv: -sum(kv[1])):
    print(f"{k}, {len(v)}, {sum(v) / len(v):.1f}, {sum(v):.0f}")
PY

echo "== study --estimate for the same grid beside what it took (steps share the GPU: each step's time is inflated)"
timeout -s INT "${ESTIMATE_LIMIT:-60}" "$PY" benchmarks/bench_estimate.py --device "$DEVICE" "$WORK/study64" \
    | grep -v '^measuring' | tee "$DEST/estimate.txt"

if [ -n "$DATA128" ]; then
    # the same steps, seed and audit features for each generator; R1 gamma 10 as in Mescheder et al.
    for STEPS in $STEPS128; do
        echo "== 128 px generators, $STEPS steps: DCGAN default, --r1 10, --spectral-norm --loss hinge"
        G="$WORK/gan128-$STEPS"
        FEAT=$AUDIT_CLASSIFIER  # auto: the first audit trains the feature classifier the others reuse
        for V in dcgan r1 sn; do
            case $V in r1) EXTRA="--r1 10";; sn) EXTRA="--spectral-norm --loss hinge";; *) EXTRA=;; esac
            timeout -s INT "${GAN128_LIMIT:-120}" "$PY" -m xraygan train-gan "$DATA128/train" --out "$G/$V" \
                --class pneumonia --steps "$STEPS" --seed 0 --device "$DEVICE" $EXTRA > /dev/null 2> "$G.$V.err" \
                && "$PY" -m xraygan generate "$G/$V/generator.safetensors" -n 402 --out "$G/synth_$V" --seed 0 \
                    --device "$DEVICE" > /dev/null 2>> "$G.$V.err" \
                && "$PY" -m xraygan audit --real "$DATA128/train" --synthetic "$G/synth_$V" --out "$G/audit_$V" \
                    --device "$DEVICE" --classifier "$FEAT" --json \
                    > "$G/audit_$V.json" 2>> "$G.$V.err"
            echo "$V exit $? ($(tail -c 300 "$G/$V/log.csv" 2> /dev/null | tail -1))"
            tail -2 "$G.$V.err"
            [ -f "$G/audit_$V/feature-classifier.safetensors" ] && FEAT="$G/audit_$V/feature-classifier.safetensors"
        done
        "$PY" - "$G" <<'PY' | tee -a "$DEST/gan128.txt"
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print(f"{root.name}: variant, then every number its audit reports")
for v in ("dcgan", "r1", "sn"):
    f = root / f"audit_{v}.json"
    try:
        print(v, json.dumps(json.loads(f.read_text())))
    except (OSError, ValueError) as e:
        print(v, "no audit:", e)
PY
    done
fi
rm -rf "$WORK"
ls -la "$DEST"
