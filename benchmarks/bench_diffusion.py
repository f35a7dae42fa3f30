"""Diffusion speed: a bare UNet2DModel training step and DDIM loop against `train-diffusion` and
`generate`, on the same data, in one run.

bare step   : the same UNet2DModel (built by xraygan's config), ready-made tensors on the device,
              random timesteps and noise, MSE on the default target (v), AdamW; same precision as xraygan's.
train       : `train_diffusion` itself for --steps steps on the real sample's pneumonia images,
              default options (EMA, log rows, the end-of-run grid and checkpoint included).
bare DDIM   : the diffusers DDIMScheduler loop over the U-Net for --sample-images images, fp32 (as
              generate samples, so the same seed gives the same images on every machine), in
              generate's batches (64 on the CPU, 256 elsewhere); on the CPU also at batch 256.
generate    : `generate` on the trained checkpoint, --sampling-steps DDIM steps, PNGs written.
--also W:L  : the bare step and DDIM loop of another U-Net shape (width W, L blocks per level) in the
              same run, e.g. 32:2 (the default before the size-based one), to show what the size-based default buys.

    python benchmarks/bench_diffusion.py --size 32 --steps 40 --sample-images 256 --also 32:2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xraygan.diffusion import (
    PREDICTIONS,
    DiffusionNetConfig,
    TrainDiffusionConfig,
    alphas_cumprod,
    build_unet,
    default_shape,
    sample,
)
from xraygan.generate import GenerateConfig, default_batch, generate
from xraygan.runtime import autocast, autocast_dtype, resolve_device


def bare_train_rate(net: DiffusionNetConfig, batch: int, steps: int, device, amp) -> float:
    torch.manual_seed(0)
    unet = build_unet(net).to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-4, weight_decay=0.0)
    abar = alphas_cumprod(net).to(device)
    x0 = torch.rand(batch, 1, net.image_size, net.image_size, device=device) * 2 - 1
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        t = torch.randint(0, net.timesteps, (batch,), device=device)
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        with autocast(device, amp):
            out = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample
        target = noise if net.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def bare_ddim_rate(net: DiffusionNetConfig, n: int, steps: int, device, amp, batch: int) -> float:
    unet = build_unet(net).to(device)
    noise = torch.randn(n, 1, net.image_size, net.image_size, device=device)
    t0 = time.perf_counter()
    for b in range(0, n, batch):
        sample(unet, net, noise[b:b + batch], None, "ddim", steps, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sample-images", type=int, default=256)
    ap.add_argument("--sampling-steps", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--also", default=None, metavar="W:L", help="another U-Net shape to time bare")
    a = ap.parse_args()
    from xraygan.allocator import keep_freed_memory

    keep_freed_memory()  # both loops with the allocator setting train-diffusion and generate make
    device = resolve_device(a.device)
    amp = autocast_dtype(device, a.precision)
    width, layers = default_shape(a.size)
    net = DiffusionNetConfig(image_size=a.size, width=width, layers_per_block=layers,
                             prediction=PREDICTIONS[TrainDiffusionConfig.prediction])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "xraygan", "prepare", "--sample", "--size", str(a.size),
                        "--out", str(data)], check=True, capture_output=True)
        from xraygan.diffusion import train_diffusion

        bare = bare_train_rate(net, a.batch, a.steps, device, amp)
        res = train_diffusion(TrainDiffusionConfig(data=data / "train", out=Path(tmp) / "run", steps=a.steps,
                                                   batch_size=a.batch, device=a.device, precision=a.precision))
        # generate samples in fp32, in its default batches
        gen_batch = default_batch("diffusion", device)
        ddim = bare_ddim_rate(net, a.sample_images, a.sampling_steps, device, None, gen_batch)
        ddim256 = bare_ddim_rate(net, 256, a.sampling_steps, device, None, 256) if device.type == "cpu" else None
        t0 = time.perf_counter()
        generate(GenerateConfig(checkpoint=Path(tmp) / "run" / "diffusion.safetensors", out=Path(tmp) / "syn",
                                n=a.sample_images, sampling_steps=a.sampling_steps, device=a.device))
        gen = a.sample_images / (time.perf_counter() - t0)
        if a.also:
            w, L = (int(v) for v in a.also.split(":"))
            other = DiffusionNetConfig(image_size=a.size, width=w, layers_per_block=L, prediction=net.prediction)
            other_bare = bare_train_rate(other, a.batch, a.steps, device, amp)
            other_ddim = bare_ddim_rate(other, a.sample_images, a.sampling_steps, device, None, gen_batch)
    params = sum(p.numel() for p in build_unet(net).parameters())
    print(f"{a.size} px, batch {a.batch}, {device}, {amp or 'fp32'}; default U-Net: width {width}, "
          f"{layers} block(s) per level, {params:,} parameters")
    print(f"training : bare step {bare:.1f} img/s; train-diffusion {res['images_per_s']:.1f} img/s "
          f"({res['images_per_s'] / bare:.2f}x; {a.steps} steps, grid and checkpoint included)")
    print(f"sampling : bare DDIM loop {ddim:.1f} img/s; generate {gen:.1f} img/s ({gen / ddim:.2f}x; "
          f"{a.sampling_steps} DDIM steps, PNGs written)")
    if ddim256:
        print(f"sampling batch: the bare loop at batch {gen_batch} {ddim:.1f} img/s, at 256 {ddim256:.1f} img/s")
    step_s = a.batch / res["images_per_s"]
    print(f"projection: {step_s:.2f} s per step -> {1800 / step_s:.0f} steps in 30 min; "
          f"805 images in {805 / gen:.0f} s")
    if a.also:
        p2 = sum(p.numel() for p in build_unet(other).parameters())
        print(f"U-Net {a.also} ({p2:,} parameters), bare: step {other_bare:.1f} img/s (default "
              f"{bare / other_bare:.1f}x faster), DDIM {other_ddim:.1f} img/s (default {ddim / other_ddim:.1f}x "
              f"faster)")


if __name__ == "__main__":
    main()
