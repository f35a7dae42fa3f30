"""`xraygan train-gan`: a DCGAN on one class, or a conditional DCGAN on all classes.

The training set is decoded once into memory; every random draw (data order, noise, fake
labels, augmentation) comes from its own seeded CPU `torch.Generator`, and their states are
checkpointed with everything else, so an interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraygan import __version__
from xraygan.checkpoint import (
    BackgroundWriter,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    snapshot,
    state_dict_to_tensors,
    tensors_to_state_dict,
)
from xraygan.distributed import Dist, average_gradients, broadcast_module, mean_and_flag
from xraygan.distributed import session as distributed_session
from xraygan.errors import (
    InputError,
    Interrupted,
    check_choice,
    check_float,
    check_int,
    require,
)
from xraygan.fsutil import (
    atomic_write_json,
    check_out_apart,
    record_header,
)
from xraygan.gan_models import (
    DIFFAUG_POLICIES,
    Discriminator,
    GanNetConfig,
    Generator,
    apply_diff_augment,
    diffaug_draw,
    ema_update,
    size_problem,
)
from xraygan.images import ImageFolder, image_side, list_image_folder, read_image_folder, save_png
from xraygan.memory import check_batch, gan_footprint
from xraygan.options import DEVICE_HELP, TORCHRUN_BATCH_HELP, TRAIN_FOLDER_HELP, opt
from xraygan.runs import (
    abandon_failed_run,
    append_log,
    begin_run,
    check_run_target,
    fingerprint_arrays,
    interrupted_in_step,
    not_finite,
    trained_to,
    truncate_log,
)
from xraygan.runtime import (
    DEVICES,
    autocast,
    autocast_dtype,
    deferred_interrupt,
    make_generator,
)

Progress = Callable[..., None]
STAT_NAMES = ("loss_d", "loss_g", "d_x", "d_g_z")
LOG_FIELDS = ("step", "epoch", *STAT_NAMES, "diversity", "seconds")
COLLAPSED_BELOW = 0.25  # diversity (see `diversity`) under which train-gan warns of mode collapse
# ... but only from this many steps: every generator starts near-constant. Healthy DCGANs on the
# real Kermany pneumonia images (default settings, seed 0) measured diversity 0.02 / 0.20 / 0.42 /
# 0.47 after 4 / 25 / 100 / 250 steps at 32 px and 0.33 / 0.42 after 50 / 100 steps at 64 px, so a
# verdict before ~100 steps would call a healthy run collapsed; 200 leaves twice that margin.
COLLAPSE_MIN_STEPS = 200


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean L2 distance between the distinct pairs of a batch of images."""
    f = x.detach().float().flatten(1)
    d = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")  # exact: identical rows give 0
    n = len(f)
    return float(d.sum() / (n * (n - 1)))


def diversity(samples: torch.Tensor, real_spread: float) -> float:
    """How spread out the generator's fixed-noise samples are, as a share of a real batch's
    spread (mean pairwise distance): about 1 for a healthy generator, near 0 when it has
    collapsed to one image whatever the noise."""
    return mean_pairwise_distance(samples) / real_spread if real_spread > 0 else float("nan")


@dataclass(frozen=True)
class TrainGanConfig:
    data: Path = opt(help=TRAIN_FOLDER_HELP, argument=True)
    out: Path = opt(help="Run folder.", flags=("--out", "-o"))
    conditional: bool = opt(False, "Train a conditional DCGAN on all classes (else a DCGAN on one).",
                            flags=("--conditional",))
    cls: str | None = opt(None, "DCGAN: the class to learn. cDCGAN: the default label to generate. Default: the "
                                "minority class.", flags=("--class",))
    alpha: float | None = opt(None, "cDCGAN (default 0.5): probability that a label drawn for a fake image during "
                                    "training is the healthy class (--healthy); the other classes share 1-alpha. "
                                    "Lower alpha trains the generator and discriminator on more fake pneumonia "
                                    "images. Each step's real batch is drawn with the same labels, so D compares "
                                    "like with like. The study tried 0.25, 0.5 and 0.75 and found it trades "
                                    "sensitivity against specificity.")
    healthy: str = opt("normal", "The healthy class alpha refers to.")
    epochs: int = opt(25, "Passes over the training images.")
    steps: int | None = opt(None, "Total training steps (overrides --epochs).")
    batch_size: int = opt(64, TORCHRUN_BATCH_HELP)
    lr: float = opt(2e-4, "Adam learning rate (both networks).")
    beta1: float = 0.5
    beta2: float = 0.999
    nz: int = opt(100, "Noise dimensions.")
    ngf: int = opt(64, "Filters of the widest-resolution layer (ngf = ndf).", flags=("--width",), sets=("ndf",))
    ndf: int = 64
    # "color,translation,cutout" (any subset); "" (or "none") = off; auto: see resolve_diffaugment
    diffaugment: str = opt("auto", "Differentiable augmentation of what D sees: a comma list of color, "
                                   "translation, cutout; 'none' to turn off; 'auto' turns all three on for fewer "
                                   "than 5,000 training images, where D otherwise memorises the real set.")
    ema: float = opt(0.999, "Decay of the moving average of G's weights used for sampling; 0 = off.")
    loss: str = opt("bce", "bce (the DCGAN's non-saturating loss) or hinge (SNGAN / BigGAN; use with "
                           "--spectral-norm).")
    spectral_norm: bool = opt(False, "Spectrally normalised discriminator convolutions, without batch norm (SNGAN).")
    seed: int = opt(0, "Seed for weights, data order and noise.")
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("auto", "auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16.")
    channels_last: bool = opt(True, "Channels-last memory layout.")
    cuda_graphs: bool = opt(True, "CUDA: capture the training step once as a CUDA graph and replay it (small GAN "
                                  "steps are bound by kernel launches).")
    save_every: int = opt(500, "Checkpoint every N steps (also every --save-seconds, at the end and on Ctrl-C).")
    save_seconds: float = opt(60.0, "Checkpoint at least this often (seconds).")
    sample_every: int = opt(500, "Write a sample grid every N steps (and at the end).")
    log_every: int = opt(20, "Read the losses from the device every N steps: log rows, progress and the NaN "
                             "guard (a non-finite loss stops the run within N steps).")
    resume: bool = opt(False, "Continue an interrupted run from its last checkpoint (same options; "
                              "--epochs/--steps may grow).")
    force: bool = opt(False, "Replace an earlier train-gan run in --out.")

    def __post_init__(self):
        for name in ("cls", "healthy", "loss"):
            if getattr(self, name):
                object.__setattr__(self, name, getattr(self, name).lower())
        if self.diffaugment == "none":
            object.__setattr__(self, "diffaugment", "")

    @property
    def alpha_value(self) -> float:
        return 0.5 if self.alpha is None else self.alpha

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def validate(self) -> None:
        """Every option checked before any folder is made or any image read."""
        check_int("--epochs", self.epochs)
        if self.steps is not None:
            check_int("--steps", self.steps)
        check_int("--batch-size", self.batch_size, 2)
        check_float("--lr", self.lr, 0.0, 1.0)
        check_float("--beta1", self.beta1, 0.0, 1.0, low_open=False, high_open=True)
        check_float("--beta2", self.beta2, 0.0, 1.0, low_open=False, high_open=True)
        check_int("--nz", self.nz)
        check_int("--width", self.ngf, 4) if self.ngf == self.ndf else (
            check_int("--ngf", self.ngf, 4), check_int("--ndf", self.ndf, 4))
        check_float("--alpha", self.alpha_value, 0.0, 1.0, low_open=False)
        check_float("--ema", self.ema, 0.0, 1.0, low_open=False, high_open=True)
        check_int("--save-every", self.save_every)
        check_float("--save-seconds", self.save_seconds, 0.0)
        check_int("--sample-every", self.sample_every)
        check_int("--log-every", self.log_every)
        check_choice("--device", self.device, DEVICES)
        check_choice("--precision", self.precision, ("auto", "fp32", "bf16"))
        check_choice("--loss", self.loss, LOSSES)
        if self.diffaugment and self.diffaugment != "auto":
            for p in self.diffaugment.split(","):
                require(p in DIFFAUG_POLICIES, f"--diffaugment {self.diffaugment}: unknown policy "
                        f"'{p}' (use a comma list of color, translation, cutout; none; or auto)")
        check_out_apart(self.out, data=self.data)


# Options that must match when a run is resumed (epochs may grow; device/precision may change).
RESUME_KEYS = ("conditional", "cls", "alpha", "batch_size", "nz", "ngf", "ndf", "seed", "diffaugment",
               "ema", "lr", "loss", "spectral_norm")
LOSSES = ("bce", "hinge")



def fake_label_probs(classes: tuple[str, ...], healthy: str, alpha: float) -> torch.Tensor:
    """P(label) for fake images: α on the healthy class, 1−α spread over the others."""
    if healthy not in classes:
        raise InputError(f"--healthy {healthy}: no such class (classes: {', '.join(classes)})")
    check_float("--alpha", alpha, 0.0, 1.0, low_open=False)
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


def _size_check(data: Path, size: int) -> None:
    problem = size_problem(size)
    if problem:
        raise InputError(f"{data}: images are {size} px; {problem} (prepare with --size N)")


def load_training_set(cfg: TrainGanConfig) -> tuple[ImageFolder, tuple[str, ...], str]:
    """Decode the data; returns (folder, classes the model knows, default label)."""
    first = next((f for files in list_image_folder(cfg.data).values() for f in files), None)
    if first is not None:  # a size no generator makes is refused before the whole folder is decoded
        _size_check(cfg.data, image_side(first))
    full = read_image_folder(cfg.data)
    counts = full.counts()
    _size_check(cfg.data, full.size)
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
    """Owns the networks, optimizers and random streams; `step()` is one D+G update.

    On the CPU every random draw comes from seeded CPU generators (bit-exact resume, the same
    numbers on every machine). On CUDA they come from seeded CUDA generators, so a step never
    waits for a host-to-device copy, and after a few eager steps the whole step (forward,
    backward, both Adam updates, EMA) is captured once as a CUDA graph and replayed: at these
    small sizes a step is bound by kernel-launch overhead, not by arithmetic.
    """

    GRAPH_WARMUP = 3  # eager steps before capture (on a side stream, as CUDA graphs require)

    def __init__(self, cfg: TrainGanConfig, net: GanNetConfig, device: torch.device,
                 label_probs: torch.Tensor | None, cuda_graphs: bool | None = None, dist: Dist = Dist()):
        self.cfg, self.net, self.device, self.dist = cfg, net, device, dist
        torch.manual_seed(cfg.seed)  # weight initialisation
        self.G = Generator(net).to(device)
        self.D = Discriminator(net).to(device)
        if cfg.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) if cfg.ema > 0 else None
        cuda = device.type == "cuda"
        # under torchrun the step holds collectives: no graph capture
        self.use_graphs = (cuda if cuda_graphs is None else (cuda_graphs and cuda)) and not dist.active
        betas = (cfg.beta1, cfg.beta2)
        # CUDA: the fused Adam kernel (one launch per step instead of several per tensor);
        # capturable keeps its step counter on the device so the update can live in a graph
        extra = {"fused": True, "capturable": True} if cuda else {}
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=betas, **extra)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr, betas=betas, **extra)
        self.amp = autocast_dtype(device, cfg.precision)
        self.rng_device = device if cuda else torch.device("cpu")
        self.label_probs = label_probs.to(self.rng_device) if label_probs is not None else None
        self.rng_data = self._generator(cfg.seed)
        self.rng_noise = self._generator(cfg.seed + 1)
        self.rng_aug = self._generator(cfg.seed + 2)
        self.step_count = 0
        self._graph = None
        self._eager_since_start = 0
        self._tgt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _generator(self, seed: int) -> torch.Generator:
        if self.rng_device.type == "cpu":
            return make_generator(seed)
        g = torch.Generator(device=self.rng_device)
        g.manual_seed(seed)
        return g

    def randperm(self, n: int) -> torch.Tensor:
        """This epoch's order, on the device the data lives on."""
        return torch.randperm(n, generator=self.rng_data, device=self.rng_device).to(self.device)

    def conditional_batch(self, by_class: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels drawn with the α mix, and for each label a real image of that class.

        Real and fake batches then hold the same labels. Drawing real images in their dataset
        proportions (3:1 normal) while fake labels follow α lets D tell the batches apart by
        their label mix through batch norm: measured on the Kermany set at 32 px, D(G(z)) fell
        to 0.01 within 100 steps at α = 0.5 and the generator collapsed; matched, it stayed
        near 0.3-0.5. Real images are drawn with replacement, per class. `by_class` holds each
        class's indices on the random streams' device; nothing here reads a value back.
        """
        labels = torch.multinomial(self.label_probs, n, replacement=True, generator=self.rng_noise)
        idx = torch.zeros(n, dtype=torch.long, device=self.rng_device)
        for c, pool in enumerate(by_class):
            pick = pool[torch.randint(len(pool), (n,), generator=self.rng_data, device=self.rng_device)]
            idx = torch.where(labels == c, pick, idx)
        return idx.to(self.device), labels.to(self.device)

    def _randoms(self, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A step's noise and DiffAugment numbers from the seeded streams. On the CPU path they are
        moved to the device in one transfer (small per-draw copies were a third of a GPU step).
        Under torchrun every process draws the whole batch's numbers and keeps its share."""
        dev = self.rng_device
        z = torch.randn(n, self.net.nz, generator=self.rng_noise, device=dev)
        aug = diffaug_draw(3 * n, size, size, self.rng_aug, self.cfg.diffaugment) \
            if self.cfg.diffaugment else None
        if self.dist.active:  # aug rows are [real | fake | G step], n each: the share of each part
            z = self.dist.share(z)
            if aug is not None:
                aug = torch.cat([self.dist.share(part) for part in aug.view(3, n, -1)])
        if dev == self.device:
            return z, aug
        if aug is None:
            return z.to(self.device), None
        both = torch.cat([z.flatten(), aug.flatten()]).to(self.device)
        return both[: z.numel()].view_as(z), both[z.numel():].view_as(aug)

    def _ema_decay(self) -> float:
        # warm-up: early on the average follows G closely, so short runs are not stuck near the
        # random initialisation
        t = self.step_count
        return min(self.cfg.ema, (1 + t) / (10 + t))

    def _core(self, real: torch.Tensor, labels: torch.Tensor | None, z: torch.Tensor,
              aug: torch.Tensor | None, decay: float | torch.Tensor, graph: bool = False) -> torch.Tensor:
        """The step's arithmetic: the same code runs eagerly and inside the CUDA graph."""
        n = real.shape[0]
        policy = self.cfg.diffaugment
        ones, zeros = self._targets(n)
        cast = autocast(self.device, self.amp, cache=not graph)
        with cast:
            fake = self.G(z, labels)
            if aug is not None:  # real and detached fake augmented in one pass, seen by D apart
                both = apply_diff_augment(torch.cat([real, fake.detach()]), aug[: 2 * n], policy)
                seen_real, seen_fake = both[:n], both[n:]
            else:
                seen_real, seen_fake = real, fake.detach()
            # conditional: the fake batch carries exactly the real batch's labels (see conditional_batch)
            d_real = self.D(seen_real, labels).float()
            d_fake = self.D(seen_fake, labels).float()
            if self.cfg.loss == "hinge":  # D pushes real logits above 1 and fake ones below -1
                loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
            else:
                loss_d = (F.binary_cross_entropy_with_logits(d_real, ones)
                          + F.binary_cross_entropy_with_logits(d_fake, zeros))
        self.opt_d.zero_grad(set_to_none=not graph)
        loss_d.backward()
        average_gradients(self.dist, list(self.D.parameters()))
        self.opt_d.step()
        # G step: D's weights get no gradients (exactly the same update, less work)
        self.D.requires_grad_(False)
        with cast:
            seen = apply_diff_augment(fake, aug[2 * n:], policy) if aug is not None else fake
            d_g = self.D(seen, labels).float()
            loss_g = -d_g.mean() if self.cfg.loss == "hinge" else F.binary_cross_entropy_with_logits(d_g, ones)
        self.opt_g.zero_grad(set_to_none=not graph)
        loss_g.backward()
        average_gradients(self.dist, list(self.G.parameters()))
        self.opt_g.step()
        self.D.requires_grad_(True)
        if self.G_ema is not None:
            ema_update(self.G_ema, self.G, decay)
        with torch.no_grad():
            return torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(d_real).mean(),
                                torch.sigmoid(d_fake).mean()])

    def step(self, real: torch.Tensor, real_labels: torch.Tensor | None) -> torch.Tensor:
        """One D and one G update. Returns (loss_d, loss_g, D(x), D(G(z))) as a tensor on the
        device: reading it forces a host sync, so the caller reads a batch of them at a time."""
        z, aug = self._randoms(real.shape[0] * self.dist.world, real.shape[-1])
        if not self.use_graphs:
            out = self._core(real, real_labels, z, aug, self._ema_decay())
        else:
            out = self._graph_step(real, real_labels, z, aug)
        self.step_count += 1
        return out

    def _graph_step(self, real, labels, z, aug) -> torch.Tensor:
        if self._graph is None and self._eager_since_start < self.GRAPH_WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._core(real, labels, z, aug, self._ema_decay())
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._eager_since_start += 1
            return out
        if self._graph is None:
            try:
                self._capture(real, labels, z, aug)
            except RuntimeError as e:  # keep training eagerly; say why once
                import warnings

                warnings.warn(f"CUDA graph capture failed, training without it: {e}", stacklevel=2)
                self.use_graphs = False
                return self._core(real, labels, z, aug, self._ema_decay())
        st = self._static
        st["real"].copy_(real)
        st["z"].copy_(z)
        if labels is not None:
            st["labels"].copy_(labels)
        if aug is not None:
            st["aug"].copy_(aug)
        st["decay"].fill_(self._ema_decay())
        self._graph.replay()
        return st["out"].clone()

    def _capture(self, real, labels, z, aug) -> None:
        st = {"real": real.clone(), "z": z.clone(), "labels": labels.clone() if labels is not None else None,
              "aug": aug.clone() if aug is not None else None,
              "decay": torch.tensor(self._ema_decay(), device=self.device)}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            st["out"] = self._core(st["real"], st["labels"], st["z"], st["aug"], st["decay"], graph=True)
        self._graph, self._static = graph, st

    def _targets(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE targets for a batch of n, made once per batch size (inside a CUDA graph they must
        be the same tensors at every replay)."""
        if n not in self._tgt:
            self._tgt[n] = (torch.ones(n, device=self.device), torch.zeros(n, device=self.device))
        return self._tgt[n]

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
        self.step_count = int(meta["step"])
        for k, name in enumerate(("data", "noise", "aug")):
            g = getattr(self, f"rng_{name}")
            try:
                g.set_state(t[f"rng.{name}"])
            except RuntimeError:  # saved on another kind of device (CPU vs CUDA streams differ)
                g.manual_seed(self.cfg.seed * 1_000_003 + self.step_count * 7 + k)


class ModelInput:
    """The training set as the trainers index it: `x[idx]` is float (B, 1, H, W) in [-1, 1].

    The set stays uint8 on the device and each batch is converted as it is drawn (the same
    values as converting the whole set once): a 50,000-image set at 128 px holds 0.8 GB, not
    the 3.3 GB of a float copy."""

    def __init__(self, images: np.ndarray, device: torch.device, channels_last: bool):
        self.u8 = torch.from_numpy(images).to(device)
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.u8)

    def __getitem__(self, idx) -> torch.Tensor:
        x = self.u8[idx].unsqueeze(1).float().div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def to_model_input(images: np.ndarray, device: torch.device, channels_last: bool) -> ModelInput:
    return ModelInput(images, device, channels_last)


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
          perm: torch.Tensor, writer: BackgroundWriter) -> None:
    """Snapshot generator, discriminator and resume state now; `writer` writes them in the
    background, the state file last, so a crash between the writes resumes from the previous
    consistent state."""
    common = dict(meta, epoch=epoch, step=trainer.step_count)
    t, smeta = trainer.state_tensors()
    t["perm"] = perm
    writer.submit([
        snapshot(run / "generator.safetensors", trainer.sampler().state_dict(), "generator",
                 trainer.net.to_dict(), writer.copies, **common, ema=trainer.G_ema is not None),
        snapshot(run / "discriminator.safetensors", trainer.D.state_dict(), "discriminator",
                 trainer.net.to_dict(), writer.copies, **common),
        snapshot(run / "state.safetensors", t, "gan-state", trainer.net.to_dict(), writer.copies,
                 **{**common, **smeta}, batch=batch)])


def _warnings(cfg: TrainGanConfig, label: str) -> list[str]:
    out = []
    if cfg.alpha is not None and not cfg.conditional:
        out.append("--alpha has no effect without --conditional (a DCGAN learns one class)")
    if not cfg.conditional and cfg.cls is None and label == cfg.healthy:
        out.append(f"the least frequent class in {cfg.data} is '{label}', the healthy class: "
                   f"the GAN learns {label} images; give --class to choose")
    return out


def is_done(run: Path, steps: int) -> bool:
    """Whether the train-gan run in `run` has trained at least `steps` steps and kept its generator."""
    return trained_to(run, steps, "generator.safetensors")


def train_gan(cfg: TrainGanConfig, progress: Progress | None = None) -> dict:
    """Train (or resume) a GAN run; returns a summary dict.

    Cadence is by steps: losses are read from the device every `log_every` steps (log rows,
    progress and the NaN guard), checkpoints every `save_every` steps or `save_seconds`, at the
    end and on Ctrl-C, sample grids every `sample_every` steps. A run that fails before its first
    checkpoint leaves no folder behind.
    """
    cfg.validate()
    run = Path(cfg.out)
    check_run_target(run, cfg, RESUME_KEYS, "train-gan")
    with distributed_session(cfg.device, cfg.batch_size) as (dist, device):
        return _train_gan(cfg, run, dist, device, progress if dist.main else None)


def _train_gan(cfg: TrainGanConfig, run: Path, dist: Dist, device: torch.device,
               progress: Progress | None) -> dict:
    """The run itself; under torchrun every process runs this and only rank 0 writes files."""
    data, classes, label = load_training_set(cfg)
    fingerprint = fingerprint_arrays(data.images, data.labels, list(classes))
    warnings = _warnings(cfg, label)
    asked = cfg.to_json()  # as given (e.g. diffaugment "auto"); --resume compares against this
    cfg = replace(cfg, diffaugment=resolve_diffaugment(cfg.diffaugment, len(data.images)))
    probs = fake_label_probs(classes, cfg.healthy, cfg.alpha_value) if cfg.conditional else None
    net = GanNetConfig(image_size=data.size, nz=cfg.nz, ngf=cfg.ngf, ndf=cfg.ndf,
                       num_classes=len(classes) if cfg.conditional else 0, spectral_norm=cfg.spectral_norm)
    check_batch("gan", *gan_footprint(net), -(-cfg.batch_size // dist.world), device, str(cfg.data), data.size)
    trainer = GanTrainer(cfg, net, device, probs, cuda_graphs=cfg.cuda_graphs, dist=dist)
    x_all = to_model_input(data.images, device, cfg.channels_last and device.type != "mps")
    by_class = [torch.nonzero(torch.from_numpy(data.labels) == c).flatten().to(trainer.rng_device)
                 for c in range(len(classes))]
    n = len(x_all)
    steps_per_epoch = n // cfg.batch_size  # drop_last: batch norm sees full batches
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    meta = {"classes": list(classes), "image_size": data.size, "conditional": cfg.conditional,
            "default_label": label, "alpha": cfg.alpha_value if cfg.conditional else None,
            "healthy": cfg.healthy if cfg.conditional else None, "seed": cfg.seed,
            "run": run.name, "xraygan_version": __version__}
    fixed = make_generator(cfg.seed + 3)
    fixed_z = torch.randn(64, cfg.nz, generator=fixed).to(device)
    fixed_labels = (torch.arange(64) % len(classes)).to(device) if cfg.conditional else None

    created = begin_run(run, cfg.resume, cfg.force, fingerprint, cfg.data, writes=dist.main)
    epoch, batch, perm = 0, 0, None
    if cfg.resume:
        t, smeta = load_checkpoint(run / "state.safetensors", "gan-state")
        trainer.load_state(t, smeta)
        epoch, batch = int(smeta["epoch"]), int(smeta["batch"])
        perm = t["perm"].to(device) if t["perm"].numel() else None
        if dist.main:
            truncate_log(run, LOG_FIELDS, trainer.step_count)
        if trainer.step_count >= total_steps:
            raise InputError(f"{run}: already trained {trainer.step_count} steps; give a larger "
                             "--steps or --epochs to continue")
    for m in (trainer.G, trainer.D, trainer.G_ema):
        if m is not None:
            broadcast_module(dist, m)
    checkpointed = cfg.resume
    t_start = time.perf_counter()
    images_done = 0
    last: dict = {}
    pending: list[tuple[int, int, float, torch.Tensor]] = []  # (step, epoch, seconds, stats on device)
    divs: dict[int, float] = {}  # step -> diversity of the sample grid written at that step
    # the real spread the samples' diversity is measured against: a fixed real batch of 64
    ref = torch.randperm(n, generator=make_generator(cfg.seed + 4))[:64].to(device)
    real_spread = mean_pairwise_distance(x_all[ref])

    def flush(want_stop: bool = False) -> bool:
        """Read the pending losses in one host sync; log them; stop on a non-finite value. Under
        torchrun the losses are averaged over the processes, and the result says whether any of
        them was asked to stop (Ctrl-C or SIGTERM), in the same collective."""
        nonlocal last
        if not pending:
            return want_stop
        stacked, want_stop = mean_and_flag(dist, torch.stack([p[3] for p in pending]), want_stop)
        vals = stacked.float().cpu().numpy()
        bad = ~np.isfinite(vals).all(axis=1)
        rows = [{"step": st, "epoch": ep, **{k: f"{v:.6g}" for k, v in zip(STAT_NAMES, row)},
                 "diversity": f"{divs[st]:.4g}" if st in divs else "", "seconds": f"{sec:.3f}"}
                for (st, ep, sec, _), row in zip(pending, vals)]
        if bad.any():
            k = int(np.argmax(bad))
            if dist.main:
                append_log(run, LOG_FIELDS, rows[:k])
            pending.clear()
            raise not_finite(rows[k]["step"], f" (loss_d {rows[k]['loss_d']}, loss_g {rows[k]['loss_g']})",
                             run / "generator.safetensors", checkpointed)
        if dist.main:
            append_log(run, LOG_FIELDS, rows)
        pending.clear()
        last = dict(zip(STAT_NAMES, map(float, vals[-1])))
        if progress:
            extra = {"diversity": divs[max(divs)]} if divs else {}
            progress("train-gan", trainer.step_count, total_steps,
                     epoch=f"{epoch + 1}/{-(-total_steps // steps_per_epoch)}",
                     loss_d=last["loss_d"], loss_g=last["loss_g"], **extra, images=images_done)
        return want_stop

    def save() -> None:
        nonlocal checkpointed, last_save
        if not dist.active:  # under torchrun saves come right after the collective flush
            flush()  # never checkpoint a state whose losses were not checked
        _save(run, trainer, meta, epoch, batch,
              perm if perm is not None else torch.zeros(0, dtype=torch.int64), writer)
        checkpointed, last_save = True, time.monotonic()

    def grid() -> None:
        with autocast(device, trainer.amp):  # the training precision: a grid is a picture, not a result
            x = sample(trainer.sampler(), fixed_z, fixed_labels)
        divs[trainer.step_count] = diversity(x, real_spread)
        save_png(run / "samples" / f"step_{trainer.step_count:07d}.png", image_grid(x))

    last_save = time.monotonic()
    in_step = False
    writer = BackgroundWriter(background=device.type != "cpu")
    try:
        if not cfg.resume and dist.main:
            atomic_write_json(run / "config.json", {
                **record_header("gan-run"), "train": asked, "diffaugment": cfg.diffaugment, "net": net.to_dict(),
                "classes": list(classes), "default_label": label, "counts": data.counts(),
                "data_fingerprint": fingerprint, "steps": total_steps, "device": str(device),
                "autocast": str(trainer.amp) if trainer.amp else "fp32", "warnings": warnings,
                "processes": dist.world, "xraygan_version": __version__, "torch_version": torch.__version__})
        if dist.main:
            (run / "samples").mkdir(exist_ok=True)
        with deferred_interrupt() as stop:
            while trainer.step_count < total_steps:
                if batch >= steps_per_epoch:
                    epoch, batch, perm = epoch + 1, 0, None
                if perm is None and not cfg.conditional:
                    perm = trainer.randperm(n)
                if cfg.conditional:
                    idx, labels = trainer.conditional_batch(by_class, cfg.batch_size)
                    idx, labels = dist.share(idx), dist.share(labels)
                else:
                    idx = dist.share(perm[batch * cfg.batch_size:(batch + 1) * cfg.batch_size])
                    labels = None
                in_step = True
                stats = trainer.step(x_all[idx], labels)
                batch += 1
                in_step = False
                images_done += cfg.batch_size
                s = trainer.step_count
                pending.append((s, epoch + 1, time.perf_counter() - t_start, stats))
                end = s == total_steps
                if dist.main and (end or s % cfg.sample_every == 0):
                    grid()
                if dist.active:  # every process meets at the same steps; rank 0 alone saves
                    if end or s % cfg.log_every == 0 or s % cfg.save_every == 0:
                        stop_all = flush(stop.requested)
                        if dist.main and (end or stop_all or s % cfg.save_every == 0
                                          or time.monotonic() - last_save >= cfg.save_seconds):
                            save()
                        if stop_all:
                            raise KeyboardInterrupt
                    continue
                if len(pending) >= cfg.log_every or end or stop.requested:
                    flush()
                if end or stop.requested or s % cfg.save_every == 0 \
                        or time.monotonic() - last_save >= cfg.save_seconds:
                    save()
                if stop.requested:
                    raise KeyboardInterrupt
        writer.wait()  # the run is reported as saved only once its files are on disk
    except KeyboardInterrupt:
        writer.wait()
        if not dist.main:
            raise Interrupted(f"interrupted at step {trainer.step_count}") from None
        if in_step:
            raise interrupted_in_step(run, created, checkpointed) from None
        save()
        writer.wait()
        raise Interrupted(f"interrupted at step {trainer.step_count}; saved: continue with "
                          f"xraygan train-gan ... --out {run} --resume") from None
    except BaseException:
        abandon_failed_run(run, created, writer, checkpointed, writes=dist.main)
        raise
    seconds = time.perf_counter() - t_start
    final_div = divs.get(trainer.step_count)
    if final_div is not None and final_div < COLLAPSED_BELOW and trainer.step_count >= COLLAPSE_MIN_STEPS:
        warnings.append(f"the generator has collapsed: its samples are nearly alike (diversity "
                        f"{final_div:.2f} of a real batch's spread; healthy runs stay near 1). Try "
                        "--diffaugment color,translation,cutout, a lower --lr, fewer --steps, or "
                        f"look at {run / 'samples'}")
    return {"run": str(run), "epochs": epoch + 1, "steps": trainer.step_count, "diversity": final_div,
            "classes": list(classes), "label": label, "conditional": cfg.conditional,
            "images_per_s": images_done / seconds if seconds > 0 else None, "processes": dist.world,
            "seconds": round(seconds, 1), "device": str(device),
            "precision": str(trainer.amp) if trainer.amp else "fp32", **last,
            "generator": str(run / "generator.safetensors"),
            "samples": str(run / "samples"), "warnings": warnings}

