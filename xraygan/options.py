"""Command-line options declared on the config fields they set.

A command's config dataclass is the one home of its defaults: a field declared with `opt(...)`
is also an option of the command (its help text beside its default), and the command line is
built from the fields (`cli.config_command`). A field without `opt` is for library callers only
(e.g. `TrainClassifierConfig.val_is_train`, which the audit's feature classifier sets on purpose).

    epochs: int = opt(20, "At most this many epochs.")
    out: Path = opt(help="Run folder.", flags=("--out", "-o"))          # required: no default
    data: Path = opt(help="Training image folder.", argument=True)      # a positional argument

Torch-free, so that declaring options costs nothing to import.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Optional

DEVICE_HELP = "auto, cpu, cuda or mps."
TRAIN_FOLDER_HELP = "Training image folder, e.g. DATA/train."
JSON_HELP = "Print a summary as JSON on stdout."
PRECISION_HELP = "auto, fp32 or bf16 (as for train-gan)."
TORCHRUN_BATCH_HELP = ("Images per step; under torchrun the whole batch, each of N processes taking 1/N "
                       "(for a batch of B per process, as DDP examples count, give N×B).")


def opt(default: Any = MISSING, help: str = "", *, flags: tuple[str, ...] = (), argument: bool = False,
        sets: tuple[str, ...] = (), **typer_options: Any) -> Any:
    """A dataclass field that is also a command-line option (or, with `argument`, a positional
    argument). `flags` are the option's names when they are not `--field-name`; `sets` names
    further fields the option's value also goes to (train-gan's `--width` sets `ngf` and `ndf`);
    `typer_options` go to `typer.Option` as they are (e.g. `show_default=False`, `envvar=...`)."""
    meta = {"cli": {"help": help, "flags": tuple(flags), "argument": argument, "sets": tuple(sets),
                    "typer": typer_options}}
    if isinstance(default, (list, dict, set)):
        raise TypeError("opt(): give a tuple for a default of several values")
    if default is MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class CliField:
    """One config field as the command line sees it."""
    name: str
    type: Any  # what Typer parses: list[X] for a tuple field, Optional[X] for X | None
    default: Any  # ... when required
    help: str
    flags: tuple[str, ...]
    argument: bool
    typer: dict
    several: bool  # a tuple field: the option repeats
    sets: tuple[str, ...]  # further fields that get the same value


@functools.lru_cache(maxsize=None)
def cli_fields(config: type) -> tuple[CliField, ...]:
    """The fields of `config` declared with `opt`, in declaration order (a study plan asks ~100 times)."""
    hints = typing.get_type_hints(config)
    out = []
    for f in dataclasses.fields(config):
        spec = f.metadata.get("cli")
        if spec is None:
            continue
        t, several = _cli_type(hints[f.name])
        default = ... if f.default is MISSING else (list(f.default) if several else f.default)
        out.append(CliField(f.name, t, default, spec["help"], spec["flags"], spec["argument"], spec["typer"],
                            several, spec["sets"]))
    return tuple(out)


def _cli_type(t: Any) -> tuple[Any, bool]:
    args = typing.get_args(t)
    origin = typing.get_origin(t)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return list[args[0]], True
    if args and type(None) in args:  # X | None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return Optional[inner[0]], False
    if t in (str, int, float, bool, Path):
        return t, False
    raise TypeError(f"no command-line form for a field of type {t}")


def config_values(declared_fields: tuple[CliField, ...], values: dict) -> dict:
    """Parsed option values → the config's keyword arguments (repeated options back to tuples,
    a value also to the fields its option `sets`)."""
    declared = {f.name: f for f in declared_fields}
    out = {}
    for k, v in values.items():
        v = tuple(v) if declared[k].several else v
        for name in (k, *declared[k].sets):
            out[name] = v
    return out
