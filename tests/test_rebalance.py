import json
import os

import numpy as np
import pytest
from conftest import make_folder
from PIL import Image

from xraygan.errors import InputError
from xraygan.images import read_image_folder, save_png
from xraygan.rebalance import RebalanceConfig, rebalance


@pytest.fixture
def train(tmp_path, rng):
    return make_folder(tmp_path / "train", {"normal": 30, "pneumonia": 10}, 16, rng)


def run(train, out, method, **kw):
    return rebalance(RebalanceConfig(data=train, out=out, method=method, **kw))


@pytest.mark.parametrize("method,after,origin", [
    ("none", {"normal": 30, "pneumonia": 10}, {"real": 10}),
    ("oversample", {"normal": 30, "pneumonia": 30}, {"real": 10, "duplicated": 20}),
    ("undersample", {"normal": 10, "pneumonia": 10}, {"real": 10}),
    ("smote", {"normal": 30, "pneumonia": 30}, {"real": 10, "smote": 20}),
    ("augment", {"normal": 30, "pneumonia": 30}, {"real": 10, "augmented": 20}),
])
def test_method_counts_and_origins(train, tmp_path, method, after, origin):
    rec = run(train, tmp_path / "out", method)
    assert rec["after"] == after and rec["origins"]["pneumonia"] == origin
    got = {c: len(list((tmp_path / "out" / c).glob("*.png"))) for c in after}
    assert got == after
    assert json.loads((tmp_path / "out" / "rebalance.json").read_text())["after"] == after
    f = read_image_folder(tmp_path / "out")  # every written file is a valid image of the size
    assert f.images.shape[1:] == (16, 16)


def test_ratio_and_hardlinks(train, tmp_path):
    rec = run(train, tmp_path / "o", "oversample", ratio=0.5)
    assert rec["after"]["pneumonia"] == 15 and rec["files"]["hardlinked"] == 45
    assert os.stat(tmp_path / "o" / "normal" / "normal-000.png").st_nlink >= 2


def test_smote_pca_images_lie_between_neighbours(train, tmp_path):
    rec = run(train, tmp_path / "o", "smote", smote_space="pca")
    assert rec["origins"]["pneumonia"]["smote"] == 20
    a = np.asarray(Image.open(tmp_path / "o" / "pneumonia" / "smote-000001.png"))
    assert a.shape == (16, 16) and a.dtype == np.uint8


def _synth(root, n, prefix, size=16):
    for i in range(n):
        save_png(root / "pneumonia" / f"synthetic-{prefix}-{i + 1:06d}.png", np.full((size, size), i, np.uint8))
    return root


def test_gan_mixes_several_synthetic_folders(train, tmp_path):
    a, b = _synth(tmp_path / "sa", 15, "dcgan"), _synth(tmp_path / "sb", 15, "cdcgan")
    rec = run(train, tmp_path / "o", "gan", synthetic=(a, b))
    names = sorted(p.name for p in (tmp_path / "o" / "pneumonia").glob("synthetic-*"))
    assert rec["origins"]["pneumonia"] == {"real": 10, "synthetic": 20}
    assert sum("dcgan-" in n and "cdcgan" not in n for n in names) == 10
    assert sum("cdcgan" in n for n in names) == 10
    assert rec["generators"] == []  # images made elsewhere (no generate record): no generator known


def test_gan_errors(train, tmp_path):
    few = _synth(tmp_path / "few", 5, "g")
    with pytest.raises(InputError, match=r"5 synthetic pneumonia images, 20 needed.*-n 20"):
        run(train, tmp_path / "o", "gan", synthetic=(few,))
    with pytest.raises(InputError, match="needs --synthetic"):
        run(train, tmp_path / "o", "gan")
    big = _synth(tmp_path / "big", 25, "g", size=32)
    with pytest.raises(InputError, match="synthetic image is 32 px, the training images are 16 px"):
        run(train, tmp_path / "o", "gan", synthetic=(big,))
    with pytest.raises(InputError, match="--method magic"):
        run(train, tmp_path / "o", "magic")
    assert not (tmp_path / "o").exists()
