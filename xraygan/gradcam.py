"""`xraygan gradcam`: what the classifier looks at, as pictures and as one number.

Grad-CAM (Selvaraju et al. 2017): the chosen layer's activations A_k are weighted by the spatial
mean of d(class score)/dA_k, summed over channels and passed through a ReLU, then upsampled to the
image. The study read its maps as "not learning features inside the chest cavity"; here that is
measured: for every test image, the share of CAM energy (the sum of the upsampled map) that falls
inside the lung fields, from the user's lung masks or else from a fixed central chest region. A
uniform map scores the region's area fraction, so the report also gives that baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraygan import __version__
from xraygan.errors import InputError
from xraygan.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    check_out_apart,
    check_output_free,
    has_record,
    record_header,
    staged_dir,
    write_csv,
)
from xraygan.images import ImageFolder, encode_png, is_image_name, load_gray
from xraygan.options import DEVICE_HELP, opt

# The central chest region used when no masks are given: an ellipse centred at (cx, cy) with
# semi-axes (rx, ry), in fractions of the image side. It is a crude proxy for the lung fields of a
# centred frontal chest X-ray (it includes the mediastinum and excludes the corners, shoulders,
# neck and abdomen), not a segmentation. Users with lung masks should pass --masks.
CHEST_ELLIPSE = (0.5, 0.48, 0.40, 0.38)


@dataclass(frozen=True)
class GradcamConfig:
    checkpoint: Path = opt(help="CLF/classifier.safetensors", argument=True)
    data: Path = opt(help="Image folder, e.g. DATA/test.", argument=True)
    out: Path = opt(help="Output folder.", flags=("--out", "-o"))
    n: int = opt(8, "Overlays per class (up to half misclassified).", flags=("-n",))
    layer: str = opt("auto", "Layer to explain: auto (layer4, the last residual block, unless its map is "
                             "under 4x4), or a module name such as layer3 or layer4.1.conv2.")
    target: str = opt("predicted", "Class to explain: predicted, true or positive.")
    masks: Path | None = opt(None, "Lung masks (MASKS/<class>/<name>.png or MASKS/<name>.png, lungs white) "
                                   "for the CAM-energy-in-lungs figure; default: a central chest ellipse.")
    label: str | None = opt(None, "Model label in the summary (default: run folder name).")
    seed: int = opt(0, "Seed for picking the images shown.")
    device: str = opt("auto", DEVICE_HELP)
    # 32: on two cores as fast as 128 or faster and much lighter (224 px: 24 s, 2.4 GB vs 44 s,
    # 6.5 GB; 128 px: 12.8 s vs 15.4 s; 32 px: 6.5 vs 6.9 s), with the same CAMs and gradcam.json
    batch_size: int = 32
    force: bool = opt(False, "Replace an existing output folder.")

class GradCam:
    """Grad-CAM on one layer of a model. Use as a context manager: the forward hook that keeps the
    layer's output is removed on exit, also when an error is raised inside."""

    def __init__(self, model: nn.Module, layer: nn.Module):
        self.model, self.layer = model, layer
        self._handle = None
        self._acts: torch.Tensor | None = None

    def __enter__(self) -> GradCam:
        self._handle = self.layer.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._acts = None

    def _keep(self, module, inputs, output) -> None:
        self._acts = output

    def __call__(self, x: torch.Tensor, target: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """CAMs (N, h, w) at the layer's resolution (≥ 0) and the logits, for class `target`
        (default: the predicted class)."""
        if self._handle is None:
            raise RuntimeError("GradCam must be used inside a `with` block")
        with torch.enable_grad():
            logits = self.model(x)
            acts = self._acts
            idx = logits.argmax(1) if target is None else target
            chosen = logits.gather(1, idx[:, None]).sum()
            grads, = torch.autograd.grad(chosen, acts)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cams = F.relu((weights * acts).sum(1))
        return cams.detach(), logits.detach()


def layer_sizes(model: nn.Module, image_size: int, device: torch.device) -> dict[str, int]:
    """Output side length of each residual stage (layer1..layer4) for this image size."""
    sizes: dict[str, int] = {}
    hooks = [getattr(model, n).register_forward_hook(
        lambda m, i, o, n=n: sizes.__setitem__(n, int(o.shape[-1])))
        for n in ("layer1", "layer2", "layer3", "layer4")]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def resolve_layer(model: nn.Module, name: str, image_size: int, device: torch.device
                  ) -> tuple[str, nn.Module, int]:
    """`auto` is the last residual block (layer4), unless its map is smaller than 4×4 (small images
    with the standard stem), where a CAM cannot localise anything: then the deepest stage whose
    map is at least 4×4."""
    sizes = layer_sizes(model, image_size, device)
    if name == "auto":
        name = next((n for n in ("layer4", "layer3", "layer2", "layer1") if sizes[n] >= 4), "layer1")
    if not name.strip():
        raise InputError("--layer '': give a layer name such as layer4, layer3 or layer4.1.conv2")
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise InputError(f"--layer {name}: no such layer (try layer4, layer3, layer4.1.conv2, ...)") from None
    shape: list = []
    h = layer.register_forward_hook(lambda m, i, o: shape.append(tuple(getattr(o, "shape", ()))))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, image_size, image_size, device=device))
    finally:
        h.remove()
    if not shape or len(shape[0]) != 4:
        raise InputError(f"--layer {name}: its output is not a feature map (shape {shape[0] if shape else 'none'}); "
                         "Grad-CAM needs a convolutional layer such as layer4 or layer3")
    if min(shape[0][-2:]) < 2:
        raise InputError(f"--layer {name}: its map is {shape[0][-2]}x{shape[0][-1]} at {image_size} px, "
                         "where a CAM is a constant; choose an earlier layer (e.g. layer3)")
    return name, layer, int(shape[0][-1])


def chest_region(size: int) -> np.ndarray:
    cx, cy, rx, ry = CHEST_ELLIPSE
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def load_masks(mask_dir: Path, folder: ImageFolder) -> np.ndarray:
    """One boolean lung mask per image, found as MASKS/<class>/<stem>.* or MASKS/<stem>.*."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise InputError(f"{mask_dir}: mask folder not found")
    index: dict[str, Path] = {}
    for p in sorted(mask_dir.rglob("*")):
        if p.is_file() and is_image_name(p):
            rel = p.relative_to(mask_dir)
            index.setdefault(str(rel.with_suffix("")), p)
            index.setdefault(p.stem, p)
    out = np.zeros((len(folder.files),) + folder.images.shape[1:], dtype=bool)
    for i, (f, y) in enumerate(zip(folder.files, folder.labels)):
        p = index.get(f"{folder.classes[y]}/{f.stem}") or index.get(f.stem)
        if p is None:
            raise InputError(f"{mask_dir}: no lung mask for {folder.classes[y]}/{f.name} "
                             f"(expected {mask_dir}/{folder.classes[y]}/{f.stem}.png)")
        try:
            m = load_gray(p, folder.size)
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{p}: cannot read lung mask ({e})") from None
        out[i] = m >= 128
        if not out[i].any():
            raise InputError(f"{p}: lung mask is empty (lungs must be white, >= 128)")
    return out


def upsample(cams: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(cams[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def energy_share(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each CAM's total inside its mask; NaN where the CAM is all zero."""
    total = cams.reshape(len(cams), -1).sum(1)
    inside = (cams * masks).reshape(len(cams), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def overlay(gray: np.ndarray, cam: np.ndarray, scale: int) -> np.ndarray:
    """X-ray | CAM overlay side by side, RGB uint8, each upscaled `scale`×."""
    from xraygan.plots import colormap

    c = cam / cam.max() if cam.max() > 0 else cam
    g = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    heat = colormap("jet")(c)[..., :3]
    mix = 0.55 * g + 0.45 * heat
    pair = np.concatenate([g, mix], axis=1)
    pair = np.kron(pair, np.ones((scale, scale, 1)))
    return (np.clip(pair, 0, 1) * 255).astype(np.uint8)


def pick(correct: np.ndarray, labels: np.ndarray, cls: int, n: int, rng: np.random.Generator) -> list[int]:
    """Up to n images of a class: up to half misclassified (where there are any), the rest correct."""
    idx = np.flatnonzero(labels == cls)
    wrong = rng.permutation(idx[~correct[idx]])
    right = rng.permutation(idx[correct[idx]])
    k = min(len(wrong), n // 2)
    chosen = list(wrong[:k]) + list(right[:n - k])
    if len(chosen) < n:
        chosen += list(wrong[k:k + n - len(chosen)])
    return [int(i) for i in chosen]


def is_done(out: Path) -> bool:
    """Whether `out` holds a finished xraygan gradcam (its own record says so)."""
    return has_record(out, "gradcam")


def gradcam(cfg: GradcamConfig, progress=None) -> dict:
    from xraygan.classifier import inference_batch, load_classifier, to_input
    from xraygan.evaluate import read_for_model, run_label
    from xraygan.runtime import resolve_device

    t0 = time.perf_counter()
    if cfg.n < 1:
        raise InputError(f"-n {cfg.n}: must be at least 1")
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size {cfg.batch_size}: must be at least 1")
    if cfg.target not in ("predicted", "true", "positive"):
        raise InputError(f"--target {cfg.target}: must be predicted, true or positive")
    check_out_apart(cfg.out, checkpoint=cfg.checkpoint, data=cfg.data, masks=cfg.masks)
    check_output_free(Path(cfg.out), cfg.force, "gradcam")
    device = resolve_device(cfg.device)
    model, meta = load_classifier(cfg.checkpoint, device)
    classes, size = tuple(meta["classes"]), int(meta["image_size"])
    pos = classes.index(meta.get("positive", classes[-1]))
    data = read_for_model(cfg.data, classes, size, "test")
    masks = load_masks(cfg.masks, data) if cfg.masks else np.broadcast_to(chest_region(size), data.images.shape)
    name, layer, side = resolve_layer(model, cfg.layer, size, device)
    n_img = len(data.labels)
    batch = inference_batch(meta, device, cfg.batch_size)
    cams = np.zeros(data.images.shape, dtype=np.float32)
    probs = np.zeros((n_img, len(classes)), dtype=np.float32)
    if progress:
        progress("grad-cam", 0, n_img, images=0)
    with GradCam(model, layer) as gc:
        for s in range(0, n_img, batch):
            x = to_input(torch.from_numpy(data.images[s:s + batch]).to(device))
            lab = torch.from_numpy(data.labels[s:s + batch]).to(device)
            target = {"predicted": None, "true": lab, "positive": torch.full_like(lab, pos)}[cfg.target]
            c, logits = gc(x, target)
            cams[s:s + len(x)] = upsample(c, size).cpu().numpy()
            probs[s:s + len(x)] = torch.softmax(logits.float(), 1).cpu().numpy()
            if progress:
                progress("grad-cam", min(s + batch, n_img), n_img, images=min(s + batch, n_img))
    pred = probs.argmax(1)
    correct = pred == data.labels
    share = energy_share(cams, masks)
    area = float(masks.mean())
    rng = np.random.default_rng(cfg.seed)
    picks = {c: pick(correct, data.labels, i, cfg.n, rng) for i, c in enumerate(classes)}
    label = cfg.label or run_label(cfg.checkpoint)

    def stats(sel: np.ndarray) -> dict:
        v = share[sel]
        v = v[~np.isnan(v)]
        return {"n": int(sel.sum()), "lung_energy_mean": round(float(v.mean()), 4) if len(v) else None,
                "lung_energy_median": round(float(np.median(v)), 4) if len(v) else None}

    per_class = {}
    for i, c in enumerate(classes):
        sel = data.labels == i
        per_class[c] = {**stats(sel), "correct": stats(sel & correct), "misclassified": stats(sel & ~correct)}
    valid = share[~np.isnan(share)]
    rec = {
        **record_header("gradcam"), "label": label,
        "checkpoint": str(cfg.checkpoint), "test": str(cfg.data), "layer": name,
        "layer_map_size": side, "target": cfg.target,
        "region": f"masks from {cfg.masks}" if cfg.masks else
                  "central chest ellipse (cx, cy, rx, ry) = " + str(CHEST_ELLIPSE),
        "region_area_fraction": round(area, 4),
        "lung_energy_mean": round(float(valid.mean()), 4) if len(valid) else None,
        "lung_energy_enrichment": round(float(valid.mean()) / area, 4) if len(valid) and area else None,
        "empty_cams": int(np.isnan(share).sum()), "images": n_img, "per_class": per_class,
        "picks": {c: [f"{c}/{data.files[i].name}" for i in ix] for c, ix in picks.items()},
        "xraygan_version": __version__,
    }
    scale = max(1, 128 // size)
    with staged_dir(Path(cfg.out), cfg.force, "gradcam") as tmp:
        for c, ix in picks.items():
            for i in ix:
                atomic_write_bytes(tmp / c / f"{data.files[i].stem}.png",
                                   encode_png(overlay(data.images[i], cams[i], scale)))
        atomic_write_bytes(tmp / "grid.png", _grid_png(data, cams, probs, share, picks, classes, pos, label, name))
        write_csv(tmp / "cams.csv", ["file", "class", "predicted", "p_positive", "correct", "lung_energy"],
                  ([f"{classes[data.labels[i]]}/{f.name}", classes[data.labels[i]], classes[pred[i]],
                    f"{probs[i, pos]:.4f}", int(correct[i]), "" if np.isnan(share[i]) else f"{share[i]:.4f}"]
                   for i, f in enumerate(data.files)))
        atomic_write_json(tmp / "gradcam.json", rec)
    rec["out"] = str(cfg.out)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _grid_png(data: ImageFolder, cams: np.ndarray, probs: np.ndarray, share: np.ndarray,
              picks: dict[str, list[int]], classes: tuple[str, ...], pos: int, label: str,
              layer: str) -> bytes:
    """One row per class of CAM overlays, each titled with prediction, score and lung share."""
    from xraygan.plots import colormap, fig_png, pyplot

    plt = pyplot()
    cols = max(len(v) for v in picks.values())
    fig, axes = plt.subplots(len(classes), cols, figsize=(1.6 * cols, 1.9 * len(classes)), squeeze=False)
    for r, c in enumerate(classes):
        for j in range(cols):
            ax = axes[r, j]
            ax.axis("off")
            if j >= len(picks[c]):
                continue
            i = picks[c][j]
            cam = cams[i] / cams[i].max() if cams[i].max() > 0 else cams[i]
            ax.imshow(data.images[i], cmap="gray", vmin=0, vmax=255)
            ax.imshow(colormap("jet")(cam), alpha=0.45)
            p = int(probs[i].argmax())
            ok = "ok" if p == data.labels[i] else "WRONG"
            lung = "n/a" if np.isnan(share[i]) else f"{share[i]:.2f}"
            ax.set_title(f"{c} → {classes[p]} {ok}\nP={probs[i, pos]:.2f} lungs {lung}", fontsize=6.5,
                         color="black" if ok == "ok" else "red")
    fig.suptitle(f"Grad-CAM ({layer}): {label}", fontsize=9)
    return fig_png(fig, dpi=110)
