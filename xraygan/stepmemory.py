"""What each step of a study holds in memory at its peak, by the estimate each command checks its
own batch with (xraygan/memory.py), so that the study

- refuses a batch that can never fit before any step runs, in one line that names the step and
  the study's option that sets the batch (`--gan-batch`, `--diffusion-batch`, `--clf-accumulate`),
  not hours later in a step's log in the words of the step's own command;
- never starts steps together whose peaks add up to more than the device had free when the study
  began: a step then waits for memory as it waits for a free slot. Each step checks its batch at
  its own start, but two steps that start together both see the memory neither has taken yet:
  two 128 px diffusion models at batch 64 in fp32 each pass on a 24 GiB machine, and started
  together the out-of-memory killer ended one (`benchmarks/bench_study_memory.py`).

The refusal is each command's own rule (its batch's estimated peak, `memory.training_bytes`,
within HEADROOM of the free memory). What runs together is decided on a closer count of what a
step holds: its activations (in bf16 on a CPU, a GAN's and a diffusion model's at
`memory.BF16_CPU_RATIO`; without backward, scoring and sampling, at `memory.INFERENCE_SHARE`),
its weights and optimizer state, its process (`memory.PROCESS_BYTES`) and the images it holds
decoded (one byte a pixel, up to the size above which a set is memory-mapped instead). Commands
that fit their batch to the free memory are counted at the batch they would take from what the
study found free. Only the study's device is counted: on a GPU, its memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xraygan.errors import InputError
from xraygan.images import MEMMAP_OVER
from xraygan.memory import (
    BF16_CPU_RATIO,
    HEADROOM,
    INFERENCE_SHARE,
    PROCESS_BYTES,
    classifier_footprint,
    diffusion_footprint,
    free_bytes,
    gan_footprint,
    generator_footprint,
    largest_batch,
    refusal,
    training_bytes,
)

# The options that set each trainer's batch and micro-batches in a study, as `memory.check_batch`
# takes them (the commands' own are ("--batch-size", "--accumulate"); None: the study sets none)
STUDY_FLAGS = {"train-gan": ("--gan-batch", ""), "train-diffusion": ("--diffusion-batch", ""),
               "train-classifier": (None, "--clf-accumulate")}
SAMPLE = 16  # training images kept by name: the estimate times reading and writing PNGs on them


@dataclass(frozen=True)
class PlanData:
    """What the plan's needs and times depend on in the prepared data: the image side, the class
    names and the training images per class, the images in val/ and test/, and the first
    SAMPLE training images (the folder is listed once)."""
    size: int
    classes: tuple[str, ...]
    train: dict[str, int]
    val: int
    test: int
    sample: tuple[Path, ...] = ()

    @property
    def n_train(self) -> int:
        return sum(self.train.values())

    @property
    def minority(self) -> str:
        return min(self.train, key=lambda c: (self.train[c], c))

    def generator_images(self, c) -> int:
        """The training images a train-gan or train-diffusion config `c` trains on."""
        return self.n_train if c.conditional else self.train.get(c.cls or self.minority, 0)

    def classifier_images(self, reb) -> int:
        """The images a classifier trains on: rebalance `reb`'s output, or the training set."""
        return balanced_size(reb.method, self.train, reb.ratio) if reb else self.n_train


def plan_data(data: Path) -> PlanData:
    from xraygan.images import image_side, list_image_folder
    from xraygan.study import class_counts

    listing = list_image_folder(data / "train")
    sample = tuple(itertools.islice((f for fs in listing.values() for f in fs), SAMPLE))
    size = image_side(sample[0])  # prepare made them all one size
    return PlanData(size, tuple(listing), {c: len(f) for c, f in listing.items()},
                    sum(class_counts(data / "val").values()), sum(class_counts(data / "test").values()), sample)


def balanced_size(method: str, counts: dict[str, int], ratio: float) -> int:
    """Images in `rebalance`'s output for `method` (the rule rebalance applies)."""
    if method == "none":
        return sum(counts.values())
    top, low = max(counts.values()), min(counts.values())
    if method == "undersample":
        return sum(min(n, int(round(low / ratio))) for n in counts.values())
    return sum(max(n, int(round(ratio * top))) for n in counts.values())


@dataclass(frozen=True)
class Need:
    """One step's peak: `batch` images a pass of a network with `elements` activation elements an
    image and `parameters` weights, plus `images` held decoded. `adapts`: the command takes a
    smaller batch where memory is short. `accumulate` and `flags` as `memory.check_batch` takes
    them (the study's options)."""
    family: str
    elements: int
    parameters: int
    batch: int
    images: int = 0
    adapts: bool = False
    accumulate: tuple[int, int] | None = None
    flags: tuple[str | None, str] = (None, "")
    scale: float = 1.0  # of the activations' bytes: BF16_CPU_RATIO where the step computes in bf16 on a CPU
    inference: bool = False  # no backward (scoring, sampling): INFERENCE_SHARE of a training step's activations

    def bytes(self, size: int, free: int | None) -> int:
        """What the step holds at its peak, its process included, for deciding what runs
        together (the refusal is `check_needs`'s, by the command's own rule)."""
        b = self.batch
        if self.adapts and free is not None and self.elements:
            b = max(1, min(b, largest_batch(self.family, self.elements, self.parameters, free)))
        activations = training_bytes(self.family, self.elements, b, 0) * self.scale
        if self.inference:
            activations *= INFERENCE_SHARE
        return int(activations) + 16 * self.parameters + PROCESS_BYTES + self.held(size)

    def rule(self, size: int) -> int:
        """What the command's own check at its start asks to be free (it reads its images first),
        0 for a batch the command fits to the memory instead."""
        if self.adapts:
            return 0
        return training_bytes(self.family, self.elements, self.batch, self.parameters) + self.held(size)

    def held(self, size: int) -> int:
        """The decoded images' bytes in the process: above MEMMAP_OVER a set is decoded into a
        memory-mapped file instead (the page cache holds it, which the kernel can reclaim)."""
        n = self.images * size * size
        return n if n <= MEMMAP_OVER else 0


def step_needs(steps: list, todo: set[str], pd: PlanData, device: torch.device) -> dict[str, list[Need]]:
    """The needs of each step of `todo` whose command holds a network (a step's largest counts)."""
    from xraygan import classifier, diffusion, gan
    from xraygan.audit import AuditConfig
    from xraygan.classifier import EVAL_BATCH, TrainClassifierConfig
    from xraygan.diffusion import TrainDiffusionConfig
    from xraygan.evaluate import EvaluateConfig
    from xraygan.gan import TrainGanConfig
    from xraygan.generate import GenerateConfig, wanted_batch
    from xraygan.gradcam import GradcamConfig
    from xraygan.rebalance import RebalanceConfig
    from xraygan.runtime import autocast_dtype

    by = {s.id: s for s in steps}
    n = len(pd.classes)
    counted: dict[tuple, tuple[int, int]] = {}

    def once(fn, *net) -> tuple[int, int]:  # a footprint per network, not per step (a plan has ~100 classifiers)
        if (fn, *net) not in counted:
            counted[(fn, *net)] = fn(*net)
        return counted[(fn, *net)]

    def dep(s, kind):
        return next((by[d].config for d in s.deps if d in by and isinstance(by[d].config, kind)), None)

    def scoring(c: TrainClassifierConfig, batch: int, images: int, inference: bool = True) -> Need:
        return Need("classifier", *once(classifier_footprint, classifier.net_config(c, pd.size, n)), batch, images,
                    adapts=True, inference=inference)

    default_clf = TrainClassifierConfig(data=Path("."), val=Path("."), out=Path("."))
    needs: dict[str, list[Need]] = {}
    for s in (s for s in steps if s.id in todo):
        c = s.config
        if isinstance(c, (TrainGanConfig, TrainDiffusionConfig)):
            used = pd.generator_images(c)
            family = "gan" if isinstance(c, TrainGanConfig) else "diffusion"
            scale = BF16_CPU_RATIO[family] if device.type == "cpu" and autocast_dtype(device, c.precision) else 1.0
            if family == "gan":
                fp = once(gan_footprint, gan.net_config(c, pd.size, n), c.r1 > 0)
                needs[s.id] = [Need("gan", *fp, c.batch_size, used, flags=STUDY_FLAGS["train-gan"], scale=scale)]
            else:
                fp = once(diffusion_footprint, diffusion.net_config(c, pd.size, n))
                needs[s.id] = [Need("diffusion", *fp, c.batch_size, used, flags=STUDY_FLAGS["train-diffusion"],
                                    scale=scale)]
        elif isinstance(c, TrainClassifierConfig):
            reb = dep(s, RebalanceConfig)
            held = pd.classifier_images(reb) + pd.val
            fp = once(classifier_footprint, classifier.net_config(c, pd.size, n))
            micro = -(-c.batch_size // c.accumulate)
            needs[s.id] = [Need("classifier", *fp, micro, held, accumulate=(c.accumulate, c.batch_size),
                                flags=STUDY_FLAGS["train-classifier"])]
            if c.accumulate == 1:  # validation scores in batches fit to the free memory
                needs[s.id].append(Need("classifier", *fp, EVAL_BATCH, held, adapts=True, inference=True))
        elif isinstance(c, GenerateConfig):
            tc = dep(s, (TrainGanConfig, TrainDiffusionConfig))
            if isinstance(tc, TrainDiffusionConfig):
                family, fp = "diffusion", once(diffusion_footprint, diffusion.net_config(tc, pd.size, n))
            else:
                family = "gan"
                gc = tc or TrainGanConfig(data=Path("."), out=Path("."))
                fp = once(generator_footprint, gan.net_config(gc, pd.size, n))
            needs[s.id] = [Need(family, *fp, wanted_batch(c, family, device), adapts=True, inference=True)]
        elif isinstance(c, AuditConfig):  # its feature classifier (3 epochs), then scoring real and synthetic
            gen = dep(s, GenerateConfig)
            held = pd.n_train + (gen.n if gen else 0)
            fp = once(classifier_footprint, classifier.net_config(TrainClassifierConfig(
                data=Path("."), val=Path("."), out=Path("."), small_stem="no"), pd.size, n))
            needs[s.id] = [Need("classifier", *fp, default_clf.batch_size, held),
                           Need("classifier", *fp, c.batch_size, held, adapts=True, inference=True)]
        elif isinstance(c, EvaluateConfig):
            needs[s.id] = [scoring(dep(s, TrainClassifierConfig) or default_clf, c.batch_size, pd.test + pd.val)]
        elif isinstance(c, GradcamConfig):
            # Grad-CAM differentiates: its batch holds activations for backward
            needs[s.id] = [scoring(dep(s, TrainClassifierConfig) or default_clf, c.batch_size, pd.test, False)]
    return needs


def peak(needs: list[Need], size: int, free: int | None) -> int:
    return max((x.bytes(size, free) for x in needs), default=0)


def check_needs(needs: dict[str, list[Need]], pd: PlanData, free: int | None, source: str,
                device: torch.device) -> None:
    """Refuse, naming the step and the study's option, the first step whose batch cannot fit the
    free memory even alone."""
    if free is None:
        return
    for sid, ns in needs.items():
        for x in ns:
            if x.adapts:
                continue
            why = refusal(x.family, x.elements, x.parameters, x.batch, free, source, device, pd.size,
                          x.accumulate, x.flags, held=x.held(pd.size))
            if why:
                raise InputError(f"study step {sid}: {why}")


def device_free(device: torch.device) -> tuple[int | None, str]:
    """(the device's free bytes now, what they are), as `memory.free_bytes`. On a GPU it is asked
    in a process of its own (the fork server's): CUDA started in the study's process would hold
    memory all study long."""
    if device.type == "cuda":
        from xraygan.estimate import Apart

        return Apart()(free_bytes, (device,), 1, "the free GPU memory")
    return free_bytes(device)


def fits(held: Iterable[int], need: int, free: int | None, rule: int = 0) -> bool:
    """Whether a step needing `need` bytes may start beside running steps holding `held` of the
    `free` bytes the study found: always when nothing runs (alone it passed `check_needs`) or it
    holds no network (rebalance, the tables); else when together they stay within HEADROOM of
    it, the margin each command keeps, and the step's own check at its start (`rule` bytes, the
    command's upper bound) passes on what the running steps leave."""
    held = list(held)
    if free is None or not held or need == 0:
        return True
    return sum(held) + need <= HEADROOM * free and rule <= HEADROOM * (free - sum(held))


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass(frozen=True)
class PlanMemory:
    """The plan's memory: each step's peak (bytes, by step id) and the device's free bytes when
    the study began (None: the device does not say, and nothing waits for memory)."""
    peaks: dict[str, int]
    free: int | None
    source: str
    rules: dict[str, int] = field(default_factory=dict)  # what each step's own check asks for (0: it adapts)

    def fits(self, running: Iterable[str], sid: str) -> bool:
        return fits((self.peaks.get(r, 0) for r in running), self.peaks.get(sid, 0), self.free,
                    self.rules.get(sid, 0))


def plan_memory(steps: list, todo: set[str], pd: PlanData, device: torch.device) -> PlanMemory:
    """Every step of `todo` checked against the device's free memory now (one line naming the
    first that cannot fit, in the study's options), and each one's peak for the executor."""
    needs = step_needs(steps, todo, pd, device)
    free, source = device_free(device)
    check_needs(needs, pd, free, source, device)
    return PlanMemory({sid: peak(ns, pd.size, free) for sid, ns in needs.items()}, free, source,
                      {sid: max(x.rule(pd.size) for x in ns) for sid, ns in needs.items()})
