"""Classifier training speed: a plain ResNet-18 step against `train-classifier`'s whole epoch loop.

plain    : torchvision ResNet-18 (one input channel, standard 7x7/2 stem + max-pool), fp32,
           default (NCHW) memory layout, a batch of ready-made float tensors, Adam, no augmentation.
xraygan  : `train_classifier` itself on a folder of PNGs for one epoch: the images are decoded
           once into uint8 memory; the epoch loop indexes, normalises and augments them as tensors
           (one batched affine warp), channels-last, --precision auto. Its images/s counts the
           training loop only (validation is timed apart by train-classifier and not included).

Both stems are timed, because the small stem (3x3/1, no max-pool; the default for images of
32 px or less) runs layer1 at full resolution: 16x the work of the standard stem.

    python benchmarks/bench_classifier.py --sizes 32 64 --images 512
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xraygan.classifier import ClassifierNetConfig, TrainClassifierConfig, build_resnet18, train_classifier
from xraygan.images import save_png
from xraygan.runtime import cpu_has_fast_bf16


def plain_rate(size: int, small_stem: bool, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_resnet18(ClassifierNetConfig(image_size=size, small_stem=small_stem))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, size, size)
    y = torch.randint(0, 2, (batch,))
    model.train()

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def make_folder(root: Path, size: int, n: int, rng: np.random.Generator) -> Path:
    for i in range(n):
        cls = "normal" if i % 4 else "pneumonia"
        save_png(root / cls / f"{i:05d}.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
    return root


def xraygan_rate(tmp: Path, size: int, small_stem: bool, batch: int, run: int) -> float:
    res = train_classifier(TrainClassifierConfig(
        data=tmp / f"train{size}", val=tmp / f"val{size}", out=tmp / f"run{size}-{small_stem}-{run}",
        epochs=1, batch_size=batch, small_stem="yes" if small_stem else "no", device="cpu"))
    return res["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=512, help="training images for the xraygan epoch")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two loops; best of N")
    args = ap.parse_args()
    steps = max(1, args.images // args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"native CPU bf16: {cpu_has_fast_bf16()}, batch {args.batch}, {args.images} images/epoch")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for size in args.sizes:
            make_folder(tmp / f"train{size}", size, args.images, rng)
            make_folder(tmp / f"val{size}", size, 32, rng)
            for small in (False, True):
                pl, xg = [], []
                for r in range(args.rounds):  # interleaved, so drift in machine load hits both
                    pl.append(plain_rate(size, small, args.batch, steps))
                    xg.append(xraygan_rate(tmp, size, small, args.batch, r))
                stem = "small stem   " if small else "standard stem"
                print(f"{size:4d} px  {stem}  plain step {max(pl):7.1f} img/s   "
                      f"train-classifier epoch {max(xg):7.1f} img/s   ratio {max(xg) / max(pl):.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
