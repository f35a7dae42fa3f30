"""`xraygan rebalance`: a new image folder with the classes rebalanced by one method.

Methods: none, oversample (random duplicates of minority images), undersample (random subset
of the majority), gan (synthetic images from one or more `--synthetic` folders), smote (SMOTE
in pixel space or a PCA space, via imbalanced-learn), augment (randomly rotated, shifted,
scaled and contrast-changed minority images). Real and duplicated files are hard-linked where
the filesystem allows (else copied); `rebalance.json` counts every file by origin.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xraygan import __version__
from xraygan.errors import InputError, check_float, check_int
from xraygan.fsutil import (
    atomic_write_json,
    check_out_apart,
    check_output_free,
    has_record,
    overlapping,
    record_header,
    staged_dir,
)
from xraygan.images import encode_png, list_image_folder, read_image_folder
from xraygan.options import TRAIN_FOLDER_HELP, given_options, opt
from xraygan.provenance import file_sources, single_source

METHODS = ("none", "oversample", "undersample", "gan", "smote", "augment")


@dataclass(frozen=True)
class RebalanceConfig:
    data: Path = opt(help=TRAIN_FOLDER_HELP, argument=True)
    out: Path = opt(help="Output image folder.", flags=("--out", "-o"))
    method: str = opt(help="none, oversample, undersample, gan, smote or augment.")
    synthetic: tuple[Path, ...] = opt((), "--method gan: folder(s) from xraygan generate; several are mixed "
                                          "evenly. Repeatable.")
    ratio: float = opt(1.0, "Target minority:majority ratio.")
    seed: int = opt(0, "Seed for every random choice.")
    smote_space: str = opt("pixel", "SMOTE in 'pixel' space or in a 'pca' space.")
    smote_k: int = opt(5, "SMOTE neighbours.")
    pca_components: int = 64
    force: bool = opt(False, "Replace an existing output folder.")

def _link(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


def synthetic_files(folders: tuple[Path, ...], label: str, size: int,
                    real: Path | None = None, generators: list[dict] | None = None) -> list[list[Path]]:
    """Per folder, the synthetic images of `label` (DIR/<label>/*.png or DIR/*.png). Real training
    images given as synthetic ones (the training folder, a folder inside it, or copies of its
    files) are refused: the record would call them synthetic. The generators that made them (as
    their generate records name them) are appended to `generators` when given."""
    out = []
    for d in folders:
        d = Path(d)
        sub = d / label if (d / label).is_dir() else d
        if not sub.is_dir():
            raise InputError(f"{d}: synthetic folder not found")
        if real is not None and overlapping(sub, real):
            raise InputError(f"{d}: overlaps the training folder {real}; those are real images, not "
                             "synthetic ones (give the output of xraygan generate)")
        from xraygan.generate import check_complete

        rec = check_complete(d if sub != d else d.parent)  # an interrupted generate is not a data set
        if rec is not None and generators is not None:
            generators += [{"checkpoint": r.get("checkpoint"), "checkpoint_sha256": r.get("checkpoint_sha256"),
                            "generator_step": r.get("generator_step"), "family": r.get("family", "gan"),
                            "label": label} for r in rec["runs"] if r.get("label") == label]
        files = sorted(p for p in sub.glob("*.png") if not p.name.startswith("."))
        if not files:
            raise InputError(f"{sub}: no synthetic {label} images (expected {d}/{label}/*.png)")
        if real is not None:
            for f in files:
                twin = Path(real) / label / f.name
                if twin.is_file() and filecmp.cmp(f, twin, shallow=False):
                    raise InputError(f"{f}: the same file as the training image {twin}; real images "
                                     "cannot be added as synthetic ones (give the output of xraygan generate)")
        with Image.open(files[0]) as im:
            if im.size != (size, size):
                raise InputError(f"{files[0]}: synthetic image is {im.size[0]} px, the training "
                                 f"images are {size} px")
        out.append(files)
    return out


def _take_mixed(pools: list[list[Path]], n: int, rng: np.random.Generator) -> list[Path]:
    """n files drawn without replacement, as evenly as possible from each pool."""
    order = [list(rng.permutation(len(p))) for p in pools]
    picked: list[Path] = []
    while len(picked) < n:
        progressed = False
        for p, o in zip(pools, order):
            if o and len(picked) < n:
                picked.append(p[o.pop(0)])
                progressed = True
        if not progressed:
            break
    return picked


def _augment(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small random rotation (±10°), shift (±8%), scale (0.9-1.1) and contrast (0.8-1.2)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    size = a.shape[0]
    t = torch.from_numpy(a)[None]
    t = TF.affine(t, angle=float(rng.uniform(-10, 10)),
                  translate=[int(rng.integers(-size // 12, size // 12 + 1)) for _ in range(2)],
                  scale=float(rng.uniform(0.9, 1.1)), shear=[0.0, 0.0],
                  interpolation=TF.InterpolationMode.BILINEAR)
    t = TF.adjust_contrast(t.expand(3, -1, -1), float(rng.uniform(0.8, 1.2)))[0]
    return t.numpy()


def _smote(x: np.ndarray, y: np.ndarray, minority: int, target: int, cfg: RebalanceConfig
           ) -> np.ndarray:
    from imblearn.over_sampling import SMOTE

    n_min = int((y == minority).sum())
    k = min(cfg.smote_k, n_min - 1)
    if k < 1:
        raise InputError(f"{cfg.data}: SMOTE needs at least 2 minority images, found {n_min}")
    flat = x.reshape(len(x), -1).astype(np.float32)
    pca = None
    if cfg.smote_space == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(cfg.pca_components, len(x) - 1, flat.shape[1]),
                  random_state=cfg.seed)
        flat = pca.fit_transform(flat)
    elif cfg.smote_space != "pixel":
        raise InputError(f"--smote-space {cfg.smote_space}: must be pixel or pca")
    sm = SMOTE(sampling_strategy={minority: target}, k_neighbors=k, random_state=cfg.seed)
    xr, _ = sm.fit_resample(flat, y)
    new = xr[len(x):]  # imbalanced-learn appends the new samples after the originals
    if pca is not None:
        new = pca.inverse_transform(new)
    return np.clip(np.round(new), 0, 255).astype(np.uint8).reshape(-1, *x.shape[1:])


def is_done(out: Path) -> bool:
    """Whether `out` holds a finished xraygan rebalance (its own record says so)."""
    return has_record(out, "rebalance")


def rebalance(cfg: RebalanceConfig, progress: Callable[..., None] | None = None) -> dict:
    if cfg.method not in METHODS:
        raise InputError(f"--method {cfg.method}: must be one of {', '.join(METHODS)}")
    check_float("--ratio", cfg.ratio, 0.0, 1.0)
    check_int("--smote-k", cfg.smote_k)
    check_out_apart(cfg.out, data=cfg.data, **{f"synthetic{i or ''}": s for i, s in enumerate(cfg.synthetic)})
    check_output_free(cfg.out, cfg.force, "rebalance")
    if cfg.method == "gan" and not cfg.synthetic:
        raise InputError("--method gan needs --synthetic DIR (the output of xraygan generate)")
    # an option the method does not use would be passed over, and the record would not say so
    uses = {"synthetic": ("gan",), "ratio": METHODS[1:], "smote_space": ("smote",), "smote_k": ("smote",)}
    for name, text in given_options(cfg, *uses).items():
        if cfg.method not in uses[name]:
            raise InputError(f"{text}: --method {cfg.method} does not use it (it applies to --method "
                             f"{' / '.join(uses[name])})")
    listing = list_image_folder(cfg.data)
    counts = {c: len(f) for c, f in listing.items()}
    if len(counts) < 2:
        raise InputError(f"{cfg.data}: need at least two classes to rebalance")
    majority = max(counts, key=lambda c: (counts[c], c))
    target = {c: max(counts[c], int(round(cfg.ratio * counts[majority]))) for c in counts}
    if cfg.method == "undersample":
        smallest = min(counts.values())
        target = {c: min(counts[c], int(round(smallest / cfg.ratio))) for c in counts}
    elif cfg.method == "none":
        target = dict(counts)
    rng = np.random.default_rng(cfg.seed)
    with Image.open(listing[majority][0]) as im:
        size = im.size[0]
    origins: dict[str, Counter] = {c: Counter() for c in counts}
    link_modes: Counter = Counter()
    synth_sources: list[str] = []
    generators: list[dict] = []  # what made the synthetic images (classifier checkpoints carry it on)
    known = file_sources(cfg.data) or {}
    default_source = single_source(cfg.data)
    sources: dict[str, str] = {}  # "<class>/<file>" -> where the image came from
    with staged_dir(cfg.out, cfg.force, "rebalance") as tmp:
        for c, files in listing.items():
            d = tmp / c
            d.mkdir()
            keep = files
            if target[c] < counts[c]:  # undersample
                keep = [files[i] for i in sorted(rng.choice(len(files), target[c], replace=False))]
            for f in keep:
                link_modes[_link(f, d / f.name)] += 1
                sources[f"{c}/{f.name}"] = known.get(f"{c}/{f.name}", default_source)
            origins[c]["real"] = len(keep)
            need = target[c] - counts[c]
            if need <= 0:
                continue
            if cfg.method == "oversample":
                for j, i in enumerate(rng.integers(0, len(files), need)):
                    link_modes[_link(files[i], d / f"{files[i].stem}-dup{j + 1:06d}.png")] += 1
                    sources[f"{c}/{files[i].stem}-dup{j + 1:06d}.png"] = known.get(f"{c}/{files[i].name}",
                                                                                  default_source)
                origins[c]["duplicated"] = need
            elif cfg.method == "gan":
                pools = synthetic_files(cfg.synthetic, c, size, cfg.data, generators)
                have = sum(len(p) for p in pools)
                if have < need:
                    raise InputError(f"{', '.join(map(str, cfg.synthetic))}: {have} synthetic {c} "
                                     f"images, {need} needed for ratio {cfg.ratio} "
                                     f"(xraygan generate -n {need})")
                for f in _take_mixed(pools, need, rng):
                    name = f.name if f.name.startswith("synthetic-") else f"synthetic-{f.name}"
                    sources[f"{c}/{name}"] = "synthetic"
                    link_modes[_link(f, d / name)] += 1
                synth_sources = [str(s) for s in cfg.synthetic]
                origins[c]["synthetic"] = need
            elif cfg.method in ("smote", "augment"):
                x = read_image_folder(cfg.data, classes=tuple(counts))
                own = x.images[x.labels == list(counts).index(c)]
                if cfg.method == "smote":
                    new = _smote(x.images, x.labels, list(counts).index(c), target[c], cfg)
                else:
                    new = np.stack([_augment(own[i], rng)
                                    for i in rng.integers(0, len(own), need)])
                tag = "smote" if cfg.method == "smote" else "augmented"
                for j, a in enumerate(new):
                    (d / f"{tag}-{j + 1:06d}.png").write_bytes(encode_png(a))
                    sources[f"{c}/{tag}-{j + 1:06d}.png"] = tag
                    if progress and j % 64 == 0:
                        progress(cfg.method, j + 1, len(new))
                origins[c][tag] = len(new)
        final = {c: sum(o.values()) for c, o in origins.items()}
        record = {**record_header("rebalance"),
                  "created_by": f"xraygan {__version__} rebalance", "method": cfg.method,
                  "ratio": cfg.ratio, "source": str(cfg.data), "seed": cfg.seed,
                  "before": counts, "after": final,
                  "origins": {c: dict(o) for c, o in origins.items()},
                  "files": {"hardlinked": link_modes["hardlink"], "copied": link_modes["copy"]},
                  "synthetic_sources": synth_sources, "generators": generators,
                  "file_sources": sources,
                  "config": {k: [str(p) for p in v] if isinstance(v, tuple) else
                             (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}}
        atomic_write_json(tmp / "rebalance.json", record)
    return record
