"""`xraygan generate`: sample N images from a generator checkpoint into `OUT/<label>/`.

Needs only the checkpoint file. Images are made and written batch by batch, so memory does not
grow with N. Image i's noise depends only on the seed and i, so the same checkpoint and seed
give the same files, and `--append` continues the sequence instead of repeating it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from xraygan import __version__
from xraygan.checkpoint import load_checkpoint
from xraygan.errors import InputError
from xraygan.fsutil import atomic_write_json, read_json
from xraygan.gan import image_grid
from xraygan.gan_models import GanNetConfig, Generator
from xraygan.images import save_png
from xraygan.runtime import make_generator, resolve_device

NAME_RE = re.compile(r"^synthetic-(?P<run>.+)-(?P<idx>\d{6,})\.png$")


@dataclass(frozen=True)
class GenerateConfig:
    checkpoint: Path
    out: Path
    n: int
    label: str | None = None
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    preview: bool = False
    append: bool = False
    force: bool = False


def load_generator(path: Path, device: torch.device) -> tuple[Generator, dict]:
    tensors, meta = load_checkpoint(path, "generator")
    try:
        G = Generator(GanNetConfig(**meta["config"]))
        G.load_state_dict(tensors)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{path}: generator checkpoint does not match its config ({e})") from None
    return G.to(device).eval(), meta


def _noise(seed: int, start: int, count: int, nz: int) -> torch.Tensor:
    """Noise for images start..start+count-1; one stream per image, so batching never matters."""
    return torch.stack([torch.randn(nz, generator=make_generator(seed * 1_000_003 + start + i))
                        for i in range(count)])


def generate(cfg: GenerateConfig, progress: Callable[..., None] | None = None) -> dict:
    if cfg.n < 1:
        raise InputError(f"-n {cfg.n}: must be at least 1")
    if cfg.append and cfg.force:
        raise InputError("give --append or --force, not both")
    device = resolve_device(cfg.device)
    G, meta = load_generator(cfg.checkpoint, device)
    classes = meta["classes"]
    label = (cfg.label or meta["default_label"]).lower()
    if label not in classes:
        raise InputError(f"--label {label}: the generator knows only {', '.join(classes)}")
    run = re.sub(r"[^A-Za-z0-9_.]+", "_", str(meta.get("run") or "gan")).strip("_") or "gan"
    folder = Path(cfg.out) / label
    existing = sorted(folder.glob("synthetic-*.png")) if folder.is_dir() else []
    start = 0
    if existing:
        if cfg.append:
            start = max(int(m["idx"]) for p in existing if (m := NAME_RE.match(p.name))) 
        elif cfg.force:
            shutil.rmtree(folder)
        else:
            raise InputError(f"{folder}: already holds {len(existing)} synthetic images "
                             "(use --append to add more, or --force to replace them)")
    folder.mkdir(parents=True, exist_ok=True)
    label_idx = classes.index(label)
    nz = G.cfg.nz
    written: list[str] = []
    preview = []
    with torch.no_grad():
        for b in range(0, cfg.n, cfg.batch_size):
            k = min(cfg.batch_size, cfg.n - b)
            z = _noise(cfg.seed, start + b, k, nz).to(device)
            labels = torch.full((k,), label_idx, device=device) if G.cfg.num_classes else None
            x = G(z, labels).float()
            imgs = ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
            for i, a in enumerate(imgs):
                name = f"synthetic-{run}-{start + b + i + 1:06d}.png"
                save_png(folder / name, a)
                written.append(name)
            shown = sum(len(p) for p in preview)
            if cfg.preview and shown < 64:
                preview.append(x[: 64 - shown].cpu())
            if progress:
                progress("generate", b + k, cfg.n)
    digest = hashlib.sha256(Path(cfg.checkpoint).read_bytes()).hexdigest()
    record_path = Path(cfg.out) / "generation.json"
    runs = read_json(record_path)["runs"] if (cfg.append and record_path.exists()) else []
    runs.append({"checkpoint": str(cfg.checkpoint), "checkpoint_sha256": digest,
                 "seed": cfg.seed, "count": cfg.n, "label": label, "first_index": start + 1,
                 "image_size": meta["image_size"], "conditional": meta["conditional"],
                 "generator_epoch": meta.get("epoch"), "generator_step": meta.get("step"),
                 "xraygan_version": __version__})
    record = {"format": "xraygan-synthetic", "version": 1,
              "note": "synthetic images made by a GAN; not real patients",
              "label": label, "total": start + cfg.n, "runs": runs,
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
    atomic_write_json(record_path, record)
    if cfg.preview:
        save_png(Path(cfg.out) / "preview.png", image_grid(torch.cat(preview)))
    return {"out": str(cfg.out), "folder": str(folder), "label": label, "count": cfg.n,
            "first": written[0], "last": written[-1], "checkpoint_sha256": digest}
