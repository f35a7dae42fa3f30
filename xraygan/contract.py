"""A command's config as its command line, so a plan of configs (the study's) gets every shell
command from the command-line definition itself, never from hand-typed flags.

`to_argv("train-gan", TrainGanConfig(...))` walks the command's own options: each option reads
the config field it is declared on (`options.opt`, through its `text` where the typed form
differs), and is written only when it differs from the option's default. A config is refused
when a field without an option differs from its default (a library caller's setting: no
command line makes that config), or when an option that sets several fields (`--width`: ngf
and ndf) finds them different. tests/test_contract.py parses every command line of a full study
plan back through the command-line layer and checks it rebuilds the same config, so a renamed
flag fails a test instead of a study.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from xraygan.options import cli_fields


@lru_cache(maxsize=1)
def commands() -> dict:
    """Every registered command's click object, built once (a study plan asks for ~100 command lines)."""
    import typer

    from xraygan.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("xraygan", [], resilient_parsing=True)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def _command(name: str):
    return commands()[name]


def _text(v: Any) -> str:
    return str(v) if not isinstance(v, float) else repr(v)


def to_argv(command: str, cfg: Any) -> list[str]:
    """The arguments (after `xraygan COMMAND`) that make `cfg`; options at their default are left out."""
    declared = {f.name: f for f in cli_fields(type(cfg))}
    on_the_command_line = {n for f in declared.values() for n in (f.name, *f.sets)}
    for f in fields(cfg):
        if f.name not in on_the_command_line and f.default is not MISSING and getattr(cfg, f.name) != f.default:
            raise ValueError(f"{command}: {f.name}={getattr(cfg, f.name)!r} has no command-line option "
                             f"(a library caller's setting); no command line makes this config")
    args: list[str] = []
    opts: list[str] = []
    for p in _command(command).params:
        if p.name == "help" or p.name == "as_json":  # how the result is shown, not part of the config
            continue
        f = declared.get(p.name)
        if f is None:
            raise ValueError(f"{command}: option {p.name} has no field in {type(cfg).__name__}")
        value = getattr(cfg, f.name)
        if any(getattr(cfg, other) != value for other in f.sets):
            raise ValueError(f"{command} takes one {f.flag} for {' and '.join((f.name, *f.sets))} "
                             f"({', '.join(f'{n} {getattr(cfg, n)}' for n in (f.name, *f.sets))})")
        if f.text is not None:
            value = f.text(value)
        if p.param_type_name == "argument":
            args += [_text(v) for v in value] if isinstance(value, (list, tuple)) else [_text(value)]
            continue
        default = p.default
        if isinstance(value, Path) and default is not None and not isinstance(default, Path):
            default = Path(default)
        if value is None or value == default or (isinstance(value, tuple) and list(value) == list(default or [])):
            continue
        if isinstance(value, bool):
            if value:
                opts.append(p.opts[0])
            elif p.secondary_opts:
                opts.append(p.secondary_opts[0])
            continue
        flag = p.opts[0]  # as the field declares it first (-n for generate, --out elsewhere)
        if getattr(p, "multiple", False):
            for v in value:
                opts += [flag, _text(v)]
        else:
            opts += [flag, _text(value)]
    return args + opts
