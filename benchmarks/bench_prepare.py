"""Images/s of `xraygan prepare` against a naive full-size decode loop, on the same files.

Generates full-size JPEGs (1-5 megapixels, like the Kermany release) from the demo phantom,
then times in one run:
  naive   : one process; open, convert to gray, crop, resize each file at full size;
  prepare : the whole `xraygan prepare` (DCT-scaled JPEG decode, worker processes, PNG writes).

    python benchmarks/bench_prepare.py --count 300 --size 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from xraygan.images import make_square
from xraygan.phantom import phantom
from xraygan.prepare import PrepareConfig, prepare


def make_jpegs(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        cls = "PNEUMONIA" if i % 2 else "NORMAL"
        w = int(rng.integers(1000, 2600))
        h = int(w * rng.uniform(0.8, 1.25))  # 0.8 to 8 MP, mostly 1-5
        small = phantom(rng, 256, pneumonia=bool(i % 2))
        big = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        # film grain, tuned so files average ~200 KB like the release (1.15 GB / 5,856 files)
        arr = np.asarray(big) + rng.normal(0, 1.5, (h, w))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        if i % 4 == 0:  # the release mixes grayscale and 3-channel JPEGs
            img = img.convert("RGB")
        name = f"person{i}_bacteria_{i}.jpeg" if i % 2 else f"IM-{i:04d}-0001.jpeg"
        split = "test" if i % 10 in (0, 1) else "train"
        path = root / split / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)


def naive(files: list[Path], size: int) -> None:
    for f in files:
        a = np.asarray(Image.open(f).convert("L"))
        Image.fromarray(make_square(a, "crop")).resize((size, size), Image.LANCZOS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xraygan-bench-"))
    try:
        src = tmp / "chest_xray"
        t = time.perf_counter()
        make_jpegs(src, args.count)
        files = sorted(src.rglob("*.jpeg"))
        mp = np.mean([np.prod(Image.open(f).size) for f in files]) / 1e6
        kb = np.mean([f.stat().st_size for f in files]) / 1024
        print(f"made {len(files)} JPEGs, mean {mp:.1f} MP and {kb:.0f} KB, in "
              f"{time.perf_counter() - t:.0f} s; "
              f"{os.cpu_count()} CPU cores")
        t = time.perf_counter()
        naive(files, args.size)
        t_naive = time.perf_counter() - t
        t = time.perf_counter()
        prepare(PrepareConfig(out=tmp / "out", src=src, size=args.size, workers=args.workers))
        t_prep = time.perf_counter() - t
        n = len(files)
        print(f"naive loop : {n / t_naive:7.1f} images/s")
        print(f"prepare    : {n / t_prep:7.1f} images/s  ({t_naive / t_prep:.1f}x naive)")
        print(f"projected for the 5,856-image Kermany release: {5856 / (n / t_prep):.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
