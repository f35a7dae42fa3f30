"""Devices, seeds, precision and RNG state: one place for each; generators are passed explicitly."""

from __future__ import annotations

import contextlib

import torch

from xraygan.errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")


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
