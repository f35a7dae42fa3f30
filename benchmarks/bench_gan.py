"""GAN training speed in one run: the textbook DCGAN step, `GanTrainer.step` (without and with
DiffAugment), and `train-gan` end to end on the same data.

textbook : the pytorch/examples DCGAN loop: fp32, default (NCHW) memory layout, data already
           on the device, separate backward passes for real and fake, D's weight gradients
           computed during the G step too.
step     : `GanTrainer.step` as `train-gan` runs it (channels-last, D frozen during the G step,
           --precision auto: bf16 on CUDA, fp32 on CPUs without native bf16).
train-gan: the whole command on a folder of N images (checkpoints, sample grids, log rows,
           progress, batch indexing included), default options unless given. "outside" is the
           time per step that train-gan spends beyond the bare DiffAugment step.

    python benchmarks/bench_gan.py --sizes 32 64 --steps 8 --e2e-steps 60       # CPU
    python benchmarks/bench_gan.py --device cuda --sizes 32 64 128 --steps 200 --e2e-steps 3000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xraygan.gan import GanTrainer, TrainGanConfig, train_gan
from xraygan.gan_models import DIFFAUG_POLICIES, Discriminator, GanNetConfig, Generator
from xraygan.images import save_png
from xraygan.runtime import cpu_has_fast_bf16, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def textbook_step_fn(size: int, batch: int, device: torch.device):
    torch.manual_seed(0)
    cfg = GanNetConfig(image_size=size)
    G, D = Generator(cfg).to(device), Discriminator(cfg).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    data = torch.rand(batch * 4, 1, size, size, device=device) * 2 - 1

    def step(i: int) -> None:
        real = data[(i % 4) * batch:(i % 4 + 1) * batch]
        ones, zeros = torch.ones(batch, device=device), torch.zeros(batch, device=device)
        D.zero_grad()
        err_real = F.binary_cross_entropy(torch.sigmoid(D(real)), ones)
        err_real.backward()
        fake = G(torch.randn(batch, cfg.nz, device=device))
        err_fake = F.binary_cross_entropy(torch.sigmoid(D(fake.detach())), zeros)
        err_fake.backward()
        opt_d.step()
        G.zero_grad()
        err_g = F.binary_cross_entropy(torch.sigmoid(D(fake)), ones)
        err_g.backward()
        opt_g.step()

    return step


def xraygan_step_fn(size: int, batch: int, device: torch.device, diffaugment: str = "",
                    compiled: bool = False, graphs: bool = False, precision: str = "auto"):
    cfg = TrainGanConfig(data=Path("."), out=Path("."), device=device.type, batch_size=batch,
                         diffaugment=diffaugment, precision=precision)
    tr = GanTrainer(cfg, GanNetConfig(image_size=size), device, None, cuda_graphs=graphs)
    if compiled:
        tr.G, tr.D = torch.compile(tr.G), torch.compile(tr.D)
    data = (torch.rand(batch * 4, 1, size, size, device=device) * 2 - 1).contiguous(
        memory_format=torch.channels_last)

    def step(i: int) -> None:
        tr.step(data[(i % 4) * batch:(i % 4 + 1) * batch], None)

    return step


def rate(step, batch: int, steps: int, device: torch.device) -> float:
    for i in range(3):  # warm-up: allocator, cuDNN / oneDNN primitive caches
        step(i)
    sync(device)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return batch * steps / (time.perf_counter() - t)


def image_folder(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        save_png(root / "pneumonia" / f"p{i:05d}.png", rng.integers(0, 255, (size, size), dtype=np.uint8))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each bare loop")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the loops; best of N")
    ap.add_argument("--e2e-steps", type=int, default=60, help="steps of the train-gan run (0 = skip)")
    ap.add_argument("--e2e-images", type=int, default=402, help="training images (402 = the 3:1 Kermany minority)")
    ap.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), fp32 or bf16")
    args = ap.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} threads, native CPU bf16: "
          f"{cpu_has_fast_bf16()}, batch {args.batch}")
    aug = ",".join(DIFFAUG_POLICIES)
    for size in args.sizes:
        pr = args.precision
        loops = {"textbook": textbook_step_fn(size, args.batch, device),
                 "step": xraygan_step_fn(size, args.batch, device, precision=pr),
                 "step+diffaug": xraygan_step_fn(size, args.batch, device, aug, precision=pr)}
        if device.type == "cuda":  # train-gan's default there: the step replayed as a CUDA graph
            loops["eager step"] = loops["step"]
            loops["eager step+diffaug"] = loops["step+diffaug"]
            loops["step"] = xraygan_step_fn(size, args.batch, device, graphs=True, precision=pr)
            loops["step+diffaug"] = xraygan_step_fn(size, args.batch, device, aug, graphs=True, precision=pr)
        best = {k: 0.0 for k in loops}
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits all
            for k, fn in loops.items():
                best[k] = max(best[k], rate(fn, args.batch, args.steps, device))
        print(f"{size:4d} px  textbook {best['textbook']:8.1f} img/s   step {best['step']:8.1f} "
              f"({best['step'] / best['textbook']:.2f}x)   step+diffaug {best['step+diffaug']:8.1f} "
              f"({best['step+diffaug'] / best['step']:.2f}x of step)", flush=True)
        if device.type == "cuda":
            print(f"{size:4d} px  without CUDA graphs: step {best['eager step']:8.1f} img/s, step+diffaug "
                  f"{best['eager step+diffaug']:8.1f} img/s; graphs gain {best['step'] / best['eager step']:.2f}x / "
                  f"{best['step+diffaug'] / best['eager step+diffaug']:.2f}x", flush=True)
        if args.compile:
            t = time.perf_counter()
            comp = xraygan_step_fn(size, args.batch, device, aug, compiled=True)
            comp(0)
            sync(device)
            warm = time.perf_counter() - t
            r_c = rate(comp, args.batch, args.steps, device)
            print(f"{size:4d} px  step+diffaug under torch.compile {r_c:8.1f} img/s "
                  f"({r_c / best['step+diffaug']:.2f}x), after {warm:.0f} s compiling", flush=True)
        if args.e2e_steps:
            inside = [0.0]
            real_step = GanTrainer.step

            def timed_step(self, *a):  # on the CPU a step's time is its wall time
                t = time.perf_counter()
                out = real_step(self, *a)
                inside[0] += time.perf_counter() - t
                return out

            if device.type == "cpu":
                GanTrainer.step = timed_step
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    data = image_folder(Path(tmp) / "train", args.e2e_images, size)
                    t0 = time.perf_counter()
                    res = train_gan(TrainGanConfig(data=data, out=Path(tmp) / "run", steps=args.e2e_steps,
                                                   batch_size=args.batch, device=args.device, precision=pr))
                    wall = time.perf_counter() - t0
                    ckpts = len(list((Path(tmp) / "run" / "samples").iterdir()))
            finally:
                GanTrainer.step = real_step
            e2e = res["images_per_s"]
            loop = res["seconds"]
            # CPU: measured around each step; CUDA (asynchronous): loop time less the bare steps
            outside = ((loop - inside[0]) if device.type == "cpu"
                       else loop - args.e2e_steps * args.batch / best["step+diffaug"]) / args.e2e_steps
            print(f"{size:4d} px  train-gan end to end {e2e:8.1f} img/s over {args.e2e_steps} steps "
                  f"({args.e2e_images} images, loop {loop} s, command {wall:.1f} s, {ckpts} sample grid(s)) = "
                  f"{e2e / best['step+diffaug']:.2f}x of the bare diffaug step; "
                  f"outside the step {outside * 1000:.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
