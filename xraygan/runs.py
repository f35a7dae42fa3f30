"""The run layer both trainers share: where a run may go, resuming only the same run on the same
data, and leaving nothing behind when a run fails before its first checkpoint.

    check_run_target(...)        before any image is read: free folder, own earlier run, or --resume
    created = begin_run(...)     after the data is read: the data fingerprint, then the folder
    ... train, checkpointing ...
    discard_new_run(run, created) when it failed before any checkpoint
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from xraygan.errors import InputError
from xraygan.fsutil import check_output_free, read_json


def check_run_target(run: Path, resume: bool, force: bool, asked: dict, must_match: tuple[str, ...],
                     command: str) -> None:
    """Before training into `run`: with --resume there must be a state file and the options in
    `must_match` must equal those in the run's config.json; without it, the folder must be free
    (or, with --force, an earlier run of the same command)."""
    run = Path(run)
    if not resume:
        check_output_free(run, force, command)
        return
    if not (run / "state.safetensors").is_file():
        raise InputError(f"{run / 'state.safetensors'}: nothing to resume (no state file)")
    saved = read_json(run / "config.json")["train"]
    changed = sorted(k for k in must_match if saved.get(k) != asked[k])
    if changed:
        raise InputError(f"{run / 'config.json'}: --resume with different {', '.join(changed)} "
                         "than the run was started with")


def start_run_folder(run: Path, resume: bool, force: bool) -> bool:
    """Make the run folder; an earlier run there (already checked to be this command's own by
    `check_run_target`) is removed first with --force. Returns True when the folder is new, so
    a run that fails before its first checkpoint can remove it again (`discard_new_run`)."""
    run = Path(run)
    if resume:
        return False
    if run.is_dir() and any(run.iterdir()):
        if not force:  # checked before; a folder that appeared since is not ours to touch
            raise InputError(f"{run}: already exists and is not empty")
        old = run.parent / f".{run.name}.old-{os.getpid()}"
        os.replace(run, old)
        shutil.rmtree(old, ignore_errors=True)
    existed = run.is_dir()
    run.mkdir(parents=True, exist_ok=True)
    return not existed


def discard_new_run(run: Path, created: bool) -> None:
    """Remove what a run that never reached its first checkpoint wrote (the folder itself too
    when this invocation created it), so a plain rerun is accepted."""
    run = Path(run)
    if created:
        shutil.rmtree(run, ignore_errors=True)
    elif run.is_dir():
        for p in run.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def begin_run(run: Path, resume: bool, force: bool, fingerprint: str, data: Path) -> bool:
    """After the training data is read: with --resume it must be the data the run was trained on
    (its config.json records a fingerprint); then the folder is made (see `start_run_folder`)."""
    if resume:
        saved = read_json(Path(run) / "config.json").get("data_fingerprint")
        if saved is not None and saved != fingerprint:
            raise InputError(f"{data}: --resume with different training images than {run} was "
                             f"trained on (fingerprint {fingerprint} vs {saved})")
    return start_run_folder(run, resume, force)


def fingerprint_arrays(*arrays) -> str:
    """sha256 (16 hex digits) of arrays' bytes and shapes: which data a run was trained on."""
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(repr(getattr(a, "shape", None)).encode())
        h.update(a.tobytes() if hasattr(a, "tobytes") else repr(a).encode())
    return h.hexdigest()[:16]
