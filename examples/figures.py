"""Figures and tables for docs/RESULTS.md from a finished `xraygan study` folder.

    python examples/figures.py DATA STUDY docs/figures [--audit NAME=AUDIT_DIR ...]
        [--prefix NAME_] [--cell INCHES]

Writes (small PNGs, to keep the repository small; --prefix before each name):
  samples.png   real pneumonia training images beside each generator's synthetic ones
  gradcam.png   Grad-CAMs of every row's seed-0 classifier on the same test images
and prints Markdown tables: the audit figures per generator (each generator of the study's GAN and diffusion rows,
plus any --audit folder made outside the study), and wall time per stage.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import colormaps  # noqa: E402

from xraygan.classifier import load_classifier, to_input  # noqa: E402
from xraygan.gradcam import GradCam, resolve_layer, upsample  # noqa: E402
from xraygan.images import read_image_folder  # noqa: E402
from xraygan.study import generator_of  # noqa: E402

GENERATORS = ("dcgan", "cdcgan_a0.25", "cdcgan_a0.5", "cdcgan_a0.75", "ddpm", "cddpm")


def save_small(fig, path: Path, dpi: int) -> None:
    """A palette PNG (128 colours): a fraction of the size of matplotlib's RGBA output."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)


def samples_figure(data: Path, study: Path, out: Path, n: int = 12, cell: float = 0.75) -> None:
    rng = np.random.default_rng(0)
    rows = [("real pneumonia (train)", read_image_folder(data / "train", only=("pneumonia",)))]
    rows += [(g, read_image_folder(study / "synth" / g)) for g in GENERATORS if (study / "synth" / g).is_dir()]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * cell, len(rows) * (cell + 0.1)), squeeze=False)
    for r, (name, folder) in enumerate(rows):
        pick = rng.choice(len(folder.images), n, replace=False)
        for j, i in enumerate(pick):
            axes[r, j].imshow(folder.images[i], cmap="gray", vmin=0, vmax=255)
            axes[r, j].axis("off")
        axes[r, 0].set_title(name, fontsize=7, loc="left")
    save_small(fig, out, dpi=80)


def gradcam_figure(data: Path, study: Path, out: Path, per_class: int = 3, cell: float = 0.9) -> None:
    test = read_image_folder(data / "test")
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(test.labels == c), per_class, replace=False)
                          for c in range(len(test.classes))])
    runs = sorted((p for p in (study / "runs").glob("*-seed0") if (p / "classifier.safetensors").is_file()),
                  key=lambda p: _row_order(p.name))
    fig, axes = plt.subplots(len(runs), len(idx), figsize=(len(idx) * cell, len(runs) * (cell + 0.1)), squeeze=False)
    device = torch.device("cpu")
    for r, run in enumerate(runs):
        model, meta = load_classifier(run / "classifier.safetensors", device)
        name, layer, _ = resolve_layer(model, "auto", test.size, device)
        with GradCam(model, layer) as gc:
            cams, logits = gc(to_input(torch.from_numpy(test.images[idx])))
        cams = upsample(cams, test.size).numpy()
        prob = torch.softmax(logits, 1)[:, 1].numpy()
        for j, i in enumerate(idx):
            ax = axes[r, j]
            ax.imshow(test.images[i], cmap="gray", vmin=0, vmax=255)
            c = cams[j] / cams[j].max() if cams[j].max() > 0 else cams[j]
            ax.imshow(colormaps["jet"](c), alpha=0.45)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{test.classes[test.labels[i]]}", fontsize=6)
            ax.set_xlabel(f"P={prob[j]:.2f}", fontsize=5, labelpad=1)
        axes[r, 0].set_ylabel(run.name.removesuffix("-seed0") + f"\n{name}", fontsize=6)
    save_small(fig, out, dpi=80)


ORDER = ("baseline", "class_weights", "undersample", "oversample", "dcgan", "cdcgan_a0.25",
         "cdcgan_a0.5", "cdcgan_a0.75", "ddpm", "cddpm", "smote", "augment")


def _row_order(name: str) -> int:
    base = name.rsplit("-seed", 1)[0]
    return ORDER.index(base) if base in ORDER else len(ORDER)


def audit_table(study: Path, extra: dict[str, Path]) -> str:
    lines = ["| generator | space | FD | of which mean | spread | KID ± std | precision | recall | density | "
             "coverage | real-vs-synthetic AUC | near-copies flagged |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    # every generator of each row (a study trains one per classifier seed unless told --gan-seeds 0)
    folders = {f.name: f for g in GENERATORS
               for f in sorted([study / "audit" / g, *(study / "audit").glob(f"{g}-gan*")],
                               key=lambda f: generator_of(f.name)[1])} | extra
    for g, folder in folders.items():
        f = folder / "audit.json"
        if not f.is_file():
            continue
        d = json.loads(f.read_text())["classes"]["pneumonia"]
        for s, v in d["spaces"].items():
            kid = f"{v['kid']:.4g} ± {v['kid_std']:.2g}" if v.get("kid_std") is not None else f"{v['kid']:.4g}"
            parts = " | ".join(f"{v[k]:.3g}" if v.get(k) is not None else "n/a" for k in ("fd_mean_term", "spread_ratio"))
            lines.append(f"| {g} | {s} | {v['fd']:.4g} | {parts} | {kid} | {v['precision']:.3f} | "
                         f"{v['recall']:.3f} | {v['density']:.3f} | {v['coverage']:.3f} | "
                         f"{v['real_vs_synthetic_auc']:.3f} | {d['memorisation']['flagged']} of {d['synthetic']} |")
    return "\n".join(lines)


def times_table(study: Path) -> str:
    total: dict[str, list[float]] = defaultdict(list)
    with open(study / "times.csv") as f:
        for row in csv.DictReader(f):
            if row.get("status", "done") != "done":  # failed, blocked or interrupted attempts
                continue
            stage = row["step"].split()[0] + (" (tuned)" if row["step"].endswith(" tuned") else "")
            total[stage].append(float(row["seconds"]))
    lines = ["| stage | runs | mean s per run | total s |", "|---|---|---|---|"]
    for stage, v in total.items():
        lines.append(f"| {stage} | {len(v)} | {np.mean(v):.1f} | {sum(v):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("study", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--audit", action="append", default=[], metavar="NAME=AUDIT_DIR",
                    help="an audit made outside the study, added to the audit table")
    ap.add_argument("--prefix", default="", help="put before each figure's file name, e.g. study128_")
    ap.add_argument("--cell", type=float, default=0.75,
                    help="inches per image (0.75 for 32 px images; larger shows more of larger ones)")
    args = ap.parse_args()
    extra = {}
    for item in args.audit:
        name, sep, folder = item.partition("=")
        if not sep:
            ap.error(f"--audit {item}: give NAME=AUDIT_DIR")
        extra[name] = Path(folder)
    args.out.mkdir(parents=True, exist_ok=True)
    samples_figure(args.data, args.study, args.out / f"{args.prefix}samples.png", cell=args.cell)
    gradcam_figure(args.data, args.study, args.out / f"{args.prefix}gradcam.png", cell=args.cell * 1.2)
    print("## audit\n\n" + audit_table(args.study, extra) + "\n\n## wall time per stage\n\n" + times_table(args.study))


if __name__ == "__main__":
    main()
