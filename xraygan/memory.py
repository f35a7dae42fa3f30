"""Will a training batch fit? Peak memory estimated from the networks' activations and checked
against what the device has free, before any step runs, so that a batch too large is refused
with one line that names the largest batch that fits, instead of ending in the out-of-memory
killer (CPU) or an allocator traceback (GPU) minutes later.

The estimate: the elements every layer outputs for one image (counted by a forward pass on the
`meta` device, which allocates nothing), times the batch, times bytes per element measured for
each family (`BYTES_PER_ELEMENT`), plus four copies of the parameters (weights, gradients and
Adam's two moments). `XRAYGAN_MEMORY_LIMIT` (e.g. `6G`) caps the memory counted as free: for a
shared node, a container whose limit the kernel does not show, or a test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from xraygan.errors import InputError

ENV = "XRAYGAN_MEMORY_LIMIT"
# Peak bytes per activation element of one training step: the growth of peak resident memory from
# a small to a large batch divided by the growth in elements, at 128 px on the CPU in fp32
# (benchmarks/bench_memory.py --calibrate --precision fp32), the larger of two machines' figures:
# GAN 2.57 (Intel Xeon; 1.57 on an AMD EPYC), classifier 2.88 (AMD; 1.27 on the Xeon), diffusion
# 4.84 (Xeon, with freed memory kept as train-diffusion keeps it, `allocator.keep_freed_memory`;
# 3.59 without). bf16 needs less, and a GPU keeps no allocator slack between steps, so the fp32
# figures are the conservative ones and are used everywhere.
BYTES_PER_ELEMENT = {"gan": 2.57, "diffusion": 4.84, "classifier": 2.88}
HEADROOM = 0.9  # refuse above 90 % of the free memory: the estimate is measured, not exact
# What a study counts for steps that may run side by side (xraygan/stepmemory.py), where a step
# counted at twice what it holds halves how many run at once. In bf16 on a CPU that computes it
# natively, a GAN or diffusion step holds about half its fp32 activations: the same calibration in
# bf16 on the AMD EPYC gave GAN 1.40 and diffusion 2.30 bytes per element against 2.49 and 4.64
# in fp32 there (`bench_memory.py --sizes 128 --calibrate --precision bf16`, and `fp32`); the
# ratios scale the figures above. (The classifier's whole-command peak is set by its validation
# pass, so its bf16 figure says nothing about its batch: it keeps the fp32 one.) A command's own
# check keeps the fp32 figures everywhere.
BF16_CPU_RATIO = {"gan": 1.40 / 2.49, "diffusion": 2.30 / 4.64}
# Scoring and sampling keep no activations for backward: their batches are fit to the memory by
# the training figures (an upper bound), but counted at this share of them. Measured at 128 px on
# the AMD EPYC, the whole command's peak less a bare torch process (0.66 GB): DDIM sampling of 64
# images 0.23, evaluate's batches of 256 0.30 (`/usr/bin/time -v xraygan generate DIFFUSION -n 64
# --sampling-steps 2`, `... evaluate CLASSIFIER k128/test`).
INFERENCE_SHARE = 0.3
# A step's process beside its batch: the whole command's peak at the calibration's smallest
# batch, less that batch's estimate, was 1.3 GiB resident (GAN and diffusion, 128 px, either
# precision): torch, the decoded images, buffers. On a GPU it stands for the CUDA context.
PROCESS_BYTES = int(1.3 * 2**30)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """'6G', '512M', '1.5GB', '2GiB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise InputError(f"{ENV}={text!r}: not a size (give e.g. 6G, 512M or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _resident_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_free() -> int | None:
    """MemAvailable, lowered to the cgroup's limit where one is set (containers, SLURM)."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            room = int(limit) - used
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free


def free_bytes(device: torch.device) -> tuple[int | None, str]:
    """(bytes this process may still take, what they are), None when the device does not say."""
    env = os.environ.get(ENV)
    if env:
        limit = parse_bytes(env)
        used = torch.cuda.memory_allocated(device) if device.type == "cuda" else _resident_bytes()
        return max(limit - used, 0), f"{ENV}={env}"
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "free GPU memory"
    if device.type == "mps":
        try:
            return (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()), "free GPU memory"
        except (AttributeError, RuntimeError):
            return None, ""
    return _cpu_free(), "available memory"


def activation_elements(build: Callable[[], nn.Module], forward: Callable[[nn.Module], object]) -> int:
    """Elements output by every leaf module in `forward(model)`, counted on the meta device; 0
    when the model cannot run there (an op without a meta kernel): then nothing is checked."""
    total = 0

    def hook(_m, _inputs, out) -> None:
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel()

    with torch.device("meta"):
        model = build().eval()  # same shapes; batch norm takes a batch of one in eval mode
        # a parametrization (spectral norm) outputs a weight, not an activation: left out
        handles = [m.register_forward_hook(hook) for name, m in model.named_modules()
                   if not list(m.children()) and "parametrizations" not in name.split(".")]
        try:
            forward(model)
        except (RuntimeError, NotImplementedError):
            return 0
        finally:
            for h in handles:
                h.remove()
    return total


def parameter_count(build: Callable[[], nn.Module]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def training_bytes(family: str, elements_per_image: int, batch: int, parameters: int) -> int:
    return int(BYTES_PER_ELEMENT[family] * elements_per_image * batch + 16 * parameters)


def fitting_batch(family: str, elements_per_image: int, parameters: int, device: torch.device, wanted: int) -> int:
    """`wanted`, or the largest training batch whose estimated peak fits the free memory where that
    is smaller (at least 1); `wanted` when the device does not say or the model's activations
    could not be counted. For batches that hold no more per image than a training step (scoring,
    Grad-CAM), which then slow down rather than run out of memory."""
    free, _ = free_bytes(device)
    if free is None or elements_per_image == 0:
        return wanted
    return max(1, min(wanted, largest_batch(family, elements_per_image, parameters, free)))


def largest_batch(family: str, elements_per_image: int, parameters: int, free: int) -> int:
    """The largest batch whose estimated training peak stays under HEADROOM of `free` bytes."""
    return int((HEADROOM * free - 16 * parameters) // (BYTES_PER_ELEMENT[family] * elements_per_image))


def check_batch(family: str, elements_per_image: int, parameters: int, batch: int, device: torch.device,
                what: str, size: int, accumulate: tuple[int, int] | None = None,
                flags: tuple[str | None, str] = ("--batch-size", "--accumulate")) -> None:
    """Refuse a batch whose estimated peak does not fit in the free memory, with the largest that does.
    `batch` is what one forward pass holds; a command that accumulates gradients passes
    `accumulate` = (micro-batches now, images per step), and the refusal then also names the
    --accumulate that keeps the step's batch. `flags`: the options that set the batch (None:
    none does) and the micro-batches, as the caller's user types them (the study's differ)."""
    free, source = free_bytes(device)
    why = refusal(family, elements_per_image, parameters, batch, free, source, device, size, accumulate, flags)
    if why:
        raise InputError(f"{what}: {why}")


def refusal(family: str, elements_per_image: int, parameters: int, batch: int, free: int | None, source: str,
            device: torch.device, size: int, accumulate: tuple[int, int] | None = None,
            flags: tuple[str | None, str] = ("--batch-size", "--accumulate"), held: int = 0) -> str | None:
    """Why `batch` does not fit `free` bytes (`check_batch`'s words), None where it fits or
    nothing is known. `held`: bytes the command will also hold (its decoded images), when `free`
    was measured before it read them (the study's check of its steps)."""
    if free is None or elements_per_image == 0:
        return None
    need = training_bytes(family, elements_per_image, batch, parameters)
    if need + held <= HEADROOM * free:
        return None
    fits = largest_batch(family, elements_per_image, parameters, max(0, free - held))
    gib = 2**30
    if fits < 1:
        hint = "no batch fits: free memory or use a smaller --width"
    elif accumulate is None:
        hint = f"give {flags[0]} {fits} or less"
    else:
        k, step_batch = accumulate
        keep = -(-step_batch // fits)  # micro-batches of at most `fits` images
        hint = (f"give {flags[1]} {keep} to keep the batch of {step_batch} in micro-batches of "
                f"{-(-step_batch // keep)}" + (f", or {flags[0]} {fits * k} or less" if flags[0] else ""))
    besides = f" besides {held / gib:.1f} GiB of decoded images" if held >= gib / 10 else ""
    return (f"a batch of {batch} at {size} px needs about {need / gib:.1f} GiB{besides} and "
            f"{device.type} has {free / gib:.1f} GiB ({source}); {hint}")


def generator_footprint(net) -> tuple[int, int]:
    """(activation elements per image, parameters) of the DCGAN generator alone: what `generate`
    runs, and the G part of a training step. Sampling keeps no activations for backward, so
    counting them as a training step's is an upper bound there."""
    from xraygan.gan_models import Generator

    labels = (lambda: torch.zeros(1, dtype=torch.long)) if net.num_classes else (lambda: None)  # made on meta
    return (activation_elements(lambda: Generator(net), lambda m: m(torch.zeros(1, net.nz), labels())),
            parameter_count(lambda: Generator(net)))


def gan_footprint(net, r1: bool = False) -> tuple[int, int]:
    """(activation elements per image, parameters) of a DCGAN step: G once, D on real and fake;
    with the R1 penalty D's pass on the real images is differentiated twice, counted as one more
    pass of D (an upper bound: at 128 px, batch 64, the whole command's peak grew 1%, 2.04 to
    2.06 GB)."""
    from xraygan.gan_models import Discriminator

    g, g_params = generator_footprint(net)
    labels = (lambda: torch.zeros(1, dtype=torch.long)) if net.num_classes else (lambda: None)
    d = activation_elements(lambda: Discriminator(net),
                            lambda m: m(torch.zeros(1, net.channels, net.image_size, net.image_size), labels()))
    return g + (3 if r1 else 2) * d, g_params + parameter_count(lambda: Discriminator(net))


def diffusion_footprint(net) -> tuple[int, int]:
    """(activation elements per image, parameters) of a U-Net training step."""
    from xraygan.diffusion import build_unet

    s = net.image_size

    def forward(m):
        labels = torch.zeros(1, dtype=torch.long) if net.num_classes else None
        return m(torch.zeros(1, 1, s, s), torch.zeros(1, dtype=torch.long), class_labels=labels)

    return activation_elements(lambda: build_unet(net), forward), parameter_count(lambda: build_unet(net))


def classifier_footprint(net) -> tuple[int, int]:
    """(activation elements per image, parameters) of a ResNet-18 training step."""
    from xraygan.classifier import build_resnet18

    s = net.image_size
    return (activation_elements(lambda: build_resnet18(net), lambda m: m(torch.zeros(1, 1, s, s))),
            parameter_count(lambda: build_resnet18(net)))
