"""Two training steps of a study started together, as `--jobs 2` starts the two diffusion models
(or two GANs): each command checks its batch against the free memory at its own start, and both
see the memory neither has taken yet. This starts both commands at once, as the study's
executor did before it counted their peaks together, and reports each one's exit status and
peak resident memory beside the machine's memory; then the study's own figures for them
(`xraygan.stepmemory`: each step's peak, the memory free, whether the second waits).

    python benchmarks/bench_study_memory.py k128 --steps 2                    # ddpm and cddpm, batch 64
    python benchmarks/bench_study_memory.py k128 --steps 2 --precision fp32   # as on a CPU without bf16

`k128` from `xraygan prepare ../shared/data/chest_xray_224 --out k128 --size 128`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from xraygan.stepmemory import gib, plan_data, plan_memory
from xraygan.study import StudyConfig, build_plan


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a folder written by xraygan prepare")
    ap.add_argument("--rows", nargs=2, default=["ddpm", "cddpm"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = StudyConfig(data=args.data, out=Path(tmp) / "study", rows=tuple(args.rows), seeds=(0,),
                          gan_steps=args.steps, gan_batch=args.batch, diffusion_steps=args.steps,
                          diffusion_batch=args.batch, device="cpu")
        steps = build_plan(cfg)[0]
        trainers = [s for s in steps if s.argv[0] in ("train-gan", "train-diffusion")]
        for s in trainers:  # the study's steps take --precision auto: fp32 here stands for a CPU without bf16
            s.config = replace(s.config, precision=args.precision)
        todo = {s.id for s in steps}
        mem = plan_memory(steps, todo, plan_data(args.data), torch.device("cpu"))
        print(f"memory free at the start: {gib(mem.free)} ({mem.source}); MemTotal {gib(meminfo('MemTotal'))}")
        for s in trainers:
            print(f"  the study's peak for {s.id}: {gib(mem.peaks[s.id])}")
        a, b = trainers[:2]
        print(f"  {b.id} beside {a.id}: {'starts' if mem.fits([a.id], b.id) else 'waits'} (the study now)")

        procs = []
        threads = max(1, (os.cpu_count() or 1) // 2)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        t0 = time.perf_counter()
        for s in (a, b):  # both at once, as the executor started them before
            argv = [sys.executable, "-m", "xraygan", *s.argv, "--precision", args.precision, "--log-every", "1"]
            procs.append((s.id, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                                 text=True)))
        for sid, p in procs:
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            err = p.stderr.read().strip().splitlines()
            how = (f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0
                   else f"exit {p.returncode}")
            print(f"{sid}: {how} after {time.perf_counter() - t0:.0f} s; peak resident {gib(usage.ru_maxrss * 1024)}"
                  + (f"; last line: {err[-1]}" if p.returncode and err else ""))


if __name__ == "__main__":
    main()
