"""`xraygan train-classifier`: a one-channel ResNet-18 trained on an image folder.

The training set is decoded once into memory as uint8 and augmented on the fly as tensors (one
batched affine warp per step: small rotations and shifts, never vertical flips). The model
with the best validation F1 (or ROC-AUC) is kept; training stops early when it stops improving.
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraygan import __version__
from xraygan.checkpoint import (
    RECORD_ALONE,
    cannot_extend,
    is_record_alone,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    state_dict_to_tensors,
    tensors_to_state_dict,
)
from xraygan.distributed import Dist, broadcast_floats
from xraygan.distributed import session as distributed_session
from xraygan.errors import (
    InputError,
    Interrupted,
    TrainingError,
    check_choice,
    check_float,
    check_int,
    require,
)
from xraygan.fsutil import atomic_write_json, check_out_apart, record_header, write_csv
from xraygan.images import ImageFolder, read_image_folder
from xraygan.memory import check_batch, classifier_footprint, fitting_batch
from xraygan.metrics import binary_metrics
from xraygan.options import DEVICE_HELP, PRECISION_HELP, TORCHRUN_BATCH_HELP, opt
from xraygan.provenance import generators_behind
from xraygan.runs import begin_run, check_run_target, discard_new_run, fingerprint_arrays
from xraygan.runtime import DEVICES, autocast, autocast_dtype, make_generator

MEAN, STD = 0.5, 0.25  # fixed intensity normalisation of 8-bit X-rays to about zero mean
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, per RGB channel
# `--small-stem auto` keeps the resolution (3×3 stride-1 stem, no max-pool) up to this size. Measured
# on the real Kermany data at 3:1 (docs/commands/train-classifier.md, "Choosing the stem"): at 32 px the small stem ranked
# better (test ROC-AUC 0.937 vs 0.918), at 64 px the standard stem did (0.940 ± 0.005 vs
# 0.927 ± 0.017, 3 seeds) while training 4x faster.
SMALL_STEM_UP_TO = 32


@dataclass(frozen=True)
class ClassifierNetConfig:
    num_classes: int = 2
    image_size: int = 64
    small_stem: bool = True  # 3×3 stride-1 first conv, no max-pool: keeps small images' detail

    def to_dict(self) -> dict:
        return asdict(self)


def build_resnet18(cfg: ClassifierNetConfig) -> nn.Module:
    from xraygan.resnet import ResNet18

    return ResNet18(cfg.num_classes, cfg.small_stem)


def load_pretrained(model: nn.Module, path: Path) -> list[str]:
    """Load local ImageNet-style ResNet-18 weights (.safetensors, or a torchvision .pth read
    with weights_only). Layers whose shape does not fit (the classifier head, a small stem) are
    left as initialised and returned.

    The RGB first layer is folded into one channel so that the network sees a gray X-ray as the
    pretrained one sees it replicated to RGB under the ImageNet normalisation: with g in [0, 1]
    and our input x = (g − MEAN) / STD, Σ_c W_c·(g − m_c)/s_c = (STD·Σ_c W_c/s_c)·x + a constant
    per output channel, which the batch norm after conv1 removes (tested)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
            if md.get("format") == "xraygan" and md.get("kind") != "classifier":
                raise InputError(f"{path}: is an xraygan {md.get('kind')} checkpoint, not ResNet-18 weights")
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear line
        if "weights only load failed" in str(e).lower():
            raise InputError(f"{path}: holds pickled Python objects (a whole model or a training state), which "
                             "xraygan does not unpickle, as that can run code; save the network's "
                             "state_dict() instead (torch.save(model.state_dict(), 'resnet18.pth'))") from None
        raise InputError(f"{path}: cannot read weights ({str(e).splitlines()[0]})") from None
    sd = _resnet_tensors(sd, path)
    if "conv1.weight" in sd and sd["conv1.weight"].shape[1] == 3:
        std = torch.tensor(IMAGENET_STD, dtype=sd["conv1.weight"].dtype).view(1, 3, 1, 1)
        sd["conv1.weight"] = (sd["conv1.weight"] / std).sum(dim=1, keepdim=True) * STD
    own = model.state_dict()
    _check_resnet18(own, sd, path)
    skipped = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in sd]
    model.load_state_dict({k: v for k, v in sd.items() if k not in skipped}, strict=False)
    return sorted(set(skipped) | set(missing))


def check_weights(path: Path) -> None:
    """Refuse, with load_pretrained's one line, a --weights file that a classifier could not start
    from: for a command that runs the classifiers long after it starts (the study)."""
    load_pretrained(build_resnet18(ClassifierNetConfig(small_stem=False)), path)


# where training frameworks keep a network's tensors inside their checkpoint files
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")


def _tensor_table(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _resnet_tensors(sd, path: Path) -> dict[str, torch.Tensor]:
    """The ResNet's tensors of a weights file: a plain table (torchvision), or one a training
    framework wrapped (`{"state_dict": ...}`, keys under `module.`, `model.` or `backbone.`)."""
    if not _tensor_table(sd):
        inner = [sd[k] for k in _WRAPPERS if isinstance(sd, dict) and _tensor_table(sd.get(k))]
        if not inner:
            raise InputError(f"{path}: does not look like ResNet-18 weights (no table of tensors, in the file "
                             f"or under {', '.join(_WRAPPERS)})")
        sd = inner[0]
    if "conv1.weight" not in sd:
        found = [k[: -len("conv1.weight")] for k in sd if k.endswith(".conv1.weight")]
        prefix = next((p for p in found if p + "layer1.0.conv1.weight" in sd), None)
        if prefix is not None:
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def _check_resnet18(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a file that is not ResNet-18 weights, whose layers would otherwise load in part and
    leave the rest as initialised under the name of a pretrained run: a deeper ResNet (34 holds
    every ResNet-18 name with the same shapes, and more blocks), a bottleneck one (50: other
    shapes), or another network. The head (fc) and the first layer may differ (a task's classes,
    a small stem); a file without batch norm counters is fine."""
    def free(k: str) -> bool:
        return k.startswith("fc.") or k == "conv1.weight" or k.endswith("num_batches_tracked")

    def shape(t: torch.Tensor) -> str:
        return "×".join(map(str, t.shape))

    extra = [k for k in sd if k not in own and not free(k)]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape and not free(k)]
    missing = [k for k in own if k not in sd and not free(k)]
    if not (extra or wrong or missing):
        return
    if extra:
        why = (f"{len(extra)} tensors ResNet-18 has not, e.g. {extra[0]}"
               + (": a deeper ResNet" if any(re.match(r"layer\d\.[2-9]", k) for k in extra) else ""))
    elif wrong:
        why = f"{wrong[0]} is {shape(sd[wrong[0]])} here, {shape(own[wrong[0]])} in ResNet-18"
    else:
        why = f"{len(missing)} of {len(own)} tensors missing, e.g. {missing[0]}"
    raise InputError(f"{path}: does not look like ResNet-18 weights ({why})")


@dataclass(frozen=True)
class TrainClassifierConfig:
    data: Path = opt(help="Training image folder, e.g. BALANCED/.", argument=True)
    val: Path = opt(help="Validation image folder, e.g. DATA/val.")
    out: Path = opt(help="Run folder.", flags=("--out", "-o"))
    epochs: int = opt(20, "At most this many epochs.")
    epoch_images: int | None = opt(None, "Images per epoch; default: the training folder's count (one pass). "
                                         "Each epoch draws them in a fresh random order, without repeats up to "
                                         "the folder's count. Give every row of a comparison the real training "
                                         "set's count, and rows whose rebalancing made more or fewer images train "
                                         "the same steps.")
    batch_size: int = opt(64, TORCHRUN_BATCH_HELP)
    accumulate: int = opt(1, "Split each step's batch into N micro-batches and add their gradients: the "
                             "memory of a batch of B/N, the step of a batch of B (batch norm normalises each "
                             "micro-batch).")
    lr: float = opt(1e-3, "AdamW learning rate (cosine schedule).")
    weight_decay: float = 1e-4
    class_weights: str = opt("none", "'balanced' weighs the loss by n/(classes*count), the study's "
                                     "class-weights row; or 'none'.")
    augment: bool = opt(True, "Small random rotations and shifts (no flips).")
    select: str = opt("auc", "Keep the epoch with the best validation auc (ROC-AUC: does not depend on the "
                             "validation set's class mix) or f1.")
    patience: int = opt(5, "Stop after this many epochs without improvement (0 = never).")
    positive: str = opt("pneumonia", "The positive class for metrics.")
    small_stem: str = opt("auto", "3x3 stride-1 first conv without max-pool: auto (for images of 32 px or "
                                  "less, where it measured better; the standard stem measured better at 64 "
                                  "px), yes or no.")
    weights: Path | None = opt(None, "Local pretrained ResNet-18 weights (.safetensors or torchvision .pth); "
                                     "the RGB first layer is summed to one channel. Nothing is downloaded.")
    seed: int = opt(0, "Seed for weights, data order and augmentation.")
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("auto", PRECISION_HELP)
    channels_last: bool = True
    resume: bool = opt(False, "Continue an interrupted run from its last finished epoch (same options; "
                              "--epochs may grow).")
    keep_state: bool = opt(True, "Keep a finished run's training state (weights, optimizer moments, best "
                                 "weights: 4x the model), so --resume with more --epochs can extend it; "
                                 "off: only its record is kept once the run ends (an interrupted run keeps "
                                 "all it needs to resume either way).")
    force: bool = opt(False, "Replace an existing run folder.")
    # library callers only: validate on the training folder itself, on purpose (the audit's feature
    # classifier, which has no other split); the command line refuses it
    val_is_train: bool = False

    def __post_init__(self):
        object.__setattr__(self, "positive", self.positive.lower())

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


# Options that must match when a run is resumed (epochs may grow; device/precision may change).
RESUME_KEYS = ("data", "val", "batch_size", "lr", "weight_decay", "class_weights", "augment",
               "select", "positive", "small_stem", "weights", "seed", "accumulate", "epoch_images")


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) → normalised float (N, 1, H, W)."""
    return (images.unsqueeze(1).float() / 255.0 - MEAN) / STD


LOG_EVERY = 10  # training steps between host reads of the loss (progress and the NaN guard)


def augment_params(n: int, g: torch.Generator, max_deg: float = 10.0, max_shift: float = 0.08
                   ) -> torch.Tensor:
    """(n, 3) warps: rotation in radians (±max_deg) and shift (±max_shift of the size)."""
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(max_deg)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * max_shift)  # grid units are [-1, 1]
    return torch.cat([ang[:, None], shift], 1)


def epoch_order(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """An epoch of `k` draws from `n` images: a random permutation, and as many more as `k` needs,
    cut to `k` (each image then comes ⌊k/n⌋ or ⌈k/n⌉ times; k < n: a random k of them). With
    k == n it is exactly one permutation, the same draw as an epoch of one pass."""
    return torch.cat([torch.randperm(n, generator=g) for _ in range(-(-k // n))])[:k]


def steps_per_epoch(per_epoch: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in an epoch of `per_epoch` images: one a batch, less a last batch too small
    for batch norm (under two images a process), which is skipped."""
    full, rest = divmod(per_epoch, batch_size)
    return full + (rest >= 2 * world)


def augment_batch(x: torch.Tensor, g: torch.Generator, max_deg: float = 10.0,
                  max_shift: float = 0.08) -> torch.Tensor:
    """One batched affine warp: rotation ±max_deg, shift ±max_shift of the size, per image."""
    return apply_augment(x, augment_params(x.shape[0], g, max_deg, max_shift).to(x.device))


def apply_augment(x: torch.Tensor, warp: torch.Tensor) -> torch.Tensor:
    """The affine warps of `augment_params` (on x's device), as one grid_sample."""
    ang, shift = warp[:, 0], warp[:, 1:]
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    bg = -MEAN / STD  # black outside the image, in normalised units
    return F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + bg


def class_weight_tensor(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """`balanced`: n_samples / (n_classes * count), as scikit-learn computes it."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise InputError(f"--class-weights {mode}: must be none or balanced")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, device: torch.device,
                  batch_size: int = 256, channels_last: bool = False) -> np.ndarray:
    """Softmax probabilities for uint8 images (N, H, W), batched."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_input(torch.from_numpy(images[i:i + batch_size]).to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(torch.softmax(model(x).float(), 1).cpu())
    return torch.cat(out).numpy()


def load_classifier(path: Path, device: torch.device) -> tuple[nn.Module, dict]:
    tensors, meta = load_checkpoint(path, "classifier")
    try:
        model = build_resnet18(ClassifierNetConfig(**meta["config"]))
        model.load_state_dict(tensors)
    except (TypeError, KeyError, RuntimeError) as e:
        raise InputError(f"{path}: classifier checkpoint does not match its config ({e})") from None
    return model.to(device).eval(), meta


def inference_batch(meta: dict, device: torch.device, wanted: int) -> int:
    """`wanted` images a batch, or fewer where a training step of that many images of this
    classifier would not fit the free memory (scoring and Grad-CAM hold no more per image than a
    training step): evaluate, gradcam and audit at 224 px on a small machine slow down rather than
    run out of memory. Where memory suffices, `wanted`: the same numbers as ever."""
    return fitting_batch("classifier", *classifier_footprint(ClassifierNetConfig(**meta["config"])), device, wanted)


def _check_folder(folder: ImageFolder, size: int, what: str) -> None:
    if folder.size != size:
        raise InputError(f"{folder.root}: {what} images are {folder.size} px, the training "
                         f"images are {size} px")


class Bf16Guard:
    """A bf16 training step on the CPU that came out non-finite is done again in fp32.

    The CPU's bf16 kernels (oneDNN, on AMX and AVX512-BF16) have produced NaN from finite inputs:
    a known class of tail-handling faults, seen here as an occasional non-finite loss in the first
    epoch of a healthy 16 px run that passes on a rerun. A fault must not end the run, and a real
    divergence must: so a step whose gradients are not finite is recomputed in fp32 from the same
    batch, with batch norm's running statistics put back first; if fp32 is not finite either, the
    run stops as before. On the CPU the check costs no device sync; under torchrun the gradients
    are already averaged, so every process takes the same decision. `retries` counts the steps
    redone (the log's `fp32_steps`)."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.saved = [b.detach().clone() for b in self.buffers]
        self.retries = 0

    def save(self) -> None:
        for s, b in zip(self.saved, self.buffers):
            s.copy_(b)

    def finite(self) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def restore(self) -> None:
        """Before the step is redone: the running statistics as they were, one more step counted."""
        self.retries += 1
        with torch.no_grad():
            for s, b in zip(self.saved, self.buffers):
                b.copy_(s)


def _save_state(out: Path, model: nn.Module, opt, sched, g: torch.Generator,
                best_state: dict | None, net: ClassifierNetConfig, keep: bool = True, **meta) -> None:
    """All that --resume needs after an epoch, without pickle: weights, optimizer moments,
    schedule, the data/augmentation random state and the best weights so far. `keep=False` (a
    finished run, --no-keep-state) writes the record alone: where the run ended, without tensors."""
    o, groups = optimizer_to_tensors("opt.", opt)
    t = {}
    if keep:
        t = state_dict_to_tensors("model.", model.state_dict())
        t.update(o)
        t["rng"] = g.get_state()
        if best_state is not None:
            t.update(state_dict_to_tensors("best.", best_state))
    else:
        meta.update(RECORD_ALONE)
    save_checkpoint(out / "state.safetensors", {k: v.contiguous() for k, v in t.items()},
                    "classifier-state", net.to_dict(), param_groups=groups,
                    scheduler=sched.state_dict(), **meta)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def improves(select: str, score: float, val_loss: float, best: float, best_loss: float) -> bool:
    """Whether an epoch beats the one kept so far. A tie in ROC-AUC (a validation set the model
    already ranks perfectly, or a small one: AUC moves in steps of 1/(positives x negatives)) goes
    to the lower validation loss, so training is not stopped at the first epoch to reach it.
    F1 ties keep the earlier epoch. Losses are compared as log.csv rounds them, so a resumed run,
    which reads the kept epoch's loss back from there, decides exactly as an uninterrupted one."""
    if score != best:
        return score > best
    return select == "auc" and round(val_loss, 5) < round(best_loss, 5)


def _kept_loss(log_rows: list[dict], best_epoch: int) -> float:
    """The kept epoch's validation loss as log.csv holds it (inf when none was kept)."""
    return next((float(r["val_loss"]) for r in log_rows if int(r["epoch"]) == best_epoch), math.inf)


def f1_selection_warning(val_counts: dict[str, int], positive: str, option: str = "--select auc",
                         share: float = 0.6) -> str | None:
    """What keeping the epoch of best validation F1 means when the positive class is the
    validation set's majority: a model that calls everything positive scores 2p / (1 + p) there
    (0.85 at the Kermany release's 74%), so F1 favours positive-happy epochs. None otherwise."""
    total = sum(val_counts.values())
    p = val_counts.get(positive, 0) / total if total else 0.0
    if p < share:
        return None
    return (f"the validation set is {p:.0%} {positive} ({val_counts[positive]} of {total}): there a model "
            f"that calls every image {positive} scores F1 {2 * p / (1 + p):.2f}, so the epoch of best F1 "
            f"favours {positive}-happy epochs; {option} does not depend on the class mix "
            "(docs/RESULTS.md, 128 px)")


def is_done(run: Path, epochs: int, patience: int) -> bool:
    """Whether the train-classifier run in `run` has finished: `epochs` epochs, or stopped early
    after `patience` epochs without improvement (what its own state file records)."""
    from xraygan.checkpoint import metadata_or_none

    m = metadata_or_none(Path(run) / "state.safetensors")
    if m is None or not (Path(run) / "classifier.safetensors").is_file():
        return False
    return int(m["epoch"]) >= epochs or (patience > 0 and int(m["stale"]) >= patience)


def validate(cfg: TrainClassifierConfig) -> None:
    """Every option checked before any folder is made or any image read."""
    check_choice("--select", cfg.select, ("f1", "auc"))
    check_int("--epochs", cfg.epochs)
    if cfg.epoch_images is not None:
        check_int("--epoch-images", cfg.epoch_images, 2)  # batch norm: two images at least
    check_int("--batch-size", cfg.batch_size, 2)  # batch norm cannot train on one image
    check_int("--accumulate", cfg.accumulate, 1)
    require(cfg.accumulate <= cfg.batch_size // 2, f"--accumulate {cfg.accumulate}: more micro-batches than "
            f"--batch-size {cfg.batch_size} can fill with two images each")
    check_float("--lr", cfg.lr, 0.0, 10.0)
    check_float("--weight-decay", cfg.weight_decay, 0.0, low_open=False)
    check_int("--patience", cfg.patience, 0)
    check_choice("--class-weights", cfg.class_weights, ("none", "balanced"))
    check_choice("--small-stem", cfg.small_stem, ("auto", "yes", "no"))
    check_choice("--device", cfg.device, DEVICES)
    check_choice("--precision", cfg.precision, ("auto", "fp32", "bf16"))
    if not cfg.val_is_train and Path(cfg.val).resolve() == Path(cfg.data).resolve():
        raise InputError(f"--val {cfg.val}: that is the training folder itself; the best epoch would be "
                         "chosen on the images the model learns from (give DATA/val)")
    check_out_apart(cfg.out, data=cfg.data, val=cfg.val, weights=cfg.weights)
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise InputError(f"{cfg.weights}: weights file not found")


def train_classifier(cfg: TrainClassifierConfig, progress: Callable[..., None] | None = None) -> dict:
    """Train (or resume) a classifier run. A run that fails before its first epoch is saved
    leaves no folder behind; Ctrl-C keeps the last finished epoch for --resume."""
    validate(cfg)
    out = Path(cfg.out)
    check_run_target(out, cfg, RESUME_KEYS, "train-classifier")
    with distributed_session(cfg.device, cfg.batch_size) as (dist, device):
        return _run(cfg, out, dist, device, progress if dist.main else None)


def _run(cfg: TrainClassifierConfig, out: Path, dist: Dist, device: torch.device,
         progress: Callable[..., None] | None) -> dict:
    """Read the data, make the folder, train; a failed new run leaves nothing behind."""
    train = read_image_folder(cfg.data)
    if len(train.classes) < 2:
        raise InputError(f"{cfg.data}: need at least two classes")
    if cfg.positive not in train.classes:
        raise InputError(f"--positive {cfg.positive}: no such class in {cfg.data} "
                         f"(found: {', '.join(train.classes)})")
    val = read_image_folder(cfg.val, classes=train.classes)
    _check_folder(val, train.size, "validation")
    fingerprint = fingerprint_arrays(train.images, train.labels, val.images, val.labels)
    created = begin_run(out, cfg.resume, cfg.force, fingerprint, cfg.data, writes=dist.main)
    try:
        return _train(cfg, out, dist, device, train, val, fingerprint, progress)
    except KeyboardInterrupt:
        if not dist.main:
            raise Interrupted("interrupted") from None
        if not (out / "state.safetensors").is_file():
            discard_new_run(out, created)
            raise Interrupted(f"interrupted in the first epoch; nothing was saved, so {out} was "
                              "removed") from None
        raise Interrupted(f"interrupted; {out} keeps its last finished epoch: continue with "
                          "--resume") from None
    except BaseException:
        if dist.main and not (out / "state.safetensors").is_file():
            discard_new_run(out, created)
        raise


LOG_FIELDS = ("epoch", "train_loss", "val_loss", "val_f1", "val_auc", "val_precision", "val_recall",
              "val_specificity", "lr", "images_per_s", "seconds", "fp32_steps")


def _val_columns(m: dict) -> dict:
    return {"val_f1": f"{m['f1']:.4f}", "val_auc": "" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}",
            "val_precision": f"{m['precision']:.4f}", "val_recall": f"{m['recall']:.4f}",
            "val_specificity": f"{m['specificity']:.4f}"}


def net_config(cfg: TrainClassifierConfig, size: int, n_classes: int) -> ClassifierNetConfig:
    """The network `train-classifier` with `cfg` builds for `size` px images of `n_classes`
    classes. --small-stem auto: the small stem at ≤ 32 px, but never under pretrained weights,
    whose conv1 is the 7×7/2 stem."""
    small = {"auto": size <= SMALL_STEM_UP_TO and cfg.weights is None, "yes": True,
             "no": False}[cfg.small_stem]  # checked in validate
    return ClassifierNetConfig(num_classes=n_classes, image_size=size, small_stem=small)


def _build(cfg: TrainClassifierConfig, train: ImageFolder, dist: Dist, device: torch.device
           ) -> tuple[ClassifierNetConfig, nn.Module, list[str], bool, int]:
    """The network for these images (after the batch-memory check), seeded, pretrained weights
    loaded, on the device. Returns (net config, model, layers not loaded, channels-last,
    validation's batch)."""
    net = net_config(cfg, train.size, len(train.classes))
    per_process = -(-cfg.batch_size // dist.world)
    footprint = classifier_footprint(net)
    check_batch("classifier", *footprint, -(-per_process // cfg.accumulate), device,
                str(cfg.data), train.size, accumulate=(cfg.accumulate, per_process))
    eval_batch = _eval_batch(cfg, footprint, device)
    torch.manual_seed(cfg.seed)
    model = build_resnet18(net)
    not_loaded = load_pretrained(model, cfg.weights) if cfg.weights else []
    model.to(device)
    cl = cfg.channels_last and device.type != "mps"
    if cl:
        model.to(memory_format=torch.channels_last)
    return net, model, not_loaded, cl, eval_batch


def _resume(out: Path, cfg: TrainClassifierConfig, model: nn.Module, opt, sched, g: torch.Generator):
    """Load `state.safetensors` into the model, optimizer, schedule and random stream. Returns
    (best weights, best score, best epoch, stale epochs, first epoch to run, log rows so far)."""
    t, meta = load_checkpoint(out / "state.safetensors", "classifier-state")
    log_rows = _read_log(out / "log.csv")[:meta["epoch"]]
    if is_record_alone(meta):
        if meta["epoch"] < cfg.epochs and not (cfg.patience and meta["stale"] >= cfg.patience):
            raise cannot_extend(out / "state.safetensors", f"{meta['epoch']} epochs", f"--epochs {cfg.epochs}")
        return None, meta["best"], meta["best_epoch"], meta["stale"], cfg.epochs + 1, log_rows
    model.load_state_dict(tensors_to_state_dict("model.", t))
    optimizer_from_tensors("opt.", opt, t, meta["param_groups"])
    sched.load_state_dict(meta["scheduler"])
    sched.T_max = cfg.epochs  # --epochs may grow on resume: the cosine is stretched to fit
    g.set_state(t["rng"])
    start = meta["epoch"] + 1
    if cfg.patience and meta["stale"] >= cfg.patience:
        start = cfg.epochs + 1  # it had stopped early: nothing left to do
    best_state = tensors_to_state_dict("best.", t) or None
    return best_state, meta["best"], meta["best_epoch"], meta["stale"], start, log_rows


def _validate(model: nn.Module, val: ImageFolder, pos: int, device: torch.device, cl: bool,
              eval_batch: int) -> tuple[dict, float]:
    """The validation metrics of the positive class at threshold 0.5, and the validation loss."""
    probs = predict_proba(model, val.images, device, batch_size=eval_batch, channels_last=cl)
    vloss = F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(val.labels)).item()
    return binary_metrics(val.labels == pos, probs[:, pos], 0.5), vloss


def _save_best(out: Path, state: dict, net: ClassifierNetConfig, train: ImageFolder,
               cfg: TrainClassifierConfig, epoch: int, m: dict, budget: dict, generators: list | None) -> None:
    save_checkpoint(out / "classifier.safetensors", state, "classifier", net.to_dict(),
                    classes=list(train.classes), image_size=train.size, positive=cfg.positive,
                    epoch=epoch, seed=cfg.seed, normalization={"mean": MEAN, "std": STD},
                    val_metrics={k: m[k] for k in ("f1", "roc_auc", "precision", "recall", "specificity")},
                    selected_by=cfg.select, train_source=str(cfg.data),
                    training={**budget, "steps": epoch * budget["steps_per_epoch"]}, generators=generators,
                    xraygan_version=__version__)


@dataclass(frozen=True)
class _Loop:
    """What every training step of a run uses, built once by `_train`."""
    cfg: TrainClassifierConfig
    dist: Dist
    device: torch.device
    fwd: nn.Module  # the model, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    x_all: torch.Tensor  # uint8 training images on the device
    y_all: torch.Tensor
    amp: torch.dtype | None
    channels_last: bool
    guard: Bf16Guard | None
    steps: int


def _backward(loop: _Loop, idx: torch.Tensor, warp: torch.Tensor | None, amp: torch.dtype | None
              ) -> torch.Tensor:
    """The gradients of one step over the images `idx`, in `cfg.accumulate` micro-batches (each
    loss weighted by its share of the images, so the gradient is the whole batch's mean); under
    torchrun the gradients are averaged once, on the last. Returns the step's loss (on the device)."""
    loop.opt.zero_grad(set_to_none=True)
    k = min(loop.cfg.accumulate, len(idx) // 2)  # batch norm: at least two images per micro-batch
    parts = idx.tensor_split(k)
    warps = warp.tensor_split(k) if warp is not None else [None] * k
    loss = torch.zeros((), device=loop.device)
    for j, (part, w) in enumerate(zip(parts, warps)):
        x = to_input(loop.x_all[part])
        if w is not None:
            x = apply_augment(x, w)
        if loop.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last = j == k - 1
        with (loop.fwd.no_sync() if loop.dist.active and not last else contextlib.nullcontext()):
            with autocast(loop.device, amp):
                part_loss = loop.loss_fn(loop.fwd(x).float(), loop.y_all[part]) * (len(part) / len(idx))
            part_loss.backward()
        loss += part_loss.detach()
    return loss


def _epoch_steps(loop: _Loop, perm: torch.Tensor, warp: torch.Tensor | None,
                 report: Callable[[int, float, int], None]) -> tuple[float, int]:
    """One epoch's steps in the order `perm`; `report(step, mean loss, images)` every LOG_EVERY
    steps and at the end (the loss stays on the device in between). Returns (summed loss, images)."""
    cfg, dist, guard = loop.cfg, loop.dist, loop.guard
    total = torch.zeros((), device=loop.device)
    seen = 0
    if guard:
        guard.retries = 0
    for s in range(loop.steps):
        part = slice(s * cfg.batch_size, (s + 1) * cfg.batch_size)
        idx = perm[part]
        if len(idx) < 2 * dist.world:  # batch norm cannot train on one image (per process)
            continue
        share = dist.rank if dist.active else 0  # this process's share of the batch
        idx = idx.tensor_split(dist.world)[share]
        w = warp[part].tensor_split(dist.world)[share] if warp is not None else None
        if guard:
            guard.save()
        loss = _backward(loop, idx, w, loop.amp)
        if guard and not guard.finite():  # this step again in fp32: see Bf16Guard
            guard.restore()
            loss = _backward(loop, idx, w, None)
        loop.opt.step()
        total += loss * len(idx)  # stays on the device: no sync per step
        seen += len(idx)
        if (s + 1) % LOG_EVERY == 0 or s == loop.steps - 1:
            report(s, float(total) / seen, seen)
    return float(total), seen


EVAL_BATCH = 256


def _eval_batch(cfg: TrainClassifierConfig, footprint: tuple[int, int], device: torch.device) -> int:
    """Validation's batch. It keeps no activations for backward, so an image costs it less than a
    training step's; it takes batches of 256, or fewer where even a training step of 256 would
    not fit the free memory (then the largest that would: never an out-of-memory error in the
    middle of a run, at 224 px on a small machine). With --accumulate memory is known to be short,
    and it takes the micro-batch's size."""
    if cfg.accumulate > 1:
        return max(1, cfg.batch_size // cfg.accumulate)
    return fitting_batch("classifier", *footprint, device, EVAL_BATCH)


def _train(cfg: TrainClassifierConfig, out: Path, dist: Dist, device: torch.device, train: ImageFolder,
           val: ImageFolder, fingerprint: str, progress: Callable[..., None] | None) -> dict:
    """The run itself, in a folder `begin_run` made: build, resume if asked, train, select.

    Under torchrun the model is wrapped in DistributedDataParallel and each process trains on its
    share of every batch; rank 0 validates, decides (best epoch, early stop) for all, and writes."""
    net, model, not_loaded, cl, eval_batch = _build(cfg, train, dist, device)
    amp = autocast_dtype(device, cfg.precision)
    pos = train.classes.index(cfg.positive)
    weights = class_weight_tensor(train.labels, len(train.classes), cfg.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    x_all = torch.from_numpy(train.images).to(device)
    y_all = torch.from_numpy(train.labels).to(device)
    g = make_generator(cfg.seed)
    log_rows: list[dict] = []
    best, best_epoch, best_state, stale, start = -1.0, 0, None, 0, 1
    if cfg.resume:
        best_state, best, best_epoch, stale, start, log_rows = _resume(out, cfg, model, opt, sched, g)
    elif dist.main:
        for stale_file in ("log.csv", "state.safetensors"):
            (out / stale_file).unlink(missing_ok=True)
    best_loss = _kept_loss(log_rows, best_epoch)
    fwd = model
    if dist.active:  # DDP broadcasts rank 0's weights now and averages gradients in backward
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    per_epoch = cfg.epoch_images or len(x_all)  # images an epoch trains on
    if dist.main:
        atomic_write_json(out / "config.json", {
            **record_header("classifier-run"), "train": cfg.to_json(), "net": net.to_dict(),
            "classes": list(train.classes), "counts": train.counts(), "val_counts": val.counts(),
            "data_fingerprint": fingerprint, "device": str(device), "precision": str(amp) if amp else "fp32",
            "class_weights": weights.tolist() if weights is not None else None,
            "pretrained_layers_not_loaded": not_loaded, "processes": dist.world,
            "validation_batch": eval_batch, "images_per_epoch": per_epoch,
            "xraygan_version": __version__, "torch_version": torch.__version__})
    steps = steps_per_epoch(per_epoch, cfg.batch_size, dist.world)  # the loop's count and the budget's
    # what the run was given, kept in the checkpoint: rows are compared on equal terms only when it is equal
    budget = {"train_images": len(x_all), "images_per_epoch": per_epoch, "batch_size": cfg.batch_size,
              "steps_per_epoch": steps, "epochs": cfg.epochs}
    # which generators made its synthetic images: compare tells rows whose seeds share one apart
    generators = generators_behind(cfg.data)
    guard = Bf16Guard(model) if amp is not None and device.type == "cpu" else None
    loop = _Loop(cfg, dist, device, fwd, opt, loss_fn, x_all, y_all, amp, cl, guard, steps)
    t0 = time.perf_counter()
    images_before, seen, epoch = 0, 0, start  # images before the current epoch (for img/s)

    def report(s: int, mean: float, seen: int) -> None:  # every LOG_EVERY steps: one host read
        if not math.isfinite(mean):
            kept = (f"best model so far, epoch {best_epoch}, in {out / 'classifier.safetensors'}"
                    if best_epoch else "no epoch had finished, so no model was saved")
            raise TrainingError(f"epoch {epoch}: training loss is not finite; stopped ({kept})")
        if progress:
            progress("train-clf", (epoch - 1) * steps + s + 1, cfg.epochs * steps,
                     epoch=f"{epoch}/{cfg.epochs}", loss=mean, images=(images_before + seen) * dist.world)

    if progress and start <= cfg.epochs:  # the clock starts before the first step, which counts in the pace
        progress("train-clf", (start - 1) * steps, cfg.epochs * steps, epoch=f"{start}/{cfg.epochs}", images=0)
    for epoch in range(start, cfg.epochs + 1):
        images_before += seen
        model.train()
        # the epoch's order and augmentation draws in one go, moved to the device once: a draw per
        # step would be a blocking host-to-device copy per step on a GPU
        perm = epoch_order(len(x_all), per_epoch, g).to(device)
        warp = augment_params(per_epoch, g).to(device) if cfg.augment else None
        te = time.perf_counter()
        total, seen = _epoch_steps(loop, perm, warp, report)
        sched.step()
        ips = seen * dist.world / (time.perf_counter() - te)
        if not dist.main:  # rank 0 validates and tells the others whether training goes on
            if broadcast_floats(dist, [0.0], device)[0]:
                break
            continue
        m, vloss = _validate(model, val, pos, device, cl, eval_batch)
        score = m["f1"] if cfg.select == "f1" else (m["roc_auc"] if m["roc_auc"] is not None else 0.0)
        log_rows.append({"epoch": epoch, "train_loss": f"{total / max(seen, 1):.5f}",
                         "val_loss": f"{vloss:.5f}", **_val_columns(m),
                         "lr": f"{opt.param_groups[0]['lr']:.3g}", "images_per_s": f"{ips:.1f}",
                         "seconds": f"{time.perf_counter() - t0:.1f}",
                         "fp32_steps": guard.retries if guard else 0})
        write_csv(out / "log.csv", LOG_FIELDS, log_rows)
        if improves(cfg.select, score, vloss, best, best_loss):
            best, best_epoch, best_loss, stale = score, epoch, vloss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _save_best(out, best_state, net, train, cfg, epoch, m, budget, generators)
        else:
            stale += 1
        stop = bool(cfg.patience and stale >= cfg.patience)
        finished = stop or epoch == cfg.epochs
        _save_state(out, model, opt, sched, g, best_state, net, keep=cfg.keep_state or not finished,
                    epoch=epoch, best=best, best_epoch=best_epoch, stale=stale)
        broadcast_floats(dist, [float(stop)], device)
        if stop:
            break
    if not dist.main:
        return {"out": str(out), "rank": dist.rank}
    if not log_rows:
        raise InputError(f"{out}: nothing to resume, the run already has {cfg.epochs} epochs "
                         "(give a larger --epochs)")
    warning = f1_selection_warning(val.counts(), cfg.positive) if cfg.select == "f1" else None
    return {"out": str(out), "best_epoch": best_epoch, f"best_val_{cfg.select}": best,
            "warnings": [warning] if warning else [], "epochs_run": len(log_rows),
            "seconds": round(time.perf_counter() - t0, 1),
            "images_per_s": float(log_rows[-1]["images_per_s"]), "device": str(device),
            "precision": str(amp) if amp else "fp32",
            "checkpoint": str(out / "classifier.safetensors")}
