"""`xraygan study --estimate`: how long the steps not done yet would take on this machine.

Nothing is assumed about the machine. Each network the plan trains or runs is timed now, at the
data's image size, on the study's device, with the CPU threads its steps will get (cores/jobs):
a train-gan step at the study's batch, a train-diffusion step, a classifier training step
(augmentation and all), an inference batch, a Grad-CAM batch, the sampler, a PNG decoded and
encoded, and the pixel products of the audit's near-copy search. The real trainers' own step
code runs on random images, so what the commands do per step is what is timed. A step's
estimate is its work in those units (steps × a step, epochs × images × an image, ...); the
study's total replays the executor: steps in plan order, `jobs` at once, each once the steps it
needs have ended, an exclusive group one at a time.

Not counted: what is small beside these everywhere it was compared (starting a step from the
fork server, checkpoint writes, sample grids, the tables) and early stopping: a classifier
is counted at all --clf-epochs, the longest it can take. `benchmarks/bench_estimate.py` sets
the estimate beside the times.csv of finished studies.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from xraygan.errors import InputError, TrainingError
from xraygan.memory import diffusion_footprint, generator_footprint
from xraygan.stepmemory import PlanMemory, balanced_size

MEASURE_SECONDS = 1.0  # time repeated calls until this much has passed (at least one call)
MAX_CALLS = 20
WARMUP_ENOUGH = 120.0  # a warm-up call this long is the measurement itself


def timed(fn: Callable[[], object], device: torch.device, warmup: int = 1) -> float:
    """Seconds per call of `fn`: after `warmup` calls (the first call of a network chooses its
    kernels and takes its memory: at 128 px on two cores a diffusion step's first call took 34 s
    and the next six 19-21 s; a DCGAN step's 1.25x the next), calls until MEASURE_SECONDS have
    passed. A warm-up call longer than WARMUP_ENOUGH is taken as the measurement (an over-
    estimate), so a network whose step takes minutes is not run twice."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if time.perf_counter() - t0 > WARMUP_ENOUGH:
            return time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        _sync(device)
        n += 1
        spent = time.perf_counter() - t0
        if spent >= MEASURE_SECONDS or n >= MAX_CALLS:
            return spent / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


# --- what one unit of each kind of work costs --------------------------------------------------


def gan_step(cfg, size: int, classes: tuple[str, ...], n_images: int, device: torch.device) -> float:
    """One train-gan step (D and G updates) of `cfg` at `size` px, as `train-gan` builds it."""
    from xraygan.gan import GanTrainer, fake_label_probs, net_config, resolve_diffaugment
    from xraygan.trainset import to_model_input

    cfg = replace(cfg, diffaugment=resolve_diffaugment(cfg.diffaugment, n_images))
    probs = fake_label_probs(classes, cfg.healthy, cfg.alpha_value) if cfg.conditional else None
    net = net_config(cfg, size, len(classes))  # (its batch was checked with the plan's: stepmemory)
    tr = GanTrainer(cfg, net, device, probs, cuda_graphs=cfg.cuda_graphs)
    x = to_model_input(_images(cfg.batch_size, size), device, cfg.channels_last and device.type != "mps")
    idx = torch.arange(cfg.batch_size, device=device)
    y = (torch.arange(cfg.batch_size, device=device) % len(classes)) if cfg.conditional else None
    # on CUDA the step is captured as a graph after GRAPH_WARMUP eager steps: time the replays
    return timed(lambda: tr.step(x[idx], y), device, warmup=tr.GRAPH_WARMUP + 1 if tr.use_graphs else 1)


def diffusion_step(cfg, size: int, n_classes: int, device: torch.device) -> float:
    """One train-diffusion step of `cfg` at `size` px: its own step function on random images."""
    from xraygan.diffusion import _family, _Model, net_config
    from xraygan.steploop import Position
    from xraygan.trainset import to_model_input

    _keep_freed(device)  # as train-diffusion does
    net = net_config(cfg, size, n_classes)
    torch.manual_seed(cfg.seed)
    m = _Model(cfg, net, device)
    x_all = to_model_input(_images(cfg.batch_size, size), device, False)
    y_all = (torch.arange(cfg.batch_size) % max(1, n_classes)).to(device)
    with tempfile.TemporaryDirectory() as run:
        fam = _family(cfg, m, x_all, y_all, {}, Path(run))
        pos = Position(perm=torch.arange(cfg.batch_size))
        return timed(lambda: fam.step(pos), device)


def diffusion_images(cfg, gen, size: int, n_classes: int, device: torch.device) -> float:
    """Seconds per image `generate` takes from a diffusion model of `cfg` with the sampling of
    `gen`: two sampler steps of a batch timed, scaled to its sampling steps."""
    from xraygan.diffusion import build_unet, net_config, sample
    from xraygan.generate import sampling_batch

    _keep_freed(device)  # as generate does for a diffusion model
    net = net_config(cfg, size, n_classes)
    unet = build_unet(net).to(device).eval()
    steps = gen.sampling_steps if gen.sampler == "ddim" else net.timesteps
    batch = sampling_batch(gen, "diffusion", diffusion_footprint(net), device)[0]
    noise = torch.randn(batch, 1, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if net.num_classes else None
    guidance = gen.guidance if net.num_classes else 0.0
    per_batch = timed(lambda: sample(unet, net, noise, labels, "ddim", 2, guidance), device) / 2 * steps
    return per_batch / batch


def gan_images(checkpoint_cfg, size: int, n_classes: int, gen, device: torch.device) -> float:
    """Seconds per image `generate` takes from a generator of `checkpoint_cfg` (its forward pass)."""
    from xraygan.gan import net_config
    from xraygan.gan_models import Generator
    from xraygan.generate import sampling_batch

    c = checkpoint_cfg
    net = net_config(c, size, n_classes)
    G = Generator(net).to(device).eval()
    batch = sampling_batch(gen, "gan", generator_footprint(net), device)[0]
    z = torch.randn(batch, c.nz, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if c.conditional else None

    @torch.no_grad()
    def run():
        return G(z, labels)

    return timed(run, device) / batch


def classifier_rates(cfg, size: int, n_classes: int, device: torch.device) -> tuple[float, float, float]:
    """(training, inference, Grad-CAM) seconds per image of the classifier `cfg` builds at `size`
    px: one step of `train-classifier`'s own step code at its batch (augmentation included),
    an inference batch as `evaluate` runs it, and a batch of `gradcam` on the layer it explains."""
    from xraygan.classifier import (
        _epoch_steps,
        _Loop,
        augment_params,
        build_resnet18,
        net_config,
        predict_proba,
    )
    from xraygan.distributed import Dist
    from xraygan.gradcam import GradCam, GradcamConfig, resolve_layer
    from xraygan.runtime import autocast_dtype

    net = net_config(cfg, size, n_classes)
    torch.manual_seed(0)
    model = build_resnet18(net).to(device)
    cl = cfg.channels_last and device.type != "mps"
    if cl:
        model.to(memory_format=torch.channels_last)
    b = cfg.batch_size
    x_all = torch.from_numpy(_images(b, size)).to(device)
    y_all = (torch.arange(b) % n_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loop = _Loop(cfg, Dist(), device, model, opt, torch.nn.CrossEntropyLoss(), x_all, y_all,
                 autocast_dtype(device, cfg.precision), cl, None, steps=1)
    perm = torch.arange(b, device=device)
    warp = augment_params(b, torch.Generator().manual_seed(0)).to(device) if cfg.augment else None
    model.train()
    train = timed(lambda: _epoch_steps(loop, perm, warp, lambda *a: None), device) / b
    model.eval()
    images = _images(64, size, 1)
    infer = timed(lambda: predict_proba(model, images, device, batch_size=len(images), channels_last=cl),
                  device) / len(images)
    _, layer, _ = resolve_layer(model, "auto", size, device)
    cb = GradcamConfig.batch_size
    xc = torch.randn(cb, 1, size, size, device=device)
    with GradCam(model, layer) as gc:
        cam = timed(lambda: gc(xc), device) / cb
    return train, infer, cam


def png_rates(sample: tuple[Path, ...]) -> tuple[float, float]:
    """(decode, encode) seconds per image, on a few training images (`stepmemory.PlanData.sample`)."""
    from xraygan.images import encode_png

    if not sample:
        return 0.0, 0.0
    t0 = time.perf_counter()
    arrays = [_read(f) for f in sample]
    dec = (time.perf_counter() - t0) / len(sample)
    t0 = time.perf_counter()
    for a in arrays:
        encode_png(a)
    return dec, (time.perf_counter() - t0) / len(sample)


def _read(f: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(f) as im:
        return np.asarray(im.convert("L"))


def product_rate(size: int, device: torch.device) -> float:
    """Seconds per (pair of images) of a correlation between two sets of `size`² pixels, as the
    audit's near-copy search computes them (a matrix product)."""
    d = size * size
    a, b = torch.randn(256, d, device=device), torch.randn(d, 256, device=device)
    return timed(lambda: a @ b, device) / (256 * 256)


# --- each measurement in a process of its own ----------------------------------------------------


class Apart:
    """Runs each measurement in a process of its own, forked from a server that imported torch
    once (xraygan/workers.py), as the study runs each step: its memory is its own (the next
    measurement's memory check sees what a step would see, not what the last network left in
    this process's heap), and so are its thread count and allocator setting. Where there is no
    fork server, or with `separate=False`, it runs them in this process."""

    def __init__(self, separate: bool = True):
        from xraygan.workers import context

        self.ctx = context() if separate else None

    def __call__(self, fn: Callable, args: tuple, threads: int, what: str):
        if self.ctx is None:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return fn(*args)
            finally:
                torch.set_num_threads(before)
        receive, send = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=_measure, args=(send, threads, fn, args))
        try:
            p.start()  # (waits for the fork server, which imports torch first: Ctrl-C may come here)
            send.close()
            kind, value = receive.recv()
        except EOFError:  # it ended without a word: killed (the out-of-memory killer) or crashed
            p.join()
            raise TrainingError(f"measuring {what}: its process ended with exit code {p.exitcode}") from None
        except BaseException:  # Ctrl-C or SIGTERM: the measurement is ended before the study says so
            if p.pid is not None:
                p.terminate()
                p.join()
            raise
        p.join()
        if kind == "input":
            raise InputError(value)
        if kind == "error":
            raise TrainingError(f"measuring {what}: {value}")
        return value


def _measure(send, threads: int, fn: Callable, args: tuple) -> None:
    """A measurement's process: `threads` CPU threads, the result (or the error) sent back. It
    ignores Ctrl-C, which reaches the whole process group: the study process ends it and says so
    in one line."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with_parent()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        answer = ("ok", fn(*args))
    except InputError as e:
        answer = ("input", str(e))
    except Exception as e:  # noqa: BLE001 - reported by the study process, which ends with it
        answer = ("error", f"{type(e).__name__}: {e}")
    try:
        send.send(answer)
    except OSError:  # the study process is gone (stopped while this was being started): no one to tell
        pass
    finally:
        send.close()


def _end_with_parent() -> None:
    """Linux: end this process when its parent, the fork server, ends, which it does with the
    study process: a measurement started just as the study was stopped is not left running."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


# --- the plan's steps in those units ------------------------------------------------------------


@dataclass
class Estimate:
    """Seconds per step not done (by step id), the wall time of running them as the study would,
    and the measured units they came from (for the record and the notes)."""
    seconds: dict[str, float]
    wall: float
    serial: float
    units: dict[str, float] = field(default_factory=dict)
    measuring: float = 0.0
    memory: PlanMemory | None = None
    waited: set[str] = field(default_factory=set)  # steps that waited for memory, not a slot


def estimate(steps: list, todo: set[str], data: Path, jobs: int, threads: Callable[[str], int],
             device: torch.device, say: Callable[[str], None] = lambda line: None, separate: bool = True) -> Estimate:
    """Measure the units the steps of `todo` need (each once per thread count, each in a process
    of its own unless `separate` is False), and price every step of `todo`; `threads(step id)`
    is the CPU threads the study gives that step."""
    from xraygan.audit import AuditConfig
    from xraygan.classifier import TrainClassifierConfig, net_config
    from xraygan.diffusion import TrainDiffusionConfig
    from xraygan.gan import TrainGanConfig
    from xraygan.generate import GenerateConfig
    from xraygan.rebalance import RebalanceConfig
    from xraygan.stepmemory import plan_data, plan_memory

    t_start = time.perf_counter()
    pd = plan_data(data)
    # a batch a step's command would refuse is refused now, in the study's options; and the
    # schedule waits for memory where the executor would
    memory = plan_memory(steps, todo, pd, device)
    size, classes, train_counts, n_train, minority = pd.size, pd.classes, pd.train, pd.n_train, pd.minority
    split = {"val": pd.val, "test": pd.test}
    by = {s.id: s for s in steps}
    units: dict[str, float] = {}
    measured: dict[tuple, object] = {}

    def unit(key: tuple, what: str, fn: Callable, *args):
        """fn(*args), measured once per key and thread count, in a process of its own."""
        key = (*key, n_threads)  # the same network on more threads is another measurement
        if key not in measured:
            say(f"measuring {what} at {size} px on {device.type}"
                + (f" ({n_threads} thread{'s' if n_threads > 1 else ''})" if device.type == "cpu" else ""))
            measured[key] = apart(fn, args, n_threads, what)
        return measured[key]

    def dep(s, kind):  # the config of the step `s` needs that is a `kind`
        return next((by[d].config for d in s.deps if isinstance(by[d].config, kind)), None)

    def clf(c) -> tuple[float, float, float]:  # the classifier `c` builds, timed once per stem
        stem = net_config(c, size, len(classes)).small_stem
        t = unit(("classifier", stem), f"a ResNet-18 ({'small' if stem else 'standard'} stem)",
                 classifier_rates, c, size, len(classes), device)
        units["classifier_train_image_s"], units["classifier_infer_image_s"], units["gradcam_image_s"] = t
        return t

    default_clf = TrainClassifierConfig(data=data, val=data, out=data)
    audited: list[str] = []

    def price(s) -> float:
        """Step `s`'s seconds: its work in the units, measured when first needed."""
        nonlocal n_threads
        c, n_threads = s.config, threads(s.id)
        if isinstance(c, (TrainGanConfig, TrainDiffusionConfig)):
            used = pd.generator_images(c)
            left = c.steps - _done(c.out, c.steps, "step")
            if isinstance(c, TrainGanConfig):
                t = unit(("gan", c.conditional), f"a {'c' if c.conditional else ''}DCGAN step (batch {c.batch_size})",
                         gan_step, c, size, classes, used, device)
                units[f"{'c' if c.conditional else ''}dcgan_step_s"] = t
            else:
                t = unit(("diffusion", c.conditional), f"a {'conditional ' if c.conditional else ''}diffusion "
                         f"step (batch {c.batch_size})", diffusion_step, c, size, len(classes), device)
                units[f"{'c' if c.conditional else ''}ddpm_step_s"] = t
            return left * t + used * dec
        if isinstance(c, GenerateConfig):
            tc = dep(s, (TrainGanConfig, TrainDiffusionConfig))
            if isinstance(tc, TrainDiffusionConfig):
                t = unit(("sample", tc.conditional), f"diffusion sampling ({c.sampling_steps} steps)",
                         diffusion_images, tc, c, size, len(classes), device)
                units[f"{'c' if tc.conditional else ''}ddpm_image_s"] = t
            else:
                tc = tc or TrainGanConfig(data=data, out=data)
                t = unit(("generator", tc.conditional), "a generator",
                         gan_images, tc, size, len(classes), c, device)
                units["generator_image_s"] = t
            return c.n * (t + enc)
        if isinstance(c, RebalanceConfig):  # links files; smote and augment make and write images
            made = balanced_size(c.method, train_counts, c.ratio) - n_train
            return made * (dec + enc) if c.method in ("smote", "augment") and made > 0 else 0.0
        if isinstance(c, TrainClassifierConfig):
            tr, inf, _ = clf(c)
            reb = dep(s, RebalanceConfig)
            n = pd.classifier_images(reb)  # decoded once; an epoch trains on --epoch-images of them
            left = c.epochs - _done(c.out, c.epochs, "epoch")
            return (n + split["val"]) * dec + left * ((c.epoch_images or n) * tr + split["val"] * inf)
        if isinstance(c, AuditConfig):
            tr, inf, _ = clf(replace(default_clf, small_stem="no"))  # its feature classifier
            pair = unit(("pairs",), "the near-copy search", product_rate, size, device)
            units["pixel_pair_s"] = pair
            gen = dep(s, GenerateConfig)
            n_syn, n_min = (gen.n if gen else 0), train_counts[minority]
            t = (n_train + n_syn) * (dec + inf) + (n_syn * n_min + n_min * n_min) * pair
            cache = Path(c.cache) if c.cache else None
            if not audited and not (cache and any(cache.glob("audit-classifier-*/classifier.safetensors"))):
                t += 3 * n_train * (tr + inf)  # the first audit trains the feature classifier: 3 epochs
            audited.append(s.id)
            return t
        if s.id.startswith(("evaluate", "gradcam")):
            _, inf, cam = clf(dep(s, TrainClassifierConfig) or default_clf)
            if s.id.startswith("evaluate"):
                return (split["test"] + (split["val"] if c.tune_on else 0)) * (dec + inf)
            return split["test"] * (dec + cam)
        return 0.0  # the tables: reading a few records

    seconds: dict[str, float] = {}
    n_threads = 1
    apart = Apart(separate)
    dec = enc = 0.0
    if any(s.inputs is None for s in steps if s.id in todo):  # (not for the tables alone)
        say("measuring reading and writing PNGs")
        dec, enc = png_rates(pd.sample)
        units["png_decode_s"], units["png_encode_s"] = dec, enc
    for s in (s for s in steps if s.id in todo):
        seconds[s.id] = price(s)
    waited: set[str] = set()
    wall = schedule(steps, todo, seconds, jobs, memory, waited)
    return Estimate(seconds, wall, sum(seconds.values()), units, time.perf_counter() - t_start, memory, waited)


def _keep_freed(device: torch.device) -> None:
    if device.type == "cpu":
        from xraygan.allocator import keep_freed_memory

        keep_freed_memory()


def _done(run, total: int, key: str) -> int:
    """Steps or epochs an interrupted run in `run` has done (its state's metadata), 0 if none."""
    from xraygan.checkpoint import metadata_or_none

    m = metadata_or_none(Path(run) / "state.safetensors")
    return min(total, int(m.get(key, 0))) if m else 0


def schedule(steps: list, todo: set[str], seconds: dict[str, float], jobs: int,
             memory: PlanMemory | None = None, waited: set[str] | None = None) -> float:
    """The wall time of running `todo` as the study's executor does: in plan order, up to `jobs`
    at once, each once the steps it needs have ended, one step of an exclusive group at a time,
    and (with `memory`) none beside running steps whose peaks leave it no room; those are added
    to `waited`."""
    by = {s.id: s for s in steps}
    waiting = [s for s in steps if s.id in todo]
    ended = {s.id for s in steps if s.id not in todo}
    running: list[tuple[float, int, str]] = []  # (end time, start order, step)
    now, started = 0.0, 0
    while waiting or running:
        busy = {by[i].exclusive for _, _, i in running if by[i].exclusive}
        for s in list(waiting):
            if len(running) >= jobs:
                break
            if all(d in ended for d in s.deps) and not (s.exclusive and s.exclusive in busy):
                if memory is not None and not memory.fits([i for _, _, i in running], s.id):
                    if waited is not None:
                        waited.add(s.id)
                    continue
                running.append((now + seconds.get(s.id, 0.0), started, s.id))
                started += 1
                waiting.remove(s)
                if s.exclusive:
                    busy.add(s.exclusive)
        if not running:
            break  # what is left waits for a step outside the plan
        running.sort()
        now, _, sid = running.pop(0)
        ended.add(sid)
    return now


def hours(seconds: float) -> str:
    """A duration as a person reads it: < 1 s, 45 s, 12 min, 3.4 h, 2.1 days."""
    if seconds < 0.5:
        return "< 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
