"""The real sample shipped with the package: checksum, counts, patient-disjoint splits, and
`prepare --sample` at 32 and 64 px."""

import hashlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from xraygan.cli import app
from xraygan.sample import FILE, SHA256, load_sample


def test_shipped_file_checksum_and_size():
    data = FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256
    assert len(data) <= 6_000_000


def test_counts_and_patient_disjoint_splits():
    splits, info = load_sample()
    counts = {s: np.bincount(sp.labels, minlength=2).tolist() for s, sp in splits.items()}
    assert counts == {"train": [900, 300], "val": [80, 80], "test": [120, 120]}
    assert info["license"] == "CC BY 4.0" and "Kermany" in info["source"]
    patients = {s: set(sp.patients) for s, sp in splits.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"] and not patients["val"] & patients["test"]
    assert all(p.startswith("test/") for p in patients["test"])  # test comes from the release's test split
    for sp in splits.values():
        assert sp.images.shape[1:] == (64, 64) and sp.images.dtype == np.uint8
    flat = np.concatenate([sp.images.reshape(len(sp.images), -1) for sp in splits.values()])
    assert len({r.tobytes() for r in flat}) == len(flat)  # no exact duplicate anywhere
    assert len(set().union(*(sp.files for sp in splits.values()))) == len(flat)


@pytest.mark.parametrize("size", [32, 64])
def test_prepare_sample(tmp_path, size):
    r = CliRunner().invoke(app, ["prepare", "--sample", "--out", str(tmp_path / "d"), "--size", str(size), "--json"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["counts"] == {"train": {"normal": 900, "pneumonia": 300}, "val": {"normal": 80, "pneumonia": 80},
                             "test": {"normal": 120, "pneumonia": 120}}
    assert rec["sources"][0]["kind"] == "sample" and rec["sources"][0]["sha256"] == SHA256
    assert rec["license"].startswith("CC BY 4.0") and not rec["synthetic_demo"]
    from xraygan.images import read_image_folder

    assert read_image_folder(tmp_path / "d" / "test").size == size


def test_prepare_sample_refuses_upscaling(tmp_path):
    r = CliRunner().invoke(app, ["prepare", "--sample", "--out", str(tmp_path / "d"), "--size", "128"])
    assert r.exit_code == 2 and "the shipped sample is 64 px" in r.stderr.strip().splitlines()[-1]


def test_sample_is_reproducible_from_the_release(shared_data):
    """The cut script reproduces the shipped arrays from the release (pixels, labels, patients)."""
    from xraygan.data.make_sample import cut

    arrays = cut(shared_data / "chest_xray_224")
    splits, _ = load_sample()
    for s, sp in splits.items():
        assert np.array_equal(arrays[f"{s}_labels"], sp.labels)
        assert tuple(arrays[f"{s}_patients"].tolist()) == sp.patients
