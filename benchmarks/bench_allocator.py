"""The CPU allocator setting (`xraygan.allocator.keep_freed_memory`) against glibc's defaults.

Each command runs twice on the same prepared folder, as its own process: once with
`XRAYGAN_MALLOC=keep` (large freed blocks kept and reused; what train-diffusion and diffusion
sampling do by default) and once with `XRAYGAN_MALLOC=system` (glibc's defaults: every block over
32 MB mapped fresh and returned on free). The two runs of a
command are back to back, in alternating order, so the ratios compare like with like on a noisy
machine. Per step: the median gap between `log.csv` rows after the first (`--log-every 1`);
for the classifier (a log row per epoch) and generate (64 images, 10 DDIM steps, from the
diffusion run), the whole command's wall time. Peak resident
memory and kernel CPU time are the kernel's rusage of the process.

    python benchmarks/bench_allocator.py --data k128 --steps 6
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

XRAYGAN = [sys.executable, "-m", "xraygan"]


def run(cmd: list[str], system: bool) -> dict:
    env = dict(os.environ)
    env["XRAYGAN_MALLOC"] = "system" if system else "keep"
    t = time.perf_counter()
    p = subprocess.Popen(XRAYGAN + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return {"wall": time.perf_counter() - t, "rss": usage.ru_maxrss / 2**20, "sys": usage.ru_stime}


def step_seconds(log: Path) -> float:
    rows = list(csv.DictReader(log.open()))
    t = [float(r["seconds"]) for r in rows]
    return statistics.median(b - a for a, b in zip(t[1:], t[2:]))  # the first step pays for warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a folder written by xraygan prepare")
    ap.add_argument("--steps", type=int, default=6, help="training steps of the GAN and the diffusion model")
    ap.add_argument("--only", nargs="*", default=None,
                    help="gan, diffusion, classifier, generate (default: all; generate needs diffusion)")
    a = ap.parse_args()
    if a.steps < 3:
        ap.error("--steps: at least 3 (the first step is left out, and a gap needs two more)")
    d = a.data
    common = ["--device", "cpu", "--precision", "fp32"]
    train = ["--steps", str(a.steps), "--log-every", "1", "--sample-every", "100000"]
    jobs = {
        "gan": ("train-gan, batch 64", lambda out: ["train-gan", f"{d}/train", "--out", out, *train, *common]),
        "diffusion": ("train-diffusion --conditional, batch 64",
                      lambda out: ["train-diffusion", f"{d}/train", "--conditional", "--out", out, *train,
                                   "--sample-steps", "2", *common]),
        "classifier": ("train-classifier, 1 epoch, batch 64",
                       lambda out: ["train-classifier", f"{d}/train", "--val", f"{d}/val", "--epochs", "1",
                                    "--out", out, "--small-stem", "no", *common]),
        "generate": ("generate from the diffusion model, 64 images, 10 DDIM steps",
                     lambda out: ["generate", f"{Path(out).parent}/diffusion-kept/diffusion.safetensors", "-n", "64",
                                  "--sampling-steps", "10", "--out", out, "--device", "cpu"]),
    }
    print(f"| command ({d.name}) | per step, kept / system | peak resident, kept / system | kernel CPU s, kept / "
          "system |\n|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (key, (name, cmd)) in enumerate(jobs.items()):
            if a.only and key not in a.only:
                continue
            res = {}
            for system in ((True, False) if i % 2 == 0 else (False, True)):
                out = Path(tmp) / f"{key}-{'system' if system else 'kept'}"
                r = run(cmd(str(out)), system)
                r["step"] = r["wall"] if key in ("classifier", "generate") else step_seconds(out / "log.csv")
                res[system] = r
            k, s = res[False], res[True]
            print(f"| {name} | {k['step']:.2f} s / {s['step']:.2f} s = {k['step'] / s['step']:.2f}x | "
                  f"{k['rss']:.2f} / {s['rss']:.2f} GiB = {k['rss'] / s['rss']:.2f}x | "
                  f"{k['sys']:.1f} / {s['sys']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
