"""`xraygan demo`: the whole study, end to end, on the real sample shipped with xraygan.

prepare (the 1,600-image Kermany sample, 3:1 in train) → train-gan (DCGAN on the minority
class) → generate → rebalance (none, oversample, gan) → train-classifier → evaluate → gradcam
→ audit of the synthetic images → compare. Each step is the same library function the command
of that name calls, so the demo exercises the real pipeline; only the sizes are small. If the
audit finds the synthetic set covers almost none of the real images' variety, the demo says the
GAN collapsed instead of presenting its row as a result. `--phantom` runs it on procedural
phantoms instead (synthetic, for tests).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xraygan.errors import Interrupted, check_choice, check_int, require
from xraygan.fsutil import atomic_write_json, check_out_apart, check_output_free, record_header
from xraygan.images import save_png
from xraygan.options import DEVICE_HELP, opt
from xraygan.runtime import DEVICES

ROWS = ("baseline", "oversample", "dcgan")


@dataclass(frozen=True)
class DemoConfig:
    out: Path = opt(Path("demo"), "Output folder for the whole run.", flags=("--out", "-o"))
    size: int = opt(32, "Image size in pixels: 32 fits a laptop CPU; 64 wants a GPU.")
    gan_steps: int = opt(400, "DCGAN training steps.")
    clf_epochs: int = opt(6, "Classifier epochs per row, each of as many images as the training set holds "
                                "(every row trains the same steps).")
    phantom: bool = opt(False, "Run on procedural phantom X-rays instead of the real sample (tests).",
                        flags=("--phantom",))
    count: int = opt(500, "--phantom: phantom images per class before splitting.")
    seed: int = opt(0, "Seed for every step.")
    device: str = opt("auto", DEVICE_HELP)
    force: bool = opt(False, "Replace an earlier demo in --out.")


# Below these (k-NN recall or coverage of the synthetic set against the real training images),
# the synthetic images cover almost none of the real variety: the GAN collapsed.
COLLAPSE_RECALL = 0.05
COLLAPSE_COVERAGE = 0.05


def side_by_side(real: Path, synth: Path, n: int = 32) -> np.ndarray:
    """Real training images (left) and synthetic ones (right), 4 rows of 8 each, one image."""
    from xraygan.images import load_gray

    def grid(folder: Path) -> np.ndarray:
        files = sorted(folder.glob("*.png"))[:n]
        tiles = [load_gray(f, _size(files[0])) for f in files]
        side = tiles[0].shape[0]
        g = np.full((4 * (side + 2) + 2, 8 * (side + 2) + 2), 255, np.uint8)
        for i, t in enumerate(tiles):
            r, c = divmod(i, 8)
            g[2 + r * (side + 2):2 + r * (side + 2) + side, 2 + c * (side + 2):2 + c * (side + 2) + side] = t
        return g

    a, b = grid(real), grid(synth)
    body = np.concatenate([a, np.full((a.shape[0], 12), 255, np.uint8), b], axis=1)
    from PIL import Image, ImageDraw

    head = Image.new("L", (body.shape[1], 14), 255)
    draw = ImageDraw.Draw(head)
    draw.text((2, 1), "real (training images)", fill=0)
    draw.text((a.shape[1] + 14, 1), "synthetic (DCGAN)", fill=0)
    return np.concatenate([np.asarray(head), body], axis=0)


def _size(f: Path) -> int:
    from PIL import Image

    with Image.open(f) as im:
        return im.size[0]


def demo(cfg: DemoConfig, progress=None) -> dict:
    from xraygan.gan_models import size_problem

    check_int("--count", cfg.count, 20)
    require(size_problem(cfg.size) is None, f"--size {cfg.size}: {size_problem(cfg.size)}")
    check_int("--gan-steps", cfg.gan_steps)
    check_int("--clf-epochs", cfg.clf_epochs)
    check_choice("--device", cfg.device, DEVICES)
    out = Path(cfg.out)
    check_out_apart(out)  # no inputs but the packaged sample: never inside an image folder
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
    from xraygan.audit import AuditConfig, audit
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
    rec = timed("prepare", prepare, PrepareConfig(out=data, demo=cfg.phantom, sample=not cfg.phantom,
                                                  demo_count=cfg.count, size=cfg.size, imbalance=3.0,
                                                  seed=cfg.seed, force=cfg.force), stage(""))
    counts = rec["counts"]["train"]
    need = counts["normal"] - counts["pneumonia"]
    batch = min(32, counts["pneumonia"])
    gan = timed("train-gan", train_gan, TrainGanConfig(
        data=data / "train", out=gan_run, cls="pneumonia", steps=cfg.gan_steps, batch_size=batch,
        sample_every=max(1, cfg.gan_steps // 5), seed=cfg.seed, device=cfg.device, force=cfg.force),
        stage("dcgan"))
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
            data=bal, val=data / "val", out=run, epochs=cfg.clf_epochs, batch_size=64, patience=0,
            epoch_images=sum(counts.values()),  # every row the baseline's steps, as in the study
            small_stem="no", seed=cfg.seed, device=cfg.device, force=cfg.force), stage(row))
        ckpt = run / "classifier.safetensors"
        timed(f"evaluate {row}", evaluate, EvaluateConfig(
            checkpoint=ckpt, data=data / "test", report=run / "report", label=row, bootstrap=500,
            device=cfg.device, force=cfg.force), stage(row))
        timed(f"gradcam {row}", gradcam, GradcamConfig(
            checkpoint=ckpt, data=data / "test", out=run / "cams", n=6, label=row,
            device=cfg.device, force=cfg.force), stage(row))
        runs[row] = str(run)
        if row == "baseline":  # the synthetic set, in the baseline classifier's feature space
            aud = timed("audit", audit, AuditConfig(
                real=data / "train", synthetic=synth, out=out / "audit" / "dcgan", classifier=str(ckpt),
                review=0, seed=cfg.seed, device=cfg.device, force=cfg.force), stage(""))
    table = compare([out / "runs" / r for r in ROWS], out / "table", force=cfg.force)
    figure = out / "real_vs_synthetic.png"
    save_png(figure, side_by_side(data / "train" / "pneumonia", synth / "pneumonia"))
    spaces = aud["classes"]["pneumonia"]["spaces"]
    space = "classifier" if "classifier" in spaces else next(iter(spaces))
    diversity = {k: spaces[space][k] for k in ("fd", "kid", "precision", "recall", "coverage")}
    copies = aud["classes"]["pneumonia"]["memorisation"]["flagged"]
    collapsed = (diversity["recall"] or 0) < COLLAPSE_RECALL or (diversity["coverage"] or 0) < COLLAPSE_COVERAGE
    summary = {
        **record_header("demo"), "status": "done", "out": str(out), "rows": list(ROWS), "train_counts": counts, "synthetic_images": need,
        "gan": {"steps": gan["steps"], "images_per_s": gan["images_per_s"], "diversity": gan.get("diversity"),
                "samples": str(gan_run / "samples"), "preview": str(synth / "preview.png")},
        "synthetic_audit": {"space": space, **diversity, "near_copies": copies, "of": need,
                            "report": str(out / "audit" / "dcgan" / "report.md")},
        "collapsed": collapsed, "figure": str(figure), "data": "phantom" if cfg.phantom else "sample",
        "reports": {r: f"{runs[r]}/report/report.md" for r in ROWS},
        "gradcam_grids": {r: f"{runs[r]}/cams/grid.png" for r in ROWS},
        # the mean table and each paired test's answer; table.md has the paired tables themselves
        "table": str(out / "table" / "table.md"),
        "markdown": table["table_markdown"] + "".join(f"\n{a}\n" for a in table["answers"]),
        "seconds": times, "total_seconds": round(sum(times.values()), 1),
        "note": rec.get("note"),
    }
    atomic_write_json(out / "demo.json", summary)
    return summary
