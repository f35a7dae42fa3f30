"""The run layer both trainers share: where a run may go, resuming only the same run on the same
data, and leaving nothing behind when a run fails before its first checkpoint.

    check_run_target(...)        before any image is read: free folder, own earlier run, or --resume
    created = begin_run(...)     after the data is read: the data fingerprint, then the folder
    ... train, checkpointing; append_log(...) every few steps ...
    discard_new_run(run, created) when it failed before any checkpoint

and for the step-based trainers (train-gan, train-diffusion): the log file (`append_log`,
`truncate_log` on resume) and the errors that end a run (`not_finite`, `interrupted_in_step`,
`abandon_failed_run`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
from pathlib import Path

from xraygan.errors import InputError, Interrupted, TrainingError
from xraygan.fsutil import check_output_free, holds_anything, make_dirs, read_json, write_csv


def check_run_target(run: Path, cfg, must_match: tuple[str, ...], command: str) -> None:
    """Before training into `run` with the trainer's config `cfg` (a dataclass with `resume`,
    `force` and `to_json`): with --resume there must be a state file and the options in
    `must_match` must equal those in the run's config.json; without it, the folder must be free
    (or, with --force, an earlier run of the same command). An option the run's record does not
    hold (one added since) counts as the config's default for it, which that run used."""
    run = Path(run)
    if not cfg.resume:
        check_output_free(run, cfg.force, command)
        return
    if not (run / "state.safetensors").is_file():
        raise InputError(f"{run / 'state.safetensors'}: nothing to resume (no state file)")
    saved = read_json(run / "config.json")["train"]
    asked = cfg.to_json()
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    changed = sorted(k for k in must_match if saved.get(k, defaults.get(k)) != asked[k])
    if changed:
        from xraygan.options import cli_fields, shown

        fields = {f.name: f for f in cli_fields(type(cfg))}

        def name(k: str) -> str:  # as the command line writes it
            f = fields.get(k)
            return "--" + k.replace("_", "-") if f is None else (k.upper() if f.argument else f.flag)

        was = "; ".join(f"{name(k)} {shown(saved.get(k, defaults.get(k)))} (now {shown(asked[k])})"
                        for k in changed)
        raise InputError(f"{run / 'config.json'}: --resume with different options than the run was started "
                         f"with: {was}; resume with those, or start a new run in another folder")


def start_run_folder(run: Path, resume: bool, force: bool) -> bool:
    """Make the run folder; an earlier run there (already checked to be this command's own by
    `check_run_target`) is removed first with --force. Returns True when the folder is new, so
    a run that fails before its first checkpoint can remove it again (`discard_new_run`)."""
    run = Path(run)
    if resume:
        return False
    if holds_anything(run):
        if not force:  # checked before; a folder that appeared since is not ours to touch
            raise InputError(f"{run}: already exists and is not empty")
        old = run.parent / f".{run.name}.old-{os.getpid()}"
        os.replace(run, old)
        shutil.rmtree(old, ignore_errors=True)
    existed = run.is_dir()
    make_dirs(run)
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


def begin_run(run: Path, resume: bool, force: bool, fingerprint: str, data: Path, writes: bool = True) -> bool:
    """After the training data is read: with --resume it must be the data the run was trained on
    (its config.json records a fingerprint); then the folder is made (see `start_run_folder`) by
    the process that `writes` it (under torchrun, rank 0 only)."""
    if resume:
        saved = read_json(Path(run) / "config.json").get("data_fingerprint")
        if saved is not None and saved != fingerprint:
            raise InputError(f"{data}: --resume with different training images than {run} was "
                             f"trained on (fingerprint {fingerprint} vs {saved})")
    return start_run_folder(run, resume, force) if writes else False


def fingerprint_arrays(*arrays) -> str:
    """sha256 (16 hex digits) of arrays' bytes and shapes: which data a run was trained on."""
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(repr(getattr(a, "shape", None)).encode())
        if hasattr(a, "tobytes"):  # the buffer itself: no copy of a 50,000-image array
            import numpy as np

            h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
        else:
            h.update(repr(a).encode())
    return h.hexdigest()[:16]


def append_log(run: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    """Add rows to RUN/log.csv (the header when the file is new)."""
    path = Path(run) / "log.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerows(rows)


def truncate_log(run: Path, fields: tuple[str, ...], step: int) -> None:
    """On resume, drop log rows written after the checkpoint that is being resumed."""
    path = Path(run) / "log.csv"
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    write_csv(path, fields, rows)


def not_finite(step, detail: str, checkpoint: Path, checkpointed: bool) -> TrainingError:
    """The NaN guard's error: which step, and what is left of the run."""
    return TrainingError(
        f"step {step}: loss is not finite{detail}; stopped. "
        + (f"The last good checkpoint is {checkpoint}; " if checkpointed
           else "No checkpoint had been written, so the run folder was removed. ")
        + "Try a lower --lr or --precision fp32")


def interrupted_in_step(run: Path, created: bool, checkpointed: bool) -> Interrupted:
    """A second Ctrl-C inside a step: that state is half-updated, so the last save is kept (or,
    with none, what the run wrote is removed)."""
    if not checkpointed:
        discard_new_run(run, created)
    return Interrupted("interrupted inside a step; " + (
        f"{run} keeps its last checkpoint: continue with --resume" if checkpointed
        else f"nothing was checkpointed, so {run} was removed"))


def abandon_failed_run(run: Path, created: bool, writer, checkpointed: bool, writes: bool = True) -> None:
    """After an error: let the background checkpoint writer finish; a run with no checkpoint on
    disk (or whose last write failed) is removed, so a plain rerun is accepted. `writes`: this
    process owns the folder (under torchrun, rank 0 only)."""
    try:
        writer.wait()
    except BaseException:  # noqa: BLE001 - the first error is the one to report
        checkpointed = False
    if not checkpointed and writes:
        discard_new_run(run, created)


def trained_to(run: Path, steps: int, model: str) -> bool:
    """Whether a step-based run (train-gan, train-diffusion) has trained at least `steps` steps and
    kept its `model` file: what the study asks before it skips a trainer."""
    from xraygan.checkpoint import metadata_or_none

    m = metadata_or_none(Path(run) / "state.safetensors")
    return m is not None and int(m.get("step", 0)) >= steps and (Path(run) / model).is_file()
