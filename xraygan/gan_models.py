"""DCGAN and conditional DCGAN networks (Radford et al. 2016), grayscale, sizes 16-512.

Depth follows the image size: size = base · 2^k with a base map of 4 to 7 (16 = 4·2², 28 = 7·2²,
160 = 5·2⁵, 224 = 7·2⁵, 256 = 4·2⁶); the generator makes the base map from the noise and
doubles it k times by strided transposed convolutions; the discriminator mirrors it. At the
powers of two the networks are those of a 4×4 base, as before. A conditional model
(`num_classes > 0`) gives the generator a one-hot label beside the noise and the discriminator
one-hot label planes beside the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

MIN_SIZE, MAX_SIZE = 16, 512
MAX_DOUBLING = 5  # channels stop doubling past ngf·2⁵ (sizes above 256): 512 px would need ngf·64


def base_and_doublings(size: int) -> tuple[int, int] | None:
    """(base, k) with size = base · 2^k, base 4..7 and k ≥ 2, or None when there is none."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        return None
    base, k = size, 0
    while base % 2 == 0 and base // 2 >= 4:
        base //= 2
        k += 1
    return (base, k) if 4 <= base <= 7 and k >= 2 else None


SUPPORTED_SIZES = tuple(s for s in range(MIN_SIZE, MAX_SIZE + 1) if base_and_doublings(s))


def size_problem(size: int) -> str | None:
    """Why the generators (DCGAN and diffusion U-Net alike) cannot make `size` px images (None when
    they can), naming the nearest sizes."""
    if size in SUPPORTED_SIZES:
        return None
    near = sorted(SUPPORTED_SIZES, key=lambda s: (abs(s - size), s))[:2]
    return (f"the generators make 16-512 px images of 4 to 7 times a power of two "
            f"(16, 20, 24, 28, 32, 40, ..., 224, 256, ...); the nearest to {size} are {', '.join(map(str, sorted(near)))}")


@dataclass(frozen=True)
class GanNetConfig:
    image_size: int = 64
    nz: int = 100  # noise dimensions
    ngf: int = 64  # generator width (filters of the last hidden layer)
    ndf: int = 64  # discriminator width (filters of the first layer)
    channels: int = 1
    num_classes: int = 0  # 0 = unconditional
    spectral_norm: bool = False  # discriminator: spectrally normalised convolutions, no batch norm

    def __post_init__(self):
        problem = size_problem(self.image_size)
        if problem:
            raise ValueError(f"image size {self.image_size}: {problem}")

    @property
    def base(self) -> int:
        return base_and_doublings(self.image_size)[0]

    @property
    def n_up(self) -> int:
        return base_and_doublings(self.image_size)[1]  # base × base → size

    @property
    def top_channels(self) -> int:
        return self.ngf * 2 ** min(self.n_up - 1, MAX_DOUBLING)

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
        ch = cfg.top_channels
        layers: list[nn.Module] = [  # (nz + classes) x 1 x 1 → ch x base x base
            nn.ConvTranspose2d(cfg.nz + cfg.num_classes, ch, cfg.base, 1, 0, bias=False),
            nn.BatchNorm2d(ch), nn.ReLU(True)]
        for i in range(cfg.n_up - 1):  # ch x s x s → ch/2 x 2s x 2s (ch kept while above the cap)
            out = ch // 2 if cfg.n_up - 1 - i <= MAX_DOUBLING else ch
            layers += [nn.ConvTranspose2d(ch, out, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU(True)]
            ch = out
        layers += [nn.ConvTranspose2d(ch, cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)  # → channels x size x size, in [-1, 1]
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.num_classes:
            z = torch.cat([z, F.one_hot(labels, self.cfg.num_classes).to(z.dtype)], 1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """The DCGAN discriminator; with `spectral_norm` every convolution is divided by its largest
    singular value (Miyato et al. 2018, one power iteration per call) and batch norm is left out,
    as in SNGAN and BigGAN: D is then 1-Lipschitz per layer, the constraint that keeps it from
    overpowering G on small sets at large sizes."""

    def __init__(self, cfg: GanNetConfig):
        super().__init__()
        self.cfg = cfg
        sn = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)
        ch = cfg.ndf
        layers: list[nn.Module] = [  # (channels + classes) x size x size → ndf x size/2
            nn.Conv2d(cfg.channels + cfg.num_classes, ch, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True)]
        for i in range(cfg.n_up - 1):  # ch x s x s → 2ch x s/2 x s/2, down to base x base
            out = ch * 2 if i < MAX_DOUBLING else ch
            norm = [] if cfg.spectral_norm else [nn.BatchNorm2d(out)]
            layers += [nn.Conv2d(ch, out, 4, 2, 1, bias=False), *norm, nn.LeakyReLU(0.2, inplace=True)]
            ch = out
        layers += [nn.Conv2d(ch, 1, cfg.base, 1, 0, bias=False)]  # → 1 x 1 x 1 logit
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)
        if cfg.spectral_norm:  # after the initialisation: the parametrization keeps the original weight
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    sn(m)

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
