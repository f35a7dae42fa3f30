"""`xraygan audit`: are synthetic images realistic, diverse, and not copies of training patients?

All offline; nothing is downloaded. Per class, in two feature spaces:

- `classifier`: the 512-d penultimate layer (global average pool) of a ResNet-18 from
  `train-classifier`: the user's own (`--classifier`), or one trained here for a few epochs on
  the real folder and cached.
- `pca`: a model-free space: the real images' first principal components of pixels (up to 64),
  whitened by the real set's spread, so that no single network decides the verdict.

Figures: Fréchet distance (FD, Gaussian fit) and kernel inception-style distance (KID: unbiased
MMD² with the cubic polynomial kernel, over subsets), precision/recall (Kynkäänniemi et al. 2019)
and density/coverage (Naeem et al. 2020) by k-nearest neighbours: realism and diversity.

Memorisation: every synthetic image's nearest real training image by Pearson correlation of
pixels; the distribution of those similarities against each real image's nearest *other* real
image (exact duplicates excluded); synthetic images closer to a training image than
`copy_quantile` of real images are to their nearest neighbour are flagged as near-copies.

A blinded review sheet (shuffled real and synthetic images with ids, a contact sheet, an HTML
page and a CSV to fill in) and `score_review` turn a radiologist's guesses into a visual Turing
test.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xraygan import __version__
from xraygan.errors import InputError, check_choice, check_float, check_int
from xraygan.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_out_apart,
    check_output_free,
    file_sha256,
    has_record,
    read_json,
    record_header,
    staged_dir,
    write_csv,
)
from xraygan.images import ImageFolder, encode_png, read_image_folder
from xraygan.options import DEVICE_HELP, opt
from xraygan.plots import fig_png, pyplot
from xraygan.runtime import DEVICES

SPACES = ("classifier", "pca")


@dataclass(frozen=True)
class AuditConfig:
    real: Path = opt(help="Real training images, e.g. DATA/train.")
    synthetic: Path = opt(help="Synthetic images, e.g. SYNTH/ from generate.")
    out: Path = opt(help="Audit folder.", flags=("--out", "-o"))
    classifier: str = opt("auto", "Feature space: a classifier.safetensors from train-classifier; 'auto' trains "
                                  "one for 3 epochs on --real (cached with --cache); 'none' uses only the PCA space.")
    pca_components: int = opt(64, "Dimensions of the pixel-PCA space.")
    k: int = opt(5, "Neighbours for precision/recall/density/coverage.")
    kid_subsets: int = 10
    kid_subset_size: int = 1000
    copy_quantile: float = opt(0.99, "Flag a synthetic image as a near-copy when its correlation with the nearest "
                                     "training image exceeds this quantile of real images' correlation with their "
                                     "nearest other real image.")
    copy_threshold: float | None = opt(None, "Flag at this absolute pixel correlation instead.")
    review: int = opt(40, "Images in the blinded review sheet (half real, half synthetic; 0 = none).")
    cache: Path | None = opt(None, "Feature cache folder (default $XRAYGAN_CACHE; without either, nothing is "
                                   "cached, nothing is written outside --out).")
    seed: int = opt(0, "Seed for KID subsets and the review sample.")
    device: str = opt("auto", DEVICE_HELP)
    batch_size: int = 256
    force: bool = opt(False, "Replace an existing audit folder.")


# --- distances between sets --------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||μa − μb||² + Tr(Σa + Σb − 2 (Σa Σb)^½), with the trace of the root from the eigenvalues
    of Σa^½ Σb Σa^½ (symmetric, so no complex square roots)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ sb @ root
    tr = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * tr)


def fd_parts(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    """What FD is made of: the mean term ||μr − μf||² (its share of FD says whether the sets are
    displaced or differently spread) and the spread ratio Tr Σf / Tr Σr (below 1: less varied
    than the real set, e.g. a collapsing generator; above 1: more)."""
    r, f = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(r) < 2 or len(f) < 2:
        return float("nan"), float("nan")
    mu = r.mean(0) - f.mean(0)
    tr_r = float(np.var(r, axis=0, ddof=1).sum())
    return float(mu @ mu), float(np.var(f, axis=0, ddof=1).sum()) / tr_r if tr_r > 0 else float("nan")


def kid(a: np.ndarray, b: np.ndarray, subsets: int, size: int, rng: np.random.Generator
        ) -> tuple[float, float]:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³, mean and std over random subsets.

    Subsets are always smaller than the sets: when a set holds no more than `size` images, they
    are 80% of the smaller set. (Subsets as large as the set are all the same set, and their std
    of 0 read as a precise estimate: the real audits reported kid_std 0.0.)
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    m = min(size, n) if size < n else int(0.8 * n)
    if m < 2:
        return float("nan"), float("nan")
    d = a.shape[1]
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                    + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def _cdist(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    """Euclidean distances in float64. (float32 `torch.cdist` goes through a matrix product,
    which loses the small differences between large coordinates: shifting 64-d features by
    1,000 moved k-NN precision from 0.73 to 0.84.) Callers centre the features first."""
    return torch.cdist(torch.from_numpy(np.ascontiguousarray(a, np.float64)),
                       torch.from_numpy(np.ascontiguousarray(b, np.float64)))


def knn_radius(x: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Distance from each point to its k-th nearest other point."""
    k = min(k, len(x) - 1)
    out = np.empty(len(x), np.float64)
    for s in range(0, len(x), chunk):
        d = _cdist(x[s:s + chunk], x)
        out[s:s + chunk] = d.topk(k + 1, dim=1, largest=False).values[:, k].numpy()  # [0] is self
    return out


def prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Precision, recall, density, coverage with k-NN balls."""
    if len(real) <= k or len(fake) <= k:
        return {m: float("nan") for m in ("precision", "recall", "density", "coverage")}
    centre = np.asarray(real, np.float64).mean(0)  # distances do not depend on where the origin is
    real, fake = np.asarray(real, np.float64) - centre, np.asarray(fake, np.float64) - centre
    rr, fr = knn_radius(real, k), knn_radius(fake, k)
    d = _cdist(fake, real).numpy()  # (n_fake, n_real)
    inside = d <= rr[None, :]
    return {"precision": float(inside.any(1).mean()),
            "recall": float((d <= fr[:, None]).any(0).mean()),
            "density": float(inside.sum(1).mean() / k),
            "coverage": float((d.min(0) <= rr).mean())}


# --- memorisation ------------------------------------------------------------------------------


def _unit_rows(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)


def nearest_correlation(query: np.ndarray, ref: np.ndarray, exclude_self: bool = False,
                        chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each query image, the Pearson correlation of pixels with its nearest reference image
    and that image's index. With `exclude_self` (query is ref), the image itself and its exact
    duplicates (correlation 1) are skipped."""
    q, r = _unit_rows(query), _unit_rows(ref)
    sims, idx = np.empty(len(q), np.float32), np.empty(len(q), np.int64)
    for s in range(0, len(q), chunk):
        c = q[s:s + chunk] @ r.T
        if exclude_self:
            c[c >= 1 - 1e-6] = -2.0
            c[torch.arange(len(c)), torch.arange(s, s + len(c))] = -2.0
        v, i = c.max(1)
        sims[s:s + chunk], idx[s:s + chunk] = v.numpy(), i.numpy()
    return sims, idx


# --- feature spaces ----------------------------------------------------------------------------


def pca_space(real: np.ndarray, fake: np.ndarray, n_components: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    xr = real.reshape(len(real), -1).astype(np.float32) / 255.0
    xf = fake.reshape(len(fake), -1).astype(np.float32) / 255.0
    n = max(1, min(n_components, len(xr) - 1, xr.shape[1]))
    pca = PCA(n_components=n, whiten=True, random_state=seed).fit(xr)
    return pca.transform(xr), pca.transform(xf)


def probe_auc(a: np.ndarray, b: np.ndarray, seed: int) -> float | None:
    """Held-out ROC-AUC of a linear model telling set `a` from set `b` (standardised features,
    logistic regression, stratified k-fold cross-validated predictions; deterministic). About 0.5:
    the sets look alike to it; near 1: anything trained on them together can tell them apart."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = min(5, len(a), len(b))
    if k < 2:
        return None
    x = np.concatenate([a, b]).astype(np.float64)
    y = np.r_[np.zeros(len(a)), np.ones(len(b))].astype(int)
    limit = max(2, min(len(a), len(b)) // 2)
    if x.shape[1] > limit:  # more features than images per fold: probes overfit to below chance
        from sklearn.decomposition import PCA

        x = PCA(n_components=limit, random_state=seed).fit_transform(x)  # unsupervised: no label leaks
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    p = cross_val_predict(clf, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                          method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def probe_verdict(auc: float | None) -> str:
    if auc is None:
        return "too few images to probe"
    if auc < 0.6:
        return "look alike"
    if auc < 0.8:
        return "partly distinguishable"
    return "easily told apart: a classifier trained on them together can shortcut"


@dataclass(frozen=True)
class ProbeSourcesConfig:
    folder: Path = opt(help="An image folder whose images come from several sources (prepare --extra-normal, "
                            "or a rebalanced set).", argument=True)
    classifier: Path | None = opt(None, "Also probe in this classifier's feature space (a classifier.safetensors).")
    pca_components: int = opt(64, "Dimensions of the pixel-PCA space.")
    seed: int = opt(0, "Seed of the held-out split.")
    device: str = opt("auto", DEVICE_HELP)

    def validate(self) -> None:
        """Every option checked before any image is read."""
        check_int("--pca-components", self.pca_components)
        check_choice("--device", self.device, DEVICES)
        if self.classifier is not None and not Path(self.classifier).is_file():
            raise InputError(f"{self.classifier}: classifier checkpoint not found")


def probe_sources(cfg: ProbeSourcesConfig, progress=None) -> dict:
    """`xraygan probe-sources`: `source_probe` on a checked config."""
    cfg.validate()
    return source_probe(cfg.folder, cfg.classifier, cfg.pca_components, cfg.seed, cfg.device)


def source_probe(folder: Path, classifier: Path | None = None, pca_components: int = 64, seed: int = 0,
                 device: str = "auto") -> dict:
    """Within each class, can a quick linear model tell the sources apart? (`xraygan probe-sources`)

    Sources come from the folder's record (`dataset.json` file_sources, or `rebalance.json`).
    Features: a whitened pixel-PCA space fitted on the class, and with `classifier` its ResNet
    features too. A high AUC means any disease classifier on the pooled data can learn the source
    instead of the disease."""
    from xraygan.provenance import file_sources

    data = read_image_folder(folder)
    src = file_sources(folder)
    if not src:
        raise InputError(f"{folder}: its record names a single source (or there is none): nothing to "
                         "probe (prepare with --extra-normal, or rebalance with synthetic images)")
    tags = np.array([src.get(f"{data.classes[c]}/{f.name}", "unknown") for f, c in zip(data.files, data.labels)])
    feats = None
    if classifier is not None:
        from xraygan.classifier import load_classifier
        from xraygan.runtime import resolve_device

        dev = resolve_device(device)
        model, _ = load_classifier(Path(classifier), dev)
        feats = classifier_features(model, data.images, dev, 256)
    out: dict = {**record_header("source-probe"), "folder": str(folder), "classes": {}}
    for ci, c in enumerate(data.classes):
        m = data.labels == ci
        names = sorted(set(tags[m].tolist()))
        if len(names) < 2:
            continue
        x = data.images[m].reshape(int(m.sum()), -1).astype(np.float32) / 255.0
        from sklearn.decomposition import PCA

        # few components for few images: with more features than a fold's images, cross-validated
        # linear probes score *below* chance (seen: AUC 0.21 on 20 + 24 images and 40 components)
        smallest = min(int((tags[m] == t).sum()) for t in names)
        n = max(1, min(pca_components, smallest // 2, x.shape[1]))
        z = PCA(n_components=n, whiten=True, random_state=seed).fit_transform(x)
        entry = {}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ma, mb = tags[m] == a, tags[m] == b
                pair = {"counts": {a: int(ma.sum()), b: int(mb.sum())},
                        "pca_auc": _r(probe_auc(z[ma], z[mb], seed))}
                if feats is not None:
                    pair["classifier_auc"] = _r(probe_auc(feats[m][ma], feats[m][mb], seed))
                aucs = [v for k, v in pair.items() if k.endswith("_auc") and v is not None]
                pair["verdict"] = probe_verdict(max(aucs, default=None))
                entry[f"{a} vs {b}"] = pair
        out["classes"][c] = entry
    if not out["classes"]:
        raise InputError(f"{folder}: no class holds images from two sources")
    return out


@torch.no_grad()
def classifier_features(model: torch.nn.Module, images: np.ndarray, device: torch.device,
                        batch_size: int) -> np.ndarray:
    """The ResNet's global-average-pooled features (the input to its last layer)."""
    from xraygan.classifier import to_input

    fc, model.fc = model.fc, torch.nn.Identity()
    try:
        out = [model(to_input(torch.from_numpy(images[s:s + batch_size]).to(device))).float().cpu()
               for s in range(0, len(images), batch_size)]
    finally:
        model.fc = fc
    return torch.cat(out).numpy()


def cache_dir(cfg: AuditConfig) -> Path | None:
    """The feature cache: opt-in (--cache or $XRAYGAN_CACHE), so by default nothing is written
    outside --out."""
    if cfg.cache is not None:
        return Path(cfg.cache)
    env = os.environ.get("XRAYGAN_CACHE")
    return Path(env) if env else None


def folder_key(folder: ImageFolder) -> str:
    """Changes when any file of the folder is added, removed, renamed or rewritten."""
    h = hashlib.sha256()
    for f in folder.files:
        st = f.stat()
        h.update(f"{f.parent.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


class FeatureCache:
    """Classifier features per (folder contents, checkpoint), as .npy files in the cache folder."""

    def __init__(self, root: Path | None):
        self.root, self.hits, self.misses = (Path(root) if root else None), 0, 0

    def get(self, key: str, compute) -> np.ndarray:
        if self.root is None:
            self.misses += 1
            return compute()
        path = self.root / f"features-{key}.npy"
        if path.is_file():
            try:
                self.hits += 1
                return np.load(path)
            except (OSError, ValueError):
                self.hits -= 1  # a damaged cache file is recomputed
        self.misses += 1
        arr = compute()
        buf = io.BytesIO()
        np.save(buf, arr)
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError:
            pass  # an unwritable cache only costs time
        return arr


def feature_classifier(cfg: AuditConfig, real: ImageFolder, device: torch.device, progress,
                       scratch: Path) -> tuple[Path | None, str]:
    """The checkpoint whose features are used, and a note on where it came from."""
    if cfg.classifier == "none":
        return None, "classifier space skipped (--classifier none)"
    if cfg.classifier != "auto":
        return Path(cfg.classifier), f"user's classifier {cfg.classifier}"
    if len(real.classes) < 2:
        return None, "classifier space skipped: --real has one class, nothing to train a classifier on"
    from xraygan.classifier import TrainClassifierConfig, train_classifier

    cache = cache_dir(cfg)
    path = (cache or scratch) / f"audit-classifier-{folder_key(real)}-s{cfg.seed}" / "classifier.safetensors"
    if not path.is_file():
        train_classifier(TrainClassifierConfig(
            data=cfg.real, val=cfg.real, val_is_train=True, out=path.parent, epochs=3, patience=0, small_stem="no",
            seed=cfg.seed, device=cfg.device, force=True), progress)
    return path, (f"a ResNet-18 trained here for 3 epochs on {cfg.real} (standard stem; saved as "
                  f"{FEATURE_CLASSIFIER} in the audit folder" + (f", cached in {path.parent}" if cache else "")
                  + ")")


FEATURE_CLASSIFIER = "feature-classifier.safetensors"


# --- the audit ---------------------------------------------------------------------------------


def is_done(out: Path) -> bool:
    """Whether `out` holds a finished xraygan audit (its own record says so)."""
    return has_record(out, "audit")


def audit(cfg: AuditConfig, progress=None) -> dict:

    t0 = time.perf_counter()
    if not 0.5 <= cfg.copy_quantile < 1.0:
        raise InputError(f"--copy-quantile {cfg.copy_quantile}: must be in [0.5, 1)")
    check_int("--k", cfg.k)
    check_int("--pca-components", cfg.pca_components)
    check_int("--review", cfg.review, 0)
    check_int("--batch-size", cfg.batch_size)
    if cfg.copy_threshold is not None:
        check_float("--copy-threshold", cfg.copy_threshold, -1.0, 1.0, low_open=False)
    check_choice("--device", cfg.device, DEVICES)
    clf = Path(cfg.classifier) if cfg.classifier not in ("auto", "none") else None
    if clf is not None and not clf.is_file():
        raise InputError(f"--classifier {clf}: file not found (or give auto or none)")
    check_out_apart(cfg.out, real=cfg.real, synthetic=cfg.synthetic, classifier=clf, cache=cache_dir(cfg))
    check_output_free(Path(cfg.out), cfg.force, "audit")
    with tempfile.TemporaryDirectory(prefix="xraygan-audit-") as scratch:
        return _audit(cfg, t0, Path(scratch), progress)


def _space_metrics(fr: np.ndarray, fs: np.ndarray, cfg: AuditConfig, rng: np.random.Generator) -> dict:
    """Realism and diversity of synthetic features `fs` against real features `fr` in one space."""
    k_mean, k_std = kid(fr, fs, cfg.kid_subsets, cfg.kid_subset_size, rng)
    mean_term, spread = fd_parts(fr, fs)
    return {"dims": int(fr.shape[1]), "fd": _r(frechet_distance(fr, fs)),
            "fd_mean_term": _r(mean_term), "spread_ratio": _r(spread),
            "kid": _r(k_mean), "kid_std": _r(k_std),
            **{k: _r(v) for k, v in prdc(fr, fs, cfg.k).items()},
            # a GAN's artefacts are a source too: can a linear model spot them?
            "real_vs_synthetic_auc": _r(probe_auc(fr, fs, cfg.seed))}


def _nearest_real(s_img: np.ndarray, r_img: np.ndarray, cfg: AuditConfig, c: str):
    """Each synthetic image's nearest real image by correlation, the real images' nearest other
    real image (the baseline), and the copy threshold: (s_sim, s_idx, r_sim, threshold)."""
    s_sim, s_idx = nearest_correlation(s_img, r_img)
    r_sim, _ = nearest_correlation(r_img, r_img, exclude_self=True)
    r_sim = r_sim[r_sim > -2]  # a real image with no other non-duplicate has no baseline
    if cfg.copy_threshold is not None:
        thr = float(cfg.copy_threshold)
    elif len(r_sim):
        thr = float(np.quantile(r_sim, cfg.copy_quantile))
    else:
        raise InputError(f"{Path(cfg.real) / c}: needs at least two distinct real images for "
                         "the memorisation baseline (or give --copy-threshold)")
    return s_sim, s_idx, r_sim, thr


def _audit(cfg: AuditConfig, t0: float, scratch: Path, progress) -> dict:
    from xraygan.classifier import inference_batch, load_classifier
    from xraygan.runtime import resolve_device

    real = read_image_folder(cfg.real)
    synth = read_image_folder(cfg.synthetic)
    missing = [c for c in synth.classes if c not in real.classes]
    if missing:
        raise InputError(f"{cfg.synthetic}: class folder(s) {', '.join(missing)} have no match in "
                         f"{cfg.real} (real classes: {', '.join(real.classes)})")
    if synth.size != real.size:
        raise InputError(f"{cfg.synthetic}: images are {synth.size} px, the real images in "
                         f"{cfg.real} are {real.size} px")
    device = resolve_device(cfg.device)
    ckpt, clf_note = feature_classifier(cfg, real, device, progress, scratch)
    feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    cache = FeatureCache(cache_dir(cfg))
    if ckpt is not None:
        model, meta = load_classifier(ckpt, device)
        if int(meta["image_size"]) != real.size:
            raise InputError(f"{ckpt}: classifier was trained on {meta['image_size']} px images, "
                             f"the audited images are {real.size} px")
        sha = file_sha256(ckpt)[:16]
        batch = inference_batch(meta, device, cfg.batch_size)
        feats["classifier"] = tuple(
            cache.get(f"{folder_key(f)}-{sha}", lambda f=f: classifier_features(model, f.images, device, batch))
            for f in (real, synth))
    rng = np.random.default_rng(cfg.seed)
    classes: dict[str, dict] = {}
    flagged: dict[str, list[str]] = {}
    pairs: dict[str, list[tuple[int, int, float]]] = {}
    hists: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    sets: dict[str, tuple] = {}  # class → (synthetic images, real images, their files), for the outputs
    for ci, c in enumerate(synth.classes):
        if progress:
            progress("audit", ci, len(synth.classes))
        rmask = real.labels == real.classes.index(c)
        smask = synth.labels == ci
        r_img, s_img = real.images[rmask], synth.images[smask]
        r_files = [f for f, m in zip(real.files, rmask) if m]
        s_files = [f for f, m in zip(synth.files, smask) if m]
        sets[c] = (s_img, r_img, s_files, r_files)
        spaces: dict[str, dict] = {}
        space_feats = {"pca": pca_space(r_img, s_img, cfg.pca_components, cfg.seed)}
        if "classifier" in feats:
            space_feats = {"classifier": (feats["classifier"][0][rmask], feats["classifier"][1][smask]),
                           **space_feats}
        for name, (fr, fs) in space_feats.items():
            spaces[name] = _space_metrics(fr, fs, cfg, rng)
        s_sim, s_idx, r_sim, thr = _nearest_real(s_img, r_img, cfg, c)
        flag = np.flatnonzero(s_sim >= thr)
        flagged[c] = [s_files[i].name for i in flag[np.argsort(-s_sim[flag])]]
        order = np.argsort(-s_sim)
        pairs[c] = [(int(i), int(s_idx[i]), float(s_sim[i])) for i in order]
        hists[c] = (s_sim, r_sim, thr)
        classes[c] = {
            "real": int(rmask.sum()), "synthetic": int(smask.sum()), "spaces": spaces,
            "memorisation": {
                "nearest_real_correlation": _quantiles(s_sim),
                "real_to_real_correlation": _quantiles(r_sim),
                "threshold": _r(thr),
                "threshold_rule": (f"--copy-threshold {cfg.copy_threshold}" if cfg.copy_threshold is not None
                                   else f"{cfg.copy_quantile:g} quantile of real-to-real nearest-neighbour correlation"),
                "flagged": len(flag),
                "flagged_share": _r(len(flag) / max(1, len(s_sim))),
            },
        }
    if progress:
        progress("audit", len(synth.classes), len(synth.classes))
    rec = {
        **record_header("audit"), "real": str(cfg.real),
        "synthetic": str(cfg.synthetic), "image_size": real.size,
        "feature_classifier": (FEATURE_CLASSIFIER if cfg.classifier == "auto" else str(ckpt)) if ckpt else None, "feature_classifier_note": clf_note,
        "k": cfg.k, "classes": classes, "flagged": flagged,
        "cache": {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses},
        "xraygan_version": __version__,
    }
    with staged_dir(Path(cfg.out), cfg.force, "audit") as tmp:
        if ckpt is not None and cfg.classifier == "auto":  # keep what the features came from
            shutil.copyfile(ckpt, tmp / FEATURE_CLASSIFIER)
        plots = {}
        for c, (s_img, r_img, s_files, r_files) in sets.items():
            for i, j, s in pairs[c][:len(flagged[c])]:
                atomic_write_bytes(tmp / "flagged" / c / f"{s_files[i].stem}__{r_files[j].stem}.png",
                                   _side_by_side(s_img[i], r_img[j]))
            plots[c] = {"similarity": f"similarity_{c}.png", "nearest": f"nearest_{c}.png"}
            atomic_write_bytes(tmp / plots[c]["similarity"], _hist_png(*hists[c], c))
            atomic_write_bytes(tmp / plots[c]["nearest"], _pairs_png(s_img, r_img, pairs[c][:8], c))
        if cfg.review > 0:
            rec["review"] = write_review(tmp, real, synth, cfg.review, cfg.seed)
        atomic_write_json(tmp / "audit.json", rec)
        atomic_write_text(tmp / "report.md", audit_markdown(rec, plots))
    rec["out"] = str(cfg.out)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def _r(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 5)


def _quantiles(v: np.ndarray) -> dict:
    if not len(v):
        return {"n": 0}
    q = np.quantile(v, [0.5, 0.9, 0.99])
    return {"n": int(len(v)), "median": _r(q[0]), "p90": _r(q[1]), "p99": _r(q[2]), "max": _r(v.max())}


# --- pictures ----------------------------------------------------------------------------------


def _side_by_side(s: np.ndarray, r: np.ndarray) -> bytes:
    scale = max(1, 128 // s.shape[0])
    gap = np.full((s.shape[0], 2), 255, np.uint8)
    return encode_png(np.kron(np.concatenate([s, gap, r], 1), np.ones((scale, scale), np.uint8)))


def _hist_png(s_sim: np.ndarray, r_sim: np.ndarray, thr: float, cls: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    lo = float(min(s_sim.min(), r_sim.min() if len(r_sim) else 1.0))
    bins = np.linspace(lo, 1.0, 40)
    ax.hist(r_sim, bins=bins, alpha=0.6, density=True, label="real → nearest other real")
    ax.hist(s_sim, bins=bins, alpha=0.6, density=True, label="synthetic → nearest real")
    ax.axvline(thr, c="red", ls="--", lw=1, label=f"near-copy threshold {thr:.3f}")
    ax.set(xlabel="pixel correlation with nearest training image", ylabel="density",
           title=f"memorisation check: {cls}")
    ax.legend(fontsize=7)
    return fig_png(fig)


def _pairs_png(s_img: np.ndarray, r_img: np.ndarray, pairs: list, cls: str) -> bytes:
    plt = pyplot()
    n = max(1, len(pairs))
    fig, axes = plt.subplots(2, n, figsize=(1.5 * n, 3.3), squeeze=False)
    for j in range(n):
        for r in range(2):
            axes[r, j].axis("off")
        if j >= len(pairs):
            continue
        i, k, s = pairs[j]
        axes[0, j].imshow(s_img[i], cmap="gray", vmin=0, vmax=255)
        axes[0, j].set_title(f"synthetic\ncorr {s:.3f}", fontsize=7)
        axes[1, j].imshow(r_img[k], cmap="gray", vmin=0, vmax=255)
        axes[1, j].set_title("nearest real", fontsize=7)
    fig.suptitle(f"{cls}: the synthetic images closest to a training image", fontsize=9)
    return fig_png(fig)


# --- the blinded review ------------------------------------------------------------------------


def write_review(out: Path, real: ImageFolder, synth: ImageFolder, n: int, seed: int) -> dict:
    """review/: shuffled real and synthetic images under neutral ids, a contact sheet, an HTML
    page and a CSV to fill in. The answer key goes to review_key.json beside review/, so the
    review folder can be handed to a reviewer without it."""
    rng = np.random.default_rng(seed + 7)
    per_class = max(1, n // (2 * len(synth.classes)))
    items = []
    for c in synth.classes:
        for truth, folder in (("real", real), ("synthetic", synth)):
            idx = np.flatnonzero(folder.labels == folder.classes.index(c))
            for i in rng.permutation(idx)[:per_class]:
                items.append((truth, c, folder, int(i)))
    order = rng.permutation(len(items))
    key, rows = {}, []
    view = max(256, synth.size)
    for k, o in enumerate(order, 1):
        truth, c, folder, i = items[o]
        rid = f"IMG{k:03d}"
        key[rid] = {"truth": truth, "class": c, "file": str(folder.files[i])}
        big = Image.fromarray(folder.images[i]).resize((view, view), Image.BICUBIC)
        atomic_write_bytes(out / "review" / "images" / f"{rid}.png", encode_png(np.asarray(big)))
        rows.append(rid)
    write_csv(out / "review" / "review.csv", ["id", "guess", "quality", "comment"],
              [[rid, "", "", ""] for rid in rows])
    cells = "\n".join(f'<figure><img src="images/{r}.png" width="256"><figcaption>{html.escape(r)}'
                      f"</figcaption></figure>" for r in rows)
    atomic_write_text(out / "review" / "sheet.html", (
        "<!doctype html><meta charset=utf-8><title>xraygan blinded review</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px}</style>"
        "<h1>Blinded review</h1><p>For each image, write in review.csv: <b>guess</b> = real or "
        "synthetic, <b>quality</b> = 1 (unusable) to 5 (diagnostic quality), optional comment. "
        f"{len(rows)} images, shuffled.</p>\n{cells}\n"))
    atomic_write_bytes(out / "review" / "sheet.png", _contact_sheet([items[o] for o in order], rows))
    atomic_write_json(out / "review_key.json", {**record_header("review-key"), "items": key})
    return {"images": len(rows), "sheet": "review/sheet.html", "csv": "review/review.csv",
            "key": "review_key.json"}


def _contact_sheet(items: list, ids: list[str]) -> bytes:
    plt = pyplot()
    cols = 8
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.55 * rows), squeeze=False)
    for a in axes.flat:
        a.axis("off")
    for a, (truth, c, folder, i), rid in zip(axes.flat, items, ids):
        a.imshow(folder.images[i], cmap="gray", vmin=0, vmax=255)
        a.set_title(rid, fontsize=7)
    return fig_png(fig)


def _read_key(csv_path: Path, key_path: Path | None) -> tuple[Path, dict]:
    key_path = Path(key_path) if key_path else Path(csv_path).parent.parent / "review_key.json"
    key = read_json(key_path)
    if not isinstance(key, dict) or key.get("kind") != "xraygan-review-key":
        raise InputError(f"{key_path}: not a review key written by xraygan audit")
    return key_path, key["items"]


_GUESS = {"real": "real", "r": "real", "synthetic": "synthetic", "synth": "synthetic",
          "s": "synthetic", "fake": "synthetic", "f": "synthetic"}


def read_sheet(csv_path: Path, items: dict, key_path: Path) -> tuple[dict[str, tuple[str, float | None]], int]:
    """A filled review sheet: id → (guess, quality or None) for the answered rows, and the blank count."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: review sheet not found")
    try:  # utf-8-sig: a sheet saved by Excel starts with a byte-order mark
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{csv_path}: not UTF-8 text (byte {e.start}); save the sheet as "
                         "CSV UTF-8") from None
    if "\0" in text:
        raise InputError(f"{csv_path}: not a text file")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "id" not in reader.fieldnames or "guess" not in reader.fieldnames:
        raise InputError(f"{csv_path}: expected columns id, guess, quality, comment")
    out: dict[str, tuple[str, float | None]] = {}
    seen: set[str] = set()
    blank = 0
    for line, row in enumerate(reader, 2):
        rid = (row.get("id") or "").strip()
        if rid not in items:
            raise InputError(f"{csv_path}:{line}: unknown id '{rid}' (not in {key_path})")
        if rid in seen:
            raise InputError(f"{csv_path}:{line}: id '{rid}' appears twice")
        seen.add(rid)
        g = (row.get("guess") or "").strip().lower()
        if not g:
            blank += 1
            continue
        if g not in _GUESS:
            raise InputError(f"{csv_path}:{line}: guess '{g}' must be real or synthetic")
        q = (row.get("quality") or "").strip()
        qv = None
        if q:
            try:
                qv = float(q)
            except ValueError:
                raise InputError(f"{csv_path}:{line}: quality '{q}' is not a number") from None
            if not 1 <= qv <= 5:
                raise InputError(f"{csv_path}:{line}: quality {q} must be between 1 and 5")
        out[rid] = (_GUESS[g], qv)
    return out, blank


def _score(answers: list[tuple[str, str, float | None]]) -> dict:
    """(truth, guess, quality) triples → the visual Turing test's figures."""
    from scipy.stats import binomtest

    n = len(answers)
    correct = sum(t == g for t, g, _ in answers)
    syn = [g for t, g, _ in answers if t == "synthetic"]
    rea = [g for t, g, _ in answers if t == "real"]
    p = binomtest(correct, n, 0.5).pvalue
    quality = {t: [q for tt, _, q in answers if tt == t and q is not None] for t in ("real", "synthetic")}
    return {
        "answered": n, "accuracy": round(correct / n, 4), "p_value": round(float(p), 5),
        "synthetic_spotted": round(sum(g == "synthetic" for g in syn) / len(syn), 4) if syn else None,
        "real_recognised": round(sum(g == "real" for g in rea) / len(rea), 4) if rea else None,
        "mean_quality": {t: (round(float(np.mean(v)), 3) if v else None) for t, v in quality.items()},
        "verdict": "better than chance (p < 0.05)" if p < 0.05 else "not better than chance (p >= 0.05)",
    }


@dataclass(frozen=True)
class ScoreReviewConfig:
    sheets: tuple[Path, ...] = opt(help="Filled review sheets: AUDIT/review/review.csv, the <reader>.csv files "
                                        "`xraygan review` writes, or the review/ folder for all of them.",
                                   argument=True)
    key: Path | None = opt(None, "The answer key (default: review_key.json in the audit folder above the sheets).")

    @property
    def one_sheet(self) -> bool:
        """One sheet file: the single-reader summary; else every reader, pooled, with agreement."""
        return len(self.sheets) == 1 and not Path(self.sheets[0]).is_dir()


def run_score_review(cfg: ScoreReviewConfig, progress=None) -> dict:
    """`xraygan score-review`: one sheet scored alone, or several readers' (`score_readers`)."""
    if cfg.one_sheet:
        return score_review(cfg.sheets[0], cfg.key)
    return score_readers(list(cfg.sheets), cfg.key)


def score_review(csv_path: Path, key_path: Path | None = None) -> dict:
    """Turn a filled review.csv into a visual Turing test: can the reviewer tell synthetic from
    real better than chance (two-sided binomial test against 0.5)?"""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: review sheet not found")
    key_path, items = _read_key(csv_path, key_path)
    answers, blank = read_sheet(csv_path, items, key_path)
    if not answers:
        raise InputError(f"{csv_path}: no guesses filled in yet")
    res = {**_score([(items[r]["truth"], g, q) for r, (g, q) in answers.items()]), "blank": blank}
    res["verdict"] = ("the reviewer told synthetic from real better than chance (p < 0.05)" if res["p_value"] < 0.05
                      else "no evidence the reviewer could tell synthetic from real (p >= 0.05)")
    atomic_write_json(csv_path.with_name("review_score.json"), res)
    res["written"] = str(csv_path.with_name("review_score.json"))
    return res


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's κ of two readers' labels on the same items (None when chance agreement is total)."""
    n = len(a)
    cats = sorted(set(a) | set(b))
    po = sum(x == y for x, y in zip(a, b)) / n
    pe = sum((a.count(c) / n) * (b.count(c) / n) for c in cats)
    return None if pe >= 1 else (po - pe) / (1 - pe)


def fleiss_kappa(labels: list[list[str]]) -> float | None:
    """Fleiss' κ: `labels[i]` are the m readers' labels of item i (m ≥ 2, the same m for all)."""
    m, n = len(labels[0]), len(labels)
    cats = sorted({c for row in labels for c in row})
    counts = np.array([[row.count(c) for c in cats] for row in labels], dtype=float)
    p_item = ((counts ** 2).sum(1) - m) / (m * (m - 1))
    p_cat = counts.sum(0) / (n * m)
    pe = float((p_cat ** 2).sum())
    return None if pe >= 1 else float((p_item.mean() - pe) / (1 - pe))


def score_readers(csv_paths: list[Path], key_path: Path | None = None) -> dict:
    """Several readers' sheets (`xraygan review` writes `review/<reader>.csv`): each scored, all
    pooled, and their agreement on real/synthetic (Cohen's κ for two, Fleiss' κ for more, over the
    images every reader answered). The table goes into the audit's report.md."""
    paths = []
    for p in map(Path, csv_paths):
        if p.is_dir():  # a review/ folder: every reader's sheet in it, not the blank one
            found = sorted(f for f in p.glob("*.csv") if f.name != "review.csv")
            if not found:
                raise InputError(f"{p}: no reader sheets (<reader>.csv) in this folder")
            paths += found
        else:
            paths.append(p)
    if not paths:
        raise InputError("score-review: give a filled sheet, or the review/ folder")
    key_path, items = _read_key(paths[0], key_path)
    sheets = {}
    for p in paths:
        answers, blank = read_sheet(p, items, key_path)
        if not answers:
            raise InputError(f"{p}: no guesses filled in yet")
        name = p.stem if p.stem != "review" else p.parent.parent.name
        if name in sheets:
            raise InputError(f"{p}: a second sheet for reader {name}")
        sheets[name] = (answers, blank, p)
    readers = {n: {**_score([(items[r]["truth"], g, q) for r, (g, q) in a.items()]), "blank": b, "sheet": str(p)}
               for n, (a, b, p) in sheets.items()}
    pooled = _score([(items[r]["truth"], g, q) for a, _, _ in sheets.values() for r, (g, q) in a.items()])
    common = sorted(set.intersection(*(set(a) for a, _, _ in sheets.values())))
    agreement = None
    if len(sheets) >= 2 and common:
        rows = [[a[r][0] for a, _, _ in sheets.values()] for r in common]
        kappa = (cohen_kappa([x[0] for x in rows], [x[1] for x in rows]) if len(sheets) == 2
                 else fleiss_kappa(rows))
        agreement = {"statistic": "cohen_kappa" if len(sheets) == 2 else "fleiss_kappa",
                     "kappa": None if kappa is None else round(kappa, 4), "images": len(common)}
    res = {**record_header("review-score"), "readers": readers, "pooled": pooled, "agreement": agreement,
           "key": str(key_path)}
    audit_dir = key_path.parent
    atomic_write_json(audit_dir / "review" / "readers_score.json", res)
    report = audit_dir / "report.md"
    if report.is_file():
        atomic_write_text(report, _with_reader_section(report.read_text(encoding="utf-8"), readers_markdown(res)))
    res["written"] = str(audit_dir / "review" / "readers_score.json")
    return res


def readers_markdown(res: dict) -> str:
    lines = ["## Reader study", "",
             "| reader | answered | accuracy | p (vs chance) | synthetic spotted | real recognised | "
             "realism, real | realism, synthetic |", "|---|---|---|---|---|---|---|---|"]

    def row(name: str, s: dict) -> str:
        q = s["mean_quality"]
        f = (lambda v: "n/a" if v is None else f"{v:.2f}")
        return (f"| {name} | {s['answered']} | {s['accuracy']:.3f} | {s['p_value']:.3g} | {f(s['synthetic_spotted'])} | "
                f"{f(s['real_recognised'])} | {f(q['real'])} | {f(q['synthetic'])} |")

    lines += [row(n, s) for n, s in res["readers"].items()]
    if len(res["readers"]) > 1:
        lines.append(row("**pooled**", res["pooled"]))
    ag = res["agreement"]
    lines += [""]
    if ag:
        name = "Cohen's κ" if ag["statistic"] == "cohen_kappa" else "Fleiss' κ"
        kappa = "n/a" if ag["kappa"] is None else f"{ag['kappa']:.3f}"
        lines.append(f"Agreement on real/synthetic: {name} = {kappa} over the {ag['images']} images every "
                     "reader answered.")
    lines += ["The pooled p-value treats every answer as independent; readers are not, so read it "
              "with the per-reader rows.", ""]
    return "\n".join(lines)


def _with_reader_section(text: str, section: str) -> str:
    """report.md with its reader-study section replaced (or added at the end)."""
    start = text.find("## Reader study")
    if start < 0:
        return text.rstrip("\n") + "\n\n" + section
    nxt = text.find("\n## ", start + 1)
    return text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")


# --- report ------------------------------------------------------------------------------------


def audit_markdown(rec: dict, plots: dict) -> str:
    lines = [f"# Synthetic-image audit: `{rec['synthetic']}` against `{rec['real']}`", "",
             f"Feature classifier: {rec['feature_classifier_note']}. k = {rec['k']} neighbours.", ""]
    for c, d in rec["classes"].items():
        m = d["memorisation"]
        lines += [f"## {c}: {d['real']} real, {d['synthetic']} synthetic", "",
                  "| space | dims | FD | of which mean | spread | KID | precision | recall | density | coverage |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s, v in d["spaces"].items():
            lines.append(f"| {s} | {v['dims']} | {_f(v['fd'])} | {_f(v.get('fd_mean_term'))} | "
                         f"{_f(v.get('spread_ratio'))} | {_f(v['kid'])} ± {_f(v['kid_std'])} | "
                         f"{_f(v['precision'])} | {_f(v['recall'])} | {_f(v['density'])} | {_f(v['coverage'])} |")
        nr, rr = m["nearest_real_correlation"], m["real_to_real_correlation"]
        lines += ["", f"Memorisation: median correlation of a synthetic image with its nearest training "
                  f"image {_f(nr.get('median'))} (max {_f(nr.get('max'))}); real images with their nearest "
                  f"other real image: median {_f(rr.get('median'))}. Threshold {_f(m['threshold'])} "
                  f"({m['threshold_rule']}): **{m['flagged']} flagged** as near-copies "
                  f"(side by side in `flagged/{c}/`).", "",
                  f"![similarity]({plots[c]['similarity']})", "", f"![nearest]({plots[c]['nearest']})", ""]
    if "review" in rec:
        lines += ["## Blinded review", "", f"`review/sheet.html` (and `sheet.png`) show {rec['review']['images']} "
                  "shuffled images; the reviewer fills `review/review.csv`; then "
                  "`xraygan score-review review/review.csv` scores it against `review_key.json` "
                  "(keep the key away from the reviewer).", ""]
    lines += ["## Caveats", "",
              "- FD is biased upwards for small sets and depends on the feature space: compare figures "
              "only between audits with the same real folder, space and similar set sizes.",
              "- FD = mean term + covariance term. \"Of which mean\" is ||μ_real − μ_synthetic||²: a large "
              "share means the synthetic set is displaced (e.g. more extreme along what the classifier "
              "sees) rather than too narrow; \"spread\" is Tr Σ_synthetic / Tr Σ_real, below 1 for a set "
              "less varied than the real one.",
              "- The classifier space sees what a classifier trained on these classes finds useful; it can "
              "miss defects that do not affect the diagnosis. The PCA space sees global intensity structure, "
              "not fine texture. Neither replaces a radiologist's review.",
              "- Precision/recall and density/coverage by k-NN are sensitive to k and to outliers.",
              "- The memorisation check finds near pixel-for-pixel copies; a shifted, flipped or re-contrasted "
              "copy of a training image can correlate less and escape it.", ""]
    return "\n".join(lines)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"
