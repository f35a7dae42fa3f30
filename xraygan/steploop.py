"""One step loop for both generator families (train-gan, train-diffusion).

A family supplies what differs (`Family`: its step, its checkpoint, its sample grid, the stats it
logs); the loop owns what every run shares:

- the position: step, epoch, batch within the epoch and the epoch's order, saved with every
  checkpoint and restored by `resume`, so an interrupted run continues exactly where it stopped;
- the cadence, by steps and time: losses read from the device every `log_every` steps in one
  host sync (log.csv rows, the progress bar, the NaN guard), checkpoints every `save_every`
  steps or `save_seconds`, at the end and on Ctrl-C, sample grids every `sample_every` steps;
- the NaN guard: a non-finite stat stops the run with the last good checkpoint named, and a state
  whose losses were not checked is never checkpointed;
- checkpoints on the background writer (the state file last), and a run that fails before its
  first checkpoint leaves no folder behind; a finished run of `keep_state=False` keeps its
  state file's record alone (where it ended, no tensors), so it can be skipped but not extended;
- Ctrl-C (and SIGTERM) deferred to the end of the step, then a save and how to resume; a second
  one inside a step keeps the last checkpoint;
- under torchrun, the collective that averages the stats and agrees on stopping, with rank 0
  alone writing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xraygan.checkpoint import RECORD_ALONE, BackgroundWriter, cannot_extend, is_record_alone, load_checkpoint
from xraygan.distributed import Dist, mean_and_flag
from xraygan.errors import InputError, Interrupted
from xraygan.runs import abandon_failed_run, append_log, interrupted_in_step, not_finite, truncate_log
from xraygan.runtime import deferred_interrupt

Progress = Callable[..., None]


@dataclass
class Position:
    """Where a run is: `step` steps done, the next batch is `batch` of epoch `epoch` (from 0) in
    the epoch's order `perm` (None: not drawn yet, or a family that draws each batch itself)."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    perm: torch.Tensor | None = None


@dataclass(frozen=True)
class Cadence:
    total: int  # steps the run trains to
    steps_per_epoch: int
    log_every: int
    save_every: int
    save_seconds: float
    sample_every: int


@dataclass(frozen=True)
class Family:
    """What one generator family does in the loop."""
    command: str  # train-gan: what the resume hint names
    model: str  # the file a finished run is for (generator.safetensors)
    state_kind: str  # the kind recorded in its state.safetensors
    log_fields: tuple[str, ...]  # log.csv's columns: step, epoch, the stats, [grid_column], seconds
    stat_names: tuple[str, ...]  # what `step` returns, in order
    shown: tuple[str, ...]  # the stats the progress bar shows
    order: Callable[[], torch.Tensor | None]  # a new epoch's order of the training set
    step: Callable[[Position], tuple[torch.Tensor, int]]  # one step: its stats (on the device), its images
    # the resume state now: its tensors and the metadata beside them (the loop adds the epoch's order)
    state: Callable[[], tuple[dict[str, torch.Tensor], dict]]
    # submit this position's checkpoint files to the writer, the state file last, holding the
    # tensors and metadata the loop passes (the family's state, or the record alone)
    save: Callable[[Position, BackgroundWriter, dict[str, torch.Tensor], dict], None]
    grid: Callable[[int], float | None]  # write the sample grid of this step; a figure for the log, or None
    grid_column: str | None = None  # the log column of `grid`'s figure (train-gan: diversity)


class StepLoop:
    """The run of `family` in `run` (see the module docstring). `created`: whether this run made
    the folder (a failure then removes it); `resumed`: whether it continues a saved state;
    `keep_state`: whether the state file of the run's last step keeps the tensors a longer run
    would resume from (an interrupted run keeps them either way)."""

    def __init__(self, run: Path, family: Family, cadence: Cadence, dist: Dist, device: torch.device,
                 created: bool, resumed: bool, progress: Progress | None, keep_state: bool = True):
        self.run, self.family, self.cadence, self.dist = Path(run), family, cadence, dist
        self.keep_state = keep_state
        self.created, self.checkpointed, self.progress = created, resumed, progress
        self.pos = Position()
        self.writer = BackgroundWriter(background=device.type != "cpu")
        self.pending: list[tuple[int, int, float, torch.Tensor]] = []  # (step, epoch, seconds, stats on device)
        self.grid_values: dict[int, float] = {}  # step -> the grid's figure at that step
        self.last: dict[str, float] = {}  # the last stats read
        self.images = 0
        self.seconds = 0.0
        self._t0 = time.perf_counter()
        self._last_save = time.monotonic()

    def resume(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The saved state's tensors and metadata, for the family to restore its own; the position
        is restored here, and the log cut back to the checkpoint."""
        path = self.run / "state.safetensors"
        t, meta = load_checkpoint(path, self.family.state_kind)
        step = int(meta["step"])
        if step >= self.cadence.total:
            raise InputError(f"{self.run}: already trained {step} steps; give a larger --steps"
                             f"{' or --epochs' if self.family.command == 'train-gan' else ''} to continue")
        if is_record_alone(meta):
            raise cannot_extend(path, f"{step} steps", f"{self.cadence.total} steps")
        self.pos = Position(step, int(meta["epoch"]), int(meta["batch"]), t["perm"] if t["perm"].numel() else None)
        if self.dist.main:
            truncate_log(self.run, self.family.log_fields, self.pos.step)
        return t, meta

    def state_file(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What the state file of this position holds: the family's state and the epoch's order
        (empty when none is drawn), or, at the end of a `keep_state=False` run, the record alone."""
        if not self.keep_state and self.pos.step >= self.cadence.total:
            return {}, dict(RECORD_ALONE)
        t, meta = self.family.state()
        perm = self.pos.perm
        return {**t, "perm": perm.cpu() if perm is not None else torch.zeros(0, dtype=torch.int64)}, meta

    def flush(self, want_stop: bool = False) -> bool:
        """Read the pending stats in one host sync; log them; stop on a non-finite value. Under
        torchrun the stats are averaged over the processes, and the result says whether any of
        them was asked to stop (Ctrl-C or SIGTERM), in the same collective."""
        if not self.pending:
            return want_stop
        fam = self.family
        stacked, want_stop = mean_and_flag(self.dist, torch.stack([p[3] for p in self.pending]), want_stop)
        vals = stacked.float().cpu().numpy().reshape(len(self.pending), -1)
        rows = []
        for (st, ep, sec, _), row in zip(self.pending, vals):
            r = {"step": st, "epoch": ep, **{k: f"{v:.6g}" for k, v in zip(fam.stat_names, row)}, "seconds": f"{sec:.3f}"}
            if fam.grid_column:
                r[fam.grid_column] = f"{self.grid_values[st]:.4g}" if st in self.grid_values else ""
            rows.append(r)
        bad = ~np.isfinite(vals).all(axis=1)
        writes = self.dist.main
        self.pending.clear()
        if bad.any():
            k = int(np.argmax(bad))
            if writes:
                append_log(self.run, fam.log_fields, rows[:k])
            detail = ", ".join(f"{s} {rows[k][s]}" for s in fam.shown)
            raise not_finite(rows[k]["step"], f" ({detail})", self.run / fam.model, self.checkpointed)
        if writes:
            append_log(self.run, fam.log_fields, rows)
        self.last = dict(zip(fam.stat_names, map(float, vals[-1])))
        if self.progress:
            c = self.cadence
            extra = {fam.grid_column: self.grid_values[max(self.grid_values)]} if self.grid_values else {}
            self.progress(fam.command, self.pos.step, c.total,
                          epoch=f"{self.pos.epoch + 1}/{-(-c.total // c.steps_per_epoch)}",
                          **{s: self.last[s] for s in fam.shown}, **extra, images=self.images)
        return want_stop

    def save(self) -> None:
        if not self.dist.active:  # under torchrun saves come right after the collective flush
            self.flush()  # never checkpoint a state whose stats were not checked
        self.family.save(self.pos, self.writer, *self.state_file())
        self.checkpointed, self._last_save = True, time.monotonic()

    def _due(self, end: bool) -> tuple[bool, bool, bool]:
        """(read the stats, save, write a grid) after the step just done."""
        c, s = self.cadence, self.pos.step
        save = end or s % c.save_every == 0 or time.monotonic() - self._last_save >= c.save_seconds
        return len(self.pending) >= c.log_every or end, save, end or s % c.sample_every == 0

    def _one_step(self) -> None:
        pos, fam = self.pos, self.family
        if pos.batch >= self.cadence.steps_per_epoch:
            pos.epoch, pos.batch, pos.perm = pos.epoch + 1, 0, None
        if pos.perm is None:
            pos.perm = fam.order()
        stats, k = fam.step(pos)
        pos.step += 1
        pos.batch += 1
        self.images += k
        self.pending.append((pos.step, pos.epoch + 1, time.perf_counter() - self._t0, stats))

    def train(self, prologue: Callable[[], None] = lambda: None) -> None:
        """Run `prologue` (the run's config.json), then steps up to the total; on any failure the
        run is left as the module docstring says."""
        dist = self.dist
        in_step = False
        self._t0 = time.perf_counter()
        try:
            prologue()
            if self.progress and self.pos.step < self.cadence.total:  # the clock starts before the first step
                self.progress(self.family.command, self.pos.step, self.cadence.total, images=0)
            with deferred_interrupt() as stop:
                while self.pos.step < self.cadence.total:
                    in_step = True
                    self._one_step()
                    in_step = False
                    end = self.pos.step == self.cadence.total
                    read, save, grid = self._due(end)
                    if dist.main and grid:
                        figure = self.family.grid(self.pos.step)
                        if figure is not None:
                            self.grid_values[self.pos.step] = figure
                    if dist.active:  # every process meets at the same steps; rank 0 alone saves
                        if end or self.pos.step % self.cadence.log_every == 0 \
                                or self.pos.step % self.cadence.save_every == 0:
                            stop_all = self.flush(stop.requested)
                            if dist.main and (save or stop_all):
                                self.save()
                            if stop_all:
                                raise KeyboardInterrupt
                        continue
                    if read or stop.requested:
                        self.flush()
                    if save or stop.requested:
                        self.save()
                    if stop.requested:
                        raise KeyboardInterrupt
            self.writer.wait()  # the run is reported as saved only once its files are on disk
        except KeyboardInterrupt:
            self.writer.wait()
            if not dist.main:
                raise Interrupted(f"interrupted at step {self.pos.step}") from None
            if in_step:
                raise interrupted_in_step(self.run, self.created, self.checkpointed) from None
            self.save()
            self.writer.wait()
            raise Interrupted(f"interrupted at step {self.pos.step}; saved: continue with xraygan "
                              f"{self.family.command} ... --out {self.run} --resume") from None
        except BaseException:
            abandon_failed_run(self.run, self.created, self.writer, self.checkpointed, writes=dist.main)
            raise
        finally:
            self.seconds = time.perf_counter() - self._t0

    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None
