"""`xraygan train-gan`: a DCGAN on one class, or a conditional DCGAN on all classes.

The training set is decoded once into memory; every random draw (data order, noise, fake
labels, augmentation) comes from its own seeded CPU `torch.Generator`, and their states are
checkpointed with everything else, so an interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import copy
import csv
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraygan import __version__
from xraygan.checkpoint import (load_checkpoint, optimizer_from_tensors, optimizer_to_tensors,
                                save_checkpoint, state_dict_to_tensors, tensors_to_state_dict)
from xraygan.errors import InputError, TrainingError
from xraygan.fsutil import atomic_write_bytes, atomic_write_json, check_run_target
from xraygan.gan_models import (SUPPORTED_SIZES, Discriminator, GanNetConfig, Generator,
                                diff_augment, ema_update)
from xraygan.images import ImageFolder, read_image_folder, save_png
from xraygan.runtime import autocast, autocast_dtype, make_generator, resolve_device

Progress = Callable[..., None]
LOG_FIELDS = ("step", "epoch", "loss_d", "loss_g", "d_x", "d_g_z", "seconds")


@dataclass(frozen=True)
class TrainGanConfig:
    data: Path
    out: Path
    conditional: bool = False
    cls: str | None = None  # unconditional: the class to learn (default: the minority)
    alpha: float = 0.5  # conditional: P(a drawn fake label is the healthy class)
    healthy: str = "normal"
    epochs: int = 25
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    nz: int = 100
    ngf: int = 64
    ndf: int = 64
    diffaugment: str = "auto"  # "color,translation,cutout" (any subset); "" = off; auto: see below
    ema: float = 0.999  # decay of the generator's weight average; 0 = off
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16
    channels_last: bool = True
    sample_every: int = 1  # epochs between sample grids
    resume: bool = False
    force: bool = False

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


# Options that must match when a run is resumed (epochs may grow; device/precision may change).
RESUME_KEYS = ("conditional", "cls", "alpha", "batch_size", "nz", "ngf", "ndf", "seed", "diffaugment",
               "ema", "lr")


def fake_label_probs(classes: tuple[str, ...], healthy: str, alpha: float) -> torch.Tensor:
    """P(label) for fake images: α on the healthy class, 1−α spread over the others."""
    if healthy not in classes:
        raise InputError(f"--healthy {healthy}: no such class (classes: {', '.join(classes)})")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"--alpha {alpha}: must be between 0 and 1")
    p = torch.full((len(classes),), (1.0 - alpha) / (len(classes) - 1), dtype=torch.float64)
    p[classes.index(healthy)] = alpha
    return p


DIFFAUG_ALL = "color,translation,cutout"
DIFFAUG_AUTO_BELOW = 5000  # training images under which `auto` turns DiffAugment on


def resolve_diffaugment(policy: str, n_images: int) -> str:
    """`auto`: all three DiffAugment policies for fewer than 5,000 training images, where an
    unaugmented discriminator memorises the real set (on the 80-image demo set it won within 100
    steps without it), none above. Anything else is taken as given."""
    if policy == "auto":
        return DIFFAUG_ALL if n_images < DIFFAUG_AUTO_BELOW else ""
    return policy


def load_training_set(cfg: TrainGanConfig) -> tuple[ImageFolder, tuple[str, ...], str]:
    """Decode the data; returns (folder, classes the model knows, default label)."""
    full = read_image_folder(cfg.data)
    counts = full.counts()
    if full.size not in SUPPORTED_SIZES:
        raise InputError(f"{cfg.data}: images are {full.size} px; the DCGAN models support "
                         f"{', '.join(map(str, SUPPORTED_SIZES))} px (prepare with --size 64)")
    minority = min(counts, key=lambda c: (counts[c], c))
    if cfg.conditional:
        if len(full.classes) < 2:
            raise InputError(f"{cfg.data}: --conditional needs at least two classes")
        data, classes, label = full, full.classes, cfg.cls or minority
        if label not in classes:
            raise InputError(f"--class {label}: no such class in {cfg.data} "
                             f"(found: {', '.join(classes)})")
    else:
        label = cfg.cls or minority
        if label not in full.classes:
            raise InputError(f"{Path(cfg.data) / label}: class folder missing "
                             f"(found: {', '.join(full.classes)})")
        keep = full.labels == full.classes.index(label)
        data = replace(full, images=full.images[keep], labels=np.zeros(int(keep.sum()), np.int64),
                       files=tuple(f for f, k in zip(full.files, keep) if k), classes=(label,))
        classes = (label,)
    if len(data.images) < cfg.batch_size:
        raise InputError(f"{cfg.data}: {len(data.images)} training images, fewer than one batch "
                         f"of {cfg.batch_size} (use a smaller --batch-size)")
    return data, classes, label


class GanTrainer:
    """Owns the networks, optimizers and random streams; `step()` is one D+G update."""

    def __init__(self, cfg: TrainGanConfig, net: GanNetConfig, device: torch.device,
                 label_probs: torch.Tensor | None):
        self.cfg, self.net, self.device = cfg, net, device
        torch.manual_seed(cfg.seed)  # weight initialisation
        self.G = Generator(net).to(device)
        self.D = Discriminator(net).to(device)
        if cfg.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) if cfg.ema > 0 else None
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr, betas=betas)
        self.amp = autocast_dtype(device, cfg.precision)
        self.label_probs = label_probs
        self.rng_data = make_generator(cfg.seed)
        self.rng_noise = make_generator(cfg.seed + 1)
        self.rng_aug = make_generator(cfg.seed + 2)
        self.step_count = 0

    def conditional_batch(self, by_class: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels drawn with the α mix, and for each label a real image of that class.

        Real and fake batches then hold the same labels. Drawing real images in their dataset
        proportions (3:1 normal) while fake labels follow α lets D tell the batches apart by
        their label mix through batch norm: measured on the Kermany set at 32 px, D(G(z)) fell
        to 0.01 within 100 steps at α = 0.5 and the generator collapsed; matched, it stayed
        near 0.3-0.5. Real images are drawn with replacement, per class.
        """
        labels = torch.multinomial(self.label_probs, n, replacement=True, generator=self.rng_noise)
        idx = torch.empty(n, dtype=torch.long)
        for c, pool in enumerate(by_class):
            sel = labels == c
            k = int(sel.sum())
            if k:
                idx[sel] = pool[torch.randint(len(pool), (k,), generator=self.rng_data)]
        return idx, labels

    def _aug(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.rng_aug, self.cfg.diffaugment) if self.cfg.diffaugment else x

    def step(self, real: torch.Tensor, real_labels: torch.Tensor | None) -> dict[str, float]:
        n = real.shape[0]
        z = torch.randn(n, self.net.nz, generator=self.rng_noise).to(self.device)
        # conditional: the fake batch carries exactly the real batch's labels (see conditional_batch)
        fake_labels = real_labels
        ones = torch.ones(n, device=self.device)
        zeros = torch.zeros(n, device=self.device)
        with autocast(self.device, self.amp):
            fake = self.G(z, fake_labels)
            d_real = self.D(self._aug(real), real_labels).float()
            d_fake = self.D(self._aug(fake.detach()), fake_labels).float()
            loss_d = (F.binary_cross_entropy_with_logits(d_real, ones)
                      + F.binary_cross_entropy_with_logits(d_fake, zeros))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        # G step: D's weights get no gradients (exactly the same update, less work)
        self.D.requires_grad_(False)
        with autocast(self.device, self.amp):
            loss_g = F.binary_cross_entropy_with_logits(
                self.D(self._aug(fake), fake_labels).float(), ones)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.D.requires_grad_(True)
        if self.G_ema is not None:
            # warm-up: early on the average follows G closely, so short runs are not stuck
            # near the random initialisation
            t = self.step_count
            ema_update(self.G_ema, self.G, min(self.cfg.ema, (1 + t) / (10 + t)))
        self.step_count += 1
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(),
                "d_x": torch.sigmoid(d_real).mean().item(),
                "d_g_z": torch.sigmoid(d_fake).mean().item()}

    def sampler(self) -> nn.Module:
        return self.G_ema if self.G_ema is not None else self.G

    # --- state (no pickle): everything needed to continue bit-for-bit ---
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        t = {}
        t.update(state_dict_to_tensors("G.", self.G.state_dict()))
        t.update(state_dict_to_tensors("D.", self.D.state_dict()))
        if self.G_ema is not None:
            t.update(state_dict_to_tensors("G_ema.", self.G_ema.state_dict()))
        og, pg_g = optimizer_to_tensors("opt_g.", self.opt_g)
        od, pg_d = optimizer_to_tensors("opt_d.", self.opt_d)
        t.update(og)
        t.update(od)
        for name in ("data", "noise", "aug"):
            t[f"rng.{name}"] = getattr(self, f"rng_{name}").get_state()
        return t, {"param_groups_g": pg_g, "param_groups_d": pg_d, "step": self.step_count}

    def load_state(self, t: dict[str, torch.Tensor], meta: dict) -> None:
        self.G.load_state_dict(tensors_to_state_dict("G.", t))
        self.D.load_state_dict(tensors_to_state_dict("D.", t))
        if self.G_ema is not None:
            self.G_ema.load_state_dict(tensors_to_state_dict("G_ema.", t))
        optimizer_from_tensors("opt_g.", self.opt_g, t, meta["param_groups_g"])
        optimizer_from_tensors("opt_d.", self.opt_d, t, meta["param_groups_d"])
        for name in ("data", "noise", "aug"):
            getattr(self, f"rng_{name}").set_state(t[f"rng.{name}"])
        self.step_count = int(meta["step"])


def to_model_input(images: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (N, H, W) → float (N, 1, H, W) in [-1, 1], once for the whole set."""
    x = torch.from_numpy(images).to(device).unsqueeze(1).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def image_grid(x: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] → one uint8 grid image."""
    from torchvision.utils import make_grid

    g = make_grid(x.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2, pad_value=1.0,
                  normalize=True, value_range=(-1, 1))
    return (g[0] * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def sample(G: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    was = G.training
    G.eval()
    try:
        return G(z, labels).float()
    finally:
        G.train(was)


def _save(run: Path, trainer: GanTrainer, meta: dict, epoch: int, batch: int,
          perm: torch.Tensor) -> None:
    """Write generator, discriminator and resume state; the state file last, so a crash
    between the writes resumes from the previous consistent state."""
    common = dict(meta, epoch=epoch, step=trainer.step_count)
    save_checkpoint(run / "generator.safetensors", trainer.sampler().state_dict(), "generator",
                    trainer.net.to_dict(), **common, ema=trainer.G_ema is not None)
    save_checkpoint(run / "discriminator.safetensors", trainer.D.state_dict(), "discriminator",
                    trainer.net.to_dict(), **common)
    t, smeta = trainer.state_tensors()
    t["perm"] = perm
    save_checkpoint(run / "state.safetensors", t, "gan-state", trainer.net.to_dict(),
                    **{**common, **smeta}, batch=batch)


def _append_log(run: Path, rows: list[dict]) -> None:
    path = run / "log.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def _truncate_log(run: Path, step: int) -> None:
    """On resume, drop log rows written after the checkpoint that is being resumed."""
    path = run / "log.csv"
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def train_gan(cfg: TrainGanConfig, progress: Progress | None = None) -> dict:
    """Train (or resume) a GAN run; returns a summary dict."""
    run = Path(cfg.out)
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise InputError("--epochs must be at least 1 and --batch-size at least 2")
    if cfg.diffaugment and cfg.diffaugment != "auto":
        for p in cfg.diffaugment.split(","):
            if p not in ("color", "translation", "cutout"):
                raise InputError(f"--diffaugment {cfg.diffaugment}: unknown policy '{p}' "
                                 "(use color, translation, cutout)")
    check_run_target(run, cfg.resume, cfg.force, cfg.to_json(), RESUME_KEYS)
    device = resolve_device(cfg.device)
    data, classes, label = load_training_set(cfg)
    asked = cfg.to_json()  # as given (e.g. diffaugment "auto"); --resume compares against this
    cfg = replace(cfg, diffaugment=resolve_diffaugment(cfg.diffaugment, len(data.images)))
    probs = fake_label_probs(classes, cfg.healthy, cfg.alpha) if cfg.conditional else None
    net = GanNetConfig(image_size=data.size, nz=cfg.nz, ngf=cfg.ngf, ndf=cfg.ndf,
                       num_classes=len(classes) if cfg.conditional else 0)
    trainer = GanTrainer(cfg, net, device, probs)
    x_all = to_model_input(data.images, device, cfg.channels_last and device.type != "mps")
    by_class = [torch.nonzero(torch.from_numpy(data.labels) == c).flatten() for c in range(len(classes))]
    n = len(x_all)
    steps_per_epoch = n // cfg.batch_size  # drop_last: batch norm sees full batches
    meta = {"classes": list(classes), "image_size": data.size, "conditional": cfg.conditional,
            "default_label": label, "alpha": cfg.alpha if cfg.conditional else None,
            "healthy": cfg.healthy if cfg.conditional else None, "seed": cfg.seed,
            "run": run.name, "xraygan_version": __version__}
    fixed = make_generator(cfg.seed + 3)
    fixed_z = torch.randn(64, cfg.nz, generator=fixed).to(device)
    fixed_labels = (torch.arange(64) % len(classes)).to(device) if cfg.conditional else None

    epoch, batch, perm = 0, 0, None
    if cfg.resume:
        t, smeta = load_checkpoint(run / "state.safetensors", "gan-state")
        trainer.load_state(t, smeta)
        epoch, batch = int(smeta["epoch"]), int(smeta["batch"])
        perm = t["perm"] if t["perm"].numel() else None
        _truncate_log(run, trainer.step_count)
    else:
        run.mkdir(parents=True, exist_ok=True)
        for stale in ("log.csv", "state.safetensors"):
            (run / stale).unlink(missing_ok=True)
        atomic_write_json(run / "config.json", {
            "train": asked, "diffaugment": cfg.diffaugment, "net": net.to_dict(), "classes": list(classes),
            "default_label": label, "counts": data.counts(), "device": str(device),
            "autocast": str(trainer.amp) if trainer.amp else "fp32",
            "xraygan_version": __version__, "torch_version": torch.__version__})
    (run / "samples").mkdir(exist_ok=True)
    t_start = time.perf_counter()
    images_done = 0
    total_steps = cfg.epochs * steps_per_epoch
    last: dict = {}
    rows: list[dict] = []
    try:
        while epoch < cfg.epochs:
            if perm is None and not cfg.conditional:
                perm = torch.randperm(n, generator=trainer.rng_data)
            while batch < steps_per_epoch:
                if cfg.conditional:
                    idx, labels = trainer.conditional_batch(by_class, cfg.batch_size)
                    idx, labels = idx.to(device), labels.to(device)
                else:
                    idx = perm[batch * cfg.batch_size:(batch + 1) * cfg.batch_size].to(device)
                    labels = None
                stats = trainer.step(x_all[idx], labels)
                batch += 1
                if not all(np.isfinite(v) for v in stats.values()):
                    raise TrainingError(
                        f"step {trainer.step_count}: loss is not finite (loss_d {stats['loss_d']:.4g}, "
                        f"loss_g {stats['loss_g']:.4g}); stopped. The last good checkpoint is "
                        f"{run / 'generator.safetensors'}"
                        + (f" (epoch {epoch})" if epoch else " (none: failed in the first epoch)")
                        + ". Try a lower --lr or --precision fp32")
                images_done += len(idx)
                last = stats
                rows.append({"step": trainer.step_count, "epoch": epoch + 1,
                             **{k: f"{v:.6g}" for k, v in stats.items()},
                             "seconds": f"{time.perf_counter() - t_start:.3f}"})
                if progress:
                    progress("train-gan", trainer.step_count, total_steps, epoch=f"{epoch + 1}/{cfg.epochs}",
                             loss_d=stats["loss_d"], loss_g=stats["loss_g"], images=images_done)
            _append_log(run, rows)
            rows = []
            epoch, batch, perm = epoch + 1, 0, None
            if epoch % cfg.sample_every == 0 or epoch == cfg.epochs:
                grid = image_grid(sample(trainer.sampler(), fixed_z, fixed_labels))
                save_png(run / "samples" / f"epoch_{epoch:04d}.png", grid)
            _save(run, trainer, meta, epoch, 0, torch.zeros(0, dtype=torch.int64))
    except KeyboardInterrupt:
        _append_log(run, rows)
        _save(run, trainer, meta, epoch, batch,
              perm if perm is not None else torch.zeros(0, dtype=torch.int64))
        raise
    seconds = time.perf_counter() - t_start
    return {"run": str(run), "epochs": cfg.epochs, "steps": trainer.step_count,
            "classes": list(classes), "label": label, "conditional": cfg.conditional,
            "images_per_s": images_done / seconds if seconds > 0 else None,
            "seconds": round(seconds, 1), "device": str(device),
            "precision": str(trainer.amp) if trainer.amp else "fp32", **last,
            "generator": str(run / "generator.safetensors"),
            "samples": str(run / "samples")}
