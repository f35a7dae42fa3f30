"""Terminal output: rich progress bars and tables on stderr, so stdout stays for --json."""

from __future__ import annotations

import contextlib
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

err = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(disable: bool = False) -> Iterator:
    """Yield a callback `cb(stage, done, total, **figures)` that drives one bar per stage.

    Figures (losses, img/s, ...) are shown after the bar; img/s is computed here from `done`
    when the caller passes `images=<count so far>`.
    """
    prog = Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[figures]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=err, disable=disable, transient=False)
    tasks: dict[str, int] = {}
    started: dict[str, float] = {}

    def cb(stage: str, done: int, total: int, **figures) -> None:
        if stage not in tasks:
            tasks[stage] = prog.add_task(stage, total=total, figures="")
            started[stage] = time.perf_counter()
        images = figures.pop("images", None)
        dt = time.perf_counter() - started[stage]
        if images is not None and dt > 0.25:  # a rate over a few milliseconds is noise
            figures["img/s"] = images / dt
        text = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in figures.items())
        prog.update(tasks[stage], completed=done, total=total, figures=text)

    with prog:
        yield cb


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
