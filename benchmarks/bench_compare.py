"""The compare step on a 12-row × 5-seed study: the table plus the paired tests, 1,000 resamples.

Writes 60 report folders (metrics.json + predictions.csv, 624 test images as the Kermany test
split: 390 pneumonia, 234 normal; scores from a noisy model, each row a little better or worse)
into a temporary folder, then times `compare()` in-process and the whole `xraygan compare`
command (process start included), each the best of --rounds.

    python benchmarks/bench_compare.py --rows 12 --seeds 5 --resamples 1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xraygan.evaluate import compare, write_predictions
from xraygan.metrics import binary_metrics


def write_study(root: Path, rows: int, seeds: int, rng: np.random.Generator) -> None:
    y = np.r_[np.ones(390, bool), np.zeros(234, bool)]
    for r in range(rows):
        label = "baseline" if r == 0 else ("oversample" if r == 1 else f"row{r}")
        for s in range(seeds):
            score = np.clip(0.55 + (y - 0.5) * (0.3 + 0.01 * r) + rng.normal(0, 0.25, len(y)), 0, 1)
            d = root / f"{label}-seed{s}" / "report"
            d.mkdir(parents=True)
            classes = ["pneumonia" if t else "normal" for t in y]
            write_predictions(d / "predictions.csv", [f"{c}/{i:04d}.png" for i, c in enumerate(classes)], classes,
                              y, score, 0.5)
            (d / "metrics.json").write_text(json.dumps({
                "kind": "xraygan-metrics", "label": label, "seed": s, "positive": "pneumonia", "threshold": 0.5,
                "test_fingerprint": "bench", "metrics": binary_metrics(y, np.round(score, 5), 0.5)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "runs"
        write_study(root, args.rows, args.seeds, np.random.default_rng(0))
        lib, cmd = [], []
        for r in range(args.rounds):
            t = time.perf_counter()
            res = compare([root], resamples=args.resamples)
            lib.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "xraygan", "compare", str(root), "--out", str(Path(d) / f"t{r}"),
                            "--resamples", str(args.resamples)], check=True, capture_output=True)
            cmd.append(time.perf_counter() - t)
        n = len(res["paired"]["comparisons"])
        print(f"{args.rows} rows x {args.seeds} seeds, {args.resamples} resamples, {n} row-reference pairs "
              f"x 5 metrics: compare() {min(lib):.2f} s, the whole command {min(cmd):.2f} s (best of {args.rounds})")


if __name__ == "__main__":
    main()
