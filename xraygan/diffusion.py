"""`xraygan train-diffusion`: a DDPM on one class, or a conditional DDPM on all classes with
classifier-free guidance.

The network is Hugging Face diffusers' `UNet2DModel` and the samplers are its `DDIMScheduler` and
`DDPMScheduler`, built here from a config (nothing is downloaded; weights are written as
xraygan safetensors checkpoints). The training step itself (cosine schedule of Nichol &
Dhariwal, epsilon prediction, MSE) is a few lines of PyTorch on the schedule's ᾱ_t, so every
random number comes from xraygan's seeded generators and a resumed run on the CPU is bit-exact.
The run conventions are train-gan's: config.json, log.csv, sample grids, checkpoints by steps
and seconds, --resume, the NaN guard, Ctrl-C that saves.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xraygan import __version__
from xraygan.allocator import keep_freed_memory
from xraygan.checkpoint import (
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    snapshot,
    state_dict_to_tensors,
    tensors_to_state_dict,
)
from xraygan.distributed import Dist
from xraygan.errors import InputError, check_choice, check_float, check_int
from xraygan.fsutil import atomic_write_json, check_out_apart, record_header
from xraygan.gan_models import base_and_doublings, ema_update, size_problem
from xraygan.images import save_png
from xraygan.memory import check_batch, diffusion_footprint
from xraygan.options import DEVICE_HELP, PRECISION_HELP, given_options, opt
from xraygan.runs import begin_run, check_run_target, fingerprint_arrays, trained_to
from xraygan.runtime import DEVICES, autocast, autocast_dtype, make_generator, resolve_device
from xraygan.steploop import Cadence, Family, Position, StepLoop
from xraygan.trainset import TrainingRun, image_grid, load_training_set, to_model_input

Progress = Callable[..., None]
# channel multipliers per resolution level at the four sizes the U-Net was first tuned at (attention only
# at the lowest level, 8×8); `unet_levels` extends the pattern to every other size
_LEVELS = {16: (1, 2), 32: (1, 2, 4), 64: (1, 2, 4, 4), 128: (1, 2, 2, 4, 4)}
# default (width, layers per block) by image size. At ≤ 32 px the U-Net is sized for two CPU cores:
# 16/32/64 channels with one block per level (0.69 M parameters) trained 4,000 steps in 26 min and
# sampled 805 images with 50 DDIM steps in 108 s there; 32 channels with two blocks (3.9 M) was
# 3.5x slower to train and 3.8x slower to sample (benchmarks/bench_diffusion.py --also 32:2). Larger images,
# where a GPU is the expected machine, keep the wider net.
SMALL_SHAPE, WIDE_SHAPE = (16, 1), (32, 2)


def unet_levels(size: int) -> tuple[int, ...] | None:
    """The U-Net's channel multipliers, one per resolution level, for `size` px images; None when
    the size cannot be made. The same sizes as the DCGAN's (16-512 px, 4 to 7 times a power of
    two): each level halves the map, down to a lowest map of 4-8 px (8 for sizes 4·2^k, else the
    base itself: 7×7 at 224 px, 5×5 at 160), where the attention block works on at most 64 tokens.
    Multipliers double up to 4 and then stay, with extra levels added at width 1 in front."""
    if size in _LEVELS:
        return _LEVELS[size]
    bk = base_and_doublings(size)
    if bk is None:
        return None
    base, k = bk
    n = k if base == 4 else k + 1  # levels: the lowest map is size / 2^(n-1)
    tail = {1: (1,), 2: (1, 2), 3: (1, 2, 4), 4: (1, 2, 4, 4)}.get(n, (1, 2, 2, 4, 4))
    return (1,) * (n - len(tail)) + tail


def default_shape(size: int) -> tuple[int, int]:
    """(width, layers per block) of the U-Net when the user gives neither."""
    return SMALL_SHAPE if size <= 32 else WIDE_SHAPE


SAMPLERS = ("ddim", "ddpm")
# what the U-Net predicts: the noise ε (Ho et al.) or v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022)
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}  # option value -> diffusers' prediction_type
LOG_FIELDS = ("step", "epoch", "loss", "seconds")


@dataclass(frozen=True)
class DiffusionNetConfig:
    image_size: int = 32
    width: int = 32  # channels of the first level; the others are multiples (unet_levels)
    layers_per_block: int = 2
    num_classes: int = 0  # 0: unconditional; else labels 0..n-1, and n means "no label" (guidance)
    timesteps: int = 1000
    schedule: str = "squaredcos_cap_v2"  # diffusers' name for the cosine schedule
    prediction: str = "epsilon"  # diffusers' prediction_type (checkpoints before this field: epsilon)

    def to_dict(self) -> dict:
        return asdict(self)


def build_unet(net: DiffusionNetConfig) -> nn.Module:
    from diffusers import UNet2DModel

    mult = unet_levels(net.image_size)
    if mult is None:
        raise ValueError(size_problem(net.image_size))
    n = len(mult)
    return UNet2DModel(
        sample_size=net.image_size, in_channels=1, out_channels=1, layers_per_block=net.layers_per_block,
        block_out_channels=tuple(net.width * m for m in mult),
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=math.gcd(32, net.width), attention_head_dim=8,
        num_class_embeds=net.num_classes + 1 if net.num_classes else None)


def scheduler(net: DiffusionNetConfig, sampler: str = "ddpm"):
    """The diffusers scheduler for this net's schedule and target: DDIM, or the DDPM chain.
    Predicted images are clipped to [-1, 1] at each step, the range the net was trained on."""
    from diffusers import DDIMScheduler, DDPMScheduler

    return (DDIMScheduler if sampler == "ddim" else DDPMScheduler)(
        num_train_timesteps=net.timesteps, beta_schedule=net.schedule, prediction_type=net.prediction,
        clip_sample=True)


def alphas_cumprod(net: DiffusionNetConfig) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1, as the diffusers schedulers use them."""
    return scheduler(net).alphas_cumprod.float()


def cosine_alpha_bar(t: torch.Tensor, T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's closed form ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2)."""
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def predict(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
            null: int, guidance: float, amp: torch.dtype | None) -> torch.Tensor:
    """The U-Net's output (ε̂ or v̂) at (x_t, t); with labels and guidance w > 0,
    (1 + w)·out(x, label) − w·out(x, no label), which is linear, so the same for either target."""
    with autocast(x.device, amp):
        if labels is None:
            return unet(x, t).sample.float()
        if guidance == 0:
            return unet(x, t, class_labels=labels).sample.float()
        both = unet(torch.cat([x, x]), torch.cat([t, t]),
                    class_labels=torch.cat([labels, torch.full_like(labels, null)])).sample.float()
        cond, uncond = both.chunk(2)
        return (1 + guidance) * cond - guidance * uncond


@torch.no_grad()
def sample(unet: nn.Module, net: DiffusionNetConfig, noise: torch.Tensor, labels: torch.Tensor | None,
           sampler: str = "ddim", steps: int = 50, guidance: float = 0.0,
           generators: list[torch.Generator] | None = None, amp: torch.dtype | None = None) -> torch.Tensor:
    """Images in [-1, 1] from initial noise x_T. DDIM (η = 0) is a deterministic function of the
    noise; the DDPM chain draws fresh noise at each step from `generators` (one per image, so an
    image never depends on the batch it was made in)."""
    was = unet.training
    unet.eval()
    try:
        sched = scheduler(net, sampler)
        sched.set_timesteps(steps if sampler == "ddim" else net.timesteps)
        x = noise
        for t in sched.timesteps:
            tt = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
            out = predict(unet, x, tt, labels, net.num_classes, guidance, amp)
            if sampler == "ddim":
                x = sched.step(out, int(t), x, eta=0.0).prev_sample
            else:
                x = sched.step(out, int(t), x, generator=generators).prev_sample
        return x.clamp(-1, 1)
    finally:
        unet.train(was)


def image_noise(seed: int, start: int, count: int, size: int) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T for images start..start+count-1 and each image's own stream for the DDPM chain."""
    gens = [make_generator(seed * 1_000_003 + start + i) for i in range(count)]
    return torch.stack([torch.randn(1, size, size, generator=g) for g in gens]), gens


def load_diffusion(path: Path, device: torch.device) -> tuple[nn.Module, DiffusionNetConfig, dict]:
    tensors, meta = load_checkpoint(path, "diffusion-model")
    try:
        net = DiffusionNetConfig(**meta["config"])
        unet = build_unet(net)
        unet.load_state_dict(tensors)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{path}: diffusion checkpoint does not match its config ({e})") from None
    return unet.to(device).eval(), net, meta


@dataclass(frozen=True)
class TrainDiffusionConfig(TrainingRun):
    steps: int = opt(4000, "Training steps (4,000: about 26 min at 32 px on two CPU cores).")
    batch_size: int = opt(64, "Images per step.")
    lr: float = opt(2e-4, "AdamW learning rate.")
    width: int | None = opt(None, "U-Net channels at full resolution (a multiple of 4); deeper levels have "
                                  "2-4x. Default: 16 up to 32 px, 32 above.", show_default=False)
    layers_per_block: int | None = opt(None, "ResNet blocks per U-Net level. Default: 1 up to 32 px, 2 above.",
                                       show_default=False)
    timesteps: int = opt(1000, "Diffusion timesteps T (cosine schedule).")
    prediction: str = opt("v", "What the U-Net learns to predict: v (√ᾱ·noise − √(1−ᾱ)·image; stable where "
                               "the image is almost all noise) or eps (the noise itself, as in Ho et al. 2020).")
    p_uncond: float = opt(0.1, "Conditional: share of training labels dropped, so the model also learns the "
                               "unconditional score that guidance needs.")
    ema: float = opt(0.999, "Decay of the weight average used for sampling; 0 = off.")
    seed: int = opt(0, "Seed for weights, data order, noise and timesteps.")
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("auto", PRECISION_HELP)
    save_every: int = opt(1000, "Checkpoint every N steps (also every --save-seconds, at the end and on Ctrl-C).")
    save_seconds: float = opt(60.0, "Checkpoint at least this often (seconds).")
    sample_every: int = opt(1000, "Write a 16-image sample grid every N steps (and at the end).")
    sample_steps: int = opt(50, "DDIM steps for the sample grids.")
    log_every: int = opt(20, "Read the loss from the device every N steps: log rows, progress and the NaN guard.")
    resume: bool = opt(False, "Continue an interrupted run from its last checkpoint (same options; "
                              "--steps may grow).")
    keep_state: bool = opt(True, "Keep a finished run's training state (U-Net, EMA, optimizer moments), so "
                                 "--resume with more --steps can extend it; off: only its record is kept once "
                                 "the run ends (an interrupted run keeps all it needs to resume either way).")
    force: bool = opt(False, "Replace an earlier train-diffusion run in --out.")

    def validate(self) -> None:
        check_int("--steps", self.steps)
        check_int("--batch-size", self.batch_size, 2)
        check_float("--lr", self.lr, 0.0, 1.0)
        if self.width is not None:
            check_int("--width", self.width, 4)
            if self.width % 4:
                raise InputError(f"--width {self.width}: must be a multiple of 4")
        if self.layers_per_block is not None:
            check_int("--layers-per-block", self.layers_per_block)
        check_int("--timesteps", self.timesteps, 10)
        check_choice("--prediction", self.prediction, tuple(PREDICTIONS))
        check_float("--p-uncond", self.p_uncond, 0.0, 1.0, low_open=False, high_open=True)
        if given_options(self, "p_uncond") and not self.conditional:
            raise InputError(f"--p-uncond {self.p_uncond}: drops the labels of a conditional model; give "
                             "--conditional too (a one-class model has no labels to drop)")
        check_float("--ema", self.ema, 0.0, 1.0, low_open=False, high_open=True)
        check_int("--save-every", self.save_every)
        check_float("--save-seconds", self.save_seconds, 0.0)
        check_int("--sample-every", self.sample_every)
        check_int("--sample-steps", self.sample_steps)
        check_int("--log-every", self.log_every)
        check_choice("--device", self.device, DEVICES)
        check_choice("--precision", self.precision, ("auto", "fp32", "bf16"))
        check_out_apart(self.out, data=self.data)


RESUME_KEYS = ("conditional", "cls", "batch_size", "lr", "width", "layers_per_block", "timesteps", "prediction",
               "p_uncond", "ema", "seed")


def net_config(cfg: TrainDiffusionConfig, size: int, n_classes: int) -> DiffusionNetConfig:
    """The U-Net `train-diffusion` with `cfg` builds for `size` px images of `n_classes` classes."""
    width, layers = default_shape(size)
    return DiffusionNetConfig(image_size=size, width=cfg.width or width, layers_per_block=cfg.layers_per_block or layers,
                              num_classes=n_classes if cfg.conditional else 0, timesteps=cfg.timesteps,
                              prediction=PREDICTIONS[cfg.prediction])


def is_done(run: Path, steps: int) -> bool:
    """Whether the train-diffusion run in `run` has trained at least `steps` steps and kept its model."""
    return trained_to(run, steps, "diffusion.safetensors")


def train_diffusion(cfg: TrainDiffusionConfig, progress: Progress | None = None) -> dict:
    """Train (or resume) a diffusion run; returns a summary dict. A run that fails before its
    first checkpoint leaves no folder behind."""
    cfg.validate()
    run = Path(cfg.out)
    check_run_target(run, cfg, RESUME_KEYS, "train-diffusion")
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()  # a 128 px step about 2x faster (docs/performance.md)
    # the same training set as train-gan's; refuses the sizes no generator makes
    data, classes, label = load_training_set(cfg.data, cfg.conditional, cfg.cls, cfg.batch_size)
    fingerprint = fingerprint_arrays(data.images, data.labels, list(classes))
    net = net_config(cfg, data.size, len(classes))
    check_batch("diffusion", *diffusion_footprint(net), cfg.batch_size, device, str(cfg.data), data.size)
    torch.manual_seed(cfg.seed)
    model = _Model(cfg, net, device)
    x_all = to_model_input(data.images, device, False)
    y_all = torch.from_numpy(data.labels).to(device)
    meta = {"classes": list(classes), "image_size": data.size, "conditional": cfg.conditional,
            "default_label": label, "seed": cfg.seed, "run": run.name, "family": "diffusion",
            "xraygan_version": __version__}
    created = begin_run(run, cfg.resume, cfg.force, fingerprint, cfg.data)
    loop = StepLoop(run, _family(cfg, model, x_all, y_all, meta, run),
                    Cadence(cfg.steps, len(x_all) // cfg.batch_size, cfg.log_every, cfg.save_every, cfg.save_seconds,
                            cfg.sample_every), Dist(), device, created, cfg.resume, progress, cfg.keep_state)
    if cfg.resume:
        model.load(*loop.resume())

    def prologue() -> None:
        if not cfg.resume:
            atomic_write_json(run / "config.json", {
                **record_header("diffusion-run"), "train": cfg.to_json(), "net": net.to_dict(),
                "classes": list(classes), "default_label": label, "counts": data.counts(),
                "data_fingerprint": fingerprint, "device": str(device),
                "autocast": str(model.amp) if model.amp else "fp32", "xraygan_version": __version__,
                "torch_version": torch.__version__})
        (run / "samples").mkdir(exist_ok=True)
        model.unet.train()

    loop.train(prologue)
    return {"run": str(run), "steps": loop.pos.step, "epochs": loop.pos.epoch + 1, "classes": list(classes),
            "label": label, "conditional": cfg.conditional, "loss": loop.last.get("loss", float("nan")),
            "seconds": round(loop.seconds, 1), "images_per_s": loop.images_per_s(), "device": str(device),
            "precision": str(model.amp) if model.amp else "fp32", "checkpoint": str(run / "diffusion.safetensors"),
            "samples": str(run / "samples"), "parameters": sum(p.numel() for p in model.unet.parameters())}


class _Model:
    """A diffusion run's network, its EMA copy, optimizer and random streams (data order; noise,
    timesteps and label dropout), all restored by `load`."""

    def __init__(self, cfg: TrainDiffusionConfig, net: DiffusionNetConfig, device: torch.device):
        self.net = net
        self.unet = build_unet(net).to(device)
        self.ema = copy.deepcopy(self.unet).eval().requires_grad_(False) if cfg.ema > 0 else None
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.amp = autocast_dtype(device, cfg.precision)
        self.abar = alphas_cumprod(net).to(device)
        self.rng_data, self.rng_noise = make_generator(cfg.seed), make_generator(cfg.seed + 1)

    def load(self, t: dict[str, torch.Tensor], smeta: dict) -> None:
        self.unet.load_state_dict(tensors_to_state_dict("model.", t))
        if self.ema is not None:
            self.ema.load_state_dict(tensors_to_state_dict("ema.", t))
        optimizer_from_tensors("opt.", self.opt, t, smeta["param_groups"])
        self.rng_data.set_state(t["rng.data"])
        self.rng_noise.set_state(t["rng.noise"])

    def state(self) -> tuple[dict[str, torch.Tensor], list]:
        t = state_dict_to_tensors("model.", self.unet.state_dict())
        if self.ema is not None:
            t.update(state_dict_to_tensors("ema.", self.ema.state_dict()))
        o, groups = optimizer_to_tensors("opt.", self.opt)
        t.update(o)
        t["rng.data"], t["rng.noise"] = self.rng_data.get_state(), self.rng_noise.get_state()
        return t, groups


def _family(cfg: TrainDiffusionConfig, m: _Model, x_all, y_all: torch.Tensor, meta: dict, run: Path) -> Family:
    """train-diffusion in the step loop: a batch in the epoch's order, noised at random timesteps
    (epsilon or v prediction, MSE), and its files: the model (EMA weights when kept) and state."""
    net, device, size = m.net, m.abar.device, x_all[0:1].shape[-1]
    grid_noise, _ = image_noise(cfg.seed + 3, 0, 16, size)
    grid_noise = grid_noise.to(device)
    grid_labels = (torch.arange(16) % max(1, net.num_classes)).to(device) if cfg.conditional else None

    def step(pos: Position) -> tuple[torch.Tensor, int]:
        idx = pos.perm[pos.batch * cfg.batch_size:(pos.batch + 1) * cfg.batch_size].to(device)
        k = len(idx)
        # every random number of the step from the seeded CPU streams (bit-exact resume on the CPU)
        tt = torch.randint(0, net.timesteps, (k,), generator=m.rng_noise)
        noise = torch.randn(k, 1, size, size, generator=m.rng_noise)
        drop = torch.rand(k, generator=m.rng_noise) < cfg.p_uncond if cfg.conditional else None
        tt, noise = tt.to(device), noise.to(device)
        x0 = x_all[idx]
        a = m.abar[tt].view(-1, 1, 1, 1)
        signal, spread = a.sqrt(), (1 - a).sqrt()
        xt = signal * x0 + spread * noise
        labels = None
        if cfg.conditional:
            labels = torch.where(drop.to(device), torch.full_like(y_all[idx], net.num_classes), y_all[idx])
        with autocast(device, m.amp):
            out = m.unet(xt, tt, class_labels=labels).sample if labels is not None else m.unet(xt, tt).sample
        target = noise if net.prediction == "epsilon" else signal * noise - spread * x0
        loss = F.mse_loss(out.float(), target)
        m.opt.zero_grad(set_to_none=True)
        loss.backward()
        m.opt.step()
        if m.ema is not None:
            ema_update(m.ema, m.unet, min(cfg.ema, (1 + pos.step) / (10 + pos.step)))
        return loss.detach(), k

    def state() -> tuple[dict[str, torch.Tensor], dict]:
        t, groups = m.state()
        return t, {"param_groups": groups}

    def save(pos: Position, w, t: dict[str, torch.Tensor], smeta: dict) -> None:
        """The model file (its weights, whatever the state file holds), then the state file."""
        common = dict(meta, epoch=pos.epoch, step=pos.step)
        w.submit([
            snapshot(run / "diffusion.safetensors", (m.ema or m.unet).state_dict(), "diffusion-model",
                     net.to_dict(), w.copies, **common, ema=m.ema is not None),
            snapshot(run / "state.safetensors", t, "diffusion-state", net.to_dict(), w.copies, **common,
                     batch=pos.batch, **smeta)])

    def grid(step: int) -> None:
        x = sample(m.ema or m.unet, net, grid_noise, grid_labels, "ddim", cfg.sample_steps, amp=m.amp)
        save_png(run / "samples" / f"step_{step:07d}.png", image_grid(x, nrow=4))

    return Family("train-diffusion", "diffusion.safetensors", "diffusion-state", LOG_FIELDS, ("loss",), ("loss",),
                  order=lambda: torch.randperm(len(x_all), generator=m.rng_data), step=step, state=state, save=save,
                  grid=grid)
