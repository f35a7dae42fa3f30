#!/usr/bin/env bash
# Run the study's rows on a prepared dataset and tabulate them (mean ± std over seeds).
#
#   examples/run_study.sh DATA OUT
#
# DATA is a folder written by `xraygan prepare` (DATA/{train,val,test}/{normal,pneumonia}/).
# Rows: baseline, class_weights, undersample, oversample, dcgan, cdcgan_a0.25, cdcgan_a0.5,
# cdcgan_a0.75, smote, augment. Each GAN is trained once (seed 0); each row's classifier is
# trained once per seed, on a rebalanced folder drawn with that seed.
#
# Knobs (environment variables):
#   SEEDS="0 1 2"       classifier seeds per row
#   ROWS="..."          a subset of the rows above (default: all)
#   CLF_EPOCHS=20       classifier epochs (early stopping on val F1 may end sooner)
#   PATIENCE=5          epochs without val improvement before stopping
#   GAN_STEPS=3000      generator steps per GAN (train-gan --steps)
#   GAN_BATCH=64        GAN batch size
#   DIFFAUG=color,translation,cutout   DiffAugment for the GANs ("none" to turn off)
#   SMALL_STEM=auto     classifier stem (auto, yes, no)
#   DEVICE=auto         auto, cpu, cuda or mps
#   AUDIT=1             audit each GAN's images against the real training set (0 = skip)
#   XRAYGAN=xraygan     the command to run (e.g. ".venv/bin/xraygan")
#
# Re-runnable: a step whose output is complete (marked by a .done file) is skipped; an
# interrupted GAN resumes from its last checkpoint; an interrupted classifier is retrained.
# Wall times per step are appended to OUT/times.csv.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 DATA OUT" >&2
    exit 2
fi
DATA=$1
OUT=$2
SEEDS=${SEEDS:-"0 1 2"}
ROWS=${ROWS:-"baseline class_weights undersample oversample dcgan cdcgan_a0.25 cdcgan_a0.5 cdcgan_a0.75 smote augment"}
CLF_EPOCHS=${CLF_EPOCHS:-20}
PATIENCE=${PATIENCE:-5}
GAN_STEPS=${GAN_STEPS:-3000}
GAN_BATCH=${GAN_BATCH:-64}
DIFFAUG=${DIFFAUG:-color,translation,cutout}
SMALL_STEM=${SMALL_STEM:-auto}
DEVICE=${DEVICE:-auto}
AUDIT=${AUDIT:-1}
XRAYGAN=${XRAYGAN:-xraygan}

for d in "$DATA/train" "$DATA/val" "$DATA/test"; do
    [ -d "$d" ] || { echo "error: $d: not found (expected a folder written by xraygan prepare)" >&2; exit 2; }
done
mkdir -p "$OUT"
[ -f "$OUT/times.csv" ] || echo "step,seconds" > "$OUT/times.csv"

count() { find "$1" -maxdepth 1 -type f -name '*.png' | wc -l; }
N_NORMAL=$(count "$DATA/train/normal")
N_PNEU=$(count "$DATA/train/pneumonia")
NEED=$((N_NORMAL - N_PNEU))          # synthetic images that balance the classes
N_ALL=$((N_NORMAL + N_PNEU))
echo "train: $N_NORMAL normal, $N_PNEU pneumonia; $NEED synthetic images balance it" >&2

# step NAME DIR CMD...: run CMD unless DIR/.done exists; time it; mark DIR done.
step() {
    local name=$1 dir=$2
    shift 2
    if [ -f "$dir/.done" ]; then
        echo "skip  $name (done)" >&2
        return
    fi
    echo "run   $name" >&2
    local t0=$SECONDS
    "$@"
    echo "$name,$((SECONDS - t0))" >> "$OUT/times.csv"
    touch "$dir/.done"
}

# train_gan NAME IMAGES ARGS...: a GAN for GAN_STEPS steps on IMAGES training images.
train_gan() {
    local name=$1 n=$2
    shift 2
    local run="$OUT/gan/$name"
    local resume=()
    [ -f "$run/state.safetensors" ] && resume=(--resume)
    mkdir -p "$run"
    step "train-gan $name" "$run" "$XRAYGAN" train-gan "$DATA/train" --out "$run" --steps "$GAN_STEPS" \
        --batch-size "$GAN_BATCH" --diffaugment "$DIFFAUG" --device "$DEVICE" --seed 0 "${resume[@]}" "$@"
    mkdir -p "$OUT/synth/$name"
    step "generate $name" "$OUT/synth/$name" "$XRAYGAN" generate "$run/generator.safetensors" -n "$NEED" \
        --out "$OUT/synth/$name" --label pneumonia --seed 0 --preview --force
    if [ "$AUDIT" = 1 ]; then
        mkdir -p "$OUT/audit/$name"
        step "audit $name" "$OUT/audit/$name" "$XRAYGAN" audit --real "$DATA/train" \
            --synthetic "$OUT/synth/$name" --out "$OUT/audit/$name" --device "$DEVICE" --force \
            --cache "$OUT/cache"  # one feature classifier for all the GAN audits, kept in OUT
    fi
}

for row in $ROWS; do
    case $row in
        dcgan) train_gan dcgan "$N_PNEU" --class pneumonia ;;
        cdcgan_a*) train_gan "$row" "$N_ALL" --conditional --alpha "${row#cdcgan_a}" ;;
    esac
done

for row in $ROWS; do
    for seed in $SEEDS; do
        run="$OUT/runs/$row-seed$seed"
        bal="$OUT/balanced/$row-seed$seed"
        extra=()
        case $row in
            baseline)       method=(--method none) ;;
            class_weights)  method=(--method none); extra=(--class-weights balanced) ;;
            undersample)    method=(--method undersample) ;;
            oversample)     method=(--method oversample) ;;
            smote)          method=(--method smote) ;;
            augment)        method=(--method augment) ;;
            dcgan|cdcgan_a*) method=(--method gan --synthetic "$OUT/synth/$row") ;;
            *) echo "error: unknown row '$row'" >&2; exit 2 ;;
        esac
        mkdir -p "$bal" "$run"
        step "rebalance $row seed $seed" "$bal" "$XRAYGAN" rebalance "$DATA/train" "${method[@]}" \
            --out "$bal" --seed "$seed" --force
        step "train-classifier $row seed $seed" "$run" "$XRAYGAN" train-classifier "$bal" --val "$DATA/val" \
            --out "$run" --epochs "$CLF_EPOCHS" --patience "$PATIENCE" --small-stem "$SMALL_STEM" \
            --seed "$seed" --device "$DEVICE" --force "${extra[@]}"
        mkdir -p "$run/report" "$run/cams"
        step "evaluate $row seed $seed" "$run/report" "$XRAYGAN" evaluate "$run/classifier.safetensors" \
            "$DATA/test" --report "$run/report" --label "$row" --device "$DEVICE" --force
        step "gradcam $row seed $seed" "$run/cams" "$XRAYGAN" gradcam "$run/classifier.safetensors" \
            "$DATA/test" --out "$run/cams" --label "$row" -n 8 --device "$DEVICE" --force
    done
done

# The table lists the rows in the order of ROWS; each run contributes metrics.json and gradcam.json.
inputs=()
for row in $ROWS; do
    for seed in $SEEDS; do
        inputs+=("$OUT/runs/$row-seed$seed")
    done
done
"$XRAYGAN" evaluate --compare "${inputs[@]}" --out "$OUT/table" --force
echo "table: $OUT/table/table.md; per-step wall times: $OUT/times.csv" >&2
