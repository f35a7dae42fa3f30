"""Do xraygan's own ROC-AUC / average precision (xraygan/metrics.py) and ResNet-18
(xraygan/resnet.py) still earn their place over scikit-learn's and torchvision's?

- the bootstrap's AUCs: every resample at once (`resample_aucs`) against scikit-learn called on
  each resample with its counts as sample weights (the same numbers), and scikit-learn's import;
- the import a command pays: `import torch` against `import torch, torchvision`, each in a new
  Python, ROUNDS times.

    python benchmarks/bench_auc.py [--images 624] [--resamples 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np


def imports(code: str, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=624)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from xraygan.metrics import resample_aucs

    rng = np.random.default_rng(0)
    y = rng.random(a.images) < 0.6
    score = np.clip(y * 0.3 + rng.random(a.images) * 0.7, 0, 1).round(3)  # with ties, as real scores have
    counts = rng.multinomial(a.images, np.ones(a.images) / a.images, size=a.resamples)
    t = time.perf_counter()
    roc, ap_ = resample_aucs(y, score, counts)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    from sklearn.metrics import average_precision_score, roc_auc_score
    imp = time.perf_counter() - t
    t = time.perf_counter()
    roc2 = np.array([roc_auc_score(y, score, sample_weight=c) for c in counts])
    ap2 = np.array([average_precision_score(y, score, sample_weight=c) for c in counts])
    theirs = time.perf_counter() - t
    diff = max(np.abs(roc - roc2).max(), np.abs(ap_ - ap2).max())
    print(f"{a.resamples} resamples of {a.images} images: resample_aucs {ours:.3f} s, scikit-learn {theirs:.2f} s "
          f"({theirs / ours:.0f}x; import {imp:.2f} s); largest difference {diff:.1e}")
    torch_only = imports("import torch", a.rounds)
    with_tv = imports("import torch, torchvision", a.rounds)
    print("import torch: " + ", ".join(f"{x:.2f}" for x in torch_only) + " s; torch + torchvision: "
          + ", ".join(f"{x:.2f}" for x in with_tv) + f" s (+{np.median(with_tv) - np.median(torch_only):.2f} s)")


if __name__ == "__main__":
    main()
