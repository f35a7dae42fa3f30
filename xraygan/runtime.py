"""Devices, seeds, precision, RNG state and the CPU allocator setting: one place for each; generators are
passed explicitly."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import torch

from xraygan.errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")
ALLOCATOR_ENV = "XRAYGAN_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's <malloc.h>
KEEP_FREED = 1 << 30  # free memory at the top of the heap beyond this goes back to the kernel
USER_MALLOC = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory(everywhere: bool = False) -> bool:
    """Let this process keep and reuse the memory of the tensors it frees (Linux with glibc).

    glibc serves every block over 32 MB with a fresh `mmap` and gives it back to the kernel when
    it is freed, so a step that frees and makes again the same large activations has their pages
    zeroed and faulted in again every time. Serving large blocks from the heap, and trimming it
    only above KEEP_FREED, reuses them instead, at the price of a higher peak resident size (the
    heap keeps what it freed, in pieces). Measured at 128 px on two cores (docs/performance.md):
    a diffusion training step and diffusion sampling about 2x faster for 1.3-1.5x the peak, where
    a GAN step or a classifier epoch gains 4-10 % for 1.1-1.3x. So the diffusion family calls
    this on the CPU and the command line calls it, with `everywhere`, only for
    `XRAYGAN_MALLOC=keep`; `XRAYGAN_MALLOC=system` keeps glibc's defaults everywhere, and so
    does a setting of the user's own for the same thing (`MALLOC_MMAP_MAX_`,
    `MALLOC_TRIM_THRESHOLD_` and the like, or their `GLIBC_TUNABLES`). Returns whether the
    setting was made; calling it again changes nothing."""
    raw = os.environ.get(ALLOCATOR_ENV) or "auto"
    mode = raw.strip().lower()
    if mode not in ("auto", "keep", "system"):
        raise InputError(f"{ALLOCATOR_ENV}={raw!r}: must be auto (kept for diffusion models), keep (kept "
                         "for every command) or system (glibc's defaults)")
    if mode == "system" or (everywhere and mode != "keep") or not sys.platform.startswith("linux"):
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(k in os.environ for k in USER_MALLOC) or "malloc.mmap" in tunables or "malloc.trim" in tunables:
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED))


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; asking for an absent device is an input error."""
    if name not in DEVICES:
        raise InputError(f"--device {name}: must be one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: no MPS device is available on this machine")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (AMX or AVX512-BF16)."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `--precision auto|fp32|bf16`, or None for plain fp32.

    `auto` uses bfloat16 on CUDA and on CPUs with native bf16; elsewhere emulated bf16 is slower
    than fp32, so fp32 it is.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise InputError(f"--precision {precision}: must be auto, fp32 or bf16")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """Autocast to `dtype`, or nothing for fp32. `cache=False` inside CUDA graph capture, where
    autocast's cache of cast weights must not be used."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def make_generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator: random draws are made on the CPU and moved, so the same seed
    gives the same numbers on every device."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class StopRequest:
    """Set by the first Ctrl-C; a training loop checks it between steps."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def deferred_interrupt():
    """Within the block the first Ctrl-C (or SIGTERM) only sets `.requested`, so the loop stops at a step
    boundary and its saved state is consistent (a KeyboardInterrupt raised inside a step, after
    D's update but before G's, made the resumed run diverge). A second Ctrl-C interrupts at once.
    """
    import signal
    import threading

    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    # SIGTERM too: a scheduler's (SLURM, torchrun) polite stop saves like Ctrl-C
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
