"""The CPU allocator setting: whether this process keeps the memory of freed tensors for reuse.

Kept apart from `runtime` because the command line asks for it before any command runs, and it
must not import torch there (`xraygan --help` and the commands that never touch torch start in a
tenth of the time torch's import takes)."""

from __future__ import annotations

import ctypes
import os
import sys

from xraygan.errors import InputError

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
