"""Grad-CAM: the maps, their hooks, the share of CAM energy in the lungs, and the command's files."""

import csv
import json

import numpy as np
import pytest
import torch

from xraygan.classifier import ClassifierNetConfig, build_resnet18
from xraygan.errors import InputError
from xraygan.gradcam import GradCam, GradcamConfig, chest_region, energy_share, gradcam, pick
from xraygan.images import save_png


def test_gradcam_shapes_and_hooks_removed():
    model = build_resnet18(ClassifierNetConfig(image_size=32, small_stem=True)).eval()
    x = torch.randn(3, 1, 32, 32)
    with GradCam(model, model.layer4) as gc:
        cams, logits = gc(x)
        assert len(model.layer4._forward_hooks) == 1
    assert cams.shape == (3, 4, 4) and (cams >= 0).all() and logits.shape == (3, 2)
    assert len(model.layer4._forward_hooks) == 0
    with pytest.raises(ValueError), GradCam(model, model.layer4):
        raise ValueError("boom")
    assert len(model.layer4._forward_hooks) == 0
    assert all(p.grad is None for p in model.parameters())  # explaining does not train


def test_energy_share_and_picks():
    cams = np.zeros((2, 4, 4), np.float32)
    cams[0, :2] = 1.0  # top half
    masks = np.zeros((2, 4, 4), bool)
    masks[:, :, :2] = True  # left half
    share = energy_share(cams, masks)
    assert share[0] == pytest.approx(0.5) and np.isnan(share[1])
    region = chest_region(64)
    assert 0.3 < region.mean() < 0.6 and region[32, 32] and not region[0, 0]
    labels = np.array([0] * 6 + [1] * 4)
    correct = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], bool)
    p = pick(correct, labels, 0, 4, np.random.default_rng(0))
    assert len(p) == 4 and sum(not correct[i] for i in p) == 2 and all(labels[i] == 0 for i in p)
    assert len(pick(correct, labels, 1, 8, np.random.default_rng(0))) == 4


def test_gradcam_outputs_and_masks(trained, tmp_path):
    ckpt = trained / "run-seed3" / "classifier.safetensors"
    rec = gradcam(GradcamConfig(checkpoint=ckpt, data=trained / "test", out=tmp_path / "cams",
                                n=3, device="cpu"))
    assert rec["layer"] == "layer3" and rec["layer_map_size"] == 4  # 16 px: layer4 would be 2x2
    assert (tmp_path / "cams" / "grid.png").stat().st_size > 0
    assert len(list((tmp_path / "cams" / "normal").glob("*.png"))) == 3
    rows = list(csv.DictReader(open(tmp_path / "cams" / "cams.csv")))
    assert len(rows) == 20
    assert json.loads((tmp_path / "cams" / "gradcam.json").read_text())["kind"] == "xraygan-gradcam"
    # the batch is memory and speed only: batches of 3 write the same files as the default
    gradcam(GradcamConfig(checkpoint=ckpt, data=trained / "test", out=tmp_path / "cams3", n=3, batch_size=3,
                          device="cpu"))
    for f in (tmp_path / "cams").rglob("*"):
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "cams3" / f.relative_to(tmp_path / "cams")).read_bytes(), f.name
    # masks covering everything put all energy in the lungs
    for cls in ("normal", "pneumonia"):
        for f in (trained / "test" / cls).glob("*.png"):
            save_png(tmp_path / "m" / cls / f.name, np.full((16, 16), 255, np.uint8))
    full = gradcam(GradcamConfig(checkpoint=ckpt, data=trained / "test", out=tmp_path / "c2",
                                 masks=tmp_path / "m", device="cpu"))
    assert full["region_area_fraction"] == 1.0
    assert full["lung_energy_mean"] is None or full["lung_energy_mean"] == pytest.approx(1.0)
    (tmp_path / "m" / "normal" / "normal0.png").unlink()
    with pytest.raises(InputError, match="no lung mask for normal/normal0.png"):
        gradcam(GradcamConfig(checkpoint=ckpt, data=trained / "test", out=tmp_path / "c3",
                              masks=tmp_path / "m", device="cpu"))
    with pytest.raises(InputError, match="--layer layer9"):
        gradcam(GradcamConfig(checkpoint=ckpt, data=trained / "test", out=tmp_path / "c4",
                              layer="layer9", device="cpu"))
