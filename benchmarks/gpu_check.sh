#!/usr/bin/env bash
# The GPU targets still open, in one prepared run for a session lent a GPU machine (about
# 15 minutes of device time in all, start-up included): issue 12's end-to-end train-gan ratio
# and issue 11's 64 px study grid, with the GPU's utilisation sampled beside it.
#
# On the CPU machine, once (the data and wheels travel in an ignored folder; ../shared/GPU.md):
#   echo /.gpu/ >> .git/info/exclude
#   xraygan prepare ../shared/data/chest_xray_224 --out .gpu/kermany64 --size 64 --imbalance 3 --seed 0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
#       imbalanced-learn sklearn-compat
#   PYTHON=.venv/bin/python DEVICE=cpu BENCH_STEPS=2 E2E_STEPS=4 GAN_STEPS=2 CLF_EPOCHS=1 SEEDS=0 STUDY_ARGS="--rows baseline dcgan" \
#       bash benchmarks/gpu_check.sh .gpu/kermany64 /tmp/try
# (the last line tries the script on the CPU with tiny settings first). Then, with the device
# tool, carry [".gpu"] and run:
#   SITE=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --target "$SITE" .gpu/whl/*.whl \
#     && export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 && bash benchmarks/gpu_check.sh .gpu/kermany64 "$OUT"
# What comes back: $OUT/log.txt (everything printed), bench_gan.txt, table.md, study.err,
# gpu_util.csv and results.tgz (times.csv, the tables, every run's metrics).
set -u
DATA=$1 DEST=$2
DEVICE=${DEVICE:-cuda} JOBS=${JOBS:-8} PY=${PYTHON:-python3}
GAN_STEPS=${GAN_STEPS:-3000} CLF_EPOCHS=${CLF_EPOCHS:-20} SEEDS=${SEEDS:-0 1 2}
BENCH_STEPS=${BENCH_STEPS:-100} E2E_STEPS=${E2E_STEPS:-600 3000}  # 600: as in session 3; 3,000: the issue's run
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
    echo "== issue 12: bare step vs train-gan end to end over $E2E steps, 32 and 64 px, batch 64"
    timeout -s INT "${BENCH_LIMIT:-150}" "$PY" benchmarks/bench_gan.py --device "$DEVICE" --sizes 32 64 \
        --steps "$BENCH_STEPS" --rounds 1 --e2e-steps "$E2E" | tee -a "$DEST/bench_gan.txt"
    echo "bench_gan exit ${PIPESTATUS[0]}"
done

echo "== issue 11: the 64 px grid, seeds $SEEDS, $GAN_STEPS GAN steps, $CLF_EPOCHS epochs, --jobs $JOBS"
/usr/bin/time -f "study wall %e s" timeout -s INT "${STUDY_LIMIT:-380}" "$PY" -m xraygan study "$DATA" \
    --out "$WORK/study64" --seeds $SEEDS --gan-steps "$GAN_STEPS" --clf-epochs "$CLF_EPOCHS" --jobs "$JOBS" \
    --device "$DEVICE" ${STUDY_ARGS:-} > "$DEST/table.md" 2> "$DEST/study.err"
echo "study exit $?"
tail -3 "$DEST/study.err"
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
rm -rf "$WORK"
ls -la "$DEST"
