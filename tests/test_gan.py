import copy
import csv
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_folder
from safetensors.torch import load_file

from xraygan import gan
from xraygan.checkpoint import load_checkpoint
from xraygan.errors import InputError, Interrupted, TrainingError
from xraygan.gan import GanTrainer, TrainGanConfig, fake_label_probs, resolve_diffaugment, train_gan
from xraygan.gan_models import Discriminator, GanNetConfig, Generator, base_and_doublings, diff_augment
from xraygan.images import save_png


def tiny(data, out, **kw):
    kw = {"epochs": 1, "batch_size": 8, "nz": 8, "ngf": 4, "ndf": 4, "device": "cpu", **kw}
    return TrainGanConfig(data=data, out=out, **kw)


@pytest.fixture
def folder16(tmp_path, rng):
    """A 16-px training folder: 24 normal, 12 pneumonia."""
    return make_folder(tmp_path / "train", {"normal": 24, "pneumonia": 12}, 16, rng)


@pytest.mark.parametrize("size", [16, 24, 32, 64, 128, 160, 224])
@pytest.mark.parametrize("classes", [0, 2])
def test_architectures_every_size(size, classes):
    cfg = GanNetConfig(image_size=size, nz=8, ngf=4, ndf=4, num_classes=classes)
    G, D = Generator(cfg), Discriminator(cfg)
    labels = torch.tensor([0, 1, 1]) if classes else None
    x = G(torch.randn(3, 8), labels)
    assert x.shape == (3, 1, size, size) and x.abs().max() <= 1
    assert D(x, labels).shape == (3,)
    convs = [m for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    base, k = base_and_doublings(size)
    assert len(convs) == k + 1 and convs[0].kernel_size == (base, base)  # depth follows the size
    if size in (16, 32, 64, 128):  # powers of two: the 4×4-base networks, log2(size) − 1 deep
        assert base == 4 and len(convs) == int(np.log2(size)) - 1
    w = convs[0].weight
    assert abs(w.std().item() - 0.02) < 0.005  # DCGAN init N(0, 0.02)


def test_unsupported_size_is_rejected():
    assert base_and_doublings(224) == (7, 5) and base_and_doublings(160) == (5, 5) and base_and_doublings(28) == (7, 2)
    with pytest.raises(ValueError, match="nearest to 100 are 96, 112"):
        GanNetConfig(image_size=100)
    for size in (18, 12, 600):
        with pytest.raises(ValueError, match="the generators make 16-512 px images"):
            GanNetConfig(image_size=size)


def test_conditional_generator_uses_label():
    torch.manual_seed(0)
    G = Generator(GanNetConfig(image_size=16, nz=8, ngf=4, num_classes=2)).eval()
    z = torch.randn(2, 8)
    a = G(z, torch.tensor([0, 0]))
    b = G(z, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)


def test_alpha_sets_fake_label_mix():
    p = fake_label_probs(("normal", "pneumonia"), "normal", 0.25)
    assert p.tolist() == [0.25, 0.75]
    draws = torch.multinomial(p, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs((draws == 0).float().mean().item() - 0.25) < 0.02
    with pytest.raises(InputError, match="--alpha 1.5"):
        fake_label_probs(("normal", "pneumonia"), "normal", 1.5)
    with pytest.raises(InputError, match="--healthy healthy"):
        fake_label_probs(("normal", "pneumonia"), "healthy", 0.5)


def test_conditional_batches_pair_real_images_with_the_alpha_labels():
    cfg = TrainGanConfig(data=Path("."), out=Path("."), conditional=True, alpha=0.25, device="cpu")
    tr = GanTrainer(cfg, GanNetConfig(image_size=16, nz=4, ngf=4, ndf=4, num_classes=2),
                    torch.device("cpu"), fake_label_probs(("normal", "pneumonia"), "normal", 0.25))
    labels_of = torch.tensor([0] * 30 + [1] * 10)  # a 3:1 dataset
    by_class = [torch.nonzero(labels_of == c).flatten() for c in range(2)]
    idx, labels = tr.conditional_batch(by_class, 4000)
    assert torch.equal(labels_of[idx], labels)  # every real image has the label drawn for it
    assert abs((labels == 0).float().mean().item() - 0.25) < 0.03  # alpha, not the 3:1 data mix


def test_diffaugment_is_differentiable_and_seeded():
    x = torch.randn(4, 1, 16, 16, requires_grad=True)
    a = diff_augment(x, torch.Generator().manual_seed(1))
    b = diff_augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diffaugment_auto_is_on_for_small_sets(folder16, tmp_path):
    assert resolve_diffaugment("auto", 405) == "color,translation,cutout"
    assert resolve_diffaugment("auto", 20000) == "" and resolve_diffaugment("color", 10) == "color"
    train_gan(tiny(folder16, tmp_path / "r", epochs=1, diffaugment="auto"))
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["diffaugment"] == "color,translation,cutout" and cfg["train"]["diffaugment"] == "auto"
    train_gan(tiny(folder16, tmp_path / "r", epochs=2, diffaugment="auto", resume=True))


def test_train_outputs_and_minority_default(folder16, tmp_path):
    res = train_gan(tiny(folder16, tmp_path / "run", epochs=2, diffaugment="color,translation,cutout"))
    run = tmp_path / "run"
    assert res["label"] == "pneumonia" and res["steps"] == 2 * (12 // 8)
    for f in ("generator.safetensors", "discriminator.safetensors", "state.safetensors",
              "config.json", "log.csv", "samples/step_0000002.png"):
        assert (run / f).is_file(), f
    assert len(list((run / "samples").iterdir())) == 1  # --sample-every 500: only the end
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert {"loss_d", "loss_g", "d_x", "d_g_z"} <= set(rows[0])
    _, meta = load_checkpoint(run / "generator.safetensors", "generator")
    assert meta["classes"] == ["pneumonia"] and meta["image_size"] == 16
    assert meta["config"]["nz"] == 8 and not meta["conditional"]
    assert json.loads((run / "config.json").read_text())["counts"] == {"pneumonia": 12}


def test_resume_matches_uninterrupted_run(folder16, tmp_path):
    kw = {"conditional": True, "alpha": 0.25, "diffaugment": "color,translation,cutout"}
    train_gan(tiny(folder16, tmp_path / "a", epochs=3, **kw))
    train_gan(tiny(folder16, tmp_path / "b", epochs=1, **kw))
    train_gan(tiny(folder16, tmp_path / "b", epochs=3, resume=True, **kw))
    for f in ("generator.safetensors", "discriminator.safetensors"):
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{f}:{k} differs after resume"
    la = (tmp_path / "a" / "log.csv").read_text().splitlines()
    lb = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert [r.split(",")[:6] for r in la] == [r.split(",")[:6] for r in lb]


@pytest.mark.parametrize("size", [16, 224])
@pytest.mark.parametrize("classes", [0, 2])
def test_spectrally_normalised_discriminator(size, classes):
    torch.manual_seed(0)
    D = Discriminator(GanNetConfig(image_size=size, nz=8, ngf=4, ndf=4, num_classes=classes, spectral_norm=True))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in D.modules())
    labels = torch.tensor([0, 1, 1]) if classes else None
    for _ in range(30):  # the power iteration converges over calls in training mode
        D(torch.randn(3, 1, size, size), labels)
    convs = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(Discriminator(GanNetConfig(image_size=size, nz=8, ngf=4, ndf=4)).net) // 3 + 1
    for m in convs:  # the weight a convolution uses has its largest singular value at 1
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
        assert abs(sigma - 1) < 0.05, sigma


def test_hinge_with_spectral_norm_resumes_exactly_and_older_records_resume(folder16, tmp_path):
    kw = {"loss": "hinge", "spectral_norm": True, "diffaugment": "color,translation,cutout"}
    train_gan(tiny(folder16, tmp_path / "a", epochs=3, **kw))
    train_gan(tiny(folder16, tmp_path / "b", epochs=1, **kw))
    train_gan(tiny(folder16, tmp_path / "b", epochs=3, resume=True, **kw))
    for f in ("generator.safetensors", "discriminator.safetensors"):
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert a.keys() == b.keys() and any("parametrizations" in k for k in b) == (f[0] == "d")
        assert all(torch.equal(a[k], b[k]) for k in a), f
    with pytest.raises(InputError, match=r"--resume with different options .*: --loss hinge \(now bce\); --spectral-norm yes \(now no\)"):
        train_gan(tiny(folder16, tmp_path / "b", epochs=4, resume=True, diffaugment=kw["diffaugment"]))
    # a run recorded before these options existed trained with their defaults, and resumes so
    train_gan(tiny(folder16, tmp_path / "c", epochs=1))
    rec = json.loads((tmp_path / "c" / "config.json").read_text())
    del rec["train"]["loss"], rec["train"]["spectral_norm"]
    (tmp_path / "c" / "config.json").write_text(json.dumps(rec))
    assert train_gan(tiny(folder16, tmp_path / "c", epochs=2, resume=True))["steps"] == 2
    with pytest.raises(InputError, match=r"started with: --loss bce \(now hinge\); resume with those"):
        train_gan(tiny(folder16, tmp_path / "c", epochs=3, resume=True, loss="hinge"))
    with pytest.raises(InputError, match="--loss 'wgan': must be one of bce, hinge"):
        train_gan(tiny(folder16, tmp_path / "d", loss="wgan"))


def _real_gradient(run: Path, data: Path) -> float:
    """E|grad_x D(x)|^2 of a run's discriminator on its real training images: what R1 penalises."""
    from xraygan.trainset import load_training_set, to_model_input

    tensors, meta = load_checkpoint(run / "discriminator.safetensors", "discriminator")
    D = Discriminator(GanNetConfig(**meta["config"]))
    D.load_state_dict(tensors)
    images = load_training_set(data, False, None, 4)[0].images
    x = to_model_input(images, torch.device("cpu"), False)[torch.arange(len(images))].float().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x, None).sum(), x)
    return grad.square().flatten(1).sum(1).mean().item()


def test_r1_penalty_flattens_the_discriminator_and_resumes_exactly(folder16, tmp_path):
    # R1 at steps 0, 16 and 32; fp32 so the measured ratio (0.63) is the same on CPUs with bf16
    kw = {"steps": 40, "batch_size": 4, "diffaugment": "none", "precision": "fp32"}
    train_gan(tiny(folder16, tmp_path / "off", **kw))
    train_gan(tiny(folder16, tmp_path / "on", r1=100.0, **kw))
    off, on = _real_gradient(tmp_path / "off", folder16), _real_gradient(tmp_path / "on", folder16)
    assert on < 0.8 * off, (on, off)
    # stopped between two penalties and resumed: the lazy schedule follows the step count
    train_gan(tiny(folder16, tmp_path / "b", r1=100.0, **{**kw, "steps": 20}))
    train_gan(tiny(folder16, tmp_path / "b", r1=100.0, resume=True, **kw))
    for f in ("generator.safetensors", "discriminator.safetensors"):
        a, b = load_file(tmp_path / "on" / f), load_file(tmp_path / "b" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train"]["r1"] == 100.0
    with pytest.raises(InputError, match=r"started with: --r1 100.0 \(now [0-9.]+\);"):
        train_gan(tiny(folder16, tmp_path / "b", resume=True, **{**kw, "steps": 60}))
    with pytest.raises(InputError, match="--r1 -1.0: must be a finite number at least 0"):
        train_gan(tiny(folder16, tmp_path / "c", r1=-1.0))


def test_no_keep_state_keeps_an_interrupted_runs_state_and_a_finished_runs_record(folder16, tmp_path, monkeypatch):
    """--no-keep-state: Ctrl-C mid-run still leaves everything --resume needs (and the resumed run
    matches a straight one); the finished run's state file is its record alone, which the study
    reads to skip it, and a longer run is refused in one line instead of starting from nothing."""
    kw = dict(epochs=3, batch_size=4, log_every=2)
    train_gan(tiny(folder16, tmp_path / "a", **kw))
    calls = {"n": 0}
    real_step = GanTrainer.step

    def interrupting(self, *a):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *a)

    monkeypatch.setattr(GanTrainer, "step", interrupting)
    with pytest.raises(Interrupted, match="interrupted at step 4; saved"):
        train_gan(tiny(folder16, tmp_path / "b", keep_state=False, **kw))
    monkeypatch.setattr(GanTrainer, "step", real_step)
    assert load_file(tmp_path / "b" / "state.safetensors").keys() == load_file(tmp_path / "a" / "state.safetensors").keys()
    train_gan(tiny(folder16, tmp_path / "b", keep_state=False, resume=True, **kw))
    for f in ("generator.safetensors", "discriminator.safetensors"):
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert load_file(tmp_path / "b" / "state.safetensors") == {}
    _, meta = load_checkpoint(tmp_path / "b" / "state.safetensors", "gan-state")
    steps = meta["step"]
    assert meta["tensors_dropped"] and steps == load_checkpoint(tmp_path / "a" / "state.safetensors", "gan-state")[1]["step"]
    assert (tmp_path / "b" / "state.safetensors").stat().st_size < 20_000 < (tmp_path / "a" / "state.safetensors").stat().st_size
    assert gan.is_done(tmp_path / "b", steps) and not gan.is_done(tmp_path / "b", steps + 1)
    with pytest.raises(InputError, match=f"already trained {steps} steps"):
        train_gan(tiny(folder16, tmp_path / "b", resume=True, **kw))
    with pytest.raises(InputError, match=f"finished after {steps} steps with --no-keep-state, so it kept no "
                                         f"training state to continue to {2 * steps} steps"):
        train_gan(tiny(folder16, tmp_path / "b", resume=True, **{**kw, "epochs": 6}))
    train_gan(tiny(folder16, tmp_path / "a", resume=True, **{**kw, "epochs": 6}))  # the kept state extends


@pytest.mark.parametrize("at", random.Random(7).sample(range(1, 9), 3))
def test_resume_after_ctrl_c_at_a_random_step(folder16, tmp_path, monkeypatch, at):
    """A real SIGINT arriving *inside* a step (the old divergence: D updated, G not) is deferred
    to the step's end; the run saves there, and resuming matches a straight run bit for bit,
    log included."""
    kw = dict(epochs=3, batch_size=4, diffaugment="color,translation,cutout", log_every=2)
    train_gan(tiny(folder16, tmp_path / "a", **kw))
    calls = {"n": 0}
    real_step = GanTrainer.step

    def interrupting(self, *a):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGINT)  # delivered mid-step, as a user's Ctrl-C is
        return real_step(self, *a)

    monkeypatch.setattr(GanTrainer, "step", interrupting)
    with pytest.raises(Interrupted, match=f"interrupted at step {at}; saved"):
        train_gan(tiny(folder16, tmp_path / "b", **kw))
    monkeypatch.setattr(GanTrainer, "step", real_step)
    train_gan(tiny(folder16, tmp_path / "b", resume=True, **kw))
    for f in ("generator.safetensors", "discriminator.safetensors"):
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    la = (tmp_path / "a" / "log.csv").read_text().splitlines()
    lb = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert [r.split(",")[:6] for r in la] == [r.split(",")[:6] for r in lb]


def test_save_cadence_and_nan_guard_with_deferred_reads(folder16, tmp_path, monkeypatch):
    """--save-every 3, --log-every 2: a NaN planted at step 5 stops the run within 2 steps and
    the checkpoint left is step 3's, the last one written (and checked) before the NaN."""
    run = tmp_path / "run"
    real_step = GanTrainer.step

    def nan_step(self, *a):
        out = real_step(self, *a)
        return out.clone().fill_(float("nan")) if self.step_count == 5 else out

    monkeypatch.setattr(GanTrainer, "step", nan_step)
    with pytest.raises(TrainingError, match=r"step 5: loss is not finite.*last good checkpoint"):
        train_gan(tiny(folder16, run, steps=9, batch_size=4, save_every=3, log_every=2))
    _, meta = load_checkpoint(run / "state.safetensors", "gan-state")
    assert meta["step"] == 3
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    monkeypatch.setattr(GanTrainer, "step", real_step)
    train_gan(tiny(folder16, run, steps=9, batch_size=4, save_every=3, log_every=2, resume=True))
    assert [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))] == list(range(1, 10))


def test_failure_before_first_checkpoint_leaves_nothing(folder16, tmp_path, monkeypatch):
    real_step = GanTrainer.step
    monkeypatch.setattr(GanTrainer, "step",
                        lambda self, *a: real_step(self, *a).fill_(float("nan")))
    with pytest.raises(TrainingError, match="No checkpoint had been written"):
        train_gan(tiny(folder16, tmp_path / "r", steps=4, batch_size=4))
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr(GanTrainer, "step", real_step)
    train_gan(tiny(folder16, tmp_path / "r", steps=2, batch_size=4))  # a plain rerun is accepted


def test_input_errors_before_training(folder16, tmp_path, rng):
    with pytest.raises(InputError, match="fewer than one batch of 64"):
        train_gan(tiny(folder16, tmp_path / "r", batch_size=64))
    with pytest.raises(InputError, match=r"train/covid: class folder missing"):
        train_gan(tiny(folder16, tmp_path / "r", cls="covid"))
    odd = tmp_path / "odd"
    for c in ("normal", "pneumonia"):
        for i in range(10):
            save_png(odd / c / f"{i}.png", rng.integers(0, 255, (36, 36), dtype=np.uint8))
    with pytest.raises(InputError, match="images are 36 px; the generators make .* nearest to 36 are 32, 40"):
        train_gan(tiny(odd, tmp_path / "r"))
    train_gan(tiny(folder16, tmp_path / "r"))
    with pytest.raises(InputError, match="already exists"):
        train_gan(tiny(folder16, tmp_path / "r"))
    with pytest.raises(InputError, match=r"started with: --alpha none \(now 0.3\)"):
        train_gan(tiny(folder16, tmp_path / "r", alpha=0.3, resume=True))
    assert len(list((tmp_path / "r" / "samples").iterdir())) == 1


def test_ema_update_with_a_device_tensor_decay_matches_the_float_form():
    """Inside a CUDA graph the decay is a tensor; it must compute what the float form does."""
    from xraygan.gan_models import ema_update

    torch.manual_seed(0)
    a, m = Generator(GanNetConfig(image_size=16, nz=4, ngf=4)), Generator(GanNetConfig(image_size=16, nz=4, ngf=4))
    b = copy.deepcopy(a)
    ema_update(a, m, 0.9)
    ema_update(b, m, torch.tensor(0.9))
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=1e-6)


def test_optimizer_moments_resume_with_the_parameters_layout(tmp_path):
    """Moments are saved contiguous; a channels-last network gets them back channels-last (the
    fused CUDA Adam refuses mismatched layouts: a CUDA resume failed on this)."""
    from xraygan.checkpoint import optimizer_from_tensors, optimizer_to_tensors

    D = Discriminator(GanNetConfig(image_size=16, ndf=4)).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(D.parameters())
    D(torch.randn(4, 1, 16, 16)).sum().backward()
    opt.step()
    t, groups = optimizer_to_tensors("o.", opt)
    t = {k: v.contiguous() for k, v in t.items()}
    opt2 = torch.optim.Adam(D.parameters())
    optimizer_from_tensors("o.", opt2, t, groups)
    for p in D.parameters():
        assert opt2.state[p]["exp_avg"].stride() == p.stride()
        assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_diversity_is_about_one_for_real_images_and_zero_for_a_constant():
    from xraygan.gan import diversity, mean_pairwise_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, 1, 16, 16, generator=g), torch.rand(64, 1, 16, 16, generator=g)
    assert abs(diversity(b, mean_pairwise_distance(a)) - 1) < 0.05
    assert diversity(a[:1].expand(64, -1, -1, -1), mean_pairwise_distance(a)) == 0


def test_collapse_warning(folder16, tmp_path, monkeypatch):
    """A generator forced to one output whatever the noise is reported as collapsed; one whose
    outputs vary like the training images (uniform noise here) is not."""
    real_forward = Generator.forward

    def varied(self, z, labels=None):
        out = real_forward(self, z, labels)  # kept in the graph, so training still runs
        g = torch.Generator().manual_seed(int(z.abs().sum().item() * 1000))
        return out * 0 + torch.rand(out.shape, generator=g) * 2 - 1

    monkeypatch.setattr(Generator, "forward", varied)
    res = train_gan(tiny(folder16, tmp_path / "ok", steps=2, batch_size=4))
    assert res["diversity"] > 0.5 and not any("collapsed" in w for w in res["warnings"])
    monkeypatch.setattr(Generator, "forward", lambda self, z, labels=None:
                        real_forward(self, torch.zeros_like(z), labels))
    res = train_gan(tiny(folder16, tmp_path / "short", steps=4, batch_size=4))
    assert res["diversity"] < 0.01 and not any("collapsed" in w for w in res["warnings"])  # 4 steps: too early
    monkeypatch.setattr(gan, "COLLAPSE_MIN_STEPS", 2)  # as if 2 steps were a long run
    res = train_gan(tiny(folder16, tmp_path / "bad", steps=2, batch_size=4))
    assert res["diversity"] < 0.01 and any("the generator has collapsed" in w for w in res["warnings"])
    rows = list(csv.DictReader(open(tmp_path / "bad" / "log.csv")))
    assert rows[-1]["diversity"] and float(rows[-1]["diversity"]) < 0.01
