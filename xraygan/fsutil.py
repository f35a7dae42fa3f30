"""Atomic file and folder writes: a crash never leaves a half-written file in place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xraygan.errors import InputError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def check_output_free(out: Path, force: bool) -> None:
    """Refuse to replace an existing, non-empty output unless --force was given."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"{out}: already exists and is not empty (use --force to replace it)")


def check_run_target(run: Path, resume: bool, force: bool, asked: dict, must_match: tuple[str, ...]) -> None:
    """Before training into `run`: with --resume there must be a state file and the options in
    `must_match` must equal those in the run's config.json; without it, the folder must be free."""
    run = Path(run)
    if not resume:
        check_output_free(run, force)
        return
    if not (run / "state.safetensors").is_file():
        raise InputError(f"{run / 'state.safetensors'}: nothing to resume (no state file)")
    saved = read_json(run / "config.json")["train"]
    changed = sorted(k for k in must_match if saved.get(k) != asked[k])
    if changed:
        raise InputError(f"{run / 'config.json'}: --resume with different {', '.join(changed)} "
                         "than the run was started with")


@contextlib.contextmanager
def staged_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and rename it to `out` only on success.

    An interrupted run leaves at most a hidden `.NAME.partial-PID` sibling, never a
    half-written `out`; stale partial folders of earlier runs are removed first.
    """
    out = Path(out).absolute()
    check_output_free(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
