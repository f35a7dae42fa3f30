"""Checkpoints: `.safetensors` files that describe themselves (no pickle anywhere).

Metadata (all strings, as safetensors requires): `format` = "xraygan", `format_version`,
`kind` (generator, discriminator, classifier, gan-state, ...), `config` (JSON that rebuilds
the network), and whatever else the writer adds (classes, image size, step, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file

from xraygan.errors import InputError
from xraygan.fsutil import atomic_write_with

FORMAT = "xraygan"
FORMAT_VERSION = 1


def snapshot(path: Path, tensors: dict[str, torch.Tensor], kind: str, config: dict, copy: bool = True,
             **meta: Any) -> tuple[Path, dict, dict]:
    """What `save_checkpoint` writes, with the tensors copied off the device (and off the live
    training tensors): safe to serialise later, on another thread. `copy=False` keeps CPU tensors
    as they are (no second copy of a 256 px GAN's 1.5 GB of state), for a write made at once."""
    md = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind,
          "config": json.dumps(config, sort_keys=True)}
    for k, v in meta.items():
        md[k] = v if isinstance(v, str) else json.dumps(v)
    flat = {k: v.detach().to("cpu", copy=copy) for k, v in tensors.items()}
    if copy:
        flat = {k: v.contiguous() for k, v in flat.items()}
    return Path(path), flat, md


# safetensors' dtype names
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(f, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (8-byte header length, JSON header, raw little-endian data), written
    one tensor at a time: a tensor in another memory layout (channels-last weights and their Adam
    moments) is made contiguous alone, never the whole state at once (1.5 GB for a 256 px GAN)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    names = sorted(tensors)
    for k in names:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    f.write(len(head).to_bytes(8, "little") + head)
    for k in names:
        t = tensors[k].contiguous().reshape(-1)
        if t.numel():
            f.write(memoryview(t.view(torch.uint8).numpy()))


def write_snapshot(snap: tuple[Path, dict, dict]) -> None:
    path, flat, md = snap

    atomic_write_with(path, lambda f: write_safetensors(f, flat, md))


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], kind: str,
                    config: dict, **meta: Any) -> None:
    """Write tensors + self-describing metadata atomically (at once, so without a copy)."""
    write_snapshot(snapshot(path, tensors, kind, config, copy=False, **meta))


class BackgroundWriter:
    """Serialises and writes checkpoint snapshots on one background thread, in order, so the
    training loop pays only for copying tensors off the device (measured on an H100 at 64 px:
    writing the 115 MB of a GAN checkpoint took longer than 100 training steps). `wait()`
    re-raises a failed write; call it before reporting a run as saved.

    With `background=False` (training on the CPU) each batch of snapshots is written at once in
    the caller's thread, and `copies` is False: the caller hands over its live tensors, because a
    copy would double the state's memory (1.5 GB more for a 256 px GAN) for a write that is
    short beside a CPU step at the sizes where the state is large."""

    def __init__(self, background: bool = True) -> None:
        self._thread = None
        self._error: BaseException | None = None
        self.background = background

    @property
    def copies(self) -> bool:
        return self.background

    def submit(self, snaps: list[tuple[Path, dict, dict]]) -> None:
        import threading

        self.wait()
        if not self.background:
            for s in snaps:
                write_snapshot(s)
            return

        def run() -> None:
            try:
                for s in snaps:
                    write_snapshot(s)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="xraygan-checkpoint")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e


# A finished run trained with --no-keep-state leaves its state file as a record alone: where the
# run ended, without tensors, so a study can skip it but nobody can extend it.
RECORD_ALONE = {"tensors_dropped": True}


def is_record_alone(meta: dict) -> bool:
    return bool(meta.get("tensors_dropped"))


def cannot_extend(path: Path, done: str, target: str) -> InputError:
    """The refusal to continue a run whose state file is its record alone."""
    return InputError(f"{path}: the run finished after {done} with --no-keep-state, so it kept no training "
                      f"state to continue to {target} (train a new run)")


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata with JSON values decoded; a clear error for anything not ours."""
    return load_checkpoint(path, None, tensors=False)[1]


def metadata_or_none(path: Path) -> dict[str, Any] | None:
    """A checkpoint's metadata, or None when the file is absent or not a readable checkpoint."""
    try:
        return read_metadata(path) if Path(path).is_file() else None
    except InputError:
        return None


def load_checkpoint(path: Path, kind: str | tuple[str, ...] | None,
                    tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load an xraygan checkpoint, checking it is one and of the expected kind. With
    `tensors=False` only the header is read (a state file is ~100 MB; its metadata a few kB)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file (only {size} bytes)")
        header_len = int.from_bytes(head, "little")
        if header_len <= 0 or header_len > size - 8:
            raise InputError(f"{path}: not a safetensors file, or truncated")
        data = head + f.read(header_len)
    try:
        header = json.loads(data[8: 8 + header_len])
        raw_md = header.get("__metadata__") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: not a valid safetensors file, or truncated ({e})") from None
    if raw_md.get("format") != FORMAT:
        raise InputError(f"{path}: a safetensors file, but not an xraygan checkpoint "
                         "(no xraygan metadata)")
    if int(raw_md.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"{path}: written by a newer xraygan (format version "
                         f"{raw_md['format_version']}); upgrade xraygan")
    md: dict[str, Any] = {}
    for k, v in raw_md.items():
        try:
            md[k] = json.loads(v) if k not in ("format", "kind") else v
        except json.JSONDecodeError:
            md[k] = v
    want = (kind,) if isinstance(kind, str) else kind
    if want is not None and md.get("kind") not in want:
        raise InputError(f"{path}: is a {md.get('kind')} checkpoint, expected a "
                         f"{' or '.join(want)}")
    try:
        loaded = st_load_file(path) if tensors else {}
    except (SafetensorError, ValueError, OSError) as e:
        raise InputError(f"{path}: not a valid safetensors file, or truncated ({e})") from None
    return loaded, md


def state_dict_to_tensors(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in sd.items()}


def tensors_to_state_dict(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_to_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict, list]:
    """Flatten an optimizer's state into named tensors + JSON param groups (no pickle)."""
    sd = opt.state_dict()
    out = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            out[f"{prefix}{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out, sd["param_groups"]


def optimizer_from_tensors(prefix: str, opt: torch.optim.Optimizer, tensors: dict,
                           param_groups: list) -> None:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            idx, name = k[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    # how the update is computed (fused, capturable, ...) belongs to this machine, not the saved run:
    # a run saved on CUDA resumes on the CPU and vice versa
    impl = ("fused", "capturable", "foreach", "differentiable")
    groups = [{**g, **{k: cur[k] for k in impl if k in cur}} for g, cur in zip(param_groups, opt.param_groups)]
    opt.load_state_dict({"state": state, "param_groups": groups})
    # moments are saved contiguous; give them their parameter's layout (channels-last), which the
    # fused CUDA Adam requires
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
