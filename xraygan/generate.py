"""`xraygan generate`: sample N images from a GAN generator or a diffusion checkpoint into
`OUT/<label>/`.

Needs only the checkpoint file. Images are made and written batch by batch, so memory does not
grow with N. Image i's noise (for a diffusion model, its x_T and its DDPM chain's stream) depends
only on the seed and i, so the same checkpoint and seed give the same files whatever the batch
size, and `--append` continues the sequence instead of repeating it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from xraygan import __version__
from xraygan.checkpoint import load_checkpoint
from xraygan.errors import InputError, check_choice, check_float, check_int
from xraygan.fsutil import (
    atomic_write_json,
    check_out_apart,
    continued_record,
    file_sha256,
    make_dirs,
    read_json,
    record_header,
)
from xraygan.gan_models import GanNetConfig, Generator
from xraygan.images import save_png
from xraygan.memory import diffusion_footprint, fitting_batch, generator_footprint
from xraygan.options import DEVICE_HELP, given_options, opt
from xraygan.runtime import DEVICES, make_generator, resolve_device
from xraygan.trainset import image_grid

# a diffusion U-Net's activations at batch 256 overflow the CPU caches: batches of 64 sample faster
# (benchmarks/bench_diffusion.py prints both)
DIFFUSION_CPU_BATCH = 64
NAME_RE = re.compile(r"^synthetic-(?P<run>.+)-(?P<idx>\d{6,})\.png$")


@dataclass(frozen=True)
class GenerateConfig:
    checkpoint: Path = opt(help="RUN/generator.safetensors (train-gan) or RUN/diffusion.safetensors "
                                "(train-diffusion)", argument=True)
    out: Path = opt(help="Output folder (images go in OUT/<label>/).", flags=("--out", "-o"))
    n: int = opt(help="How many images.", flags=("-n", "--count"))
    label: str | None = opt(None, "Conditional generators: the class to generate (default: the one recorded "
                                  "at training, the minority class).")
    seed: int = opt(0, "Same checkpoint + seed = same images.")
    batch_size: int | None = opt(None, "Images per batch (memory and speed only; the images are the same). "
                                       "Default: 256; a diffusion model on the CPU 64, which samples faster "
                                       "there.", show_default=False)
    device: str = opt("auto", DEVICE_HELP)
    preview: bool = opt(False, "Also write OUT/preview.png of the first 64.")
    append: bool = opt(False, "Add to existing synthetic images, numbering on.")
    force: bool = opt(False, "Replace existing synthetic images.")
    sampler: str = opt("ddim", "Diffusion models: ddim (deterministic given the seed, --sampling-steps) or "
                               "ddpm (the full stochastic chain, one step per training timestep).")
    sampling_steps: int = opt(50, "Diffusion models: DDIM steps.")
    # at 32 px w = 1 drew caricatures of pneumonia (classifier-space FD 525 vs 13; docs/RESULTS.md)
    guidance: float = opt(0.0, "Conditional diffusion models: classifier-free guidance weight w "
                               "((1+w)·ε(x, label) − w·ε(x)). 0 = none, the conditional model alone: at w = 1 "
                               "its pneumonia images were caricatures of the class (docs/RESULTS.md).")

def default_batch(family: str, device: torch.device) -> int:
    """Images per batch when --batch-size is not given."""
    return DIFFUSION_CPU_BATCH if family == "diffusion" and device.type == "cpu" else 256


def wanted_batch(cfg: GenerateConfig, family: str, device: torch.device) -> int:
    """The batch asked for or the default, at most -n."""
    return min(cfg.batch_size or default_batch(family, device), cfg.n)


def sampling_batch(cfg: GenerateConfig, family: str, footprint: tuple[int, int], device: torch.device
                   ) -> tuple[int, int]:
    """(the batch images are made in, `wanted_batch`). The images do not depend on the batch, so
    one too large for the free memory is cut to the largest that fits (a 256 px diffusion model's
    default 256 on a GPU), never an out-of-memory error."""
    wanted = wanted_batch(cfg, family, device)
    return fitting_batch(family, *footprint, device, wanted), wanted


def load_generator(path: Path, device: torch.device) -> tuple[Generator, dict]:
    tensors, meta = load_checkpoint(path, "generator")
    try:
        G = Generator(GanNetConfig(**meta["config"]))
        G.load_state_dict(tensors)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{path}: generator checkpoint does not match its config ({e})") from None
    return G.to(device).eval(), meta


def load_sampler(cfg: GenerateConfig, device: torch.device) -> tuple[dict, Callable, dict, tuple[int, int]]:
    """The checkpoint's metadata, a function (start, count, label index) → images in [-1, 1],
    what the record should say about how they were sampled, and the network's footprint
    (activation elements per image, parameters) for the batch's memory check."""
    from xraygan.checkpoint import read_metadata

    kind = read_metadata(cfg.checkpoint).get("kind")
    given = given_options(cfg, "sampler", "sampling_steps", "guidance")
    if kind == "diffusion-model":
        from xraygan.diffusion import image_noise, load_diffusion, sample

        unet, net, meta = load_diffusion(cfg.checkpoint, device)
        if cfg.guidance and not net.num_classes:
            raise InputError(f"--guidance {cfg.guidance}: {cfg.checkpoint} is an unconditional diffusion model; "
                             "guidance needs a conditional one (train-diffusion --conditional)")
        if cfg.sampler == "ddpm" and "sampling_steps" in given:
            raise InputError(f"--sampling-steps {cfg.sampling_steps}: --sampler ddpm runs all "
                             f"{net.timesteps} steps; the number of steps is --sampler ddim's")
        if device.type == "cpu":
            from xraygan.allocator import keep_freed_memory

            keep_freed_memory()  # 128 px sampling about 2x faster (docs/performance.md)

        def make(start: int, count: int, label_idx: int) -> torch.Tensor:
            x, gens = image_noise(cfg.seed, start, count, net.image_size)
            labels = torch.full((count,), label_idx, device=device) if net.num_classes else None
            return sample(unet, net, x.to(device), labels, cfg.sampler, cfg.sampling_steps,
                          cfg.guidance if net.num_classes else 0.0, gens)

        how = {"family": "diffusion", "sampler": cfg.sampler,
               "sampling_steps": cfg.sampling_steps if cfg.sampler == "ddim" else net.timesteps,
               "guidance": cfg.guidance if net.num_classes else None}
        return meta, make, how, diffusion_footprint(net)
    if kind not in (None, "generator"):
        raise InputError(f"{cfg.checkpoint}: is a {kind} checkpoint, expected a generator "
                         "(RUN/generator.safetensors) or a diffusion model (RUN/diffusion.safetensors)")
    if given:  # a GAN draws in one pass: the diffusion sampler's options have nothing to change
        raise InputError(f"{next(iter(given.values()))}: only for diffusion models; {cfg.checkpoint} is a "
                         "GAN generator")
    G, meta = load_generator(cfg.checkpoint, device)

    def make_gan(start: int, count: int, label_idx: int) -> torch.Tensor:
        z = _noise(cfg.seed, start, count, G.cfg.nz).to(device)
        labels = torch.full((count,), label_idx, device=device) if G.cfg.num_classes else None
        return G(z, labels).float()

    return meta, make_gan, {"family": "gan"}, generator_footprint(G.cfg)


def _noise(seed: int, start: int, count: int, nz: int) -> torch.Tensor:
    """Noise for images start..start+count-1; one stream per image, so batching never matters."""
    return torch.stack([torch.randn(nz, generator=make_generator(seed * 1_000_003 + start + i))
                        for i in range(count)])


RECORD = "generation.json"


def listed_files(record: dict) -> dict[str, set[str]]:
    """Per label, the file names the record says generate wrote (finished or not)."""
    out: dict[str, set[str]] = {}
    for r in record["runs"]:
        names = {f"synthetic-{r['run_name']}-{i:06d}.png"
                 for i in range(r["first_index"], r["first_index"] + r["count"])} if r.get("run_name") else set()
        out.setdefault(r["label"], set()).update(names)
    return out


def _load_record(folder: Path) -> dict:
    """FOLDER/generation.json, checked, with every run named. Records of xraygan 0.1 did not name
    the run; its files carry the name, so it is read from a file in the run's index range."""
    path = Path(folder) / RECORD
    rec = read_json(path)
    if not isinstance(rec, dict) or not isinstance(rec.get("runs"), list):
        raise InputError(f"{path}: not a generate record")
    for r in rec["runs"]:
        if "run_name" not in r:
            first, last = r["first_index"], r["first_index"] + r["count"]
            r["run_name"] = next((m["run"] for f in (Path(folder) / r["label"]).glob("synthetic-*.png")
                                  if (m := NAME_RE.match(f.name)) and first <= int(m["idx"]) < last), None)
    return rec


def read_record(out: Path) -> dict | None:
    """OUT/generation.json, or None when OUT is new or empty. A folder holding anything
    generate did not write is refused: synthetic images never mix with other files."""
    path = continued_record(out, RECORD, f"holds files that xraygan generate did not write (no {RECORD}); "
                                         "give a new or empty --out")
    if path is None:
        return None
    out = Path(out)
    visible = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    rec = _load_record(out)
    listed = listed_files(rec)
    for p in visible:
        if p.name in (RECORD, "preview.png"):
            continue
        if not p.is_dir() or p.name not in listed:
            raise InputError(f"{p}: not written by xraygan generate; it will not write beside it "
                             "(give a new or empty --out)")
        foreign = sorted(f.name for f in p.iterdir() if not f.name.startswith(".")
                         and f.name not in listed[p.name])
        if foreign:
            raise InputError(f"{p / foreign[0]}: not listed in {path} ({len(foreign)} such file(s)); "
                             "generate only writes into folders that hold its own images")
    return rec


def is_done(folder: Path, n: int) -> bool:
    """Whether `folder` holds a finished generate of at least `n` images."""
    try:
        rec = check_complete(folder)
    except InputError:
        return False
    return rec is not None and int(rec.get("total", 0)) >= n


def check_complete(folder: Path, rec: dict | None = None) -> dict | None:
    """For readers (rebalance, --append): the record of a finished generate, or None for a folder
    without one (synthetic images made elsewhere). An interrupted generate is refused."""
    path = Path(folder) / RECORD
    if rec is None:
        if not path.is_file():
            return None
        rec = _load_record(folder)
    unfinished = [r for r in rec["runs"] if r.get("status", "done") != "done"]
    if unfinished:
        raise InputError(f"{path}: a generate run did not finish (run {unfinished[0].get('status')}); "
                         f"rerun xraygan generate with --force --out {folder}")
    for label, names in listed_files(rec).items():
        have = {p.name for p in (Path(folder) / label).glob("synthetic-*.png")}
        if names and have != names:
            raise InputError(f"{Path(folder) / label}: holds {len(have)} synthetic images but "
                             f"{path} lists {len(names)}; rerun generate with --force")
    return rec


def _write_record(out: Path, runs: list[dict], cfg: GenerateConfig) -> None:
    counts: dict[str, int] = {}
    for r in runs:
        if r.get("status", "done") == "done":
            counts[r["label"]] = counts.get(r["label"], 0) + r["count"]
    atomic_write_json(Path(out) / RECORD, {
        **record_header("synthetic-images"),
        "note": "synthetic images made by a GAN; not real patients",
        "counts": counts, "total": sum(counts.values()),
        "label": next(iter(counts)) if len(counts) == 1 else None, "runs": runs,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}})


def generate(cfg: GenerateConfig, progress: Callable[..., None] | None = None) -> dict:
    """Images are written into a hidden staging folder inside OUT and moved into OUT/<label>/
    only when all are made; the record marks a run 'writing' until the move is over, so an
    interrupted generate is never mistaken for a complete one, and --force (which removes only
    the files the record lists) can always clean up."""
    check_int("-n", cfg.n)
    if cfg.batch_size is not None:
        check_int("--batch-size", cfg.batch_size)
    check_choice("--device", cfg.device, DEVICES)
    check_choice("--sampler", cfg.sampler, ("ddim", "ddpm"))
    check_int("--sampling-steps", cfg.sampling_steps)
    check_float("--guidance", cfg.guidance, 0.0, low_open=False)
    if cfg.append and cfg.force:
        raise InputError("give --append or --force, not both")
    check_out_apart(cfg.out, checkpoint=cfg.checkpoint)
    out = Path(cfg.out)
    rec = read_record(out)
    device = resolve_device(cfg.device)
    meta, make, how, footprint = load_sampler(cfg, device)
    batch, wanted = sampling_batch(cfg, how["family"], footprint, device)
    classes = meta["classes"]
    label = (cfg.label or meta["default_label"]).lower()
    if label not in classes:
        raise InputError(f"--label {label}: the generator knows only {', '.join(classes)}")
    run = re.sub(r"[^A-Za-z0-9_.]+", "_", str(meta.get("run") or "gan")).strip("_") or "gan"
    folder = out / label
    old_runs = rec["runs"] if rec else []
    start = 0
    if rec is not None:
        mine = [r for r in old_runs if r["label"] == label]
        if cfg.append:
            check_complete(out, rec)
            start = max((r["first_index"] + r["count"] - 1 for r in mine if r.get("run_name") == run),
                        default=0)
        elif not cfg.force:
            n_old = sum(r["count"] for r in old_runs)
            raise InputError(f"{out}: already holds {n_old} synthetic images from xraygan generate "
                             "(use --append to add more, or --force to replace them)")
    created = not out.exists()
    make_dirs(out)
    for stale in out.glob(".generate.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = out / f".generate.partial-{os.getpid()}"
    stage.mkdir()
    label_idx = classes.index(label)
    written: list[str] = []
    preview = []
    try:
        if progress:  # the clock starts before the first batch, so it counts in the pace
            progress("generate", 0, cfg.n, images=0)
        with torch.no_grad():
            for b in range(0, cfg.n, batch):
                k = min(batch, cfg.n - b)
                x = make(start + b, k, label_idx)
                imgs = ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
                for i, a in enumerate(imgs):
                    name = f"synthetic-{run}-{start + b + i + 1:06d}.png"
                    save_png(stage / name, a)
                    written.append(name)
                shown = sum(len(p) for p in preview)
                if cfg.preview and shown < 64:
                    preview.append(x[: 64 - shown].cpu())
                if progress:
                    progress("generate", b + k, cfg.n, images=b + k)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    digest = file_sha256(Path(cfg.checkpoint))
    new = {"run_name": run, "checkpoint": str(cfg.checkpoint), "checkpoint_sha256": digest,
           "seed": cfg.seed, "count": cfg.n, "label": label, "first_index": start + 1,
           "image_size": meta["image_size"], "conditional": meta["conditional"],
           "generator_epoch": meta.get("epoch"), "generator_step": meta.get("step"), **how,
           "batch_size": batch, "xraygan_version": __version__}
    replacing = cfg.force and rec is not None
    # 1. the record lists everything that may be on disk while files move
    kept = [] if replacing else old_runs
    _write_record(out, [*([{**r, "status": "removing"} for r in old_runs] if replacing else kept),
                        {**new, "status": "writing"}], cfg)
    # 2. --force: remove only the files the old record lists
    if replacing:
        for lab, names in listed_files(rec).items():
            for name in names:
                (out / lab / name).unlink(missing_ok=True)
        (out / "preview.png").unlink(missing_ok=True)
    # 3. move the new images in, then mark the run done
    folder.mkdir(exist_ok=True)
    for name in written:
        os.replace(stage / name, folder / name)
    shutil.rmtree(stage, ignore_errors=True)
    if replacing:
        for lab in listed_files(rec):
            d = out / lab
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    _write_record(out, [*kept, {**new, "status": "done"}], cfg)
    if cfg.preview:
        save_png(out / "preview.png", image_grid(torch.cat(preview)))
    cut = (f"--batch-size {cfg.batch_size}: made in batches of {batch}, the most that fit the free memory "
           "(the images are the same)") if batch < wanted and cfg.batch_size else None
    return {"out": str(out), "folder": str(folder), "label": label, "count": cfg.n,
            "first": written[0], "last": written[-1], "checkpoint_sha256": digest, "batch_size": batch,
            "warnings": [cut] if cut else []}
