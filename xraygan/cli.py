"""The `xraygan` command line: each command turns options into a config, calls one library
function and prints what it returns. Library errors become one line on stderr (exit 2 for bad
input, 1 for failures)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
import typer.core

from xraygan.errors import XrayganError
from xraygan.options import DEVICE_HELP, JSON_HELP


def _click():
    try:  # typer >= 0.22 vendors click as typer._click
        from typer import _click as click
    except ImportError:
        import click
    return click


class _Group(typer.core.TyperGroup):
    """Usage errors (a missing option, a value of the wrong type) print as two plain lines, the
    error last, instead of a boxed panel whose last line is a border: scripts and users read the
    last line of stderr."""

    def list_commands(self, ctx) -> list[str]:
        names = [*self.commands, *(n for n in CONFIG_COMMANDS if n not in self.commands)]
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))

    def get_command(self, ctx, name: str):
        if name not in self.commands and name in CONFIG_COMMANDS:
            if getattr(self, "_listing", False):  # `xraygan --help` needs the help line, not the command
                return typer.core.TyperCommand(name, help=CONFIG_COMMANDS[name].doc)
            self.add_command(config_command(name, CONFIG_COMMANDS[name]), name)
        return super().get_command(ctx, name)

    def format_help(self, ctx, formatter):
        self._listing = True
        try:
            return super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        click = _click()

        args = _optional_values(list(sys.argv[1:] if args is None else args))
        try:
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


# Options that also work as bare flags, as the study's users write them: `evaluate CKPT DATA
# --report` puts the report beside the checkpoint. A bare flag is one followed by nothing or by
# another option; it is given this value, which the command resolves.
BESIDE = "@beside"
OPTIONAL_VALUE = {"evaluate": ("--report",)}


# Options that take several values after one flag, as in `study --seeds 0 1 2`: the values that
# follow (while they look like values of that option) are split into repeated flags.
MULTI_VALUE = {"study": {"--seeds": re.compile(r"^\d+(,\d+)*$"),
                         "--rows": re.compile(r"^[a-z_]+(\d*\.?\d+)?(,[a-z_]+(\d*\.?\d+)?)*$")}}


def _optional_values(args: list[str]) -> list[str]:
    cmd = next((a for a in args if not a.startswith("-")), None)
    flags = OPTIONAL_VALUE.get(cmd, ())
    multi = MULTI_VALUE.get(cmd, {})
    out: list[str] = []
    flag, bare = None, False  # a multi-value option whose values are being read; none read yet
    for i, a in enumerate(args):
        if flag is not None and not a.startswith("-") and multi[flag].match(a) \
                and not (flag == "--rows" and Path(a).exists()):
            out += [flag, a]
            bare = False
            continue
        if bare:  # no value followed: leave the flag for the parser to report
            out.append(flag)
        flag = a if a in multi else None
        bare = flag is not None
        if flag is not None:
            continue
        out.append(a)
        if a in flags and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(BESIDE)
    if bare:
        out.append(flag)
    return out


app = typer.Typer(name="xraygan", cls=_Group, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  add_completion=False,
                  help="Rebalance imbalanced chest X-ray datasets with GAN images, and measure "
                       "whether it helps.")
T = TypeVar("T")

# Options shared by several commands: one definition, the same help everywhere.
DeviceOpt = Annotated[str, typer.Option(help=DEVICE_HELP)]
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]


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


def _run_with_progress(fn: Callable[..., T], cfg, show: bool = True) -> T:
    """Run one library step under a rich progress bar (on stderr); under torchrun, only rank 0
    shows one; `show=False` for a step with nothing to show."""
    if not _rank0() or not show:
        return _run(fn, cfg, None)
    return _run(fn, cfg, progress=True)


def _rank0() -> bool:
    """False in the processes torchrun starts besides rank 0: they print nothing on success."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _warn(lines) -> None:
    from xraygan.console import err

    for w in lines or ():
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@dataclass(frozen=True)
class ConfigCommand:
    """A command whose options are its config's fields (xraygan/options.py): `run` in `module`
    takes the config `config` and a progress callback; `report` prints its summary on stderr."""
    module: str
    config: str
    run: str
    report: Callable[[dict, Any], None]
    doc: str
    json_help: str = JSON_HELP
    progress: bool = True  # a progress bar while it runs
    json_of: Callable[[dict], dict] | None = None  # what --json prints (default: the whole result)
    stdout_of: Callable[[dict], str] | None = None  # what goes to stdout without --json (default: nothing)


# the order of `xraygan --help`: the pipeline's, then the tools
COMMAND_ORDER = ("prepare", "train-gan", "train-diffusion", "generate", "rebalance", "train-classifier",
                 "compare", "evaluate", "gradcam", "demo", "audit", "score-review", "probe-sources", "review",
                 "study")
# Built when first asked for (`_Group.get_command`), so a command imports only its own module:
# `xraygan rebalance` does not import torch for the trainers' configs.
CONFIG_COMMANDS: dict[str, ConfigCommand] = {}


def run_config(name: str, cfg, as_json: bool) -> None:
    """Run command `name` (one of CONFIG_COMMANDS) on `cfg`; print its summary, and its JSON or
    its stdout text (also for the old spellings that now run these commands)."""
    import importlib

    cc = CONFIG_COMMANDS[name]
    res = _run_with_progress(getattr(importlib.import_module(cc.module), cc.run), cfg, show=cc.progress)
    if not _rank0():
        return
    cc.report(res, cfg)
    if as_json:
        _emit_json(cc.json_of(res) if cc.json_of else res)
    elif cc.stdout_of:
        sys.stdout.write(cc.stdout_of(res))


def config_command(name: str, cc: ConfigCommand):
    """The click command for `cc`: one option per `opt` field, then `--json`; the body builds
    the config, runs it under a progress bar and prints the summary."""
    import importlib
    import inspect

    from xraygan.options import cli_fields, config_values

    config = getattr(importlib.import_module(cc.module), cc.config)
    declared = cli_fields(config)
    params = []
    for f in declared:
        info = (typer.Argument(f.default, help=f.help, **f.typer) if f.argument
                else typer.Option(f.default, *f.flags, help=f.help, **f.typer))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=f.type))
    params.append(inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY,
                                    default=typer.Option(False, "--json", help=cc.json_help), annotation=bool))

    def command(**values) -> None:
        as_json = values.pop("as_json")
        cfg = _run(config, **config_values(declared, values))  # a check in __post_init__ is one line too
        run_config(name, cfg, as_json)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = cc.doc
    one = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    one.command(name)(command)
    return typer.main.get_command(one)


def _parse_keep(values: list[str]) -> tuple[tuple[str, int], ...]:
    out = []
    for v in values:
        cls, sep, n = v.partition("=")
        if not sep or not n.strip().isdigit():
            raise typer.BadParameter(f"'{v}': expected CLASS=COUNT, e.g. pneumonia=1460")
        out.append((cls.strip().lower(), int(n)))
    return tuple(out)


def _parse_fractions(v: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in v.split(","))
    except ValueError:
        raise typer.BadParameter(f"'{v}': expected three fractions, e.g. 0.8,0.1,0.1") from None
    if len(parts) != 3:
        raise typer.BadParameter(f"'{v}': expected three fractions, e.g. 0.8,0.1,0.1")
    return parts  # type: ignore[return-value]


def _print_prepared(rec: dict, local: list[dict], out: Path) -> None:
    """prepare's summary on stderr: what was skipped and why (`local`: the files skipped, with
    their local paths, which dataset.json leaves out), the label and duplicate reports, the
    counts table."""
    from xraygan.console import counts_table, err

    for s in local[:20]:
        err.print(f"[yellow]skipped[/] {s['file']}: {s['reason']}", highlight=False)
    if rec["skipped_count"] > 20:
        err.print(f"[yellow]... and {rec['skipped_count'] - 20} more skipped (see dataset.json)")
    for w in rec["warnings"]:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if rec["views_skipped"]:
        err.print("views left out: " + ", ".join(f"{n} {v}" for v, n in rec["views_skipped"].items()),
                  highlight=False, soft_wrap=True)
    lab = rec["labels"]
    if lab:
        err.print(f"labels: {lab['images']} images from {lab['rows']} rows; "
                  f"{lab['missing_count']} named but not found, {lab['not_in_csv_count']} on disk but not in "
                  f"the CSV, {lab['unmatched_rows']} rows matching no class (left out"
                  f"{'' if not lab['other'] else ' → ' + lab['other']}), {lab['uncertain_rows']} uncertain, "
                  f"{lab['conflicting_images']} with conflicting rows", highlight=False, soft_wrap=True)
    d = rec["duplicates"]
    err.print(f"duplicates: {d['images']} images in {d['groups']} groups of identical pixels "
              f"(kept together in one split; {d['dropped_across_splits']} dropped across splits)")
    removed = rec["imbalance"]["removed_counts"]
    if removed:
        err.print("imbalance: removed " + ", ".join(f"{n} {c}" for c, n in removed.items())
                  + " training images")
    err.print(counts_table(f"{out} ({rec['image_size']} px, {rec['seconds']} s)", rec["counts"]))
    if rec["synthetic_demo"]:
        err.print(f"[bold yellow]note:[/] {rec['note']}")


@app.command()
def prepare(
    src: Annotated[Optional[Path], typer.Argument(
        help="Raw data: the Kermany chest_xray/ folder (train/test/<CLASS>/), any SRC/<class>/ "
             "folder, or a MedMNIST .npz.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset folder.")] = ...,
    medmnist: Annotated[Optional[Path], typer.Option(help="A MedMNIST .npz file as the source.")] = None,
    sample: Annotated[bool, typer.Option(
        "--sample", help="Use the real sample shipped with xraygan: 1,600 Kermany chest X-rays at "
                         "64 px (CC BY 4.0), split by patient; --size 64 or less.")] = False,
    demo: Annotated[bool, typer.Option(
        "--phantom", "--demo", help="Use procedural phantom X-rays (synthetic, for tests; not for "
                                    "medical conclusions). --demo is its old name.")] = False,
    demo_count: Annotated[int, typer.Option(help="Phantom images per class.")] = 300,
    size: Annotated[int, typer.Option(help="Output image size in pixels (square).")] = 64,
    square: Annotated[str, typer.Option(help="How to make images square: crop (center) or pad.")] = "crop",
    keep: Annotated[list[str], typer.Option(
        help="Keep only COUNT images of CLASS in the training split, chosen at random with the "
             "seed, e.g. --keep pneumonia=1460. Repeatable.")] = [],  # noqa: B006
    imbalance: Annotated[Optional[float], typer.Option(
        help="Cut the --minority class in the training split to (largest other class)/R; "
             "--imbalance 3 gives the study's 3:1 normal:pneumonia.")] = None,
    minority: Annotated[str, typer.Option(help="The class --imbalance cuts.")] = "pneumonia",
    extra_normal: Annotated[Optional[Path], typer.Option(
        help="Folder of extra healthy images (e.g. NIH ChestX-ray8; with Data_Entry_2017.csv only "
             "'No Finding' rows are used), added to the normal class in train/val.")] = None,
    extra_normal_count: Annotated[Optional[int], typer.Option(
        help="At most this many extra-normal images (chosen at random with the seed).")] = None,
    extra_normal_splits: Annotated[str, typer.Option(
        help="Splits the extra-normal images go to, by patient: train,val (default; the source's "
             "test split stays as published) or train,val,test (the study's pooled protocol: then "
             "evaluate reports results per source).")] = "train,val",
    split: Annotated[str, typer.Option(
        help="train,val,test fractions for sources that have no splits.")] = "0.8,0.1,0.1",
    val_fraction: Annotated[float, typer.Option(
        help="Share of train carved out (by patient) as val when the source has no val split.")] = 0.1,
    classes: Annotated[Optional[str], typer.Option(
        help="With --labels: which label values mean which class, CLASS=VALUE[|VALUE...] separated "
             "by ';' (\"pneumonia=Pneumonia;normal=No Finding\", \"pneumonia=1;normal=0|(blank)\"). "
             "With MedMNIST: comma-separated names for labels 0,1,... (default normal,pneumonia).")] = None,
    labels: Annotated[list[Path], typer.Option(
        help="A CSV that labels the images below SRC (repeatable: CheXpert's train.csv and "
             "valid.csv). See --path-column, --label-column, --classes, or --preset.")] = [],  # noqa: B006
    preset: Annotated[Optional[str], typer.Option(
        help="The column layout of a public release: rsna (stage_2_train_labels.csv), nih "
             "(Data_Entry_2017.csv, with test_list.txt as the test split), chexpert (train.csv, "
             "valid.csv). Found beside SRC or in its parent unless --labels is given; any column "
             "option overrides the preset's.")] = None,
    path_column: Annotated[Optional[str], typer.Option(
        help="CSV column naming the image: a path below SRC, a file name, or a name without extension.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="CSV column holding the label.")] = None,
    patient_column: Annotated[Optional[str], typer.Option(
        help="CSV column holding the patient id (default: DICOM PatientID, else the path or file name).")] = None,
    split_column: Annotated[Optional[str], typer.Option(
        help="CSV column holding train/val/test (default: split by patient).")] = None,
    view_column: Annotated[Optional[str], typer.Option(
        help="CSV column holding the view (PA, AP, LATERAL, Frontal/Lateral); DICOMs use ViewPosition.")] = None,
    test_list: Annotated[Optional[Path], typer.Option(
        help="File of image names, one a line, that form the test split (NIH's test_list.txt); "
             "the other images are train, and val is carved from train by patient.")] = None,
    uncertain: Annotated[str, typer.Option(
        help="Label -1 (CheXpert's uncertain): ignore (drop the image), positive (read as 1) or "
             "negative (read as 0): the paper's U-Ignore, U-Ones, U-Zeros.")] = "ignore",
    other: Annotated[Optional[str], typer.Option(
        help="A class name for images whose label matches no class (other findings); default: "
             "left out, and counted in dataset.json.")] = None,
    views: Annotated[Optional[str], typer.Option(
        help="Keep only these views, e.g. PA,AP (images without a view are then left out too); "
             "default: all but lateral views, which are counted in dataset.json.")] = None,
    salt: Annotated[str, typer.Option(
        envvar="XRAYGAN_SALT", show_default=False,
        help="A secret mixed into the hashed DICOM patient and image names (never written); give the "
             "same one to link exports of the same patients.")] = "",
    seed: Annotated[int, typer.Option(help="Seed for splits, imbalance and demo data.")] = 0,
    workers: Annotated[int, typer.Option(help="Decoding processes (0 = one per CPU core).")] = 0,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable file instead of "
                                              "skipping it.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print dataset.json on stdout.")] = False,
) -> None:
    """Turn raw chest X-rays into OUT/{train,val,test}/{normal,pneumonia}/*.png + dataset.json.

    SRC may hold images or DICOM files (.dcm, or no extension), in class folders or labelled by a
    CSV. DICOM file names and header values never reach the output (names are salted hashes).

    Example: xraygan prepare chest_xray/ --out data --size 64 --imbalance 3
             xraygan prepare rsna/stage_2_train_images --preset rsna --out data --size 224
             xraygan prepare --sample --out data --size 32
    """
    from xraygan.labels import LabelSpec
    from xraygan.prepare import PrepareConfig
    from xraygan.prepare import prepare as run_prepare

    spec = None
    if labels or preset or any(v is not None for v in (path_column, label_column, patient_column, split_column,
                                                       view_column, test_list, other)):
        spec = LabelSpec(csv=tuple(labels), preset=preset.lower() if preset else None, path_column=path_column,
                         label_column=label_column, classes=classes, patient_column=patient_column,
                         split_column=split_column, view_column=view_column, uncertain=uncertain.lower(),
                         other=other.lower() if other else None, test_list=test_list)
    cfg = PrepareConfig(out=out, src=src, medmnist=medmnist, demo=demo, demo_count=demo_count, sample=sample,
                        size=size, square=square, keep=_parse_keep(keep), imbalance=imbalance,
                        minority=minority.lower(), extra_normal=extra_normal,
                        extra_normal_count=extra_normal_count,
                        extra_normal_splits=tuple(x.strip() for x in extra_normal_splits.split(",") if x.strip()),
                        split=_parse_fractions(split),
                        val_fraction=val_fraction, seed=seed, workers=workers, strict=strict,
                        force=force, labels=spec, salt=salt,
                        views=tuple(v.strip() for v in views.split(",") if v.strip()) if views else None,
                        class_names=tuple(c.strip() for c in classes.split(",")) if classes and not spec else None)
    rec = _run_with_progress(run_prepare, cfg)
    _print_prepared(rec, rec.pop("skipped_local"), out)
    if as_json:
        _emit_json(rec)


def _report_compare(res: dict, cfg) -> None:
    from xraygan.console import err

    sys.stderr.write(res["markdown"])
    for w in res["warnings"]:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if cfg.out:
        err.print(f"wrote {cfg.out}/table.md, table.csv, table.json{', paired.csv' if res['paired']['comparisons'] else ''} "
                  f"({res['runs']} runs)", highlight=False)


def _compare_json(res: dict) -> dict:
    return {k: res[k] for k in ("rows", "columns", "warnings", "runs", "paired")}


@app.command()
def evaluate(
    inputs: Annotated[list[Path], typer.Argument(
        help="CLF/classifier.safetensors DATA/test; with --compare: metrics.json files or "
             "folders holding them (searched recursively).", show_default=False)] = [],  # noqa: B006
    report: Annotated[Optional[Path], typer.Option(
        help="Write metrics.json, report.md, predictions.csv and ROC/PR/confusion/score "
             "plots here; a bare --report writes them to report/ beside the checkpoint.")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        help="Decision threshold on P(positive) (default 0.5).")] = None,
    tune_on: Annotated[Optional[Path], typer.Option(
        "--tune-on", help="Tune the threshold on this validation folder instead (see --tune-for).")] = None,
    tune_for: Annotated[str, typer.Option(help="Tuning criterion: f1 or youden (J = sens + spec - 1).")] = "f1",
    untuned_report: Annotated[Optional[Path], typer.Option(
        "--untuned-report", help="With --tune-on: also write the report at the untuned threshold "
                                 "(--threshold, default 0.5) here, from the same scores: both operating "
                                 "points in one run.")] = None,
    positive: Annotated[Optional[str], typer.Option(
        help="Positive class (default: the one recorded in the checkpoint).")] = None,
    label: Annotated[Optional[str], typer.Option(
        help="Method label for --compare (default: the run folder name without -seedN).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals (0 = none).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    compare: Annotated[bool, typer.Option(
        "--compare", help="The old spelling of `xraygan compare` (still works): tabulate runs instead.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="--compare: write table.md, table.csv and table.json here.")] = None,
    device: DeviceOpt = "auto",
    force: Annotated[bool, typer.Option(help="Replace an existing report or table folder.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure a classifier on a test folder: metrics with 95% intervals, and a report (`xraygan compare` tabulates runs).

    Example: xraygan evaluate runs/clf/classifier.safetensors data/test --report
             xraygan compare runs/ --out results/      (was: evaluate --compare)
    """
    from xraygan.console import err
    from xraygan.evaluate import CI_KEYS, EvaluateConfig
    from xraygan.evaluate import evaluate as run_evaluate

    if compare:
        if not inputs:
            raise typer.BadParameter("--compare needs metrics.json files or folders")
        for opt, given in (("--report", report), ("--threshold", threshold), ("--tune-on", tune_on),
                           ("--untuned-report", untuned_report)):
            if given is not None:
                raise typer.BadParameter(f"{opt} is for evaluating a checkpoint; --compare only reads "
                                         "metrics.json files (its output is --out)")
        err.print("[yellow]note:[/] `evaluate --compare` is now `xraygan compare` (same inputs and --out; "
                  "it also takes --reference, --resamples, --power)", highlight=False, soft_wrap=True)
        from xraygan.evaluate import CompareConfig

        run_config("compare", CompareConfig(inputs=tuple(inputs), out=out, force=force), as_json)
        return
    if len(inputs) != 2:
        raise typer.BadParameter("expected CHECKPOINT TEST_FOLDER (or --compare PATHS...)")
    if out is not None:
        raise typer.BadParameter("--out is for --compare; a single evaluation writes to --report")
    if report is not None and str(report) == BESIDE:
        report = inputs[0].parent / "report"
    cfg = EvaluateConfig(checkpoint=inputs[0], data=inputs[1], report=report, threshold=threshold,
                         tune_on=tune_on, tune_for=tune_for, untuned_report=untuned_report,
                         positive=positive, label=label,
                         bootstrap=bootstrap, seed=seed, device=device, force=force)
    rec = _run_with_progress(run_evaluate, cfg)
    from rich.table import Table

    t = Table(title=f"{rec['label']}: {rec['test']} {rec['test_counts']}, positive "
                    f"{rec['positive']}, threshold {rec['threshold']:.3f}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("95% CI", justify="right")
    for k in CI_KEYS:
        v, ci = rec["metrics"][k], rec["ci95"].get(k)
        t.add_row(k, "n/a" if v is None else f"{v:.3f}", f"{ci[0]:.3f} - {ci[1]:.3f}" if ci else "")
    err.print(t)
    c = rec["metrics"]["confusion"]
    err.print(f"confusion: TP {c['tp']}  FN {c['fn']}  FP {c['fp']}  TN {c['tn']}"
              + (f"; report: {rec['report']}/report.md" if report else ""), highlight=False)
    if "untuned" in rec:
        u = rec["untuned"]
        err.print(f"at threshold {u['threshold']:.3f}: " + ", ".join(
            f"{k} {'n/a' if u['metrics'][k] is None else format(u['metrics'][k], '.3f')}"
            for k in ("precision", "recall", "specificity", "f1")) + f"; report: {u['report']}/report.md",
            highlight=False, soft_wrap=True)
    for src, e in (rec.get("by_source") or {}).items():
        parts = [f"{m} {e[m]:.3f} [{e[m + '_ci'][0]:.3f}, {e[m + '_ci'][1]:.3f}]" if e.get(m + "_ci")
                 else f"{m} {e[m]:.3f}" for m in ("recall", "specificity") if m in e]
        if "roc_auc" in e:
            parts.append(f"ROC-AUC {e['roc_auc']:.3f}")
        err.print(f"  source {src} ({e['n']} images): " + "; ".join(parts), highlight=False)
    _warn(rec.get("warnings"))
    if as_json:
        _emit_json(rec)


@app.command()
def audit(
    ctx: typer.Context,
    real: Annotated[Optional[Path], typer.Option(help="Real training images, e.g. DATA/train.")] = None,
    synthetic: Annotated[Optional[Path], typer.Option(help="Synthetic images, e.g. SYNTH/ from generate.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Audit folder.")] = None,
    classifier: Annotated[str, typer.Option(
        help="Feature space: a classifier.safetensors from train-classifier; 'auto' trains one for "
             "3 epochs on --real (cached); 'none' uses only the PCA space.")] = "auto",
    k: Annotated[int, typer.Option(help="Neighbours for precision/recall/density/coverage.")] = 5,
    pca_components: Annotated[int, typer.Option(help="Dimensions of the pixel-PCA space.")] = 64,
    copy_quantile: Annotated[float, typer.Option(
        help="Flag a synthetic image as a near-copy when its correlation with the nearest training "
             "image exceeds this quantile of real images' correlation with their nearest other "
             "real image.")] = 0.99,
    copy_threshold: Annotated[Optional[float], typer.Option(
        help="Flag at this absolute pixel correlation instead.")] = None,
    review: Annotated[int, typer.Option(help="Images in the blinded review sheet (0 = none).")] = 40,
    score_review: Annotated[list[Path], typer.Option(
        "--score-review", hidden=True, help="The old spelling of `xraygan score-review`.")] = [],  # noqa: B006
    key: Annotated[Optional[Path], typer.Option(hidden=True, help="With the old --score-review.")] = None,
    sources: Annotated[Optional[Path], typer.Option(
        "--sources", hidden=True, help="The old spelling of `xraygan probe-sources`.")] = None,
    cache: Annotated[Optional[Path], typer.Option(
        help="Feature cache folder (default $XRAYGAN_CACHE; without either, nothing is cached).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for KID subsets and the review sample.")] = 0,
    device: DeviceOpt = "auto",
    force: Annotated[bool, typer.Option(help="Replace an existing audit folder.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Audit synthetic images: realism and diversity (FD, KID, precision/recall), near-copies of
    training images, and a blinded review sheet for a radiologist.

    Example: xraygan audit --real data/train --synthetic synth --out audit
             xraygan score-review audit/review/          (the filled sheets; was audit --score-review)
    """
    from xraygan.audit import AuditConfig
    from xraygan.audit import audit as run_audit
    from xraygan.console import err

    if sources is not None or score_review:
        mode = "--sources" if sources is not None else "--score-review"
        allowed = {"--sources": {"classifier", "pca_components", "seed", "device"}, "--score-review": {"key"}}[mode]
        # what the user typed (not compared with defaults written here a second time)
        typed = [n for n in ctx.params if ctx.get_parameter_source(n).name != "DEFAULT"]
        allowed |= {"as_json", mode.lstrip("-").replace("-", "_")}
        unused = [f"--{n.replace('_', '-')}" for n in typed if n not in allowed]
        if unused:
            raise typer.BadParameter(f"{unused[0]} has no effect with {mode}, which is `xraygan "
                                     f"{'probe-sources' if mode == '--sources' else 'score-review'}` now")
        new = "probe-sources FOLDER" if mode == "--sources" else "score-review SHEETS"
        err.print(f"[yellow]note:[/] `audit {mode}` is now `xraygan {new}`", highlight=False)
        if sources is not None:
            from xraygan.audit import ProbeSourcesConfig

            run_config("probe-sources", ProbeSourcesConfig(
                folder=sources, classifier=None if classifier in ("auto", "none") else Path(classifier),
                pca_components=pca_components, seed=seed, device=device), as_json)
        else:
            from xraygan.audit import ScoreReviewConfig

            run_config("score-review", ScoreReviewConfig(sheets=tuple(score_review), key=key), as_json)
        return
    if real is None or synthetic is None or out is None:
        raise typer.BadParameter("needs --real DIR --synthetic DIR --out AUDIT")
    cfg = AuditConfig(real=real, synthetic=synthetic, out=out, classifier=classifier,
                      pca_components=pca_components, k=k, copy_quantile=copy_quantile,
                      copy_threshold=copy_threshold, review=review, cache=cache, seed=seed,
                      device=device, force=force)
    rec = _run_with_progress(run_audit, cfg)
    from rich.table import Table

    t = Table(title=f"audit of {synthetic} against {real} ({rec['seconds']} s)")
    for col in ("class", "space", "FD", "KID", "precision", "recall", "density", "coverage", "real/synth AUC",
                "near-copies"):
        t.add_column(col, justify="right" if col not in ("class", "space") else "left")
    for c, d in rec["classes"].items():
        for s, v in d["spaces"].items():
            t.add_row(c, s, *(("n/a" if v[m] is None else f"{v[m]:.4g}")
                              for m in ("fd", "kid", "precision", "recall", "density", "coverage",
                                        "real_vs_synthetic_auc")),
                      str(d["memorisation"]["flagged"]))
    err.print(t)
    err.print(f"report: {out}/report.md; flagged near-copies: {out}/flagged/; review sheet: "
              f"{out}/review/sheet.html", highlight=False)
    if as_json:
        _emit_json(rec)


def _report_review(res: dict, cfg) -> None:
    from xraygan.audit import readers_markdown
    from xraygan.console import err

    if cfg.one_sheet:
        err.print(f"{res['answered']} answered ({res['blank']} blank): accuracy {res['accuracy']:.2f}, "
                  f"synthetic spotted {res['synthetic_spotted']}, real recognised {res['real_recognised']}, "
                  f"p = {res['p_value']:.3g}: {res['verdict']}; mean quality {res['mean_quality']}",
                  highlight=False)
    else:
        sys.stderr.write(readers_markdown(res))


def _report_probe(res: dict, cfg) -> None:
    from xraygan.console import err

    for c, pairs in res["classes"].items():
        for name, v in pairs.items():
            aucs = "; ".join(f"{k.replace('_auc', '')} space AUC {v[k]:.3f}" for k in ("pca_auc", "classifier_auc")
                             if v.get(k) is not None)
            err.print(f"{c}: {name} ({', '.join(f'{n} {k}' for k, n in v['counts'].items())}): {aucs}: "
                      f"{v['verdict']}", highlight=False)


@app.command()
def review(
    audit_dir: Annotated[Path, typer.Argument(
        metavar="AUDIT", help="An audit folder with a blinded review sheet (xraygan audit --review N).",
        show_default=False)],
    reader: Annotated[str, typer.Option(help="The reader's name: their answers go to AUDIT/review/<reader>.csv "
                                             "and their order is shuffled by it.")] = "reader1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    host: Annotated[Optional[str], typer.Option(
        help="Address to listen on (default 127.0.0.1, this machine only). Any other address lets "
             "other machines see the images.")] = None,
) -> None:
    """Serve the blinded real-vs-synthetic reading as a local web page: one image at a time, dark
    background, zoom and window/level, R / S, realism 1-5, a note; every answer saved at once to
    AUDIT/review/<reader>.csv (resumes where the reader stopped). Score with
    `xraygan score-review AUDIT/review/`.

    Example: xraygan review audit --reader smith      (then open http://127.0.0.1:8000/)
    """
    from xraygan.console import err
    from xraygan.review import ReviewConfig, is_loopback, serve

    cfg = ReviewConfig(audit=audit_dir, reader=reader, host=host or "127.0.0.1", port=port,
                       host_given=host is not None)

    def ready(url: str, answered: int, total: int) -> None:
        if not is_loopback(cfg.host):
            err.print(f"[bold yellow]warning:[/] serving on {cfg.host}: the review images leave this machine's "
                      "loopback; anyone who can reach it can see them", highlight=False, soft_wrap=True)
        err.print(f"reader {reader}: {answered} of {total} answered; open {url} (Ctrl-C stops; answers are "
                  "saved after every image)", highlight=False, soft_wrap=True)

    res = _run(serve, cfg, ready)
    err.print(f"{res['answered']} of {res['total']} answered, in {res['answers']}", highlight=False)


@app.command()
def study(
    data: Annotated[Path, typer.Argument(help="A folder written by xraygan prepare (train/, val/, test/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Study folder: every step's output, logs/, "
                                      "times.csv, table/ and table-tuned/.")] = ...,
    rows: Annotated[list[str], typer.Option(
        help="Rows to run (default the study's ten): baseline class_weights undersample oversample dcgan "
             "cdcgan_a0.25 cdcgan_a0.5 cdcgan_a0.75 smote augment; any cdcgan_a<α>; and the diffusion "
             "rows ddpm and cddpm (train-diffusion). Space- or comma-separated.")] = [],  # noqa: B006
    seeds: Annotated[list[str], typer.Option(
        help="Classifier seeds per row (each also draws the rebalanced set), e.g. --seeds 0 1 2.")] = [],  # noqa: B006
    gan_steps: Annotated[int, typer.Option(help="Generator steps per GAN (each GAN is trained once, seed 0).")] = 3000,
    gan_batch: Annotated[int, typer.Option(help="GAN batch size.")] = 64,
    diffusion_steps: Annotated[int, typer.Option(help="Training steps per diffusion model (rows ddpm, cddpm).")] = 4000,
    diffaugment: Annotated[str, typer.Option(help="DiffAugment policy for the GANs (see train-gan).")] = "auto",
    clf_epochs: Annotated[int, typer.Option(help="Classifier epochs (early stopping may end sooner).")] = 20,
    clf_accumulate: Annotated[int, typer.Option(
        help="Classifier micro-batches per step, for a batch that does not fit in memory (see "
             "train-classifier --accumulate).")] = 1,
    patience: Annotated[int, typer.Option(help="Classifier epochs without improvement before stopping.")] = 5,
    small_stem: Annotated[str, typer.Option(help="Classifier stem: auto, yes or no (see train-classifier).")] = "auto",
    weights: Annotated[Optional[Path], typer.Option(
        help="Local pretrained ResNet-18 weights (e.g. torchvision's ImageNet file) for every row's "
             "classifier (see train-classifier --weights).")] = None,
    audit: Annotated[bool, typer.Option(help="Audit each GAN's images against the real training set.")] = True,
    jobs: Annotated[Optional[int], typer.Option(
        "--jobs", "-j", help="Steps run at once, each with cores/N CPU threads, sharing one GPU "
                             "(default: one per core up to 8; with a GPU min(8, cores/2); see docs/commands/study.md).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (what is done, what would run) "
                                          "and exit.")] = False,
    print_commands: Annotated[bool, typer.Option(
        "--print-commands", help="Print the steps not done yet as a bash script, one command a line "
                                 "tagged with its stage (for GNU parallel or a SLURM job array), and exit.")] = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Run the study's whole grid: GANs, synthetic images, audits, then per row and seed rebalance,
    train-classifier, evaluate (threshold 0.5 and tuned on val) and gradcam, then the tables.

    Each step is an ordinary xraygan command (logged in OUT/logs/); finished steps are skipped on a
    rerun and interrupted training resumes, so the same command continues a study.

    Example: xraygan study data64 --out study64 --seeds 0 1 2 --jobs 8
    """
    from xraygan.console import err
    from xraygan.study import (
        ROWS,
        StudyConfig,
        build_plan,
        check_study_folder,
        commands_script,
        plan_text,
        run_study,
    )

    def split(values: list[str]) -> list[str]:
        return [v.strip() for x in values for v in x.split(",") if v.strip()]

    try:
        seed_list = tuple(int(v) for v in split(seeds)) or (0, 1, 2)
    except ValueError:
        raise typer.BadParameter(f"'{' '.join(seeds)}': seeds are whole numbers, e.g. --seeds 0 1 2") from None
    cfg = StudyConfig(data=data, out=out, rows=tuple(split(rows)) or ROWS, seeds=seed_list,
                      gan_steps=gan_steps, gan_batch=gan_batch, diffaugment=diffaugment,
                      clf_epochs=clf_epochs, clf_accumulate=clf_accumulate, patience=patience, small_stem=small_stem, weights=weights,
                      audit=audit, diffusion_steps=diffusion_steps,
                      device=device, jobs=jobs)
    if dry_run or print_commands:
        def plan() -> list:
            cfg.validate()
            check_study_folder(cfg)
            return build_plan(cfg)[0]

        steps = _run(plan)
        sys.stdout.write(commands_script(steps, cfg.program) if print_commands else plan_text(steps))
        return

    def say(line: str) -> None:
        err.print(line, highlight=False, soft_wrap=True, markup=False)

    res = _run(run_study, cfg, say)
    for t, path in res["tables"].items():
        err.print(f"\n[bold]{'Threshold 0.5' if t == 'table' else 'Threshold tuned on the validation split'}[/] "
                  f"({path}):", highlight=False)
        sys.stdout.write(Path(path).read_text(encoding="utf-8"))
    err.print(f"\nstudy: {res['ran']} steps run, {res['skipped']} already done, in {res['seconds']:.0f} s "
              f"({res['jobs']} at a time); per-step times in {out}/times.csv", highlight=False, soft_wrap=True)
    if as_json:
        _emit_json(res)



def _report_diffusion(res: dict, cfg) -> None:
    from xraygan.console import err

    err.print(f"trained {res['steps']} steps in {res['seconds']} s ({res['images_per_s']:.0f} img/s, "
              f"{res['device']}, {res['precision']}; {res['parameters']:,} parameters); model: "
              f"{res['checkpoint']}; sample grids: {res['samples']}", highlight=False, soft_wrap=True)


def _report_gan(res: dict, cfg) -> None:
    from xraygan.console import err

    _warn(res["warnings"])
    err.print(f"trained {res['steps']} steps in {res['seconds']} s "
              f"({res['images_per_s']:.0f} img/s, {res['device']}, {res['precision']}); "
              f"generator: {res['generator']}; sample grids: {res['samples']}", highlight=False)


def _report_demo(res: dict, cfg) -> None:
    from xraygan.console import err

    a = res["synthetic_audit"]
    err.print(f"\n[bold]Synthetic pneumonia images[/] ({res['synthetic_images']}, DCGAN, {res['gan']['steps']} "
              f"steps) against the real training images, in the {a['space']} feature space: "
              f"precision {a['precision']:.2f}, recall {a['recall']:.2f}, coverage {a['coverage']:.2f}, "
              f"FD {a['fd']:.3g}; near-copies of training images: {a['near_copies']} of {a['of']}",
              highlight=False)
    if res["collapsed"]:
        err.print(f"[bold red]The DCGAN collapsed:[/] its images cover almost none of the real images' "
                  f"variety (recall {a['recall']:.2f}, coverage {a['coverage']:.2f}; see {res['figure']}). "
                  "Its row below is not a result about GAN oversampling. Try more --gan-steps, or "
                  "--size 64 on a GPU.", highlight=False)
    err.print(f"\n[bold]Comparison on the {'phantom' if cfg.phantom else 'sample'} test set[/] "
              f"({res['total_seconds']:.0f} s in all):", highlight=False)
    sys.stderr.write(res["markdown"])
    err.print(f"\nreal vs synthetic: {res['figure']}\n"
              f"reports:           {cfg.out}/runs/<row>/report/report.md  (plots beside them)\n"
              f"audit:             {a['report']}\n"
              f"GAN samples:       {res['gan']['samples']}/, synthetic preview {res['gan']['preview']}\n"
              f"Grad-CAMs:         {cfg.out}/runs/<row>/cams/grid.png\n"
              f"table:             {res['table']} (+ .csv); timings: {cfg.out}/demo.json", highlight=False)
    if res.get("note"):
        err.print(f"[bold yellow]note:[/] {res['note']}", highlight=False)
    elif not cfg.phantom:
        err.print("data: 1,600 real pediatric chest X-rays from Kermany et al. (2018), CC BY 4.0",
                  highlight=False)


CONFIG_COMMANDS["demo"] = ConfigCommand(
    "xraygan.demo", "DemoConfig", "demo", _report_demo,
    """Run the whole study on the real chest X-ray sample shipped with xraygan and print the table.

    prepare --sample → train-gan → generate → rebalance (none, oversample, gan) → train-classifier
    → evaluate → gradcam → audit of the synthetic images → compare, in about two minutes on two
    CPU cores.

    Example: xraygan demo --out demo
    """, json_of=lambda res: {k: v for k, v in res.items() if k != "markdown"})
CONFIG_COMMANDS["compare"] = ConfigCommand(
    "xraygan.evaluate", "CompareConfig", "run_compare", _report_compare,
    """The study's table (mean ± std per method), then each row's paired difference to the baseline
    and to over-sampling: 95% interval over test images and seeds, Holm-corrected p, a verdict, the
    smallest difference the study could detect, and DeLong's AUC test per seed.

    Example: xraygan compare study/runs/*/report --out study/table
             xraygan compare runs/ --reference baseline --power 0.02
    """, progress=False, json_of=_compare_json, stdout_of=lambda res: res["markdown"])
CONFIG_COMMANDS["train-gan"] = ConfigCommand(
    "xraygan.gan", "TrainGanConfig", "train_gan", _report_gan,
    """Train a DCGAN on the minority class, or a conditional DCGAN (--conditional) on all.

    Example: xraygan train-gan data/train --out runs/dcgan --epochs 25
             xraygan train-gan data/train --conditional --alpha 0.25 --out runs/cdcgan
             torchrun --nproc-per-node 4 -m xraygan train-gan data/train --out runs/dcgan
    """)
CONFIG_COMMANDS["train-diffusion"] = ConfigCommand(
    "xraygan.diffusion", "TrainDiffusionConfig", "train_diffusion", _report_diffusion,
    """Train a denoising diffusion model (DDPM) on the minority class, or a conditional one on all.

    Example: xraygan train-diffusion data/train --out runs/ddpm --steps 4000
             xraygan train-diffusion data/train --conditional --out runs/cddpm
    """)


def _report_generate(res: dict, cfg) -> None:
    from xraygan.console import err

    err.print(f"wrote {res['count']} {res['label']} images to {res['folder']} "
              f"({res['first']} … {res['last']})", highlight=False)


def _report_rebalance(rec: dict, cfg) -> None:
    from xraygan.console import counts_table, err

    err.print(counts_table(f"{cfg.out} ({cfg.method})", rec["origins"]))


def _report_classifier(res: dict, cfg) -> None:
    from xraygan.console import err

    err.print(f"best epoch {res['best_epoch']} of {res['epochs_run']} (validation "
              f"{cfg.select} {res[f'best_val_{cfg.select}']:.3f}); {res['images_per_s']:.0f} img/s; "
              f"checkpoint: {res['checkpoint']}", highlight=False)


def _report_gradcam(rec: dict, cfg) -> None:
    from xraygan.console import err

    per = ", ".join(f"{c} {v['lung_energy_mean']}" for c, v in rec["per_class"].items())
    err.print(f"{rec['label']}: layer {rec['layer']} ({rec['layer_map_size']}x{rec['layer_map_size']}); "
              f"CAM energy inside the lung region {rec['lung_energy_mean']} (uniform map: "
              f"{rec['region_area_fraction']}; per class: {per}); grid: {cfg.out}/grid.png", highlight=False)


CONFIG_COMMANDS["score-review"] = ConfigCommand(
    "xraygan.audit", "ScoreReviewConfig", "run_score_review", _report_review,
    """Score a blinded review: per reader accuracy and a binomial test (could they tell synthetic
    from real?), quality ratings, and with several readers the pooled figures and Cohen's or
    Fleiss' κ; the audit's report.md gets a "Reader study" section.

    Example: xraygan score-review audit/review/
             xraygan score-review audit/review/review.csv
    """, progress=False)
CONFIG_COMMANDS["probe-sources"] = ConfigCommand(
    "xraygan.audit", "ProbeSourcesConfig", "probe_sources", _report_probe,
    """Within each class, can a linear model tell the images' sources apart? Held-out ROC-AUC in
    pixel-PCA space (and a classifier's features) and a verdict: a shortcut a classifier could
    learn instead of the disease.

    Example: xraygan probe-sources data/train
    """, progress=False)
CONFIG_COMMANDS["generate"] = ConfigCommand(
    "xraygan.generate", "GenerateConfig", "generate", _report_generate,
    """Write N synthetic images from a GAN generator or a diffusion model into OUT/<label>/.

    Example: xraygan generate runs/dcgan/generator.safetensors -n 2925 --out synth
             xraygan generate runs/ddpm/diffusion.safetensors -n 805 --out synth-ddpm --sampling-steps 50
    """)
CONFIG_COMMANDS["rebalance"] = ConfigCommand(
    "xraygan.rebalance", "RebalanceConfig", "rebalance", _report_rebalance,
    """Write a rebalanced copy of a training folder (files hard-linked where possible).

    Example: xraygan rebalance data/train --method gan --synthetic synth --out balanced
    """, json_help="Print rebalance.json on stdout.")
CONFIG_COMMANDS["train-classifier"] = ConfigCommand(
    "xraygan.classifier", "TrainClassifierConfig", "train_classifier", _report_classifier,
    """Train a one-channel ResNet-18 and keep the best epoch on the validation split.

    Example: xraygan train-classifier balanced --val data/val --out runs/clf --class-weights balanced
             torchrun --nproc-per-node 4 -m xraygan train-classifier balanced --val data/val --out runs/clf
    """)
CONFIG_COMMANDS["gradcam"] = ConfigCommand(
    "xraygan.gradcam", "GradcamConfig", "gradcam", _report_gradcam,
    """Grad-CAM overlays per class, and the share of CAM energy inside the lung fields.

    Example: xraygan gradcam runs/clf/classifier.safetensors data/test --out runs/clf/cams -n 8
    """)

def main() -> None:
    try:
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
