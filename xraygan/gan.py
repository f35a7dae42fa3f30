"""`xraygan train-gan`: a DCGAN on one class, or a conditional DCGAN on all classes.

The training set is decoded once into memory; every random draw (data order, noise, fake
labels, augmentation) comes from its own seeded CPU `torch.Generator`, and their states are
checkpointed with everything else, so an interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraygan import __version__
from xraygan.checkpoint import (
    BackgroundWriter,
    optimizer_from_tensors,
    optimizer_to_tensors,
    snapshot,
    state_dict_to_tensors,
    tensors_to_state_dict,
)
from xraygan.distributed import Dist, average_gradients, broadcast_module
from xraygan.distributed import session as distributed_session
from xraygan.errors import InputError, check_choice, check_float, check_int, require
from xraygan.fsutil import atomic_write_json, check_out_apart, record_header
from xraygan.gan_models import (
    DIFFAUG_POLICIES,
    Discriminator,
    GanNetConfig,
    Generator,
    apply_diff_augment,
    diffaug_draw,
    ema_update,
)
from xraygan.images import save_png
from xraygan.memory import check_batch, gan_footprint
from xraygan.options import DEVICE_HELP, TORCHRUN_BATCH_HELP, opt
from xraygan.runs import begin_run, check_run_target, fingerprint_arrays, trained_to
from xraygan.runtime import DEVICES, autocast, autocast_dtype, make_generator
from xraygan.steploop import Cadence, Family, Position, StepLoop
from xraygan.trainset import ModelInput, TrainingRun, image_grid, load_training_set, to_model_input

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
class TrainGanConfig(TrainingRun):
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
                                   "than 5,000 training images, where D otherwise memorises the real set.",
                           text=lambda v: v or "none")
    ema: float = opt(0.999, "Decay of the moving average of G's weights used for sampling; 0 = off.")
    loss: str = opt("bce", "bce (the DCGAN's non-saturating loss) or hinge (SNGAN / BigGAN; use with "
                           "--spectral-norm).")
    spectral_norm: bool = opt(False, "Spectrally normalised discriminator convolutions, without batch norm (SNGAN).")
    r1: float = opt(0.0, "R1 penalty weight gamma: gamma/2 times the squared gradient of D's output on the real "
                         "images it sees, every 16 steps scaled by 16 (StyleGAN2's lazy form); 0 = off.")
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
    keep_state: bool = opt(True, "Keep a finished run's training state (generator, discriminator, EMA, "
                                 "optimizer moments), so --resume with more --steps can extend it; off: only "
                                 "its record is kept once the run ends (an interrupted run keeps all it needs "
                                 "to resume either way).")
    force: bool = opt(False, "Replace an earlier train-gan run in --out.")

    def __post_init__(self):
        super().__post_init__()
        for name in ("healthy", "loss"):
            if getattr(self, name):
                object.__setattr__(self, name, getattr(self, name).lower())
        if self.diffaugment == "none":
            object.__setattr__(self, "diffaugment", "")

    @property
    def alpha_value(self) -> float:
        return 0.5 if self.alpha is None else self.alpha

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
        check_float("--r1", self.r1, 0.0, None, low_open=False)
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
               "ema", "lr", "loss", "spectral_norm", "r1")
LOSSES = ("bce", "hinge")
R1_EVERY = 16  # steps between R1 penalties (each weighted by 16): StyleGAN2's lazy regularisation



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

    def _r1_weight(self) -> float | None:
        """This step's R1 weight: gamma/2, times R1_EVERY on every R1_EVERY-th step (None between)."""
        if self.cfg.r1 == 0 or self.step_count % R1_EVERY:
            return None
        return self.cfg.r1 / 2 * R1_EVERY

    def _ema_decay(self) -> float:
        # warm-up: early on the average follows G closely, so short runs are not stuck near the
        # random initialisation
        t = self.step_count
        return min(self.cfg.ema, (1 + t) / (10 + t))

    def _core(self, real: torch.Tensor, labels: torch.Tensor | None, z: torch.Tensor,
              aug: torch.Tensor | None, decay: float | torch.Tensor, r1: float | torch.Tensor | None,
              graph: bool = False) -> torch.Tensor:
        """The step's arithmetic: the same code runs eagerly and inside the CUDA graph. `r1` weights
        this step's R1 penalty (None: not computed)."""
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
            if r1 is not None:  # the penalty is on the gradient w.r.t. the images D sees
                seen_real = seen_real.detach().requires_grad_(True)
            # conditional: the fake batch carries exactly the real batch's labels (see conditional_batch)
            d_real = self.D(seen_real, labels).float()
            d_fake = self.D(seen_fake, labels).float()
            if self.cfg.loss == "hinge":  # D pushes real logits above 1 and fake ones below -1
                loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
            else:
                loss_d = (F.binary_cross_entropy_with_logits(d_real, ones)
                          + F.binary_cross_entropy_with_logits(d_fake, zeros))
        total_d = loss_d
        if r1 is not None:
            # R1 (Mescheder et al. 2018): gamma/2 E|grad_x D(x)|^2 on real images keeps D flat
            # around the data, so it cannot push G with steep, noisy gradients
            (grad,) = torch.autograd.grad(d_real.sum(), seen_real, create_graph=True)
            total_d = loss_d + r1 * grad.float().square().flatten(1).sum(1).mean()
        self.opt_d.zero_grad(set_to_none=not graph)
        total_d.backward()
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
            out = self._core(real, real_labels, z, aug, self._ema_decay(), self._r1_weight())
        else:
            out = self._graph_step(real, real_labels, z, aug)
        self.step_count += 1
        return out

    def _graph_step(self, real, labels, z, aug) -> torch.Tensor:
        if self._graph is None and self._eager_since_start < self.GRAPH_WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._core(real, labels, z, aug, self._ema_decay(), self._r1_weight())
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
                return self._core(real, labels, z, aug, self._ema_decay(), self._r1_weight())
        st = self._static
        st["real"].copy_(real)
        st["z"].copy_(z)
        if labels is not None:
            st["labels"].copy_(labels)
        if aug is not None:
            st["aug"].copy_(aug)
        st["decay"].fill_(self._ema_decay())
        if st["r1"] is not None:  # the graph computes the penalty every step; 0 weights it out between
            st["r1"].fill_(self._r1_weight() or 0.0)
        self._graph.replay()
        return st["out"].clone()

    def _capture(self, real, labels, z, aug) -> None:
        st = {"real": real.clone(), "z": z.clone(), "labels": labels.clone() if labels is not None else None,
              "aug": aug.clone() if aug is not None else None,
              "decay": torch.tensor(self._ema_decay(), device=self.device),
              "r1": torch.tensor(self._r1_weight() or 0.0, device=self.device) if self.cfg.r1 else None}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            st["out"] = self._core(st["real"], st["labels"], st["z"], st["aug"], st["decay"], st["r1"],
                                   graph=True)
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


@torch.no_grad()
def sample(G: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    was = G.training
    G.eval()
    try:
        return G(z, labels).float()
    finally:
        G.train(was)


def _warnings(cfg: TrainGanConfig, label: str) -> list[str]:
    out = []
    if cfg.alpha is not None and not cfg.conditional:
        out.append("--alpha has no effect without --conditional (a DCGAN learns one class)")
    if not cfg.conditional and cfg.cls is None and label == cfg.healthy:
        out.append(f"the least frequent class in {cfg.data} is '{label}', the healthy class: "
                   f"the GAN learns {label} images; give --class to choose")
    return out


def net_config(cfg: TrainGanConfig, size: int, n_classes: int) -> GanNetConfig:
    """The networks `train-gan` with `cfg` builds for `size` px images of `n_classes` classes."""
    return GanNetConfig(image_size=size, nz=cfg.nz, ngf=cfg.ngf, ndf=cfg.ndf,
                        num_classes=n_classes if cfg.conditional else 0, spectral_norm=cfg.spectral_norm)


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
    data, classes, label = load_training_set(cfg.data, cfg.conditional, cfg.cls, cfg.batch_size)
    fingerprint = fingerprint_arrays(data.images, data.labels, list(classes))
    warnings = _warnings(cfg, label)
    asked = cfg.to_json()  # as given (e.g. diffaugment "auto"); --resume compares against this
    cfg = replace(cfg, diffaugment=resolve_diffaugment(cfg.diffaugment, len(data.images)))
    probs = fake_label_probs(classes, cfg.healthy, cfg.alpha_value) if cfg.conditional else None
    net = net_config(cfg, data.size, len(classes))
    check_batch("gan", *gan_footprint(net, cfg.r1 > 0), -(-cfg.batch_size // dist.world), device, str(cfg.data), data.size)
    trainer = GanTrainer(cfg, net, device, probs, cuda_graphs=cfg.cuda_graphs, dist=dist)
    x_all = to_model_input(data.images, device, cfg.channels_last and device.type != "mps")
    n = len(x_all)
    steps_per_epoch = n // cfg.batch_size  # drop_last: batch norm sees full batches
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    meta = {"classes": list(classes), "image_size": data.size, "conditional": cfg.conditional,
            "default_label": label, "alpha": cfg.alpha_value if cfg.conditional else None,
            "healthy": cfg.healthy if cfg.conditional else None, "seed": cfg.seed,
            "run": run.name, "xraygan_version": __version__}
    created = begin_run(run, cfg.resume, cfg.force, fingerprint, cfg.data, writes=dist.main)
    loop = StepLoop(run, _family(cfg, trainer, x_all, data.labels, len(classes), meta, run),
                    Cadence(total_steps, steps_per_epoch, cfg.log_every, cfg.save_every, cfg.save_seconds,
                            cfg.sample_every), dist, device, created, cfg.resume, progress, cfg.keep_state)
    if cfg.resume:
        trainer.load_state(*loop.resume())
        if loop.pos.perm is not None:
            loop.pos.perm = loop.pos.perm.to(trainer.rng_device)
    for m in (trainer.G, trainer.D, trainer.G_ema):
        if m is not None:
            broadcast_module(dist, m)

    def prologue() -> None:
        if not cfg.resume and dist.main:
            atomic_write_json(run / "config.json", {
                **record_header("gan-run"), "train": asked, "diffaugment": cfg.diffaugment, "net": net.to_dict(),
                "classes": list(classes), "default_label": label, "counts": data.counts(),
                "data_fingerprint": fingerprint, "steps": total_steps, "device": str(device),
                "autocast": str(trainer.amp) if trainer.amp else "fp32", "warnings": warnings,
                "processes": dist.world, "xraygan_version": __version__, "torch_version": torch.__version__})
        if dist.main:
            (run / "samples").mkdir(exist_ok=True)

    loop.train(prologue)
    final_div = loop.grid_values.get(trainer.step_count)
    if final_div is not None and final_div < COLLAPSED_BELOW and trainer.step_count >= COLLAPSE_MIN_STEPS:
        warnings.append(f"the generator has collapsed: its samples are nearly alike (diversity "
                        f"{final_div:.2f} of a real batch's spread; healthy runs stay near 1). Try "
                        "--diffaugment color,translation,cutout, a lower --lr, fewer --steps, or "
                        f"look at {run / 'samples'}")
    return {"run": str(run), "epochs": loop.pos.epoch + 1, "steps": trainer.step_count, "diversity": final_div,
            "classes": list(classes), "label": label, "conditional": cfg.conditional,
            "images_per_s": loop.images_per_s(), "processes": dist.world,
            "seconds": round(loop.seconds, 1), "device": str(device),
            "precision": str(trainer.amp) if trainer.amp else "fp32", **loop.last,
            "generator": str(run / "generator.safetensors"),
            "samples": str(run / "samples"), "warnings": warnings}


def _family(cfg: TrainGanConfig, trainer: GanTrainer, x_all: ModelInput, labels: np.ndarray, n_classes: int,
            meta: dict, run: Path) -> Family:
    """train-gan in the step loop: a batch (in the epoch's order, or drawn per class when
    conditional), one D and G step, and its files: generator, discriminator and resume state."""
    dist, device, n = trainer.dist, trainer.device, len(x_all)
    by_class = [torch.nonzero(torch.from_numpy(labels) == c).flatten().to(trainer.rng_device)
                for c in range(n_classes)]
    fixed_z = torch.randn(64, cfg.nz, generator=make_generator(cfg.seed + 3)).to(device)
    fixed_labels = (torch.arange(64) % n_classes).to(device) if cfg.conditional else None
    # the real spread the samples' diversity is measured against: a fixed real batch of 64
    ref = torch.randperm(n, generator=make_generator(cfg.seed + 4))[:64].to(device)
    real_spread = mean_pairwise_distance(x_all[ref])

    def step(pos: Position) -> tuple[torch.Tensor, int]:
        if cfg.conditional:
            idx, y = trainer.conditional_batch(by_class, cfg.batch_size)
            idx, y = dist.share(idx), dist.share(y)
        else:
            idx, y = dist.share(pos.perm[pos.batch * cfg.batch_size:(pos.batch + 1) * cfg.batch_size]), None
        return trainer.step(x_all[idx], y), cfg.batch_size

    def save(pos: Position, w: BackgroundWriter, t: dict[str, torch.Tensor], smeta: dict) -> None:
        """Snapshot generator and discriminator now, and the state the loop passes; the writer
        writes them in the background, the state file last, so a crash between the writes resumes
        from the previous consistent state."""
        common = dict(meta, epoch=pos.epoch, step=trainer.step_count)
        w.submit([
            snapshot(run / "generator.safetensors", trainer.sampler().state_dict(), "generator",
                     trainer.net.to_dict(), w.copies, **common, ema=trainer.G_ema is not None),
            snapshot(run / "discriminator.safetensors", trainer.D.state_dict(), "discriminator",
                     trainer.net.to_dict(), w.copies, **common),
            snapshot(run / "state.safetensors", t, "gan-state", trainer.net.to_dict(), w.copies,
                     **{**common, **smeta}, batch=pos.batch)])

    def grid(step_count: int) -> float:
        with autocast(device, trainer.amp):  # the training precision: a grid is a picture, not a result
            x = sample(trainer.sampler(), fixed_z, fixed_labels)
        save_png(run / "samples" / f"step_{step_count:07d}.png", image_grid(x))
        return diversity(x, real_spread)

    return Family("train-gan", "generator.safetensors", "gan-state", LOG_FIELDS, STAT_NAMES, ("loss_d", "loss_g"),
                  order=lambda: None if cfg.conditional else trainer.randperm(n), step=step,
                  state=trainer.state_tensors, save=save, grid=grid,
                  grid_column="diversity")
