"""train-classifier on a 50,000-image training folder at 128 px: peak memory and epoch speed.

Makes the folder once from the real Kermany release in ../shared/data/chest_xray_224 (each
image at 128 px, then flipped and shifted by a few pixels for each further pass, so no two
files are the same), then in one process, alternating:

  ready    : the classifier's own model and training step (same stem, precision and
             channels-last layout) on a batch of ready-made float tensors: no data at all;
  xraygan  : `train_classifier` itself on the folder: the images decoded into uint8 memory (a
             memory-mapped temporary file above 2 GB), indexed, normalised and augmented per
             batch. Timed over its first K batches after a warm-up, from its own progress
             callback, then stopped (the run is discarded, as Ctrl-C in the first epoch does).

Peak memory is the process's maximum resident set (getrusage) after the xraygan run, which
includes decoding the folder; the same figure before it is printed too.

    python benchmarks/bench_big_folder.py --images 50000 --size 128 --batches 40
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224"


def _make_one(job: tuple[Path, Path, int, int]) -> None:
    src, dest, variant, size = job
    a = np.asarray(Image.open(src).convert("L").resize((size + 8, size + 8), Image.LANCZOS))
    dy, dx = (variant // 2) % 3 * 4, (variant // 6) % 3 * 4  # shifts of 0, 4, 8 px
    a = a[dy:dy + size, dx:dx + size]
    if variant % 2:
        a = a[:, ::-1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(a)).save(dest, compress_level=1)


def make_folder(root: Path, n: int, size: int) -> None:
    files = sorted(SHARED.rglob("*.jpeg"))
    jobs = [(files[i % len(files)], root / files[i % len(files)].parent.name.lower() / f"{i:06d}.png",
             i // len(files), size) for i in range(n)]
    todo = [j for j in jobs if not j[1].exists()]
    with multiprocessing.Pool() as pool:
        for _ in pool.imap_unordered(_make_one, todo, chunksize=64):
            pass


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ready_rate(size: int, batch: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from xraygan.classifier import ClassifierNetConfig, build_resnet18
    from xraygan.runtime import autocast, autocast_dtype

    torch.manual_seed(0)
    model = build_resnet18(ClassifierNetConfig(image_size=size, small_stem=False))
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dev = torch.device("cpu")
    amp = autocast_dtype(dev, "auto")
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    model.train()

    def step() -> None:
        with autocast(dev, amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


class _Stop(KeyboardInterrupt):
    pass


def xraygan_rate(data: Path, val: Path, out: Path, batch: int, warm: int, batches: int) -> float:
    """Images/s of train_classifier's epoch loop between batch `warm` and `warm + batches`."""
    from xraygan.classifier import TrainClassifierConfig, train_classifier
    from xraygan.errors import Interrupted

    marks: list[tuple[float, int]] = []

    def progress(stage: str, done: int, total: int, **fig) -> None:
        if stage == "train-clf":
            marks.append((time.perf_counter(), fig.get("images", done * batch)))
            if marks[-1][1] >= (warm + batches) * batch:
                raise _Stop

    try:
        train_classifier(TrainClassifierConfig(data=data, val=val, out=out, epochs=1, batch_size=batch,
                                               small_stem="no", device="cpu"), progress)
    except Interrupted:
        pass
    first = next(m for m in marks if m[1] >= warm * batch)
    last = marks[-1]
    return (last[1] - first[1]) / (last[0] - first[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=40, help="batches timed per xraygan round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/xraygan-big-folder"))
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED}: the Kermany release is needed to make the folder")
    t0 = time.perf_counter()
    make_folder(args.work / "train", args.images, args.size)
    make_folder(args.work / "val", 512, args.size)
    print(f"folder: {args.images} PNGs at {args.size} px (made or checked in {time.perf_counter() - t0:.0f} s)",
          flush=True)
    import torch

    from xraygan.images import read_image_folder

    t0 = time.perf_counter()
    folder = read_image_folder(args.work / "train")
    print(f"read_image_folder: {time.perf_counter() - t0:.1f} s, {folder.images.nbytes / 1e9:.2f} GB uint8 "
          f"({type(folder.images).__name__}), {torch.get_num_threads()} threads", flush=True)
    del folder
    print(f"peak resident memory so far: {peak_mb():.0f} MB", flush=True)
    ready, ours = [], []
    for r in range(args.rounds):
        ready.append(ready_rate(args.size, args.batch, args.batches))
        ours.append(xraygan_rate(args.work / "train", args.work / "val", args.work / f"run{r}",
                                 args.batch, 5, args.batches))
        print(f"round {r}: ready tensors {ready[-1]:.1f} img/s, train-classifier {ours[-1]:.1f} img/s, "
              f"peak resident memory {peak_mb():.0f} MB", flush=True)
    print(f"ratio: {max(ours) / max(ready):.2f}x of the same model on ready tensors (best of {args.rounds}); "
          f"peak resident memory {peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
