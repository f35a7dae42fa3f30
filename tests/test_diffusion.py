"""train-diffusion and generate on diffusion checkpoints: a tiny U-Net (width 8, 16-32 px), a
few steps each."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_folder

from xraygan.checkpoint import load_checkpoint
from xraygan.diffusion import (
    DiffusionNetConfig,
    TrainDiffusionConfig,
    alphas_cumprod,
    build_unet,
    cosine_alpha_bar,
    default_shape,
    is_done,
    sample,
    train_diffusion,
    unet_levels,
)
from xraygan.errors import InputError
from xraygan.generate import GenerateConfig, generate

TINY = dict(batch_size=8, width=8, layers_per_block=1, sample_steps=3, device="cpu", precision="fp32")


def test_schedule_is_the_cosine_closed_form():
    net = DiffusionNetConfig(timesteps=1000)
    ab = alphas_cumprod(net).double()
    t = torch.arange(1, 1001, dtype=torch.float64)  # ᾱ_t of step t = 1..T (diffusers indexes from 0)
    ref = cosine_alpha_bar(t, 1000)
    assert torch.allclose(ab[:990], ref[:990], rtol=1e-4, atol=1e-7)  # (the last betas are clipped at 0.999)
    assert (ab[1:] < ab[:-1]).all() and ab[0] > 0.999 and ab[-1] < 1e-3


class Oracle(torch.nn.Module):
    """A 'network' that knows the planted image x0, so its prediction (ε or v) is exact."""

    def __init__(self, x0: torch.Tensor, abar: torch.Tensor, prediction: str = "epsilon"):
        super().__init__()
        self.x0, self.abar, self.prediction = x0, abar, prediction

    def forward(self, x, t, class_labels=None):
        a = self.abar[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        out = eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * self.x0
        return type("Out", (), {"sample": out})()


@pytest.mark.parametrize("sampler,prediction", [("ddim", "epsilon"), ("ddpm", "epsilon"),
                                                ("ddim", "v_prediction"), ("ddpm", "v_prediction")])
def test_sampling_recovers_a_planted_signal(sampler, prediction):
    net = DiffusionNetConfig(image_size=16, timesteps=100, prediction=prediction)
    x0 = torch.linspace(-0.8, 0.8, 16 * 16).view(1, 1, 16, 16).repeat(2, 1, 1, 1)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = sample(Oracle(x0, alphas_cumprod(net), prediction), net, noise, None, sampler, steps=10, generators=gens)
    assert (out - x0).abs().max() < 0.05 < (noise - x0).abs().max()


def test_training_reduces_the_denoising_error_on_a_planted_signal(tmp_path, rng):
    """One image, repeated: a few steps must lower the noise-prediction loss."""
    from xraygan.images import save_png

    a = (np.add.outer(np.arange(16), np.arange(16)) * 8).clip(0, 255).astype(np.uint8)
    for i in range(16):
        save_png(tmp_path / "d" / "pneumonia" / f"{i:03d}.png", a)
    make_folder(tmp_path / "d", {"normal": 20}, 16, rng)
    res = train_diffusion(TrainDiffusionConfig(data=tmp_path / "d", out=tmp_path / "run", steps=60, lr=2e-3,
                                               log_every=10, sample_every=1000, **TINY))
    loss = [float(r.split(",")[2]) for r in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    assert res["label"] == "pneumonia" and np.mean(loss[-10:]) < 0.5 * np.mean(loss[:5])


def test_resume_is_bit_exact_and_checkpoints_are_typed(demo_data, tmp_path):
    common = dict(data=demo_data / "train", save_every=2, sample_every=2, **TINY)
    train_diffusion(TrainDiffusionConfig(out=tmp_path / "a", steps=4, **common))
    train_diffusion(TrainDiffusionConfig(out=tmp_path / "b", steps=2, **common))
    train_diffusion(TrainDiffusionConfig(out=tmp_path / "b", steps=4, resume=True, **common))
    ta, ma = load_checkpoint(tmp_path / "a" / "diffusion.safetensors", "diffusion-model")
    tb, mb = load_checkpoint(tmp_path / "b" / "diffusion.safetensors", "diffusion-model")
    assert ma["step"] == mb["step"] == 4
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (tmp_path / "a" / "log.csv").read_text() .splitlines()[1:][-1].split(",")[2] == \
        (tmp_path / "b" / "log.csv").read_text().splitlines()[1:][-1].split(",")[2]
    # a diffusion checkpoint where a classifier or a generator belongs: one line
    ckpt = str(tmp_path / "a" / "diffusion.safetensors")
    for args in (["evaluate", ckpt, str(demo_data / "test")],
                 ["train-classifier", str(demo_data / "train"), "--val", str(demo_data / "val"),
                  "--out", str(tmp_path / "clf"), "--weights", ckpt, "--device", "cpu"],
                 ["gradcam", ckpt, str(demo_data / "test"), "--out", str(tmp_path / "cams")]):
        r = subprocess.run([sys.executable, "-m", "xraygan", *args], capture_output=True, text=True)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and "diffusion-model checkpoint" in last and "Traceback" not in r.stderr
    assert not (tmp_path / "clf").exists()
    with pytest.raises(InputError, match="already trained 4 steps"):
        train_diffusion(TrainDiffusionConfig(out=tmp_path / "b", steps=4, resume=True, **common))
    # --no-keep-state: the same model; the finished run's state is its record alone, not extended
    train_diffusion(TrainDiffusionConfig(out=tmp_path / "c", steps=4, keep_state=False, **common))
    tc, mc = load_checkpoint(tmp_path / "c" / "diffusion.safetensors", "diffusion-model")
    assert all(torch.equal(ta[k], tc[k]) for k in ta) and "tensors_dropped" not in mc
    tc, mc = load_checkpoint(tmp_path / "c" / "state.safetensors", "diffusion-state")
    assert tc == {} and mc["tensors_dropped"] and mc["step"] == 4 and is_done(tmp_path / "c", 4)
    with pytest.raises(InputError, match="finished after 4 steps with --no-keep-state"):
        train_diffusion(TrainDiffusionConfig(out=tmp_path / "c", steps=6, resume=True, **common))


def test_generation_is_deterministic_and_conditional(demo_data, tmp_path, monkeypatch):
    import xraygan.allocator
    import xraygan.diffusion

    kept = []  # training and sampling on the CPU keep freed memory for the next step (docs/performance.md)
    monkeypatch.setattr(xraygan.diffusion, "keep_freed_memory", lambda: kept.append("train"))
    monkeypatch.setattr(xraygan.allocator, "keep_freed_memory", lambda: kept.append("sample"))
    run = tmp_path / "cond"
    train_diffusion(TrainDiffusionConfig(data=demo_data / "train", out=run, steps=2, conditional=True, timesteps=50,
                                         **TINY))
    assert kept == ["train"]
    ckpt = run / "diffusion.safetensors"
    _, meta = load_checkpoint(ckpt, "diffusion-model")
    assert meta["conditional"] and meta["classes"] == ["normal", "pneumonia"]

    def make(out: str, **kw) -> list[bytes]:
        kw.setdefault("sampling_steps", 4 if kw.get("sampler", "ddim") == "ddim" else 50)
        generate(GenerateConfig(checkpoint=ckpt, out=tmp_path / out, n=3, device="cpu", **kw))
        rec = json.loads((tmp_path / out / "generation.json").read_text())
        steps = 4 if kw.get("sampler", "ddim") == "ddim" else 50  # the DDPM chain: every timestep
        assert rec["runs"][0]["family"] == "diffusion" and rec["runs"][0]["sampling_steps"] == steps
        label = rec["runs"][0]["label"]
        return [p.read_bytes() for p in sorted((tmp_path / out / label).glob("*.png"))]

    a = make("a")
    assert kept == ["train", "sample"]
    assert make("b", batch_size=2) == a  # the same images whatever the batch
    assert make("c", seed=1) != a
    assert make("d", guidance=1.0) != a  # guidance changes the images
    assert make("e", label="normal") != a
    assert make("f", sampler="ddpm", batch_size=1) == make("g", sampler="ddpm", batch_size=3)
    with pytest.raises(InputError, match="--sampler ddpm runs all 50 steps"):  # not a quietly ignored 4
        make("h", sampler="ddpm", sampling_steps=4)


def test_the_default_unet_is_sized_by_image_size_and_predicts_v(tmp_path, rng):
    """Up to 32 px the CPU-sized U-Net (16 channels, one block per level); options override it."""
    make_folder(tmp_path / "d", {"normal": 12, "pneumonia": 8}, 16, rng)
    common = dict(data=tmp_path / "d", steps=1, batch_size=4, sample_every=1000, sample_steps=2, device="cpu",
                  precision="fp32")
    res = train_diffusion(TrainDiffusionConfig(out=tmp_path / "auto", **common))
    net = json.loads((tmp_path / "auto" / "config.json").read_text())["net"]
    assert (net["width"], net["layers_per_block"]) == default_shape(16) == (16, 1)
    assert net["prediction"] == "v_prediction"
    assert res["parameters"] == sum(p.numel() for p in build_unet(DiffusionNetConfig(**net)).parameters())
    train_diffusion(TrainDiffusionConfig(out=tmp_path / "set", width=8, layers_per_block=2, prediction="eps",
                                         **common))
    net = json.loads((tmp_path / "set" / "config.json").read_text())["net"]
    assert (net["width"], net["layers_per_block"], net["prediction"]) == (8, 2, "epsilon")
    assert default_shape(64) == (32, 2)  # above 32 px, where a GPU is the expected machine: the wider net


@pytest.mark.parametrize("size", [16, 24, 32, 64, 128, 160, 224])
def test_unet_levels_follow_the_size(size):
    """Each level halves the map down to 4-8 px; the four first-tuned sizes keep their nets."""
    mult = unet_levels(size)
    lowest = size // 2 ** (len(mult) - 1)
    assert size % 2 ** (len(mult) - 1) == 0 and 4 <= lowest <= 8
    assert mult[-1] == max(mult) and list(mult) == sorted(mult)
    unet = build_unet(DiffusionNetConfig(image_size=size, width=8, layers_per_block=1, num_classes=2))
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        out = unet(x, torch.tensor([3, 500]), class_labels=torch.tensor([0, 2])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_diffusion_sizes_agree_with_the_dcgan_and_odd_ones_are_refused(tmp_path, rng):
    from xraygan.gan_models import SUPPORTED_SIZES

    assert [s for s in range(8, 600) if unet_levels(s)] == list(SUPPORTED_SIZES)
    assert unet_levels(224) == (1, 1, 2, 2, 4, 4) and unet_levels(160) == (1, 1, 2, 2, 4, 4)
    assert unet_levels(64) == (1, 2, 4, 4) and unet_levels(24) == (1, 2, 4)  # 24 → 6×6 lowest
    make_folder(tmp_path / "d", {"normal": 4, "pneumonia": 4}, 18, rng)
    with pytest.raises(InputError, match=r"images are 18 px; the generators make .* nearest to 18 are 16, 20"):
        train_diffusion(TrainDiffusionConfig(data=tmp_path / "d", out=tmp_path / "r", steps=1, device="cpu"))
    assert not (tmp_path / "r").exists()


def test_a_224_px_diffusion_model_trains_and_generates_224_px_images(tmp_path, rng):
    make_folder(tmp_path / "d", {"normal": 3, "pneumonia": 3}, 224, rng)
    train_diffusion(TrainDiffusionConfig(data=tmp_path / "d", out=tmp_path / "r", steps=1, batch_size=2, width=8,
                                         layers_per_block=1, sample_every=1000, sample_steps=2, device="cpu",
                                         precision="fp32", cls="pneumonia"))
    generate(GenerateConfig(checkpoint=tmp_path / "r" / "diffusion.safetensors", out=tmp_path / "g", n=2,
                            sampling_steps=2, device="cpu"))
    with pytest.raises(InputError, match="is an unconditional diffusion model; guidance needs a conditional"):
        generate(GenerateConfig(checkpoint=tmp_path / "r" / "diffusion.safetensors", out=tmp_path / "h", n=2,
                                sampling_steps=2, guidance=1.0, device="cpu"))
    from PIL import Image
    sizes = {Image.open(p).size for p in (tmp_path / "g").rglob("*.png")}
    assert sizes == {(224, 224)}
