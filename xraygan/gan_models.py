"""DCGAN and conditional DCGAN networks (Radford et al. 2016), grayscale, sizes 16-256.

Depth follows the image size: the generator grows a 4×4 map by strided transposed
convolutions until it reaches the size; the discriminator mirrors it. A conditional model
(`num_classes > 0`) gives the generator a one-hot label beside the noise and the discriminator
one-hot label planes beside the image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class GanNetConfig:
    image_size: int = 64
    nz: int = 100  # noise dimensions
    ngf: int = 64  # generator width (filters of the last hidden layer)
    ndf: int = 64  # discriminator width (filters of the first layer)
    channels: int = 1
    num_classes: int = 0  # 0 = unconditional

    def __post_init__(self):
        if self.image_size not in SUPPORTED_SIZES:
            raise ValueError(f"image size {self.image_size} is not supported by the DCGAN models "
                             f"(supported: {', '.join(map(str, SUPPORTED_SIZES))})")

    @property
    def n_up(self) -> int:
        return int(math.log2(self.image_size)) - 2  # 4×4 → size

    def to_dict(self) -> dict:
        return asdict(self)


def init_dcgan_weights(m: nn.Module) -> None:
    """N(0, 0.02) for convolutions, N(1, 0.02) for batch-norm scales (DCGAN paper)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, cfg: GanNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.ngf * 2 ** (cfg.n_up - 1)
        layers: list[nn.Module] = [  # (nz + classes) x 1 x 1 → ch x 4 x 4
            nn.ConvTranspose2d(cfg.nz + cfg.num_classes, ch, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(cfg.n_up - 1):  # ch x s x s → ch/2 x 2s x 2s
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)  # → channels x size x size, in [-1, 1]
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.num_classes:
            z = torch.cat([z, F.one_hot(labels, self.cfg.num_classes).to(z.dtype)], 1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, cfg: GanNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.ndf
        layers: list[nn.Module] = [  # (channels + classes) x size x size → ndf x size/2
            nn.Conv2d(cfg.channels + cfg.num_classes, ch, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(cfg.n_up - 1):  # ch x s x s → 2ch x s/2 x s/2, down to 4 x 4
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2),
                       nn.LeakyReLU(0.2, inplace=True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 0, bias=False)]  # → 1 x 1 x 1 logit
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.num_classes:
            planes = F.one_hot(labels, self.cfg.num_classes).to(x.dtype)[:, :, None, None]
            x = torch.cat([x, planes.expand(-1, -1, x.shape[2], x.shape[3])], 1)
        return self.net(x).flatten()


DIFFAUG_POLICIES = ("color", "translation", "cutout")


def diffaug_draw(n: int, h: int, w: int, g: torch.Generator, policy: str) -> torch.Tensor:
    """All random numbers one DiffAugment call needs, as one (n, k) float CPU tensor.

    Drawn on the CPU from `g` (so a resumed run repeats them and every device gets the same
    numbers), then moved to the device in a single transfer: measured on an H200, the six small
    per-policy copies of the first version cost 30% of a GAN step.
    """
    cols: list[torch.Tensor] = []
    dev = g.device  # a CUDA generator draws on the GPU: no copy at all
    for p in policy.split(","):
        if p == "color":  # brightness offset, contrast factor
            cols += [torch.rand(n, generator=g, device=dev) - 0.5, torch.rand(n, generator=g, device=dev) + 0.5]
        elif p == "translation":  # shift by up to 1/8 of the size
            cols += [torch.randint(-(h // 8), h // 8 + 1, (n,), generator=g, device=dev).float(),
                     torch.randint(-(w // 8), w // 8 + 1, (n,), generator=g, device=dev).float()]
        elif p == "cutout":  # corner of one square hole of half the size
            cols += [torch.randint(0, h - h // 2 + 1, (n,), generator=g, device=dev).float(),
                     torch.randint(0, w - w // 2 + 1, (n,), generator=g, device=dev).float()]
        elif p:
            raise ValueError(f"unknown DiffAugment policy '{p}' (use color, translation, cutout)")
    return torch.stack(cols, 1) if cols else torch.zeros(n, 0, device=dev)


def apply_diff_augment(x: torch.Tensor, params: torch.Tensor, policy: str) -> torch.Tensor:
    """DiffAugment with pre-drawn `params` (from `diffaug_draw`, on x's device)."""
    n, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    col = 0
    for p in policy.split(","):
        if not p:
            continue
        a, b = params[:, col].view(n, 1, 1, 1), params[:, col + 1].view(n, 1, 1, 1)
        col += 2
        if p == "color":  # brightness then contrast, per image
            x = x + a.to(dt)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * b.to(dt) + mean
        elif p == "translation":  # zero padding
            yy = torch.arange(h, device=dev)[None, :, None] + a.view(n, 1, 1).long()
            xx = torch.arange(w, device=dev)[None, None, :] + b.view(n, 1, 1).long()
            pad = F.pad(x, (1, 1, 1, 1))
            yy = (yy + 1).clamp(0, h + 1).expand(n, h, w)
            xx = (xx + 1).clamp(0, w + 1).expand(n, h, w)
            idx = (yy * (w + 2) + xx).reshape(n, 1, -1).expand(-1, c, -1)
            x = pad.reshape(n, c, -1).gather(2, idx).reshape(x.shape)
        elif p == "cutout":
            oy, ox = a.view(n, 1, 1).long(), b.view(n, 1, 1).long()
            yy = torch.arange(h, device=dev)[None, :, None]
            xx = torch.arange(w, device=dev)[None, None, :]
            hole = (yy >= oy) & (yy < oy + h // 2) & (xx >= ox) & (xx < ox + w // 2)
            x = x * (~hole).unsqueeze(1).to(dt)
    return x


def diff_augment(x: torch.Tensor, g: torch.Generator, policy: str = "color,translation,cutout"
                 ) -> torch.Tensor:
    """Differentiable augmentation applied alike to real and fake images seen by D
    (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

    Gradients flow through every op to the generator. Random draws come from `g` (CPU) so a
    resumed run repeats them exactly.
    """
    n, _, h, w = x.shape
    return apply_diff_augment(x, diffaug_draw(n, h, w, g, policy).to(x.device), policy)


def ema_update(ema: nn.Module, model: nn.Module, decay: float | torch.Tensor) -> None:
    """ema ← decay·ema + (1−decay)·model for weights; batch-norm buffers are copied. `decay` may
    be a device tensor (inside a CUDA graph, where a Python number would be frozen)."""
    e, m = list(ema.parameters()), list(model.parameters())
    with torch.no_grad():  # one fused call per list, not one kernel launch per tensor
        if isinstance(decay, torch.Tensor):
            torch._foreach_mul_(e, decay)
            torch._foreach_add_(e, torch._foreach_mul(m, 1.0 - decay))
        else:
            torch._foreach_lerp_(e, m, 1.0 - decay)
        buffers = list(ema.buffers())
        if buffers:  # (a U-Net with group norm has none)
            torch._foreach_copy_(buffers, list(model.buffers()))
