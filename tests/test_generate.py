"""generate: the same images whatever the batching, labels, and never clobbering what it did not write."""

import json

import numpy as np
import pytest
import torch
from conftest import make_folder
from PIL import Image

from xraygan.checkpoint import save_checkpoint
from xraygan.errors import InputError
from xraygan.gan import TrainGanConfig, train_gan
from xraygan.generate import GenerateConfig, generate
from xraygan.images import read_image_folder


@pytest.fixture
def folder16(tmp_path, rng):
    """A 16-px training folder: 24 normal, 12 pneumonia."""
    return make_folder(tmp_path / "train", {"normal": 24, "pneumonia": 12}, 16, rng)


def tiny(data, out, **kw):
    kw = {"epochs": 1, "batch_size": 8, "nz": 8, "ngf": 4, "ndf": 4, "device": "cpu", **kw}
    return TrainGanConfig(data=data, out=out, **kw)


@pytest.fixture
def cgan_run(folder16, tmp_path):
    train_gan(tiny(folder16, tmp_path / "cg", conditional=True))
    return tmp_path / "cg" / "generator.safetensors"


def test_generate_deterministic_streaming_and_labels(cgan_run, tmp_path):
    a = generate(GenerateConfig(cgan_run, tmp_path / "a", n=10, batch_size=3, device="cpu"))
    generate(GenerateConfig(cgan_run, tmp_path / "b", n=10, batch_size=7, device="cpu"))
    assert a["label"] == "pneumonia"  # the minority, recorded at training
    fa = sorted((tmp_path / "a" / "pneumonia").iterdir())
    fb = sorted((tmp_path / "b" / "pneumonia").iterdir())
    assert [f.name for f in fa][0] == "synthetic-cg-000001.png" and len(fa) == 10
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))  # batching-independent
    rec = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert rec["runs"][0]["count"] == 10 and len(rec["runs"][0]["checkpoint_sha256"]) == 64
    generate(GenerateConfig(cgan_run, tmp_path / "n", n=3, label="normal", device="cpu"))
    assert len(list((tmp_path / "n" / "normal").iterdir())) == 3
    with pytest.raises(InputError, match="--label covid: the generator knows only"):
        generate(GenerateConfig(cgan_run, tmp_path / "c", n=3, label="covid", device="cpu"))


def test_a_batch_too_large_for_the_memory_is_made_in_smaller_ones_with_the_same_images(cgan_run, tmp_path,
                                                                                     monkeypatch):
    """generate cuts its batch to what fits the free memory (XRAYGAN_MEMORY_LIMIT simulates a small
    machine), records the batch it used, says so when --batch-size was given, and draws the same files."""
    from xraygan.gan_models import GanNetConfig
    from xraygan.generate import load_generator
    from xraygan.memory import BYTES_PER_ELEMENT, ENV, _resident_bytes, generator_footprint

    full = generate(GenerateConfig(cgan_run, tmp_path / "full", n=12, device="cpu"))
    assert full["batch_size"] == 12 and full["warnings"] == []  # never more than -n, nothing cut
    G, _ = load_generator(cgan_run, torch.device("cpu"))
    per, params = generator_footprint(GanNetConfig(**G.cfg.__dict__))
    # room for the weights and about 3 images beyond what this process holds now
    monkeypatch.setenv(ENV, str(_resident_bytes() + int((16 * params + BYTES_PER_ELEMENT["gan"] * per * 3.5) / 0.9)))
    short = generate(GenerateConfig(cgan_run, tmp_path / "short", n=12, batch_size=256, device="cpu"))
    assert 1 <= short["batch_size"] < 12 and "--batch-size 256: made in batches of" in short["warnings"][0]
    rec = json.loads((tmp_path / "short" / "generation.json").read_text())
    assert rec["runs"][0]["batch_size"] == short["batch_size"]
    fa, fb = (sorted((tmp_path / d / "pneumonia").glob("*.png")) for d in ("full", "short"))
    assert [f.name for f in fa] == [f.name for f in fb] and all(a.read_bytes() == b.read_bytes() for a, b in zip(fa, fb))


def test_generate_no_clobber_append_force(cgan_run, tmp_path):
    out = tmp_path / "s"
    generate(GenerateConfig(cgan_run, out, n=4, device="cpu"))
    first = (out / "pneumonia" / "synthetic-cg-000001.png").read_bytes()
    with pytest.raises(InputError, match="already holds 4 synthetic images"):
        generate(GenerateConfig(cgan_run, out, n=4, device="cpu"))
    generate(GenerateConfig(cgan_run, out, n=3, append=True, device="cpu"))
    names = sorted(p.name for p in (out / "pneumonia").iterdir())
    assert names[-1] == "synthetic-cg-000007.png" and len(names) == 7
    assert (out / "pneumonia" / "synthetic-cg-000001.png").read_bytes() == first
    assert json.loads((out / "generation.json").read_text())["total"] == 7
    generate(GenerateConfig(cgan_run, out, n=2, force=True, device="cpu", preview=True))
    assert len(list((out / "pneumonia").iterdir())) == 2 and (out / "preview.png").is_file()
    generate(GenerateConfig(cgan_run, out, n=100, batch_size=16, force=True, device="cpu", preview=True))
    side = read_image_folder(out).size
    grid = np.asarray(Image.open(out / "preview.png"))
    assert grid.shape[0] == 8 * (side + 2) + 2  # 64 images in rows of 8, not every batch's first


def test_generate_rejects_wrong_files(cgan_run, tmp_path):
    run = cgan_run.parent
    with pytest.raises(InputError, match="is a discriminator checkpoint, expected a generator"):
        generate(GenerateConfig(run / "discriminator.safetensors", tmp_path / "o", n=1))
    save_checkpoint(tmp_path / "clf.safetensors", {"w": torch.zeros(2)}, "classifier", {})
    with pytest.raises(InputError, match="is a classifier checkpoint"):
        generate(GenerateConfig(tmp_path / "clf.safetensors", tmp_path / "o", n=1))
    data = cgan_run.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.safetensors: not a .*safetensors file"):
        generate(GenerateConfig(tmp_path / "trunc.safetensors", tmp_path / "o", n=1))
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(InputError, match=r"x\.png: not a .*safetensors file"):
        generate(GenerateConfig(tmp_path / "x.png", tmp_path / "o", n=1))
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(InputError, match="not an xraygan checkpoint"):
        generate(GenerateConfig(tmp_path / "foreign.safetensors", tmp_path / "o", n=1))
    assert not (tmp_path / "o").exists()
