"""Atomic file and folder writes: a crash never leaves a half-written file in place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from xraygan.errors import InputError, WriteError


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide outputs from a team


def file_sha256(path: Path) -> str:
    """The file's sha256 (hex), read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` fills a temporary file beside `path`, which is then renamed into place; for
    writers that stream (a checkpoint is never one bytes object in memory)."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def make_dirs(folder: Path) -> None:
    """`mkdir -p` for an output folder, with one clear line when a file stands where a folder
    must be (`--out results.csv/run`) instead of FileExistsError's traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise InputError(f"{folder}: cannot be made, {blocker} is a file, not a folder") from None
    except OSError as e:
        raise write_error(folder, e) from None


def os_reason(e: OSError) -> str:
    """The system's words for a refused file operation: 'no space left on device'."""
    return (e.strerror or type(e).__name__).lower()


def write_error(path: Path, e: OSError) -> WriteError:
    """One line for a write the machine refused (a full disk is the common case: a classifier's
    resume state is 180 MB): which file, why, and that nothing half-written was kept."""
    return WriteError(f"{path}: could not write it ({os_reason(e)}); nothing half-written was kept, "
                      "and any earlier version of it is unchanged")


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


# The record each command leaves in its output folder, and the top-level entries it writes there.
# `--force` replaces a folder only when it holds that record and nothing else (hidden files
# aside): what a command did not write is never removed.
OUTPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "prepare": ("dataset.json", ("train", "val", "test")),
    "train-gan": ("config.json", ("log.csv", "generator.safetensors", "discriminator.safetensors",
                                  "state.safetensors", "samples")),
    "train-diffusion": ("config.json", ("log.csv", "diffusion.safetensors", "state.safetensors", "samples")),
    "train-classifier": ("config.json", ("log.csv", "classifier.safetensors", "state.safetensors",
                                         "last.safetensors", "summary.json")),
    "rebalance": ("rebalance.json", ("*",)),  # class folders, named by the data
    "evaluate": ("metrics.json", ("report.md", "predictions.csv", "*.png")),
    "compare": ("table.json", ("table.md", "table.csv", "paired.csv", "paired.png")),
    "gradcam": ("gradcam.json", ("cams.csv", "grid.png", "*")),
    "audit": ("audit.json", ("report.md", "review", "review_key.json", "flagged", "*.png", "*.csv",
                              "*.safetensors")),
    "demo": ("demo.json", ("data", "gan", "synth", "runs", "balanced", "table", "*")),
}
# Files by which a folder is recognised as xraygan output (never read as raw data).
RECORD_NAMES = ("dataset.json", "generation.json", "rebalance.json", "metrics.json", "gradcam.json",
                "audit.json", "demo.json", "table.json", "study.json", "config.json")


def xraygan_record(folder: Path) -> Path | None:
    """The xraygan record in `folder`, if it has one (config.json only when xraygan wrote it)."""
    for name in RECORD_NAMES:
        p = Path(folder) / name
        if not p.is_file():
            continue
        if name != "config.json":
            return p
        try:
            if "xraygan_version" in json.loads(p.read_text(encoding="utf-8")):
                return p
        except (OSError, ValueError):
            continue
    return None


def image_folder_around(out: Path) -> tuple[Path, str] | None:
    """The xraygan image folder that `out` would lie inside, and the command that made it: a split
    of a prepared dataset, a rebalanced set or a generated set. A folder made there would be
    read as one more class of it (`--out data/train/synthetic`)."""
    def ours(record: Path) -> bool:  # another tool's dataset.json is not a reason to refuse
        try:
            return record.is_file() and "xraygan_version" in json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False

    for a in Path(out).absolute().parents:
        if a.name in OUTPUTS["prepare"][1] and ours(a.parent / "dataset.json"):
            return a, "prepare"
        for record, command in (("rebalance.json", "rebalance"), ("generation.json", "generate")):
            if ours(a / record):
                return a, command
    return None


def check_not_in_image_folder(out: Path) -> None:
    around = image_folder_around(out)
    if around is not None:
        where = around[0] if Path(out).is_absolute() else os.path.relpath(around[0])  # as the user wrote it
        raise InputError(f"{out}: lies inside {where}, an image folder written by xraygan {around[1]}; "
                         "a folder there would be read as one more class of it: choose a folder outside it")


def holds_anything(folder: Path) -> bool:
    """Whether `folder` is a folder with anything in it (hidden files count)."""
    folder = Path(folder)
    return folder.is_dir() and any(folder.iterdir())


def check_output_free(out: Path, force: bool, command: str | None = None) -> None:
    """Refuse to replace an existing, non-empty output unless --force was given, and with --force
    unless the folder is what `command` itself wrote (its record, and nothing else)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not holds_anything(out):
        return
    if not force:
        raise InputError(f"{out}: already exists and is not empty (choose another --out, or "
                         "--force to replace an earlier output of this command)")
    if command is None:
        return
    record, allowed = OUTPUTS[command]
    rec = out / record
    if not rec.is_file() or (record == "config.json" and xraygan_record(out) is None):
        raise InputError(f"{out}: not an output of xraygan {command} (no {record}); --force only "
                         "replaces what this command wrote: choose another --out")
    import fnmatch

    # outputs of other xraygan commands kept inside (a classifier run's report/ and cams/) are
    # derived from what is replaced and go with it
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != record
                     and not any(fnmatch.fnmatchcase(p.name, pat) for pat in allowed)
                     and not (p.is_dir() and xraygan_record(p) is not None))
    if foreign:
        raise InputError(f"{out}: holds {', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}, "
                         f"which xraygan {command} did not write; --force will not remove it")


def continued_record(out: Path, record: str, refusal: str) -> Path | None:
    """For a command that continues its own output (generate adds images, a study reruns): None
    when `out` is new or empty (hidden files aside), else the path of its record `record`; a
    folder holding files but no such record is refused with `refusal`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(not p.name.startswith(".") for p in out.iterdir()):
        return None
    if not (out / record).is_file():
        raise InputError(f"{out}: {refusal}")
    return out / record


def overlapping(a: Path, b: Path) -> bool:
    """The same folder, or one inside the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def check_out_apart(out: Path, **inputs: Path | None) -> None:
    """An output folder is never an input, inside one, or above one (so --force can never
    remove, and a later run never reads, the data it was made from), and never inside an image
    folder xraygan made (see image_folder_around). Every command checks its outputs here."""
    o = Path(out).resolve()
    for name, p in inputs.items():
        if p is None:
            continue
        i = Path(p).resolve()
        opt = "--" + name.replace("_", "-")
        if o == i:
            raise InputError(f"{out}: the output folder is also the input ({opt}); choose another --out")
        if i in o.parents:
            raise InputError(f"{out}: the output folder lies inside the input {p} ({opt}); "
                             "choose a folder outside it")
        if o in i.parents:
            raise InputError(f"{out}: the output folder contains the input {p} ({opt}); "
                             "choose a folder beside it")
    check_not_in_image_folder(out)  # after the inputs: "inside the input" says more when it applies


@contextlib.contextmanager
def staged_dir(out: Path, force: bool = False, command: str | None = None) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and rename it to `out` only on success.

    An interrupted run leaves at most a hidden `.NAME.partial-PID` sibling, never a
    half-written `out`; stale partial folders of earlier runs are removed first.
    """
    out = Path(out).absolute()
    check_output_free(out, force, command)
    make_dirs(out.parent)
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


def has_record(folder: Path, command: str) -> bool:
    """Whether `folder` holds the finished record of `command` (its OUTPUTS record file, a JSON
    object that does not say it is still running)."""
    try:
        rec = read_json(Path(folder) / OUTPUTS[command][0])
    except (InputError, OSError):
        return False
    return isinstance(rec, dict) and rec.get("status", "done") == "done"


def record_header(kind: str) -> dict:
    """The one header every JSON record starts with: kind, format_version,
    xraygan_version."""
    from xraygan import __version__

    return {"kind": f"xraygan-{kind}", "format_version": 1, "xraygan_version": __version__}


def csv_text(header, rows) -> str:
    """CSV text: a header, then rows given as sequences or as dicts keyed by the header."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r.get(k, "") for k in header] if isinstance(r, dict) else r)
    return buf.getvalue()


def write_csv(path: Path, header, rows) -> None:
    """Write a CSV file atomically (see `csv_text`)."""
    atomic_write_text(path, csv_text(header, rows))
