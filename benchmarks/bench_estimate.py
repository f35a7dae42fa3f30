"""How close is `xraygan study --estimate` to what a study took? For each finished study folder:
the estimate for the same data, settings, rows, seeds and jobs (planned into an empty folder, so
every step counts as to run), beside the seconds its times.csv recorded per step (the last
"done" time of each), summed per command. Run it on the machine the studies ran on.

    python benchmarks/bench_estimate.py /work/grid/study32auc /work/grid/grid128s
    python benchmarks/bench_estimate.py --device cuda study64            # (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

from xraygan.estimate import estimate, hours
from xraygan.images import image_side, list_image_folder
from xraygan.runtime import resolve_device
from xraygan.study import StudyConfig, build_plan


def recorded(study: Path) -> dict[str, float]:
    """Each step's seconds in times.csv: its last run that finished."""
    with open(study / "times.csv", newline="") as f:
        return {r["step"]: float(r["seconds"]) for r in csv.DictReader(f) if r["status"] == "done"}


def recorded_threads(study: Path) -> dict[str, int]:
    with open(study / "times.csv", newline="") as f:
        return {r["step"]: int(r["threads"]) for r in csv.DictReader(f) if r["status"] == "done"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="+", type=Path)
    ap.add_argument("--device", default="cpu", help="the device the studies ran on (cpu, cuda)")
    args = ap.parse_args()
    for study in args.studies:
        rec = json.loads((study / "study.json").read_text())
        st = rec["settings"]
        jobs = rec.get("last_run", {}).get("jobs", 2)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = StudyConfig(data=Path(st["data"]), out=Path(tmp) / "s", rows=tuple(rec["rows"]),
                              seeds=tuple(rec["seeds"]), jobs=jobs,
                              **{k: st[k] for k in ("gan_steps", "gan_batch", "diffaugment", "clf_epochs", "patience",
                                                     "small_stem", "diffusion_steps", "sampling_steps") if k in st})
            steps = build_plan(cfg)[0]
            first = next(f for fs in list_image_folder(Path(st["data"]) / "train").values() for f in fs)
            threads = recorded_threads(study)  # as each step ran (a step that ran alone had all cores)
            cores = os.cpu_count() or 1
            est = estimate(steps, {s.id for s in steps}, Path(st["data"]), jobs,
                           lambda sid: threads.get(sid, max(1, cores // jobs)), resolve_device(args.device), print)
        took = recorded(study)
        print(f"\n{study}: {image_side(first)} px, jobs {jobs}; estimate measured in {est.measuring:.0f} s")
        print("units (seconds): " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(est.units.items())))
        print(f"{'command':<17}{'steps':>6}{'recorded':>11}{'estimated':>11}{'est/rec':>9}")
        by: dict[str, list[tuple[float, float]]] = {}
        for s in steps:
            if s.id in took and s.inputs is None:
                by.setdefault(s.argv[0], []).append((took[s.id], est.seconds[s.id]))
        for cmd, pairs in sorted(by.items(), key=lambda kv: -sum(p[0] for p in kv[1])):
            r, e = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            print(f"{cmd:<17}{len(pairs):>6}{hours(r):>11}{hours(e):>11}{e / r if r else float('nan'):>9.2f}")
        if rec.get("last_run", {}).get("skipped") == 0:
            wall = rec["last_run"]["seconds"]
            print(f"{'whole study':<23}{hours(wall):>11}{hours(est.wall):>11}{est.wall / wall:>9.2f}")


if __name__ == "__main__":
    main()
