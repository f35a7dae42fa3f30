"""Pooled sources (issue: the source shortcut): extra normals by patient into named splits, per-file
sources carried to evaluate, per-source metrics and the warning when sources disagree."""

import json
from collections import defaultdict

import numpy as np
from conftest import write_img, xray_like
from typer.testing import CliRunner

from xraygan.cli import app
from xraygan.evaluate import by_source
from xraygan.sources import patient_id

runner = CliRunner()


def _pooled_source(root, rng):
    for split, n in (("train", 24), ("test", 8)):
        for i in range(n):
            write_img(root / "src" / split / "NORMAL" / f"IM-{1000 + i:04d}-0001.png", xray_like(rng, 40))
            write_img(root / "src" / split / "PNEUMONIA" / f"person{i + 1}_bacteria_{i}.png",
                      xray_like(rng, 40, bright=True))
    for p in range(1, 16):  # NIH-style names: patient 000000pp, two images each
        for k in range(2):
            write_img(root / "nih" / f"{p:08d}_{k:03d}.png", xray_like(rng, 40))
    return root / "src", root / "nih"


def _files(out):
    return {s: sorted(str(p.relative_to(out / s)) for p in (out / s).rglob("*.png")) for s in ("train", "val", "test")}


def test_extra_normal_splits_keep_patients_together_and_the_primary_test_split(tmp_path, rng):
    src, nih = _pooled_source(tmp_path, rng)
    outs = {}
    for name, extra in (("default", []), ("pooled", ["--extra-normal-splits", "train,val,test"])):
        out = tmp_path / name
        r = runner.invoke(app, ["prepare", str(src), "--out", str(out), "--size", "16", "--extra-normal", str(nih),
                                *extra, "--json"])
        assert r.exit_code == 0, r.stderr
        outs[name] = (out, json.loads(r.stdout))
    d_out, d_rec = outs["default"]
    p_out, p_rec = outs["pooled"]
    fs = p_rec["file_sources"]
    primary_test = lambda rec: sorted(k for k, v in rec["file_sources"].items()  # noqa: E731
                                      if k.startswith("test/") and v != "extra-normal")
    assert primary_test(d_rec) == primary_test(p_rec)  # pooling never changes the source's test split
    assert not any(v == "extra-normal" for k, v in d_rec["file_sources"].items() if k.startswith("test/"))
    assert any(v == "extra-normal" for k, v in fs.items() if k.startswith("test/"))
    where = defaultdict(set)  # every extra patient sits in exactly one split
    for k, v in fs.items():
        if v == "extra-normal":
            where[patient_id(k.split("/")[-1][:-4])].add(k.split("/")[0])
    assert where and all(len(s) == 1 for s in where.values())


def test_per_source_figures_sum_to_the_pooled_confusion_and_warn_only_when_apart():
    rng = np.random.default_rng(0)
    n = 400
    src = np.array(["kermany"] * n + ["extra-normal"] * n)
    y = np.r_[rng.random(n) < 0.5, np.zeros(n, bool)]  # the extra source holds normals only
    # kermany normals are often called pneumonia, extra normals almost never
    score = np.r_[np.where(y[:n], 0.9, rng.choice([0.2, 0.8], n, p=[0.5, 0.5])), np.full(n, 0.1)]
    out, warns = by_source(src, y, score, 0.5, 500, 0, "pneumonia", "normal")
    pooled = {"tp": int((y & (score >= 0.5)).sum()), "fn": int((y & (score < 0.5)).sum()),
              "fp": int((~y & (score >= 0.5)).sum()), "tn": int((~y & (score < 0.5)).sum())}
    assert {k: sum(e["confusion"][k] for e in out.values()) for k in pooled} == pooled
    assert "roc_auc" in out["kermany"] and "roc_auc" not in out["extra-normal"]
    assert out["extra-normal"]["specificity"] == 1.0 and out["kermany"]["specificity"] < 0.6
    assert len(warns) == 1 and "specificity (normal) 1.00 on extra-normal" in warns[0]
    # two sources that behave alike: intervals overlap, no warning
    same = np.array(["a", "b"] * n)
    y2 = rng.random(2 * n) < 0.5
    s2 = np.clip(rng.normal(0.3 + 0.4 * y2, 0.2), 0, 1)
    assert by_source(same, y2, s2, 0.5, 500, 0, "pneumonia", "normal")[1] == []


def test_evaluate_and_compare_report_per_source(tmp_path, rng):
    src, nih = _pooled_source(tmp_path, rng)
    data = tmp_path / "data"
    assert runner.invoke(app, ["prepare", str(src), "--out", str(data), "--size", "16", "--extra-normal",
                               str(nih), "--extra-normal-splits", "train,val,test"]).exit_code == 0
    run = tmp_path / "runs" / "base"
    r = runner.invoke(app, ["train-classifier", str(data / "train"), "--val", str(data / "val"), "--out", str(run),
                            "--epochs", "1", "--batch-size", "16", "--small-stem", "no", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["evaluate", str(run / "classifier.safetensors"), str(data / "test"), "--report",
                            "--bootstrap", "100", "--json"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert set(rec["by_source"]) == {"kermany", "extra-normal"} and "source kermany" in r.stderr
    assert "## By source" in (run / "report" / "report.md").read_text()
    r = runner.invoke(app, ["evaluate", "--compare", str(tmp_path / "runs")])
    assert r.exit_code == 0 and "Specificity (extra-normal)" in r.stdout


def test_probe_tells_a_shifted_source_apart_and_not_a_random_split(tmp_path, rng):
    from xraygan.audit import probe_auc

    imgs = np.stack([xray_like(rng, 16) for _ in range(160)]).reshape(160, -1).astype(float) / 255
    half = rng.permutation(160)
    assert abs(probe_auc(imgs[half[:80]], imgs[half[80:]], 0) - 0.5) < 0.15  # one source, split at random
    shifted = imgs[half[80:]] ** 0.6  # the same kind of images through another contrast curve
    assert probe_auc(imgs[half[:80]], shifted, 0) > 0.9
    # end to end: extra normals with a border and another contrast curve, pooled as the study did
    src, nih = _pooled_source(tmp_path, rng)
    for f in nih.glob("*.png"):
        from PIL import Image

        a = np.asarray(Image.open(f)).astype(float)
        a = (255 * (a / 255) ** 0.5).astype(np.uint8)
        a[:4], a[-4:] = 0, 0
        write_img(f, a)
    data = tmp_path / "data"
    assert runner.invoke(app, ["prepare", str(src), "--out", str(data), "--size", "16", "--extra-normal",
                               str(nih)]).exit_code == 0
    r = runner.invoke(app, ["probe-sources", str(data / "train"), "--json"])
    assert r.exit_code == 0, r.stderr
    pair = json.loads(r.stdout)["classes"]["normal"]["extra-normal vs kermany"]
    assert pair["pca_auc"] > 0.9 and pair["verdict"].startswith("easily told apart")
    old = runner.invoke(app, ["audit", "--sources", str(data / "train"), "--json"])  # the old spelling
    assert old.exit_code == 0 and json.loads(old.stdout) == json.loads(r.stdout)
    assert "is now `xraygan probe-sources`" in old.stderr
    r = runner.invoke(app, ["probe-sources", str(src / "train")])
    assert r.exit_code == 2 and "single source" in r.stderr.strip().splitlines()[-1]
