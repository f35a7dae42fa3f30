"""Peak memory of each command at the sizes users train at, and the calibration of the batch check.

Every command runs as its own process on a folder prepared from the Kermany release at that size;
its peak resident memory is the kernel's (`os.wait4` rusage, what `/usr/bin/time -v` reports as
"Maximum resident set size").

table      : train-gan (3 steps, and with the R1 penalty), train-diffusion (2 steps, batch 16), train-classifier (1 epoch), generate
             (256 images), audit (those against the training set) and gradcam (the test split) at
             their default batch sizes.
--calibrate: train-gan, train-diffusion and train-classifier at two batch sizes; the difference in
             peak memory divided by the difference in activation elements (counted by
             `xraygan.memory`) is the bytes per element the batch check uses.

    python benchmarks/bench_memory.py --src ../shared/data/chest_xray_224 --sizes 128 256
    python benchmarks/bench_memory.py --src ../shared/data/chest_xray_224 --sizes 256 --commands train-gan train-diffusion
    python benchmarks/bench_memory.py --src ../shared/data/chest_xray_224 --sizes 128 --calibrate --precision fp32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

XRAYGAN = [sys.executable, "-m", "xraygan"]


def peak(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(peak resident GiB, seconds) of one command, which must succeed."""
    import time

    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - t  # ru_maxrss is in KiB on Linux


def prepared(src: Path, size: int, root: Path) -> Path:
    out = root / f"data{size}"
    if not (out / "dataset.json").is_file():
        subprocess.run(XRAYGAN + ["prepare", str(src), "--out", str(out), "--size", str(size), "--imbalance", "3",
                                  "--seed", "0"], check=True, capture_output=True)
    return out


def table(data: Path, size: int, root: Path, device: str, only: list[str] | None = None) -> list[tuple[str, float, float]]:
    r = root / f"runs{size}"
    dev = ["--device", device]
    steps = [
        ("train-gan, 3 steps, batch 64", ["train-gan", f"{data}/train", "--out", f"{r}/gan", "--class", "pneumonia",
                                          "--steps", "3", "--sample-every", "100000", *dev]),
        ("train-gan --r1 10, 3 steps (one R1 step)", ["train-gan", f"{data}/train", "--out", f"{r}/gan-r1", "--class",
                                                      "pneumonia", "--steps", "3", "--sample-every", "100000",
                                                      "--r1", "10", *dev]),
        ("train-diffusion, 2 steps, batch 16", ["train-diffusion", f"{data}/train", "--out", f"{r}/ddpm", "--class",
                                                "pneumonia", "--steps", "2", "--batch-size", "16", "--sample-every", "100000",
                                                "--sample-steps", "2", *dev]),
        ("train-classifier, 1 epoch, batch 64", ["train-classifier", f"{data}/train", "--val", f"{data}/val",
                                                 "--out", f"{r}/clf", "--epochs", "1", *dev]),
        ("generate, 256 images (GAN)", ["generate", f"{r}/gan/generator.safetensors", "--out", f"{r}/syn",
                                        "-n", "256", *dev]),
        ("audit, 256 images against train", ["audit", "--real", f"{data}/train", "--synthetic", f"{r}/syn",
                                             "--out", f"{r}/audit", *dev]),
        ("gradcam, the test split", ["gradcam", f"{r}/clf/classifier.safetensors", f"{data}/test", "--out",
                                     f"{r}/cam", *dev]),
    ]
    rows = []
    for name, args in steps:
        if only and args[0] not in only:
            continue
        gib, secs = peak(XRAYGAN + args)
        rows.append((name, gib, secs))
        print(f"{size:4d} px  {name:40s} {gib:6.2f} GiB  {secs:6.1f} s", flush=True)
    return rows


def calibrate(data: Path, size: int, root: Path, device: str, precision: str) -> dict[str, float]:
    from xraygan.classifier import ClassifierNetConfig
    from xraygan.diffusion import DiffusionNetConfig, default_shape
    from xraygan.gan_models import GanNetConfig
    from xraygan.memory import classifier_footprint, diffusion_footprint, gan_footprint

    width, layers = default_shape(size)
    per = {"gan": gan_footprint(GanNetConfig(image_size=size))[0],
           "diffusion": diffusion_footprint(DiffusionNetConfig(image_size=size, width=width,
                                                                 layers_per_block=layers))[0],
           "classifier": classifier_footprint(ClassifierNetConfig(num_classes=2, image_size=size,
                                                                  small_stem=size <= 32))[0]}
    r = root / f"calib{size}"
    dev = ["--device", device]

    def cmd(family: str, b: int) -> list[str]:
        out = ["--out", f"{r}/{family}{b}-{precision}", "--batch-size", str(b), "--precision", precision, *dev]
        if family == "gan":
            return ["train-gan", f"{data}/train", "--class", "pneumonia", "--steps", "2", "--sample-every",
                    "100000", *out]
        if family == "diffusion":
            return ["train-diffusion", f"{data}/train", "--class", "pneumonia", "--steps", "2", "--sample-every",
                    "100000", "--sample-steps", "1", *out]
        return ["train-classifier", f"{data}/train", "--val", f"{data}/val", "--epochs", "1", *out]

    found = {}
    for family, (b1, b2) in {"gan": (8, 64), "diffusion": (4, 32), "classifier": (8, 64)}.items():
        (m1, _), (m2, _) = peak(XRAYGAN + cmd(family, b1)), peak(XRAYGAN + cmd(family, b2))
        found[family] = (m2 - m1) * 2**30 / ((b2 - b1) * per[family])
        print(f"{size:4d} px  {precision:5s} {family:10s} batch {b1}: {m1:.2f} GiB, batch {b2}: {m2:.2f} GiB, "
              f"{per[family] / 1e6:.1f} M elements per image -> {found[family]:.2f} bytes per element", flush=True)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="the Kermany release (or any folder prepare reads)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--commands", nargs="*", default=None,
                    help="table: only these commands, e.g. train-gan train-diffusion (default: all)")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--precision", default="auto", help="--calibrate: auto, fp32 or bf16")
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = a.work or Path(tmp)
        results = {}
        for size in a.sizes:
            data = prepared(a.src, size, root)
            results[size] = calibrate(data, size, root, a.device, a.precision) if a.calibrate else table(data, size, root, a.device, a.commands)
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
