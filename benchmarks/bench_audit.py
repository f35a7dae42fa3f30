"""Audit speed: `xraygan audit` on 10,000 synthetic images against a real folder, at 64 px.

Times the audit (decoding, PCA space, memorisation check, k-NN figures, plots, review sheet)
with the PCA space only, then with a classifier's feature space (an untrained standard-stem
ResNet-18 checkpoint stands in for the user's: the work is the same) on a cold and on a warm
feature cache. Images are random smooth blobs, so the figures are about time, not realism.

    python benchmarks/bench_audit.py --synthetic 10000 --real 5000 --size 64
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xraygan.audit import AuditConfig, audit
from xraygan.checkpoint import save_checkpoint
from xraygan.classifier import ClassifierNetConfig, build_resnet18
from xraygan.images import save_png


def blobs(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        a = 0.5 + 0.3 * np.sin(6 * x + rng.random() * 6) * np.cos(5 * y + rng.random() * 3)
        out[i] = (np.clip(a + rng.normal(0, 0.08, a.shape), 0, 1) * 255).astype(np.uint8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic", type=int, default=10000)
    ap.add_argument("--real", type=int, default=5000, help="real images, split over two classes")
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"{args.synthetic} synthetic vs {args.real} real at {args.size} px")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t = time.perf_counter()
        for i, a in enumerate(blobs(rng, args.real, args.size)):
            save_png(tmp / "real" / ("pneumonia" if i % 2 else "normal") / f"r{i:05d}.png", a)
        for i, a in enumerate(blobs(rng, args.synthetic, args.size)):
            save_png(tmp / "synth" / "pneumonia" / f"synthetic-b-{i:06d}.png", a)
        print(f"wrote the test folders in {time.perf_counter() - t:.1f} s")
        model = build_resnet18(ClassifierNetConfig(image_size=args.size, small_stem=False))
        save_checkpoint(tmp / "clf.safetensors", model.state_dict(), "classifier",
                        ClassifierNetConfig(image_size=args.size, small_stem=False).to_dict(),
                        classes=["normal", "pneumonia"], image_size=args.size, positive="pneumonia")
        runs = [("PCA space only (--classifier none)", "none"),
                ("+ classifier space, cold cache", str(tmp / "clf.safetensors")),
                ("+ classifier space, warm cache", str(tmp / "clf.safetensors"))]
        for i, (name, clf) in enumerate(runs):
            t = time.perf_counter()
            rec = audit(AuditConfig(real=tmp / "real", synthetic=tmp / "synth", out=tmp / f"a{i}",
                                    classifier=clf, cache=tmp / "cache", device="cpu"))
            print(f"{name:38s} {time.perf_counter() - t:6.1f} s   (cache hits {rec['cache']['hits']}, "
                  f"misses {rec['cache']['misses']})", flush=True)


if __name__ == "__main__":
    main()
