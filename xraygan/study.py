"""`xraygan study`: the study's whole grid as one resumable command.

The grid is a plan of steps, each one ordinary xraygan command (so every result can be remade
from the shell): per GAN row train-gan → generate → audit; per row and seed rebalance →
train-classifier → evaluate (at threshold 0.5 and tuned on the validation split, in one
process) and gradcam; the two tables last. Up to `--jobs` steps run at once as subprocesses,
each with its share of the CPU threads, sharing one GPU. A step is done when the record its command writes says so
(the GAN's and classifier's state files, generation.json, metrics.json, ...), so a rerun skips
it; an interrupted GAN or classifier resumes with --resume.
"""

from __future__ import annotations

import graphlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from xraygan import __version__
from xraygan.errors import InputError, Interrupted, TrainingError, check_choice, check_int, require
from xraygan.fsutil import (
    atomic_write_json,
    continued_record,
    file_sha256,
    holds_anything,
    make_dirs,
    read_json,
    record_header,
    write_csv,
)
from xraygan.options import DEVICE_HELP, opt
from xraygan.runtime import DEVICES

ROWS = ("baseline", "class_weights", "undersample", "oversample", "dcgan", "cdcgan_a0.25", "cdcgan_a0.5",
        "cdcgan_a0.75", "smote", "augment")
METHODS = {"baseline": "none", "class_weights": "none", "undersample": "undersample",
           "oversample": "oversample", "smote": "smote", "augment": "augment"}
CDCGAN = re.compile(r"^cdcgan_a(?P<alpha>[0-9]*\.?[0-9]+)$")
DIFFUSION_ROWS = ("ddpm", "cddpm")  # a DDPM on the minority class; a conditional one on all classes
RECORD = "study.json"
# Settings a study folder keeps: rerunning into it with other values would mix two studies.
SETTINGS = ("data", "gan_steps", "gan_batch", "diffaugment", "clf_epochs", "patience", "small_stem",
            "diffusion_steps", "diffusion_batch", "clf_accumulate", "sampling_steps", "clf_select", "weights",
            "tune_for", "clf_equal_steps", "gan_seeds")
# A setting shapes only the folders named here (under the study folder; "*" is any row): while
# none of them holds anything, it may change between runs of one study, so a diffusion row can be
# added to a finished GAN grid at a step count of its own, and a study's generators can be given
# to classifiers of other settings (a copy of the study without its runs/), or its classifiers
# to another tuning criterion (a copy without runs/*/report-tuned). `data` shapes everything and
# never may.
_CLASSIFIERS = ("runs/*",)
# What a study ran with before its record held the setting (the default then, since changed):
# a record without it is compared against this, not against today's default.
RECORD_DEFAULTS = {"clf_select": "f1", "tune_for": "f1", "clf_equal_steps": False, "gan_seeds": [0]}
SETTING_FOLDERS = {"gan_steps": ("gan/*",), "gan_batch": ("gan/*",), "diffaugment": ("gan/*",),
                   # which generator's images a generator row's set of each seed holds (the other
                   # rows' sets are the same for any), so a finished grid can be given more
                   # generators by removing its generator rows' sets and runs alone
                   "gan_seeds": tuple(f"{d}/{r}-seed*" for d in ("balanced", "runs")
                                      for r in ("dcgan", "cdcgan_a*", *DIFFUSION_ROWS)),
                   "diffusion_steps": ("diffusion/*",), "diffusion_batch": ("diffusion/*",),
                   "sampling_steps": tuple(f"synth/{r}" for r in DIFFUSION_ROWS),
                   **{k: _CLASSIFIERS for k in ("clf_epochs", "patience", "small_stem", "clf_accumulate",
                                                "clf_select", "weights", "clf_equal_steps")},
                   "tune_for": ("runs/*/report-tuned",)}


def generator_tag(row: str, gan_seed: int) -> str:
    """The name of a generator row's generator of one seed (folders gan/, synth/, audit/ and its
    steps): the row's own for seed 0, so a study of one generator per row keeps its layout."""
    return row if gan_seed == 0 else f"{row}-gan{gan_seed}"


def generator_of(tag: str) -> tuple[str, int]:
    """The row and generator seed a `generator_tag` names (`cdcgan_a0.5-gan3` -> cdcgan_a0.5, 3)."""
    row, sep, k = tag.rpartition("-gan")
    return (row, int(k)) if sep and row and k.isdigit() else (tag, 0)


def is_gan_row(row: str) -> bool:
    """Rows whose minority images come from a trained generator (a GAN or a diffusion model)."""
    return row == "dcgan" or CDCGAN.match(row) is not None or row in DIFFUSION_ROWS


def default_jobs(cores: int, cuda: bool) -> int:
    """Steps at once, each with cores/jobs CPU threads. Measured (docs/commands/study.md): on two
    CPU cores two steps at once with one thread each finished a grid 1.4-1.7x sooner than one
    at a time with two threads (every step has a serial part: starting Python and torch, reading
    images, writing files, which the other step overlaps); without the thread split the same
    two jobs oversubscribe the cores and were much slower. So on a CPU: one job per core, at
    most 8. With a GPU: min(8, cores/2), at least 2; 8 on a 16-core H200 machine kept the grid's
    step slots busy (its steps added up to 7.3x the wall time)."""
    if cuda:
        return max(2, min(8, cores // 2)) if cores >= 2 else 1
    return max(1, min(8, cores))


def _rows(values: list[str]) -> tuple[str, ...]:
    return tuple(v.strip() for x in values for v in x.split(",") if v.strip())


def _seeds(values: list[str], option: str = "--seeds") -> tuple[int, ...]:
    words = _rows(values)
    if not all(w.isdigit() for w in words):
        raise InputError(f"{option} '{' '.join(values)}': seeds are whole numbers, e.g. {option} 0 1 2")
    return tuple(int(w) for w in words)


def _gan_seeds(values: list[str] | None) -> tuple[int, ...] | None:
    return None if values is None else _seeds(values, "--gan-seeds")


# the words `--rows` takes after it (a row, or rows joined by commas): only row names, so the data
# folder after `--rows baseline dcgan` is never read as a row
_ROW = r"(?:" + "|".join(ROWS[:5] + ("smote", "augment") + DIFFUSION_ROWS) + r"|cdcgan_a[0-9]*\.?[0-9]+)"


@dataclass(frozen=True)
class StudyConfig:
    data: Path = opt(help="A folder written by xraygan prepare (train/, val/, test/).", argument=True)
    out: Path = opt(help="Study folder: every step's output, logs/, times.csv, table/ and table-tuned/.",
                    flags=("--out", "-o"))
    rows: tuple[str, ...] = opt(
        ROWS, "Rows to run: baseline class_weights undersample oversample dcgan cdcgan_a0.25 cdcgan_a0.5 "
              "cdcgan_a0.75 smote augment; any cdcgan_a<α>; and the diffusion rows ddpm and cddpm "
              "(train-diffusion). Space- or comma-separated. Default: the ten before ddpm.", cli=list[str],
        parse=_rows, show_default=False,
        several=rf"^{_ROW}(,{_ROW})*$")
    seeds: tuple[int, ...] = opt((0, 1, 2), "Classifier seeds per row (each also draws the rebalanced set), e.g. "
                                            "--seeds 0 1 2.", cli=list[str], parse=_seeds,
                                 text=lambda v: [str(x) for x in v], several=r"^\d+(,\d+)*$")
    gan_seeds: tuple[int, ...] | None = opt(
        None, "Seeds of each generator row's generators (GANs and diffusion models); classifier seed s takes "
              "the images of the generator seeded gan_seeds[s mod n]. Default: a generator per classifier "
              "seed, seeded with it, so a row's spread over seeds includes its generators'; --gan-seeds 0 trains "
              "one generator a row for all seeds (faster; its results are that one generator's).",
        cli=Optional[list[str]], parse=_gan_seeds, text=lambda v: None if v is None else [str(x) for x in v], several=r"^\d+(,\d+)*$",
        show_default=False)
    gan_steps: int = opt(3000, "Generator steps per GAN.")
    gan_batch: int = opt(64, "GAN batch size.")
    diffusion_steps: int = opt(4000, "Training steps per diffusion model (rows ddpm, cddpm).")
    diffusion_batch: int = opt(64, "Diffusion batch size (rows ddpm, cddpm; see train-diffusion --batch-size).")
    sampling_steps: int = opt(50, "DDIM steps when the diffusion rows generate (see generate --sampling-steps).")
    diffaugment: str = opt("auto", "DiffAugment policy for the GANs (see train-gan).")
    clf_epochs: int = opt(20, "Classifier epochs (early stopping may end sooner).")
    clf_accumulate: int = opt(1, "Classifier micro-batches per step, for a batch that does not fit in memory "
                                 "(see train-classifier --accumulate).")
    clf_equal_steps: bool = opt(True, "Every row's classifier epoch takes as many images as the real training "
                                      "set holds (train-classifier --epoch-images), so every row trains the same "
                                      "optimizer steps and rows differ in their images alone; off: an epoch is one "
                                      "pass over each row's own set, and over-sampled rows take more steps than the "
                                      "baseline, under-sampled fewer (the design of the study this toolkit "
                                      "reproduces).")
    patience: int = opt(5, "Classifier epochs without improvement before stopping.")
    clf_select: str = opt("auc", "Keep each classifier's epoch with the best validation auc or f1 (see "
                                 "train-classifier --select).")
    tune_for: str = opt("youden", "What the tuned table's threshold maximises on the validation split: youden "
                                  "or f1 (see evaluate --tune-for).")
    small_stem: str = opt("auto", "Classifier stem: auto, yes or no (see train-classifier).")
    weights: Path | None = opt(None, "Local pretrained ResNet-18 weights (e.g. torchvision's ImageNet file) for "
                                     "every row's classifier (see train-classifier --weights).")
    audit: bool = opt(True, "Audit each GAN's images against the real training set.")
    jobs: int | None = opt(None, "Steps run at once, each with cores/N CPU threads, sharing one GPU (default: "
                                 "one per core up to 8; with a GPU min(8, cores/2); see docs/commands/study.md).",
                           flags=("--jobs", "-j"))
    dry_run: bool = opt(False, "Print the plan (what is done, what would run) and exit.", flags=("--dry-run",))
    estimate: bool = opt(False, "Print the plan with each step's time on this machine, measured now from a step or "
                                "two of each network at the data's size with the threads each step will get, and "
                                "the study's total; then exit.", flags=("--estimate",))
    print_commands: bool = opt(False, "Print the steps not done yet as a bash script, one command a line tagged "
                                      "with its stage (for GNU parallel or a SLURM job array), and exit.",
                               flags=("--print-commands",))
    device: str = opt("auto", DEVICE_HELP)
    program: str = "xraygan"  # how --print-commands names the command

    def validate(self) -> None:
        require(len(self.rows) > 0, "--rows: give at least one row")
        for r in self.rows:
            m = CDCGAN.match(r)
            require(r in METHODS or r == "dcgan" or r in DIFFUSION_ROWS
                    or (m is not None and 0 <= float(m["alpha"]) <= 1),
                    f"--rows {r}: unknown row (rows: {', '.join(ROWS + DIFFUSION_ROWS)}; any cdcgan_a<α> with "
                    "α in [0, 1])")
        require(len(set(self.rows)) == len(self.rows), "--rows: a row is named twice")
        require(len(self.seeds) > 0, "--seeds: give at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), "--seeds: a seed is named twice")
        for s in self.seeds:
            check_int("--seeds", s, 0)
        if self.gan_seeds is not None:
            require(len(self.gan_seeds) > 0, "--gan-seeds: give at least one seed")
            require(len(set(self.gan_seeds)) == len(self.gan_seeds), "--gan-seeds: a seed is named twice")
            for s in self.gan_seeds:
                check_int("--gan-seeds", s, 0)
        check_int("--gan-steps", self.gan_steps)
        check_int("--gan-batch", self.gan_batch, 2)
        check_int("--clf-epochs", self.clf_epochs)
        check_int("--clf-accumulate", self.clf_accumulate)
        from xraygan.classifier import TrainClassifierConfig  # every row's classifier takes its default batch

        batch = TrainClassifierConfig.batch_size
        require(self.clf_accumulate <= batch // 2, f"--clf-accumulate {self.clf_accumulate}: more micro-batches "
                f"than the classifier's batch of {batch} can fill with two images each")
        check_int("--diffusion-steps", self.diffusion_steps)
        check_int("--diffusion-batch", self.diffusion_batch, 2)
        check_int("--sampling-steps", self.sampling_steps)
        check_int("--patience", self.patience, 0)
        check_choice("--small-stem", self.small_stem, ("auto", "yes", "no"))
        check_choice("--clf-select", self.clf_select, ("f1", "auc"))
        check_choice("--tune-for", self.tune_for, ("f1", "youden"))
        require(self.weights is None or Path(self.weights).is_file(), f"{self.weights}: weights file not found")
        if self.weights is not None:  # read now, not in the first classifier step hours of GAN training later
            from xraygan.classifier import check_weights

            check_weights(Path(self.weights))
        check_choice("--device", self.device, DEVICES)
        if self.jobs is not None:
            check_int("--jobs", self.jobs)
        for split in ("train", "val", "test"):
            if not (Path(self.data) / split).is_dir():
                raise InputError(f"{Path(self.data) / split}: not found (DATA must be a folder written "
                                 "by xraygan prepare, with train/, val/ and test/)")
        from xraygan.fsutil import check_out_apart

        check_out_apart(self.out, data=self.data)

    def generator_seeds(self) -> tuple[int, ...]:
        """The seeds each generator row trains a generator from."""
        return self.seeds if self.gan_seeds is None else self.gan_seeds

    def generator_seed(self, seed: int) -> int:
        """The seed of the generator whose images classifier seed `seed` is given."""
        return seed if self.gan_seeds is None else self.gan_seeds[seed % len(self.gan_seeds)]

    def settings(self) -> dict:
        return {"data": str(Path(self.data).resolve()), "gan_steps": self.gan_steps,
                "gan_seeds": None if self.gan_seeds is None else list(self.gan_seeds),
                "gan_batch": self.gan_batch, "diffaugment": self.diffaugment,
                "clf_epochs": self.clf_epochs, "patience": self.patience, "small_stem": self.small_stem,
                "diffusion_steps": self.diffusion_steps, "diffusion_batch": self.diffusion_batch,
                "clf_accumulate": self.clf_accumulate, "clf_equal_steps": self.clf_equal_steps,
                "sampling_steps": self.sampling_steps, "clf_select": self.clf_select, "tune_for": self.tune_for,
                "weights": self.weights and {"path": str(Path(self.weights).resolve()),
                                             "sha256": file_sha256(Path(self.weights))}}


@dataclass
class Step:
    """One command of the plan. `done` says whether its output is complete; `partial` whether
    an earlier attempt left something (then the command gets `again`, e.g. --resume)."""
    id: str
    argv: list[str]
    out: Path
    deps: list[str] = field(default_factory=list)
    done: Callable[[], bool] = lambda: False
    again: list[str] = field(default_factory=lambda: ["--force"])
    exclusive: str | None = None  # steps of one group never run at the same time
    inputs: list[tuple[str, Path]] | None = None  # the table: (step, file) pairs it reads, when done
    also: tuple[Path, ...] = ()  # further folders the command writes besides `out`
    config: object = None  # the command's config the arguments were made from (None: typed here)
    stage: int = 1

    def attempt(self) -> tuple[str, list[str]]:
        """(state, arguments) now, reading the step's record once: done, run (nothing there yet),
        resume or redo (an earlier attempt left something: the command gets `again`)."""
        if self.done():
            return "done", list(self.argv)
        if not any(map(holds_anything, (self.out, *self.also))):
            return "run", list(self.argv)
        if self.again == ["--resume"] and not (self.out / "state.safetensors").is_file():
            return "redo", list(self.argv) + ["--force"]  # stopped before its first checkpoint
        return ("resume" if self.again == ["--resume"] else "redo"), list(self.argv) + self.again

    def command(self) -> list[str]:
        """The arguments for this attempt."""
        return self.attempt()[1]


def alone_steps(steps: list[Step], todo: set[str]) -> set[str]:
    """The steps of `todo` that can never run beside another step of `todo`: every other one
    depends on them or they on it (adding a generator row to a finished study: its training,
    then its generation, run with nothing else possible). They get all the cores, not cores/jobs.
    Decided from the plan and the study folder when the study starts, never from which steps
    happen to be running at the time, so the thread count (on which CPU results depend in
    their last bits) does not vary with timing."""
    by = {s.id: s for s in steps}
    ancestors: dict[str, set[str]] = {}

    def up(sid: str) -> set[str]:
        if sid not in ancestors:
            ancestors[sid] = set()
            for d in by[sid].deps:
                ancestors[sid] |= {d} | up(d)
        return ancestors[sid]

    return {a for a in todo if all(b == a or a in up(b) or b in up(a) for b in todo)}


def thread_plan(steps: list[Step], todo: set[str], jobs: int, cores: int) -> tuple[int, set[str]]:
    """(CPU threads of a step, the steps of `todo` that run alone with all `cores`) when `jobs`
    steps run at once: cores/jobs each, except what can only run alone (`alone_steps`)."""
    threads = max(1, cores // jobs)
    return threads, (alone_steps(steps, todo) if threads < cores else set())


def class_counts(train: Path) -> dict[str, int]:
    from xraygan.images import list_image_folder

    return {c: len(f) for c, f in list_image_folder(train).items()}


def command_step(sid: str, command: str, config, out: Path, **kw) -> Step:
    """A step that runs `command` with `config`, its command line made from the config itself."""
    from xraygan.contract import to_argv

    return Step(sid, [command, *to_argv(command, config)], out, config=config, **kw)


def build_plan(cfg: StudyConfig) -> tuple[list[Step], dict]:
    """The steps in the order they are started (GANs first: they take longest). Each step is a
    command's config; its command line comes from `to_argv`, and whether it is done from the
    command's own `is_done`, which reads the command's own record."""
    from xraygan import audit, classifier, diffusion, evaluate, gan, generate, gradcam, rebalance
    from xraygan.audit import AuditConfig
    from xraygan.classifier import TrainClassifierConfig
    from xraygan.evaluate import CompareConfig, EvaluateConfig
    from xraygan.gradcam import GradcamConfig
    from xraygan.rebalance import RebalanceConfig

    data, out = Path(cfg.data), Path(cfg.out)
    counts = class_counts(data / "train")
    require(len(counts) == 2, f"{data / 'train'}: the study needs two classes, found "
                              f"{len(counts)} ({', '.join(counts)})")
    minority = min(counts, key=lambda c: (counts[c], c))
    need = max(counts.values()) - counts[minority]
    if any(is_gan_row(r) for r in cfg.rows):
        require(need > 0, f"{data / 'train'}: the classes are balanced ({counts}); there is nothing "
                          "for a GAN to add (drop the GAN rows)")
    dev, train = cfg.device, data / "train"
    steps: list[Step] = []
    for row in cfg.rows:
        if not is_gan_row(row):
            continue
        for g in cfg.generator_seeds():
            tag = generator_tag(row, g)  # its folders' and steps' name
            synth = out / "synth" / tag
            if row in DIFFUSION_ROWS:
                run, trainer, model = out / "diffusion" / tag, "train-diffusion", "diffusion.safetensors"
                c = diffusion.TrainDiffusionConfig(data=train, out=run, conditional=row == "cddpm", cls=minority,
                                                   steps=cfg.diffusion_steps, batch_size=cfg.diffusion_batch,
                                                   seed=g, device=dev, keep_state=False)
                steps.append(command_step(f"{trainer} {tag}", trainer, c, run, again=["--resume"],
                                          done=lambda run=run: diffusion.is_done(run, cfg.diffusion_steps)))
            else:
                run, trainer, model = out / "gan" / tag, "train-gan", "generator.safetensors"
                alpha = CDCGAN.match(row)
                c = gan.TrainGanConfig(data=train, out=run, conditional=alpha is not None,
                                       cls=None if alpha else minority,
                                       alpha=float(alpha["alpha"]) if alpha else None, steps=cfg.gan_steps,
                                       batch_size=cfg.gan_batch,
                                       diffaugment="" if cfg.diffaugment == "none" else cfg.diffaugment, seed=g,
                                       device=dev, keep_state=False)
                steps.append(command_step(f"{trainer} {tag}", trainer, c, run, again=["--resume"],
                                          done=lambda run=run: gan.is_done(run, cfg.gan_steps)))
            c = generate.GenerateConfig(checkpoint=run / model, out=synth, n=need, label=minority, seed=g,
                                        preview=True, device=dev,
                                        **({"sampling_steps": cfg.sampling_steps} if row in DIFFUSION_ROWS else {}))
            steps.append(command_step(f"generate {tag}", "generate", c, synth, deps=[f"{trainer} {tag}"],
                                      done=lambda s=synth: generate.is_done(s, need)))
            if cfg.audit:
                a = out / "audit" / tag
                c = AuditConfig(real=train, synthetic=synth, out=a, cache=out / "cache", device=dev)
                steps.append(command_step(f"audit {tag}", "audit", c, a, deps=[f"generate {tag}"],
                                          done=lambda a=a: audit.is_done(a),
                                          exclusive="audit"))  # the first audit trains the cached feature classifier
    tables: dict[str, list[tuple[str, Path]]] = {"table": [], "table-tuned": []}
    weights = Path(cfg.weights).absolute() if cfg.weights is not None else None  # one pretrained start for all
    for row in cfg.rows:
        for seed in cfg.seeds:
            name = f"{row} seed {seed}"
            bal, run = out / "balanced" / f"{row}-seed{seed}", out / "runs" / f"{row}-seed{seed}"
            tag = generator_tag(row, cfg.generator_seed(seed))  # this seed's generator
            c = RebalanceConfig(data=train, out=bal, method="gan" if is_gan_row(row) else METHODS[row],
                                synthetic=(out / "synth" / tag,) if is_gan_row(row) else (), seed=seed)
            steps.append(command_step(f"rebalance {name}", "rebalance", c, bal,
                                      deps=[f"generate {tag}"] if is_gan_row(row) else [],
                                      done=lambda b=bal: rebalance.is_done(b)))
            c = TrainClassifierConfig(data=bal, val=data / "val", out=run, epochs=cfg.clf_epochs,
                                      epoch_images=sum(counts.values()) if cfg.clf_equal_steps else None,
                                      accumulate=cfg.clf_accumulate, patience=cfg.patience,
                                      small_stem=cfg.small_stem, select=cfg.clf_select, seed=seed,
                                      class_weights="balanced" if row == "class_weights" else "none",
                                      weights=weights, device=dev,
                                      keep_state=False)  # its settings are locked: never extended
            steps.append(command_step(f"train-classifier {name}", "train-classifier", c, run,
                                      deps=[f"rebalance {name}"], again=["--resume"],
                                      done=lambda r=run: classifier.is_done(r, cfg.clf_epochs, cfg.patience)))
            ckpt = run / "classifier.safetensors"
            # both operating points from one scoring of the test set: one process, not two (on the
            # 64 px GPU grid, evaluations were half of all step time, mostly process start-up)
            rep, rep_tuned = run / "report", run / "report-tuned"
            sid = f"evaluate {name}"
            c = EvaluateConfig(checkpoint=ckpt, data=data / "test", report=rep_tuned, tune_on=data / "val",
                               tune_for=cfg.tune_for, untuned_report=rep, label=row, device=dev)
            steps.append(command_step(sid, "evaluate", c, rep_tuned, deps=[f"train-classifier {name}"], also=(rep,),
                                      done=lambda rs=(rep, rep_tuned): all(map(evaluate.is_done, rs))))
            tables["table"].append((sid, rep / "metrics.json"))
            tables["table-tuned"].append((sid, rep_tuned / "metrics.json"))
            cams = run / "cams"
            c = GradcamConfig(checkpoint=ckpt, data=data / "test", out=cams, label=row, n=8, device=dev)
            steps.append(command_step(f"gradcam {name}", "gradcam", c, cams, deps=[f"train-classifier {name}"],
                                      done=lambda c=cams: gradcam.is_done(c)))
            for table in tables:
                tables[table].append((f"gradcam {name}", cams / "gradcam.json"))
    for table, inputs in tables.items():
        t = out / table
        c = CompareConfig(inputs=tuple(p for _, p in inputs), out=t, force=True)
        steps.append(command_step(f"compare {table}", "compare", c, t, deps=sorted({s for s, _ in inputs}),
                                  inputs=inputs, again=[]))
    ids = {s.id: s for s in steps}
    for s in steps:  # a step's stage comes after all the stages it depends on
        s.stage = 1 + max((ids[d].stage for d in s.deps if d in ids), default=0)
        s.deps = [d for d in s.deps if d in ids]
    return steps, {"counts": counts, "minority": minority, "synthetic_needed": need}


def check_study_folder(cfg: StudyConfig) -> dict | None:
    """STUDY is new, empty, or an earlier study with the same settings (which is continued)."""
    rec_path = continued_record(cfg.out, RECORD, f"holds files but no {RECORD}, so it is not a study folder; "
                                                 "choose another --out")
    if rec_path is None:
        return None
    rec = read_json(rec_path)
    if not isinstance(rec, dict) or rec.get("kind") != "xraygan-study":
        raise InputError(f"{rec_path}: not a study record written by xraygan study")
    mine = cfg.settings()
    recorded = rec.get("settings", {})
    # a setting the record lacks is newer than the study, which then ran with the default of its
    # day (RECORD_DEFAULTS where that has changed since; the weights are not known then, so they
    # are not compared)
    theirs = {**StudyConfig(data=cfg.data, out=cfg.out).settings(), **RECORD_DEFAULTS, **recorded}
    if "weights" not in recorded:
        theirs["weights"] = mine["weights"]
    same = {k: theirs[k] == mine[k] for k in SETTINGS}
    # no --gan-seeds is a generator per classifier seed: the same as naming those seeds
    was_g, now_g = (list(cfg.seeds) if v is None else list(v) for v in (theirs["gan_seeds"], mine["gan_seeds"]))
    same["gan_seeds"] = was_g == now_g
    same["weights"] = (theirs["weights"] or {}).get("sha256") == (mine["weights"] or {}).get("sha256")
    changed = [k for k in SETTINGS if not same[k]
               and (k not in SETTING_FOLDERS or _started(Path(cfg.out), SETTING_FOLDERS[k]))]
    if changed:
        k = changed[0]
        was, now = theirs[k], mine[k]
        if k == "weights":
            was, now = (w["path"] if w else "none" for w in (was, now))
        if k == "gan_seeds":
            was, now = ("unset: a generator per classifier seed" if v is None else v for v in (was, now))
        if isinstance(now, list) or isinstance(was, list):
            was, now = (" ".join(map(str, v)) if isinstance(v, list) else v for v in (was, now))
        option = "DATA" if k == "data" else "--" + k.replace("_", "-")
        said = f"{option} {was} (now {now})"
        if isinstance(now, bool):  # a switch: its two spellings
            said = "{} (now {})".format(*(option if v else "--no-" + option[2:] for v in (was, now)))
        raise InputError(f"{rec_path}: this study was run with {said}; rerun with the same settings to "
                         "continue it, or choose another --out")
    return rec


def _started(out: Path, patterns: tuple[str, ...]) -> bool:
    """Whether any folder matching `patterns` under `out` holds anything."""
    return any(holds_anything(d) for p in patterns for d in out.glob(p))


def plan_states(steps: list[Step]) -> dict[str, str]:
    """Each step's state now (done, run, resume, redo; a table: always), its record read once."""
    return {s.id: "always" if s.inputs is not None else s.attempt()[0] for s in steps}


def plan_text(steps: list[Step], states: dict[str, str] | None = None) -> str:
    """--dry-run: one line per step: its state (`states`, or read now), stage, name and what it
    waits for."""
    states = states or plan_states(steps)
    lines = []
    for s in steps:
        state = states[s.id]
        after = f"  (after {len(s.deps)} steps)" if len(s.deps) > 3 else \
            (f"  (after {', '.join(s.deps)})" if s.deps else "")
        lines.append(f"{state:<7}stage {s.stage}  {s.id}{after}")
    return "\n".join(lines) + "\n"


def commands_script(steps: list[Step], program: str) -> str:
    """--print-commands: a bash script, one line per step that is not done, in stage order. Each
    line ends with `# stage K: <step>`; every step of a stage depends only on earlier stages."""
    attempts = {s.id: s.attempt() for s in steps}
    todo = [s for s in steps if attempts[s.id][0] != "done"]
    stages = sorted({s.stage for s in todo})
    head = [
        "#!/usr/bin/env bash",
        f"# xraygan {__version__} study: {len(todo)} steps to run in {len(stages)} stages"
        f" ({len(steps) - len(todo)} already done).",
        "# As written, one after another:  bash THIS_FILE",
        "# A stage at a time, in parallel:  for k in " + " ".join(map(str, stages))
        + "; do grep \"# stage $k:\" THIS_FILE | parallel -j 8 || break; done",
        "set -euo pipefail",
    ]
    body = []
    for k in stages:
        for s in sorted((s for s in todo if s.stage == k), key=steps.index):
            body.append(f"{shlex.join([program, *attempts[s.id][1]])}  # stage {k}: {s.id}")
    return "\n".join(head + body) + "\n"


def _slug(step_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", step_id).strip("-")


def study(cfg: StudyConfig, say: Callable[[str], None] | None = None) -> dict:
    """`xraygan study`: with --dry-run or --print-commands, the plan as text (`script`) and nothing
    run; else `run_study`."""
    if not (cfg.dry_run or cfg.print_commands or cfg.estimate):
        return run_study(cfg, say)
    cfg.validate()
    require(not (cfg.estimate and cfg.print_commands), "--estimate prints the plan with times; "
            "--print-commands prints it as a script: give one of them")
    check_study_folder(cfg)
    steps, info = build_plan(cfg)
    if not cfg.print_commands:  # a plan is read before hours are committed to it
        say_unequal_steps(cfg, steps, info["counts"], say)
    if cfg.estimate:
        text, est = estimate_text(cfg, steps, say)
        return {"script": text, "estimate": {"seconds": round(est.wall, 1), "one_after_another": round(est.serial, 1),
                                             "steps": {k: round(v, 1) for k, v in est.seconds.items()},
                                             "units": est.units, "measuring_seconds": round(est.measuring, 1),
                                             "memory": est.memory and {"free_bytes": est.memory.free,
                                                                       "peak_bytes": est.memory.peaks,
                                                                       "waiting": sorted(est.waited)}}}
    return {"script": commands_script(steps, cfg.program) if cfg.print_commands else plan_text(steps)}


def estimate_text(cfg: StudyConfig, steps: list[Step], say: Callable[[str], None] | None = None):
    """--estimate: the plan, each step not done with its estimated time, then the study's total
    and the time of each command summed (xraygan/estimate.py says how they are measured); and
    the `Estimate` itself (for --json)."""
    from xraygan.estimate import estimate, hours
    from xraygan.runtime import resolve_device

    device = resolve_device(cfg.device)
    states = plan_states(steps)
    todo = {sid for sid, st in states.items() if st != "done"}
    cores = os.cpu_count() or 1
    jobs = cfg.jobs if cfg.jobs is not None else default_jobs(cores, device.type == "cuda")
    threads, lone = thread_plan(steps, todo, jobs, cores)
    restore = _stop_on_signals()  # SIGTERM too ends the measurement running, as Ctrl-C does
    try:
        est = estimate(steps, todo, Path(cfg.data), jobs, lambda sid: cores if sid in lone else threads, device,
                       say or (lambda line: None))
    finally:
        restore()
    lines = plan_text(steps, states).splitlines()
    width = max(map(len, lines))
    out = [f"{line:<{width}}  {hours(est.seconds[s.id]) if s.id in est.seconds and s.inputs is None else ''}".rstrip()
           for line, s in zip(lines, steps)]
    by_command: dict[str, list[float]] = {}
    for s in steps:
        if s.id in est.seconds and s.inputs is None:
            by_command.setdefault(s.argv[0], []).append(est.seconds[s.id])
    # steps that share a GPU slow each other, which the schedule does not know: there the one-after-
    # another sum is the other bound
    about = hours(est.wall) if device.type == "cpu" or jobs == 1 else f"{hours(est.wall)} to {hours(est.serial)}"
    out += ["", f"{len(todo)} steps to run, {len(steps) - len(todo)} done: about {about} on this machine "
            f"({device.type}, {jobs} step{'s' if jobs > 1 else ''} at a time with {threads} CPU "
            f"thread{'s' if threads > 1 else ''} each" + (f", {len(lone)} that can only run alone with {cores}"
                                                          if lone else "")
            + (f"; {hours(est.serial)} one after another)." if device.type == "cpu" else
               f"; the first figure if steps sharing the {device.type.upper()} GPU did not slow each other, the "
               "second one after another).")]
    out += [f"  {cmd:<17}{len(v):>4} step{'s' if len(v) > 1 else ' '}  {hours(sum(v)):>9}"
            for cmd, v in sorted(by_command.items(), key=lambda kv: -sum(kv[1]))]
    m = est.memory
    if m is not None and m.free is not None and m.peaks:
        from xraygan.stepmemory import gib

        top = max(m.peaks, key=m.peaks.get)
        n = len(est.waited)
        out.append(f"Memory: the largest step, {top}, needs about {gib(m.peaks[top])} of the {gib(m.free)} free "
                   f"({m.source})" + (f"; {n} step{'s' if n > 1 else ''} will wait for memory rather than run "
                                      "beside another" if n else "") + ".")
    if est.units:  # (a study with only its tables left measures nothing)
        out += [f"Measured in {est.measuring:.0f} s from a step or two of each network"
                + (f"; a classifier is counted at --clf-epochs {cfg.clf_epochs} (early stopping after {cfg.patience} "
                   "without improvement often ends it sooner)."
                   if 0 < cfg.patience < cfg.clf_epochs and "train-classifier" in by_command
                   else ".")]
    return "\n".join(out) + "\n", est


def unequal_steps_note(cfg: StudyConfig, steps: list[Step], counts: dict[str, int]) -> str | None:
    """What an epoch of one pass over each row's own set means for the rows' optimizer steps, when
    their sets differ in size and --clf-equal-steps is off (None otherwise)."""
    if cfg.clf_equal_steps:
        return None
    from xraygan.rebalance import RebalanceConfig
    from xraygan.stepmemory import balanced_size

    n, times = sum(counts.values()), {}
    for s in steps:
        if isinstance(s.config, RebalanceConfig):  # "rebalance <row> seed <seed>"
            times.setdefault(s.id.split()[1], balanced_size(s.config.method, counts, s.config.ratio) / n)
    by: dict[float, list[str]] = {}
    for row, x in times.items():
        if round(x, 2) != 1:
            by.setdefault(round(x, 2), []).append(row)
    if not by:
        return None
    parts = "; ".join(f"{', '.join(rows)} {x:g}×" for x, rows in sorted(by.items(), reverse=True))
    return (f"at the same --clf-epochs the rows train these multiples of the baseline's optimizer steps: {parts} "
            "(an epoch is one pass over each row's own set); --clf-equal-steps trains every row the same steps")


def say_unequal_steps(cfg: StudyConfig, steps: list[Step], counts: dict[str, int],
                      say: Callable[[str], None] | None) -> None:
    note = unequal_steps_note(cfg, steps, counts)
    if note and say is not None:
        say(f"note: {note}")


def run_study(cfg: StudyConfig, say: Callable[[str], None] | None = None) -> dict:
    """Run what is not done yet, up to `jobs` steps at once. Returns a summary; raises
    TrainingError (exit 1) after the independent steps have run if any step failed."""
    cfg.validate()
    from xraygan.runtime import resolve_device

    device = resolve_device(cfg.device)  # here, not in every step: --print-commands may plan for another machine
    earlier = check_study_folder(cfg)
    steps, info = build_plan(cfg)
    done = {s.id for s in steps if s.inputs is None and s.done()}
    from xraygan.stepmemory import plan_data, plan_memory

    # every step's batch against the free memory before any folder is made or step started; the
    # executor starts no step beside others whose peaks leave it no room
    memory = plan_memory(steps, {s.id for s in steps} - done, plan_data(Path(cfg.data)), device)
    if cfg.clf_select == "f1" and say is not None:  # said before hours of training, not after
        from xraygan.classifier import TrainClassifierConfig, f1_selection_warning

        w = f1_selection_warning(class_counts(Path(cfg.data) / "val"), TrainClassifierConfig.positive,
                                 "--clf-select auc")
        if w:
            say(f"warning: {w}")
    say_unequal_steps(cfg, steps, info["counts"], say)
    cores = os.cpu_count() or 1
    jobs = cfg.jobs if cfg.jobs is not None else default_jobs(cores, _cuda(cfg.device))
    out = Path(cfg.out)
    make_dirs(out)
    (out / "logs").mkdir(exist_ok=True)
    record = {**record_header("study"), "settings": cfg.settings(), **info,
              "rows": list(dict.fromkeys([*(earlier or {}).get("rows", []), *cfg.rows])),
              "seeds": list(dict.fromkeys([*(earlier or {}).get("seeds", []), *cfg.seeds]))}
    atomic_write_json(out / RECORD, record)
    ex = _Executor(cfg, steps, jobs, cores, say or (lambda line: None), done, memory)
    ex.run()
    record["last_run"] = {"seconds": round(ex.wall, 1), "jobs": jobs, "threads": ex.threads,
                          "steps_run": ex.finished, "skipped": ex.skipped, "failed": [f for f, _ in ex.failed]}
    atomic_write_json(out / RECORD, record)
    res = {"out": str(out), "seconds": ex.wall, "jobs": jobs, "threads": ex.threads, "skipped": ex.skipped,
           "ran": ex.finished, "failed": [(f, str(log)) for f, log in ex.failed],
           "blocked": sorted(k for k, v in ex.state.items() if v == "blocked"),
           "tables": {t: str(out / t / "table.md") for t in ("table", "table-tuned")
                      if ex.state.get(f"compare {t}") == "done"}}
    if ex.failed:
        n = len(ex.failed)
        raise TrainingError(f"{n} step{'s' if n > 1 else ''} failed ({', '.join(f for f, _ in ex.failed[:3])}"
                            f"{' …' if n > 3 else ''}); logs in {out / 'logs'}, times in {out / 'times.csv'}; fix "
                            "the cause and rerun the same command to run what is left")
    return res


def _cuda(device: str) -> bool:
    if device not in ("auto", "cuda"):
        return False
    import torch

    return torch.cuda.is_available()


TIME_FIELDS = ["step", "status", "seconds", "jobs", "threads", "log", "command"]


class _Executor:
    """Runs a plan: `graphlib.TopologicalSorter` says which steps may start, `concurrent.futures`
    says which ended. Every step is a process of its own in its own session, forked from a server
    that imported torch and the commands once (xraygan/workers.py), and told once to stop on
    Ctrl-C (a training step saves first). A step's log starts with its shell command, and
    times.csv records it."""

    def __init__(self, cfg: StudyConfig, steps: list[Step], jobs: int, cores: int, say: Callable[[str], None],
                 done: set[str], memory):
        self.cfg, self.steps, self.jobs, self.cores, self.say = cfg, steps, jobs, cores, say
        self.memory = memory  # stepmemory.PlanMemory: each step's peak and the free memory
        self.out = Path(cfg.out)
        self.by = {s.id: s for s in steps}
        self.state: dict[str, str] = dict.fromkeys(done, "done")
        self.told_wait: set[str] = set()
        self.skipped = len(self.state)
        todo = {s.id for s in steps if s.id not in self.state}
        self.threads, self.lone = thread_plan(steps, todo, jobs, cores)
        self.times = _read_times(self.out / "times.csv")
        self.failed: list[tuple[str, Path]] = []
        self.running: dict[Future, tuple[Step, float, Path, list[str]]] = {}
        self.pids: dict[str, int] = {}  # the process of each running step
        self.finished = 0
        self.wall = 0.0
        say(f"study: {len(steps)} steps, {self.skipped} already done, {len(todo)} to run; {jobs} at a time, "
            f"{self.threads} CPU thread{'s' if self.threads > 1 else ''} each"
            + (f" ({len(self.lone)} that can only run alone: {cores})" if self.lone else ""))

    def threads_for(self, sid: str) -> int:
        return self.cores if sid in self.lone else self.threads

    def record_time(self, sid: str, status: str, seconds: float, log: Path | None, argv: list[str]) -> None:
        self.times.append({"step": sid, "status": status, "seconds": f"{seconds:.1f}", "jobs": self.jobs,
                           "threads": self.threads_for(sid), "log": str(log) if log else "",
                           "command": shlex.join([self.cfg.program, *argv])})
        write_csv(self.out / "times.csv", TIME_FIELDS, self.times)

    def run(self) -> None:
        from xraygan.workers import context

        t0 = time.perf_counter()
        ts = graphlib.TopologicalSorter({s.id: s.deps for s in self.steps})
        ts.prepare()
        order = {s.id: i for i, s in enumerate(self.steps)}
        waiting: list[Step] = []  # may start: waits for a free slot (or its exclusive group)
        self.ctx = context()
        restore = _stop_on_signals()
        with ThreadPoolExecutor(self.jobs) as self.waiter:  # a thread per running step, waiting for its end
            try:
                while ts.is_active():
                    waiting = sorted([*waiting, *(self.by[i] for i in ts.get_ready())], key=lambda s: order[s.id])
                    waiting = self._start(waiting, ts)
                    if not self.running:
                        continue  # what became ready was settled without running; ask again
                    ended, _ = wait(self.running, return_when=FIRST_COMPLETED)
                    for f in ended:
                        ts.done(self._ended(f))
            except KeyboardInterrupt:
                self._interrupted()
            finally:
                restore()
                self.wall = time.perf_counter() - t0

    def _start(self, waiting: list[Step], ts) -> list[Step]:
        """Start what can start, settle what needs no run; returns the steps still waiting."""
        left = []
        for s in waiting:
            verdict = "done" if self.state.get(s.id) == "done" else self._ready(s)
            if verdict in ("done", "blocked"):
                if verdict == "blocked":
                    self.state[s.id] = "blocked"
                    self.record_time(s.id, "blocked", 0.0, None, s.command())
                    if s.inputs is None:  # (a table with no finished run to tabulate is only recorded)
                        self.say(f"skip   {s.id}: a step it needs failed")
                ts.done(s.id)
            elif verdict == "wait" or len(self.running) >= self.jobs:
                left.append(s)
            elif not self.memory.fits([st.id for st, *_ in self.running.values()], s.id):
                left.append(s)
                self._say_waiting(s)
            else:
                self._launch(s)
        return left

    def _say_waiting(self, s: Step) -> None:
        """Said once per step: it waits for running steps to end, not to run beside them."""
        if s.id in self.told_wait:
            return
        self.told_wait.add(s.id)
        from xraygan.stepmemory import gib

        m = self.memory
        names = [st.id for st, *_ in self.running.values()]
        held = sum(m.peaks.get(n, 0) for n in names)
        self.say(f"wait   {s.id}: needs about {gib(m.peaks[s.id])} of memory and {', '.join(names)} "
                 f"{'holds' if len(names) == 1 else 'hold'} about {gib(held)} of the {gib(m.free)} free "
                 f"({m.source}); it starts when memory is freed")

    def _ready(self, s: Step) -> str:
        """run, wait (its exclusive group is busy) or blocked (a step it needs failed); the table
        runs once every run has ended, on the runs that finished."""
        if s.inputs is not None:
            return "run" if any(p.name == "metrics.json" for p in self._finished_inputs(s)) else "blocked"
        if any(self.state.get(d) in ("failed", "blocked") for d in s.deps):
            return "blocked"
        if s.exclusive and any(st.exclusive == s.exclusive for st, *_ in self.running.values()):
            return "wait"
        return "run"

    def _finished_inputs(self, s: Step) -> list[Path]:
        """The table's inputs from the runs that finished."""
        return [p for sid, p in s.inputs if self.state.get(sid) == "done" and p.is_file()]

    def _launch(self, s: Step) -> None:
        argv = s.command()
        if s.inputs is not None:  # the table: only the runs that finished
            from xraygan.contract import to_argv

            argv = ["compare", *to_argv("compare", replace(s.config, inputs=tuple(self._finished_inputs(s))))]
        log = self.out / "logs" / f"{_slug(s.id)}.log"
        log.write_text(f"$ {shlex.join([self.cfg.program, *argv])}\n")
        self.running[self.waiter.submit(self._process, s.id, argv, log, self.threads_for(s.id))] = \
            (s, time.perf_counter(), log, argv)
        self.state[s.id] = "running"
        self.say(f"start  {s.id}")

    def _process(self, sid: str, argv: list[str], log: Path, threads: int) -> int:
        """Run one step in its own process and session; its exit code."""
        if self.ctx is not None:
            from xraygan.workers import step_main

            p = self.ctx.Process(target=step_main, args=(argv, str(log), threads, dict(os.environ), os.getcwd()))
            p.start()
            self.pids[sid] = p.pid
            p.join()
            return p.exitcode
        with open(log, "a") as f:  # no fork server here: a new Python
            q = subprocess.Popen([sys.executable, "-m", "xraygan", *argv], stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                                          PYTHONUNBUFFERED="1"))
            self.pids[sid] = q.pid
            return q.wait()

    def _ended(self, f: Future) -> str:
        s, t0, log, argv = self.running.pop(f)
        self.pids.pop(s.id, None)
        why = None  # what the step's own output cannot say, written where it is read (its log)
        try:
            rc = f.result()
        except Exception as e:  # noqa: BLE001 - the step's process could not be started
            rc, why = 1, f"the step's process did not run ({type(e).__name__}: {e})"
        secs = time.perf_counter() - t0
        self.finished += 1
        ok = rc == 0 and (s.inputs is not None or s.done())
        if isinstance(rc, int) and rc < 0:  # killed (the out-of-memory killer, kill -9)
            why = f"the step's process was ended by {_signal_name(-rc)}"
        elif rc == 0 and not ok:  # it said it finished, but its record does not
            why = "the step exited 0 but its output does not record it as finished"
        if why:
            with open(log, "a") as fh:
                fh.write(f"error: {why}\n")
        self.state[s.id] = "done" if ok else "failed"
        self.record_time(s.id, self.state[s.id], secs, log, argv)
        if ok:
            n_done = sum(v == "done" for v in self.state.values())
            self.say(f"done   {s.id} ({secs:.1f} s) [{n_done}/{len(self.steps)}]")
        else:
            self.failed.append((s.id, log))
            self.say(f"FAILED {s.id} (exit {rc}): {_in_study_terms(s.argv[0], _last_line(log))} — log: {log}")
        return s.id

    def _interrupted(self) -> None:
        """Ctrl-C or SIGTERM: every running step is told once to stop (a training step saves
        first), given until the deadline, then ended."""
        for pid in list(self.pids.values()):
            _signal(pid, signal.SIGINT)
        deadline = time.monotonic() + 120
        for f, (s, t0, log, argv) in self.running.items():
            try:
                f.result(timeout=max(1.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - past the deadline: ended
                _signal(self.pids.get(s.id), signal.SIGKILL)
            self.record_time(s.id, "interrupted", time.perf_counter() - t0, log, argv)
        raise Interrupted(f"interrupted; finished steps are kept: rerun the same xraygan study command to "
                          f"continue ({self.out})") from None


def _signal_name(sig: int) -> str:
    try:
        return f"{signal.Signals(sig).name} (signal {sig})"
    except ValueError:
        return f"signal {sig}"


def _signal(pid: int | None, sig: int) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _read_times(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _stop_on_signals() -> Callable[[], None]:
    """Ctrl-C and SIGTERM (a scheduler's or `timeout`'s stop) end the study: the steps running in
    their own sessions are told to stop and save, rather than left running alone. SIGINT is
    handled explicitly too, since a study started in the background of a script inherits SIGINT
    ignored and would otherwise never stop on it."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    return restore


def _in_study_terms(command: str, line: str) -> str:
    """A step's memory refusal (`memory.check_batch`: "... give --batch-size 12 or less") in the
    study's options (`stepmemory.STUDY_FLAGS`; the study checks every batch before it starts, so a
    step refuses only when memory was taken while it ran); any other line as it is."""
    from xraygan.stepmemory import STUDY_FLAGS

    if " needs about " not in line or command not in STUDY_FLAGS:
        return line
    for theirs, ours in zip(("--batch-size", "--accumulate"), STUDY_FLAGS[command]):
        if ours is None:  # no study option sets it: the alternative is not offered
            line = re.sub(rf", or {theirs} \d+ or less", "", line)
        elif ours:
            line = line.replace(f"give {theirs} ", f"give {ours} ").replace(f"or {theirs} ", f"or {ours} ")
    return line


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""
