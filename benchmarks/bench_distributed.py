"""One process against `torchrun --nproc-per-node N` (gloo on CPU, NCCL on CUDA), same run, same
data, same whole batch: images per second of `train-gan` and `train-classifier` as each reports
it (the training loop only, checkpoints included for the GAN).

The data is the real chest X-ray sample shipped with xraygan, prepared at --size px. On a CPU
every process gets cores/N threads (torchrun sets OMP_NUM_THREADS=1; this sets it to cores/N so
both sides use all the cores).

    python benchmarks/bench_distributed.py --size 32 --nproc 2 --gan-steps 120

Two ways to scale: the same whole batch split N ways (`--batch-size B`: the run a single
process would make), and each process with its own batch of B (`--batch-size N*B`: N times the
images per step, as DDP's own examples count batches). Both are measured against one process
at batch B.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(cmd: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--gan-steps", type=int, default=120)
    ap.add_argument("--clf-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    py = [sys.executable, "-m"]
    launch = {1: py + ["xraygan"],
              a.nproc: py + ["torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
                             "-m", "xraygan"]}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run(py + ["xraygan", "prepare", "--sample", "--size", str(a.size), "--out", str(data)],
                       check=True, capture_output=True)
        rows = []
        for procs, batch in ((1, a.batch_size), (a.nproc, a.batch_size), (a.nproc, a.batch_size * a.nproc)):
            cmd = launch[procs]
            threads = max(1, cores // procs) if a.device == "cpu" else 1
            tag = f"{procs}-{batch}"
            gan = run(cmd + ["train-gan", str(data / "train"), "--out", f"{tmp}/gan{tag}", "--steps",
                             str(a.gan_steps), "--batch-size", str(batch), "--device", a.device,
                             "--json"], threads)
            clf = run(cmd + ["train-classifier", str(data / "train"), "--val", str(data / "val"), "--out",
                             f"{tmp}/clf{tag}", "--epochs", str(a.clf_epochs), "--patience", "0",
                             "--batch-size", str(batch), "--device", a.device, "--json"], threads)
            rows.append((procs, batch, threads, gan["images_per_s"], clf["images_per_s"]))
    print(f"{a.size} px, {a.device}, {cores} cores; GAN {a.gan_steps} steps on the sample's pneumonia "
          f"images, classifier {a.clf_epochs} epochs")
    print("| processes | --batch-size (each process's share) | threads each | train-gan img/s | "
          "train-classifier img/s |")
    print("|---|---|---|---|---|")
    for procs, batch, threads, g, c in rows:
        print(f"| {procs} | {batch} ({batch // procs}) | {threads} | {g:.0f} | {c:.0f} |")
    base = rows[0]
    for procs, batch, _, g, c in rows[1:]:
        how = "same whole batch" if batch == a.batch_size else "a batch of %d each" % (batch // procs)
        print(f"{procs} processes ({how}) / 1: train-gan {g / base[3]:.2f}x, "
              f"train-classifier {c / base[4]:.2f}x")


if __name__ == "__main__":
    main()
