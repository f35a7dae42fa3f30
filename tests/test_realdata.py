"""Checks on the real data in ../shared/data (skipped in a user's clone, run in CI)."""

import pytest

from xraygan.prepare import PrepareConfig, prepare

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_pneumoniamnist_study_imbalance(shared_data, tmp_path):
    rec = prepare(PrepareConfig(out=tmp_path / "pm", medmnist=shared_data / "pneumoniamnist.npz",
                                size=28, imbalance=3.0, seed=0))
    c = rec["counts"]
    # the official val and test splits are untouched (MedMNIST v2 counts)
    assert c["val"] == {"normal": 135, "pneumonia": 389}
    assert c["test"] == {"normal": 234, "pneumonia": 390}
    assert c["train"]["normal"] == 1214
    assert c["train"]["pneumonia"] == round(1214 / 3) == 405  # the study's 3:1
    assert rec["duplicates"]["groups"] > 0  # PneumoniaMNIST holds a few duplicates
    # duplicates that the source spread across splits never stay in two splits
    assert all(not f.endswith("]") or f.split(":")[1].startswith("train")
               for f in rec["duplicates"]["dropped_files"])
    assert rec["imbalance"]["removed_counts"]["pneumonia"] + 405 + rec["duplicates"][
        "dropped_across_splits"] == 3494


def test_kermany_224_release(shared_data, tmp_path):
    rec = prepare(PrepareConfig(out=tmp_path / "k", src=shared_data / "chest_xray_224", size=32,
                                imbalance=3.0))
    c = rec["counts"]
    assert c["test"] == {"normal": 234, "pneumonia": 390}
    assert c["train"]["normal"] + c["val"]["normal"] == 1341
    assert rec["val_carved_from_train"]
    assert rec["duplicates"]["groups"] == 30  # as the data's README says, at 32 px
    assert c["train"]["pneumonia"] == round(c["train"]["normal"] / 3)


def test_gan_on_pneumoniamnist_32px(shared_data, tmp_path):
    from PIL import Image

    from xraygan.gan import TrainGanConfig, train_gan
    from xraygan.generate import GenerateConfig, generate

    prepare(PrepareConfig(out=tmp_path / "pm", medmnist=shared_data / "pneumoniamnist.npz",
                          size=32, imbalance=3.0))
    res = train_gan(TrainGanConfig(data=tmp_path / "pm" / "train", out=tmp_path / "gan",
                                   epochs=1, batch_size=64, ngf=8, ndf=8, device="cpu"))
    assert res["label"] == "pneumonia" and res["steps"] == 405 // 64
    generate(GenerateConfig(tmp_path / "gan" / "generator.safetensors", tmp_path / "synth", n=20,
                            device="cpu"))
    files = sorted((tmp_path / "synth" / "pneumonia").glob("synthetic-gan-*.png"))
    assert len(files) == 20
    img = Image.open(files[0])
    assert img.mode == "L" and img.size == (32, 32)
