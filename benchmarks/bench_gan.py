"""GAN training speed: a textbook DCGAN step against `train-gan`'s own step, in one run.

textbook : the pytorch/examples DCGAN loop: fp32, default (NCHW) memory layout, data already
           in memory, separate backward passes for real and fake, D's weight gradients
           computed during the G step too.
xraygan  : `GanTrainer.step` as `train-gan` runs it (channels-last, D frozen during the G step,
           --precision auto: bf16 only where the CPU has native bf16).

Both use the same networks (ngf = ndf = 64, nz = 100), batch size and random data.

    python benchmarks/bench_gan.py --sizes 32 64 --steps 8
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xraygan.gan import GanTrainer, TrainGanConfig
from xraygan.gan_models import Discriminator, GanNetConfig, Generator
from xraygan.runtime import cpu_has_fast_bf16


def textbook_step_fn(size: int, batch: int):
    torch.manual_seed(0)
    cfg = GanNetConfig(image_size=size)
    G, D = Generator(cfg), Discriminator(cfg)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    data = torch.rand(batch * 4, 1, size, size) * 2 - 1

    def step(i: int) -> None:
        real = data[(i % 4) * batch:(i % 4 + 1) * batch]
        ones, zeros = torch.ones(batch), torch.zeros(batch)
        D.zero_grad()
        err_real = F.binary_cross_entropy(torch.sigmoid(D(real)), ones)
        err_real.backward()
        fake = G(torch.randn(batch, cfg.nz))
        err_fake = F.binary_cross_entropy(torch.sigmoid(D(fake.detach())), zeros)
        err_fake.backward()
        opt_d.step()
        G.zero_grad()
        err_g = F.binary_cross_entropy(torch.sigmoid(D(fake)), ones)
        err_g.backward()
        opt_g.step()

    return step


def xraygan_step_fn(size: int, batch: int, compiled: bool = False):
    cfg = TrainGanConfig(data=Path("."), out=Path("."), device="cpu", batch_size=batch, diffaugment="")
    net = GanNetConfig(image_size=size)
    tr = GanTrainer(cfg, net, torch.device("cpu"), None)
    if compiled:  # the lever that was tried and not kept: it did not pay on 2 CPU cores
        tr.G, tr.D = torch.compile(tr.G), torch.compile(tr.D)
    data = (torch.rand(batch * 4, 1, size, size) * 2 - 1).contiguous(
        memory_format=torch.channels_last)

    def step(i: int) -> None:
        tr.step(data[(i % 4) * batch:(i % 4 + 1) * batch], None)

    return step


def rate(step, batch: int, steps: int) -> float:
    for i in range(2):  # warm-up: allocator and oneDNN primitive caches
        step(i)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two loops; best of N")
    ap.add_argument("--compile", action="store_true",
                    help="also time the xraygan step with torch.compile (slow to compile)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"native CPU bf16: {cpu_has_fast_bf16()}, batch {args.batch}")
    for size in args.sizes:
        tb, xg = textbook_step_fn(size, args.batch), xraygan_step_fn(size, args.batch)
        tbs, xgs = [], []
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits both
            tbs.append(rate(tb, args.batch, args.steps))
            xgs.append(rate(xg, args.batch, args.steps))
        r_tb, r_xg = max(tbs), max(xgs)
        print(f"{size:4d} px  textbook {r_tb:7.1f} img/s   xraygan {r_xg:7.1f} img/s   "
              f"ratio {r_xg / r_tb:.2f}x")
        if args.compile:
            t = time.perf_counter()
            comp = xraygan_step_fn(size, args.batch, compiled=True)
            comp(0)
            warm = time.perf_counter() - t
            r_c = rate(comp, args.batch, args.steps)
            print(f"{size:4d} px  xraygan + torch.compile {r_c:7.1f} img/s   "
                  f"{r_c / r_xg:.2f}x of xraygan, after {warm:.0f} s compiling")


if __name__ == "__main__":
    main()
