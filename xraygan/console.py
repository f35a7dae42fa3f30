"""Terminal output: rich progress bars and tables on stderr, so stdout stays for --json."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# soft_wrap: a line is never broken at the console's width (80 columns in a log file), so a path
# in a summary stays whole for copying and grep; tables still fit the width
err = Console(stderr=True, soft_wrap=True)


PLAIN_EVERY_S = 30.0  # at most one plain progress line per stage this often (logs, not terminals)


class _Rate:
    """A stage's pace since its first report: work units (and images) per second over the time it
    was watched. The first report comes after some work is done, so that work is the baseline,
    not part of the rate (counting it would overstate the first minutes' img/s)."""

    def __init__(self, done: int, images: int | None):
        self.t0, self.done0, self.images0 = time.perf_counter(), done, images or 0

    def add_to(self, figures: dict, images: int | None) -> float:
        """Add img/s to `figures` once it means something; return the seconds watched."""
        dt = time.perf_counter() - self.t0
        if images is not None and dt > 0.25 and images > self.images0:  # over a few ms it is noise
            figures["img/s"] = (images - self.images0) / dt
        return dt


def _figures_text(figures: dict) -> str:
    def shown(v) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"  # 3204 img/s, not 3.2e+03
    return "  ".join(f"{k} {shown(v)}" for k, v in figures.items())


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@contextlib.contextmanager
def progress_bar(disable: bool = False) -> Iterator:
    """Yield a callback `cb(stage, done, total, **figures)` that reports one stage's progress.

    Figures (losses, img/s, ...) are shown after the count; img/s is computed here when the caller
    passes `images=<count so far>`. On a terminal (or in Jupyter) each stage is a rich bar; written
    to a file or a pipe (a cluster job's log, a study step's log) it is a plain line every
    PLAIN_EVERY_S seconds and one when the stage ends, since a bar is only drawn there once the
    command is done.
    """
    if disable:
        yield lambda *a, **k: None
        return
    if err.is_terminal or err.is_jupyter:
        with _rich_bar() as cb:
            yield cb
    else:
        yield _plain_lines()


@contextlib.contextmanager
def _rich_bar() -> Iterator:
    # ETA from the pace over five minutes: a 224 px epoch on a CPU reports every ~45 s, and rich's
    # default 30 s window would hold one report, so no ETA at all
    prog = Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[figures]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=err, transient=False, speed_estimate_period=300)
    tasks: dict[str, int] = {}
    rates: dict[str, _Rate] = {}

    def cb(stage: str, done: int, total: int, **figures) -> None:
        images = figures.pop("images", None)
        if stage not in tasks:
            tasks[stage] = prog.add_task(stage, total=total, completed=done, figures="")
            rates[stage] = _Rate(done, images)
        rates[stage].add_to(figures, images)
        prog.update(tasks[stage], completed=done, total=total, figures=_figures_text(figures))

    with prog:
        yield cb


def _plain_lines():
    rates: dict[str, _Rate] = {}
    printed: dict[str, float] = {}  # when each stage last printed (or started)
    ended: set[str] = set()

    def cb(stage: str, done: int, total: int, **figures) -> None:
        images = figures.pop("images", None)
        now, end = time.perf_counter(), done >= total
        if stage not in rates:
            rates[stage], printed[stage] = _Rate(done, images), now
        if stage in ended or not (end or now - printed[stage] >= PLAIN_EVERY_S):
            return
        printed[stage] = now
        if end:
            ended.add(stage)
        r = rates[stage]
        dt = r.add_to(figures, images)
        line = f"{stage:<10} {done}/{total}"
        if total:
            line += f" {100 * done // total}%"
        if figures:
            line += "  " + _figures_text(figures)
        line += f"  {_clock(dt)}"
        if 0 < done - r.done0 and done < total:
            line += f"  ETA {_clock((total - done) * dt / (done - r.done0))}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return cb


def counts_table(title: str, counts: dict[str, dict[str, int]]) -> Table:
    """A table of rows (e.g. splits) × columns (e.g. classes) with totals."""
    cols = sorted({c for row in counts.values() for c in row})
    t = Table(title=title)
    t.add_column("")
    for c in cols:
        t.add_column(c, justify="right")
    t.add_column("total", justify="right", style="bold")
    for r, row in counts.items():
        t.add_row(r, *(str(row.get(c, 0)) for c in cols), str(sum(row.values())))
    return t
