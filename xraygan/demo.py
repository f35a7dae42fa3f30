"""`xraygan demo`: the whole study, end to end, on the embedded phantom data in a few minutes.

prepare (phantoms, 3:1) → train-gan (DCGAN on the minority class) → generate → rebalance
(none, oversample, gan) → train-classifier → evaluate → gradcam → compare. Each step is the
same library function the command of that name calls, so the demo exercises the real pipeline;
only the sizes are small. The phantoms are synthetic: the numbers show the pipeline working,
not anything about medicine.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from xraygan.errors import Interrupted, check_choice, check_int, require
from xraygan.fsutil import atomic_write_json, check_output_free, record_header
from xraygan.runtime import DEVICES

ROWS = ("baseline", "oversample", "dcgan")


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    count: int = 500  # phantoms per class before the split
    size: int = 32
    gan_steps: int = 500
    clf_epochs: int = 8
    seed: int = 0
    device: str = "auto"
    force: bool = False


def demo(cfg: DemoConfig, progress=None) -> dict:
    from xraygan.gan_models import SUPPORTED_SIZES

    check_int("--count", cfg.count, 20)
    require(cfg.size in SUPPORTED_SIZES, f"--size {cfg.size}: must be one of "
            f"{', '.join(map(str, SUPPORTED_SIZES))}")
    check_int("--gan-steps", cfg.gan_steps)
    check_int("--clf-epochs", cfg.clf_epochs)
    check_choice("--device", cfg.device, DEVICES)
    out = Path(cfg.out)
    check_output_free(out, cfg.force, "demo")
    if cfg.force and out.is_dir():
        shutil.rmtree(out)  # checked above: an earlier demo's folder and nothing else
    # the record first, so an interrupted demo is still recognised (and replaced by --force)
    atomic_write_json(out / "demo.json", {**record_header("demo"), "status": "running"})
    try:
        return _demo(cfg, out, progress)
    except (KeyboardInterrupt, Interrupted):
        raise Interrupted(f"interrupted; {out} keeps the steps that finished (demo.json says "
                          "'running'): rerun with --force to start over") from None


def _demo(cfg: DemoConfig, out: Path, progress) -> dict:
    from xraygan.classifier import TrainClassifierConfig, train_classifier
    from xraygan.evaluate import EvaluateConfig, compare, evaluate
    from xraygan.gan import TrainGanConfig, train_gan
    from xraygan.generate import GenerateConfig, generate
    from xraygan.gradcam import GradcamConfig, gradcam
    from xraygan.prepare import PrepareConfig, prepare
    from xraygan.rebalance import RebalanceConfig, rebalance

    times: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t = time.perf_counter()
        res = fn(*args)
        times[name] = round(time.perf_counter() - t, 1)
        return res

    def stage(label: str):
        """Each sub-step gets its own bar, so img/s is per step."""
        if progress is None:
            return None
        return lambda s, done, total, **fig: progress(f"{s} {label}".strip(), done, total, **fig)

    data, gan_run, synth = out / "data", out / "gan" / "dcgan", out / "synth" / "dcgan"
    rec = timed("prepare", prepare, PrepareConfig(out=data, demo=True, demo_count=cfg.count,
                                                  size=cfg.size, imbalance=3.0, seed=cfg.seed,
                                                  force=cfg.force), stage(""))
    counts = rec["counts"]["train"]
    need = counts["normal"] - counts["pneumonia"]
    batch = min(32, counts["pneumonia"])
    gan = timed("train-gan", train_gan, TrainGanConfig(
        data=data / "train", out=gan_run, cls="pneumonia", steps=cfg.gan_steps, batch_size=batch,
        seed=cfg.seed, device=cfg.device, force=cfg.force), stage("dcgan"))
    timed("generate", generate, GenerateConfig(checkpoint=gan_run / "generator.safetensors",
                                               out=synth, n=need, label="pneumonia", seed=cfg.seed,
                                               device=cfg.device, preview=True, force=cfg.force),
          stage(""))
    methods = {"baseline": ("none", ()), "oversample": ("oversample", ()), "dcgan": ("gan", (synth,))}
    runs = {}
    for row in ROWS:
        method, synthetic = methods[row]
        bal, run = out / "balanced" / row, out / "runs" / row
        timed(f"rebalance {row}", rebalance, RebalanceConfig(
            data=data / "train", out=bal, method=method, synthetic=synthetic, seed=cfg.seed,
            force=cfg.force), stage(row))
        timed(f"train-classifier {row}", train_classifier, TrainClassifierConfig(
            data=bal, val=data / "val", out=run, epochs=cfg.clf_epochs, batch_size=32, patience=0,
            small_stem="no", seed=cfg.seed, device=cfg.device, force=cfg.force), stage(row))
        ckpt = run / "classifier.safetensors"
        timed(f"evaluate {row}", evaluate, EvaluateConfig(
            checkpoint=ckpt, data=data / "test", report=run / "report", label=row, bootstrap=500,
            device=cfg.device, force=cfg.force), stage(row))
        timed(f"gradcam {row}", gradcam, GradcamConfig(
            checkpoint=ckpt, data=data / "test", out=run / "cams", n=6, label=row,
            device=cfg.device, force=cfg.force), stage(row))
        runs[row] = str(run)
    table = compare([out / "runs" / r for r in ROWS], out / "table", force=cfg.force)
    summary = {
        **record_header("demo"), "status": "done", "out": str(out), "rows": list(ROWS), "train_counts": counts, "synthetic_images": need,
        "gan": {"steps": gan["steps"], "images_per_s": gan["images_per_s"],
                "samples": str(gan_run / "samples"), "preview": str(synth / "preview.png")},
        "reports": {r: f"{runs[r]}/report/report.md" for r in ROWS},
        "gradcam_grids": {r: f"{runs[r]}/cams/grid.png" for r in ROWS},
        "table": str(out / "table" / "table.md"), "markdown": table["markdown"],
        "seconds": times, "total_seconds": round(sum(times.values()), 1),
        "note": rec.get("note"),
    }
    atomic_write_json(out / "demo.json", summary)
    return summary
