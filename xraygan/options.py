"""Command-line options declared on the config fields they set.

A command's config dataclass is the one home of its defaults: a field declared with `opt(...)`
is also an option of the command (its help text beside its default), and the command line is
built from the fields (`cli.config_command`). A field without `opt` is for library callers only
(e.g. `TrainClassifierConfig.val_is_train`, which the audit's feature classifier sets on purpose).

    epochs: int = opt(20, "At most this many epochs.")
    out: Path = opt(help="Run folder.", flags=("--out", "-o"))          # required: no default
    data: Path = opt(help="Training image folder.", argument=True)      # a positional argument
    split: tuple[float, float, float] = opt((0.8, 0.1, 0.1), "Fractions.", cli=str, parse=fractions,
                                            text=lambda v: ",".join(map(str, v)))  # typed as a string

A value the command line writes one way and the config holds another (`--split 0.8,0.1,0.1`, a
tuple) is declared with `cli` (the type typed), `parse` (typed → field; its errors are one
line) and `text` (field → typed, for `contract.to_argv`). `several` lets one flag take several
values (`study --seeds 0 1 2`: the words after it that match the pattern), `bare` gives a flag
written without a value that value (`evaluate --report`).

Torch-free, so that declaring options costs nothing to import.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Optional

DEVICE_HELP = "auto, cpu, cuda or mps."
BESIDE = "@beside"  # what a bare `evaluate --report` gives the config, which puts the report beside the checkpoint
TRAIN_FOLDER_HELP = "Training image folder, e.g. DATA/train."
JSON_HELP = "Print a summary as JSON on stdout."
PRECISION_HELP = "auto, fp32 or bf16 (as for train-gan)."
TORCHRUN_BATCH_HELP = ("Images per step; under torchrun the whole batch, each of N processes taking 1/N "
                       "(for a batch of B per process, as DDP examples count, give N×B).")


def opt(default: Any = MISSING, help: str = "", *, flags: tuple[str, ...] = (), argument: bool = False,
        sets: tuple[str, ...] = (), cli: Any = None, parse: Callable[[Any], Any] | None = None,
        text: Callable[[Any], Any] | None = None, several: str | None = None, bare: str | None = None,
        **typer_options: Any) -> Any:
    """A dataclass field that is also a command-line option (or, with `argument`, a positional
    argument). `flags` are the option's names when they are not `--field-name`; `sets` names
    further fields the option's value also goes to (train-gan's `--width` sets `ngf` and `ndf`);
    `cli`, `parse` and `text` declare a typed form other than the field's (see the module's
    docstring); `several` is the pattern of the words one flag takes (`--seeds 0 1 2`); `bare`
    the value of a flag given alone; `typer_options` go to `typer.Option` as they are (e.g.
    `show_default=False`, `envvar=...`)."""
    if (cli is None) != (parse is None):
        raise TypeError("opt(): cli and parse go together")
    meta = {"cli": {"help": help, "flags": tuple(flags), "argument": argument, "sets": tuple(sets),
                    "typer": typer_options, "cli_type": cli, "parse": parse, "text": text,
                    "several": re.compile(several) if several else None, "bare": bare}}
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
    parse: Callable[[Any], Any] | None  # typed value -> field value
    text: Callable[[Any], Any] | None  # field value -> typed value
    words: re.Pattern | None  # the words one flag takes, when it takes several
    bare: str | None  # the value of the flag given alone

    @property
    def flag(self) -> str:
        return self.flags[0] if self.flags else "--" + self.name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def cli_fields(config: type) -> tuple[CliField, ...]:
    """The fields of `config` declared with `opt`, in declaration order (a study plan asks ~100 times)."""
    hints = typing.get_type_hints(config)
    out = []
    for f in dataclasses.fields(config):
        spec = f.metadata.get("cli")
        if spec is None:
            continue
        t, several = _cli_type(spec["cli_type"] if spec["cli_type"] is not None else hints[f.name])
        default = ... if f.default is MISSING else (spec["text"] or (lambda v: v))(f.default)
        default = list(default) if several and default is not ... else default
        out.append(CliField(f.name, t, default, spec["help"], spec["flags"], spec["argument"], spec["typer"],
                            several, spec["sets"], spec["parse"], spec["text"], spec["several"], spec["bare"]))
    return tuple(out)


def _cli_type(t: Any) -> tuple[Any, bool]:
    args = typing.get_args(t)
    origin = typing.get_origin(t)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis or origin is list:
        return list[args[0]], True
    if args and type(None) in args:  # X | None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return Optional[inner[0]], False
    if t in (str, int, float, bool, Path):
        return t, False
    raise TypeError(f"no command-line form for a field of type {t}")


def config_values(declared_fields: tuple[CliField, ...], values: dict) -> dict:
    """Parsed option values → the config's keyword arguments (repeated options back to tuples, a
    typed form through its `parse`, a value also to the fields its option `sets`)."""
    declared = {f.name: f for f in declared_fields}
    out = {}
    for k, v in values.items():
        f = declared[k]
        v = f.parse(v) if f.parse is not None else (tuple(v) if f.several else v)
        for name in (k, *declared[k].sets):
            out[name] = v
    return out


def given_options(config: Any, *names: str) -> dict[str, str]:
    """Of the options `names` of a config, those set to other than their declared default, as
    field name → how the command line wrote it (`--sampling-steps 5`): a command refuses such an
    option when what it applies to is absent, instead of passing over it in silence."""
    declared = {f.name: f for f in dataclasses.fields(config)}
    flags = {f.name: f.flag for f in cli_fields(type(config))}
    out = {}
    for name in names:
        value, default = getattr(config, name), declared[name].default
        if default is not MISSING and value != default:
            text = flags[name] if isinstance(value, bool) else f"{flags[name]} {shown(value)}"
            out[name] = text
    return out


def shown(value: Any) -> str:
    """An option's value as a message writes it: several joined by commas (a tuple, or the list
    a JSON record holds), yes/no, none."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "none" if value is None else ("yes" if value is True else ("no" if value is False else str(value)))

