"""The `xraygan` command line, built from the command table (`xraygan/commands.py`): each
command's options are its config's fields (`xraygan/options.py`), and every command runs the
same way: options → config (its checks) → one library function → its summary on stderr and its
JSON or text on stdout. Library errors become one line on stderr (exit 2 for bad input, 1 for
failures); nothing here branches on a command's modes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
import typer.core

from xraygan.commands import COMMAND_ORDER, CONFIG_COMMANDS, RENAMED
from xraygan.errors import XrayganError


def _click():
    try:  # typer >= 0.22 vendors click as typer._click
        from typer import _click as click
    except ImportError:
        import click
    return click


class _Group(typer.core.TyperGroup):
    """Commands built when first asked for, so each imports only its own module (`xraygan
    rebalance` never imports torch). Usage errors (a missing option, a value of the wrong type)
    print as two plain lines, the error last, instead of a boxed panel whose last line is a
    border: scripts and users read the last line of stderr."""

    def list_commands(self, ctx) -> list[str]:
        names = [*self.commands, *(n for n in CONFIG_COMMANDS if n not in self.commands)]
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))

    def get_command(self, ctx, name: str):
        if name not in self.commands and name in CONFIG_COMMANDS:
            if getattr(self, "_listing", False):  # `xraygan --help` needs the help line, not the command
                return typer.core.TyperCommand(name, help=CONFIG_COMMANDS[name].doc)
            self.add_command(config_command(name), name)
        return super().get_command(ctx, name)

    def format_help(self, ctx, formatter):
        self._listing = True
        try:
            return super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        click = _click()

        try:
            args = rewrite_args(list(sys.argv[1:] if args is None else args))
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
            rv = 2
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                click.echo(f"Try '{ctx.command_path} --help' for help.", err=True)
            click.echo(f"error: {e.format_message()}", err=True)
            rv = e.exit_code
        except (typer.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _declared(command: str | None) -> tuple:
    """The options of a command from the table, as its config declares them."""
    if command not in CONFIG_COMMANDS:
        return ()
    import importlib

    from xraygan.options import cli_fields

    cc = CONFIG_COMMANDS[command]
    return cli_fields(getattr(importlib.import_module(cc.module), cc.config))


def rewrite_args(args: list[str]) -> list[str]:
    """The words as the parser reads them: an old spelling (`RENAMED`) as the command it is now;
    the several words after a flag that takes them (`study --seeds 0 1 2`) as repeated flags; a
    flag that may stand alone (`evaluate ... --report`) given its bare value."""
    cmd = next((a for a in args if not a.startswith("-")), None)
    old = next((f for f in args if (cmd, f) in RENAMED), None)
    if old is not None:
        from xraygan.console import err

        new = RENAMED[cmd, old]
        err.print(f"[yellow]note:[/] `xraygan {cmd} {old}` is now `xraygan {new}`", highlight=False)
        k = args.index(cmd)
        args = args[:k] + [new] + [a for a in args[k + 1:] if a != old]
        cmd = new
    fields = _declared(cmd)
    several = {fl: f.words for f in fields if f.words is not None for fl in (f.flags or (f.flag,))}
    bare = {fl: f.bare for f in fields if f.bare is not None for fl in (f.flags or (f.flag,))}
    out: list[str] = []
    flag, taken = None, False  # a flag whose several words are being read; whether any was
    for i, a in enumerate(args):
        if flag is not None and not a.startswith("-") and several[flag].match(a):
            out += [flag, a]
            taken = True
            continue
        if flag is not None and not taken:  # no word followed: leave the flag for the parser to report
            out.append(flag)
        flag, taken = (a if a in several else None), False
        if flag is not None:
            continue
        out.append(a)
        if a in bare and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(bare[a])
    if flag is not None and not taken:
        out.append(flag)
    return out


app = typer.Typer(name="xraygan", cls=_Group, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  add_completion=False,
                  help="Rebalance imbalanced chest X-ray datasets with GAN images, and measure "
                       "whether it helps.")
T = TypeVar("T")


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.",
                                          is_eager=True)] = False,
) -> None:
    """Rebalance imbalanced chest X-ray datasets with GAN images, and measure whether it helps."""
    if version:
        from xraygan import __version__

        print(f"xraygan {__version__}")
        raise typer.Exit()


def _run(fn: Callable[..., T], *args, progress: bool = False, **kwargs) -> T:
    """Call library code; turn its errors into one clear line and an exit code.

    With `progress`, the call gets a rich progress callback; the bar is stopped before any error
    is printed, so the error is always the last line on stderr. Anything unexpected prints one
    line and leaves its traceback in a log file, never on the terminal.
    """
    from xraygan.console import err, progress_bar

    try:
        if progress:
            with progress_bar() as cb:
                return fn(*args, cb, **kwargs)
        return fn(*args, **kwargs)
    except XrayganError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: outputs are written whole or not at all; "
                  "nothing half-written was kept", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except MemoryError:
        err.print("[bold red]error:[/] out of memory (try a smaller --batch-size or --size)",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - the promise: never a traceback on the terminal
        if _machine_refused(e):
            from xraygan.fsutil import os_reason

            err.print(f"[bold red]error:[/] {e.filename}: {os_reason(e)}; outputs are written whole or not at "
                      "all, so nothing half-written was kept", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        log = _crash_log(e)
        what = str(e).splitlines()[0] if str(e) else ""
        err.print(f"[bold red]internal error:[/] {type(e).__name__}{': ' + what if what else ''} "
                  f"— please report; details in {log}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _machine_refused(e: BaseException) -> bool:
    """A file operation the machine refused (disk full, quota, permissions, read-only, a name
    too long, a symlink loop): the user's to fix, not a bug to report. Outputs are staged and
    renamed into place, so such a failure leaves nothing half-written."""
    import errno

    return isinstance(e, OSError) and e.filename is not None and e.errno in (
        errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG,
        errno.ELOOP)


def _crash_log(e: BaseException) -> str:
    """Write the traceback to a log file in the temp folder (never beside the user's data)."""
    import tempfile
    import time
    import traceback

    from xraygan import __version__

    text = (f"xraygan {__version__}; argv: {sys.argv}\n"
            + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    try:
        fd, path = tempfile.mkstemp(prefix=f"xraygan-error-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".log")
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    except OSError:
        return "(the log could not be written)"


def _run_with_progress(fn: Callable[..., T], cfg, show: bool = True, callback: Callable | None = None) -> T:
    """Run one library step under a rich progress bar (on stderr), or with `callback` instead;
    under torchrun, only rank 0 shows one; `show=False` for a step with nothing to show."""
    if callback is not None:
        return _run(fn, cfg, callback)
    if not _rank0() or not show:
        return _run(fn, cfg, None)
    return _run(fn, cfg, progress=True)


def _rank0() -> bool:
    """False in the processes torchrun starts besides rank 0: they print nothing on success."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def run_config(name: str, cfg, as_json: bool) -> None:
    """Run command `name` on `cfg`; print its summary, and its JSON or its stdout text."""
    import importlib

    cc = CONFIG_COMMANDS[name]
    res = _run_with_progress(getattr(importlib.import_module(cc.module), cc.run), cfg, show=cc.progress,
                             callback=cc.callback(cfg) if cc.callback else None)
    if not _rank0():
        return
    cc.report(res, cfg)
    if as_json:
        _emit_json(cc.json_of(res) if cc.json_of else res)
    elif cc.stdout_of:
        sys.stdout.write(cc.stdout_of(res))


def config_command(name: str):
    """The click command for `name`: one option per `opt` field of its config, then `--json`; the
    body builds the config (a check in its `__post_init__` or a field's `parse` is one line too),
    runs it and prints the summary."""
    import importlib
    import inspect

    from xraygan.options import cli_fields, config_values

    cc = CONFIG_COMMANDS[name]
    config = getattr(importlib.import_module(cc.module), cc.config)
    declared = cli_fields(config)
    params = []
    for f in declared:
        info = (typer.Argument(f.default, help=f.help, **f.typer) if f.argument
                else typer.Option(f.default, *f.flags, help=f.help, **f.typer))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=f.type))
    if cc.json_help is not None:
        params.append(inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY,
                                        default=typer.Option(False, "--json", help=cc.json_help), annotation=bool))

    def command(**values) -> None:
        as_json = values.pop("as_json", False)
        cfg = _run(lambda: config(**config_values(declared, values)))
        run_config(name, cfg, as_json)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = cc.doc
    one = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    one.command(name)(command)
    return typer.main.get_command(one)


def main() -> None:
    try:
        from xraygan.allocator import keep_freed_memory

        keep_freed_memory(everywhere=True)  # only for XRAYGAN_MALLOC=keep; diffusion models ask for it
        app()
    except XrayganError as e:  # raised outside a command (should not happen, but never a traceback)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BrokenPipeError:  # `xraygan ... | head`: the reader left, nothing to report
        sys.exit(0)
    except Exception as e:  # noqa: BLE001
        print(f"internal error: {type(e).__name__}: {e} — please report; details in {_crash_log(e)}",
              file=sys.stderr)
        sys.exit(1)
