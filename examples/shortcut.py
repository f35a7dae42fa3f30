"""Make the source shortcut visible with data anyone has: a second "hospital" made from the Kermany
release by an acquisition change, pooled into every split as the study pooled NIH normals.

    python examples/shortcut.py ../shared/data/chest_xray_224 OUT [--size 32] [--epochs 12] [--seeds 0 1]

Half of the train NORMAL patients stay as they are; the other half become the "other" source:
a different contrast curve (gamma 0.6) and a black 6% border, written as PNG with their original
names (so patients stay grouped). Then, with the ordinary commands:
prepare --extra-normal OTHER --extra-normal-splits train,val,test; train-classifier per seed;
evaluate --report (per-source figures); audit --sources; compare. Prints each command.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from xraygan.images import is_image_name
from xraygan.sources import patient_id


def run(*args: str) -> None:
    print("+ xraygan " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "xraygan", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("release", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a = ap.parse_args()
    src, other = a.out / "src", a.out / "other"
    if not src.exists():
        rng = np.random.default_rng(0)
        for split in ("train", "test"):
            for cls in ("NORMAL", "PNEUMONIA"):
                (src / split / cls).mkdir(parents=True)
                files = sorted(p for p in (a.release / split / cls).iterdir() if is_image_name(p))
                if split == "train" and cls == "NORMAL":
                    patients = sorted({patient_id(f.stem) or f.stem for f in files})
                    moved = set(rng.permutation(patients)[: len(patients) // 2].tolist())
                    other.mkdir(parents=True)
                    for f in files:
                        if (patient_id(f.stem) or f.stem) in moved:
                            img = np.asarray(Image.open(f).convert("L"), dtype=np.float64) / 255
                            img = 255 * img ** 0.6  # another detector's contrast curve
                            b = int(0.06 * img.shape[0])
                            img[:b], img[-b:], img[:, :b], img[:, -b:] = 0, 0, 0, 0  # and a collimator border
                            Image.fromarray(img.astype(np.uint8)).save(other / f"{f.stem}.png")
                            continue
                        os.symlink(f.resolve(), src / split / cls / f.name)
                else:
                    for f in files:
                        os.symlink(f.resolve(), src / split / cls / f.name)
    data = a.out / "data"
    if not data.exists():
        run("prepare", str(src), "--out", str(data), "--size", str(a.size), "--extra-normal", str(other),
            "--extra-normal-splits", "train,val,test")
    for seed in a.seeds:
        r = a.out / "runs" / f"pooled-seed{seed}"
        if not (r / "report" / "metrics.json").exists():
            run("train-classifier", str(data / "train"), "--val", str(data / "val"), "--out", str(r),
                "--epochs", str(a.epochs), "--small-stem", "no", "--select", "f1", "--seed", str(seed),
                "--force")
            run("evaluate", str(r / "classifier.safetensors"), str(data / "test"), "--report", "--force")
    run("audit", "--sources", str(data / "train"))
    run("compare", str(a.out / "runs"))


if __name__ == "__main__":
    main()
