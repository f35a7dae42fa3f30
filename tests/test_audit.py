import csv
import json

import numpy as np
import pytest
import torch
from conftest import xray_like

from xraygan.audit import (
    AuditConfig,
    audit,
    fd_parts,
    frechet_distance,
    kid,
    nearest_correlation,
    prdc,
    score_review,
)
from xraygan.checkpoint import save_checkpoint
from xraygan.errors import InputError
from xraygan.images import save_png


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    # N(0, I) vs N(m, 4I) in 3 dims: |m|² + 3 * (1 + 4 - 2 * 2) = |m|² + 3
    b = rng.normal(0, 2, (20000, 3)) + np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(5 + 3, rel=0.05)
    # of those 8: the mean term |m|² = 5, and b is 4x as spread as a
    mean_term, spread = fd_parts(a, b)
    assert mean_term == pytest.approx(5, rel=0.02) and spread == pytest.approx(4, rel=0.05)
    c = a - a.mean(0)
    mean_term, spread = fd_parts(c, 0.5 * c)  # a narrower set in the same place: no mean term
    assert mean_term == pytest.approx(0, abs=1e-9) and spread == pytest.approx(0.25)


def test_kid_and_prdc_separate_same_from_different():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (300, 8)), rng.normal(0, 1, (300, 8))
    far = rng.normal(4, 1, (300, 8))
    same, diff = kid(a, b, 5, 200, rng)[0], kid(a, far, 5, 200, rng)[0]
    assert abs(same) < 0.05 < diff
    m = prdc(a, b, 5)
    assert m["precision"] > 0.8 and m["recall"] > 0.8 and m["coverage"] > 0.8
    f = prdc(a, far, 5)
    assert f["precision"] < 0.1 and f["coverage"] < 0.1


def test_nearest_correlation_finds_copies_and_skips_self():
    rng = np.random.default_rng(2)
    ref = np.stack([xray_like(rng, 16) for _ in range(10)])
    q = np.stack([ref[3], xray_like(rng, 16)])
    sims, idx = nearest_correlation(q, ref)
    assert sims[0] == pytest.approx(1.0, abs=1e-5) and idx[0] == 3 and sims[1] < 0.999
    self_sims, self_idx = nearest_correlation(ref, ref, exclude_self=True)
    assert (self_idx != np.arange(10)).all() and (self_sims < 0.999).all()


@pytest.fixture
def folders(tmp_path):
    """Real train folder (2 classes, 16 px) and synthetic pneumonia: new look-alikes plus one
    planted exact copy of a real image; and a pure-noise synthetic set."""
    rng = np.random.default_rng(3)
    real, synth, noise = tmp_path / "real", tmp_path / "synth", tmp_path / "noise"
    for i in range(40):
        save_png(real / "normal" / f"n{i:02d}.png", xray_like(rng, 16))
        save_png(real / "pneumonia" / f"p{i:02d}.png", xray_like(rng, 16, bright=True))
    for i in range(30):
        save_png(synth / "pneumonia" / f"synthetic-g-{i:06d}.png", xray_like(rng, 16, bright=True))
        save_png(noise / "pneumonia" / f"synthetic-n-{i:06d}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    copy = (real / "pneumonia" / "p07.png").read_bytes()
    (synth / "pneumonia" / "synthetic-g-000099.png").write_bytes(copy)
    return real, synth, noise


def test_audit_flags_the_planted_copy_and_scores_noise_far(folders, tmp_path):
    real, synth, noise = folders
    cache = tmp_path / "cache"
    good = audit(AuditConfig(real=real, synthetic=synth, out=tmp_path / "a", cache=cache,
                             review=8, device="cpu", kid_subset_size=20))
    assert good["flagged"]["pneumonia"] == ["synthetic-g-000099.png"]
    flagged_png = list((tmp_path / "a" / "flagged" / "pneumonia").glob("*.png"))
    assert [p.name for p in flagged_png] == ["synthetic-g-000099__p07.png"]
    bad = audit(AuditConfig(real=real, synthetic=noise, out=tmp_path / "b", cache=cache, review=0,
                            device="cpu", kid_subset_size=20))
    assert bad["flagged"]["pneumonia"] == []
    for space in ("classifier", "pca"):
        g, b = good["classes"]["pneumonia"]["spaces"][space], bad["classes"]["pneumonia"]["spaces"][space]
        assert b["fd"] > 2 * g["fd"] and b["kid"] > g["kid"], space
    assert bad["classes"]["pneumonia"]["spaces"]["pca"]["precision"] < good["classes"]["pneumonia"]["spaces"]["pca"]["precision"]
    assert bad["cache"]["hits"] == 1  # the real folder's features came from the first audit
    for f in ("audit.json", "report.md", "similarity_pneumonia.png", "nearest_pneumonia.png",
              "review/sheet.html", "review/sheet.png", "review/review.csv", "review_key.json"):
        assert (tmp_path / "a" / f).is_file(), f
    assert not list((tmp_path / "a" / "review").rglob("*key*"))  # the key is not in review/


def test_score_review(folders, tmp_path):
    real, synth, _ = folders
    audit(AuditConfig(real=real, synthetic=synth, out=tmp_path / "a", classifier="none", review=12,
                      device="cpu", kid_subset_size=20, cache=tmp_path / "c"))
    key = json.loads((tmp_path / "a" / "review_key.json").read_text())["items"]
    sheet = tmp_path / "a" / "review" / "review.csv"
    rows = list(csv.DictReader(open(sheet)))
    assert len(rows) == 12 and sorted(v["truth"] for v in key.values()).count("real") == 6
    with open(sheet, "w", newline="") as f:  # a perfect reviewer, one image left blank
        w = csv.writer(f)
        w.writerow(["id", "guess", "quality", "comment"])
        for i, r in enumerate(rows):
            w.writerow([r["id"], "" if i == 0 else key[r["id"]]["truth"], 4, ""])
    res = score_review(sheet)
    assert res["answered"] == 11 and res["blank"] == 1 and res["accuracy"] == 1.0
    assert res["p_value"] < 0.05 and "better than chance" in res["verdict"]
    assert (tmp_path / "a" / "review" / "review_score.json").is_file()
    sheet.write_text("id,guess,quality,comment\nIMG999,real,3,\n")
    with pytest.raises(InputError, match="unknown id 'IMG999'"):
        score_review(sheet)


def test_audit_errors(folders, tmp_path):
    real, synth, _ = folders
    rng = np.random.default_rng(4)
    save_png(tmp_path / "s32" / "pneumonia" / "x.png", xray_like(rng, 32))
    with pytest.raises(InputError, match="images are 32 px, the real images"):
        audit(AuditConfig(real=real, synthetic=tmp_path / "s32", out=tmp_path / "o1"))
    save_png(tmp_path / "covid" / "covid" / "x.png", xray_like(rng, 16))
    with pytest.raises(InputError, match="covid have no match"):
        audit(AuditConfig(real=real, synthetic=tmp_path / "covid", out=tmp_path / "o2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no class folders"):
        audit(AuditConfig(real=real, synthetic=tmp_path / "empty", out=tmp_path / "o3"))
    save_checkpoint(tmp_path / "g.safetensors", {"w": torch.zeros(1)}, "generator", {})
    with pytest.raises(InputError, match="generator"):
        audit(AuditConfig(real=real, synthetic=synth, out=tmp_path / "o4",
                          classifier=str(tmp_path / "g.safetensors"), cache=tmp_path / "c"))


def test_prdc_does_not_move_when_features_are_shifted():
    """Translation changes no distance, so it must change no k-NN figure (float32 cdist did)."""
    from xraygan.audit import prdc

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 64)), rng.normal(0.3, 1.0, size=(300, 64))
    a = prdc(real, fake, 5)
    b = prdc(real + 1000.0, fake + 1000.0, 5)
    assert a == b


def test_kid_spread_is_estimated_when_sets_are_small():
    """With sets no larger than the subset size, subsets are smaller than the sets, so the std
    is a real spread and not 0."""
    from xraygan.audit import kid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(0.2, 1.0, size=(150, 16))
    mean, std = kid(a, b, subsets=10, size=1000, rng=np.random.default_rng(1))
    assert std > 0 and np.isfinite(mean)
