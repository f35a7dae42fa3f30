"""The training set of a generator (train-gan, train-diffusion): decoded once, kept as uint8 on
the device, and drawn as batches in [-1, 1]; and the sample grid both write."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from xraygan.errors import InputError
from xraygan.gan_models import size_problem
from xraygan.images import ImageFolder, image_side, list_image_folder, read_image_folder
from xraygan.options import TRAIN_FOLDER_HELP, opt


@dataclass(frozen=True)
class TrainingRun:
    """The options both generator trainers open with: where the images are, where the run goes,
    and which classes the model learns."""
    data: Path = opt(help=TRAIN_FOLDER_HELP, argument=True)
    out: Path = opt(help="Run folder.", flags=("--out", "-o"))
    conditional: bool = opt(False, "Learn all classes: a conditional model (a cDCGAN; a DDPM with classifier-free "
                                   "guidance at sampling). Else one class.", flags=("--conditional",))
    cls: str | None = opt(None, "One class: the class to learn. Conditional: the default label to generate. "
                                "Default: the minority class.", flags=("--class",))

    def __post_init__(self):
        if self.cls:
            object.__setattr__(self, "cls", self.cls.lower())

    def to_json(self) -> dict:
        """The options as config.json records them (and --resume compares them)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _size_check(data: Path, size: int) -> None:
    problem = size_problem(size)
    if problem:
        raise InputError(f"{data}: images are {size} px; {problem} (prepare with --size N)")


def load_training_set(folder: Path, conditional: bool, cls: str | None,
                      batch_size: int) -> tuple[ImageFolder, tuple[str, ...], str]:
    """Decode a generator's training folder: all classes when `conditional`, else class `cls`
    (default: the least frequent). Returns (images, classes the model knows, default label)."""
    first = next((f for files in list_image_folder(folder).values() for f in files), None)
    if first is not None:  # a size no generator makes is refused before the whole folder is decoded
        _size_check(folder, image_side(first))
    full = read_image_folder(folder)
    counts = full.counts()
    _size_check(folder, full.size)
    minority = min(counts, key=lambda c: (counts[c], c))
    if conditional:
        if len(full.classes) < 2:
            raise InputError(f"{folder}: --conditional needs at least two classes")
        data, classes, label = full, full.classes, cls or minority
        if label not in classes:
            raise InputError(f"--class {label}: no such class in {folder} "
                             f"(found: {', '.join(classes)})")
    else:
        label = cls or minority
        if label not in full.classes:
            raise InputError(f"{Path(folder) / label}: class folder missing "
                             f"(found: {', '.join(full.classes)})")
        keep = full.labels == full.classes.index(label)
        data = replace(full, images=full.images[keep], labels=np.zeros(int(keep.sum()), np.int64),
                       files=tuple(f for f, k in zip(full.files, keep) if k), classes=(label,))
        classes = (label,)
    if len(data.images) < batch_size:
        raise InputError(f"{folder}: {len(data.images)} training images, fewer than one batch "
                         f"of {batch_size} (use a smaller --batch-size)")
    return data, classes, label


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
