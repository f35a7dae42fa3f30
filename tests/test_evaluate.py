import csv
import json
import shutil

import numpy as np
import pytest
import torch

from xraygan.checkpoint import save_checkpoint
from xraygan.errors import InputError
from xraygan.evaluate import EvaluateConfig, bootstrap_ci, compare, evaluate, run_label, tune_threshold
from xraygan.images import save_png
from xraygan.metrics import binary_metrics


def test_tune_threshold_maximises_the_criterion():
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    s = np.array([.1, .2, .3, .35, .4, .6, .7, .9])
    t = tune_threshold(y, s, "f1")
    best = max(binary_metrics(y, s, v)["f1"] for v in s)
    assert binary_metrics(y, s, t)["f1"] == pytest.approx(best)
    j = tune_threshold(y, s, "youden")
    assert j == pytest.approx(0.6)  # sens 0.75, spec 1.0: J 0.75 beats t=0.35 (1.0 + 0.75 - 1)
    with pytest.raises(InputError, match="both classes"):
        tune_threshold(np.ones(3), np.array([.1, .2, .3]), "f1")


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    m = binary_metrics(y, s, 0.5)
    a, b = bootstrap_ci(y, s, 0.5, 300, seed=1), bootstrap_ci(y, s, 0.5, 300, seed=1)
    assert a == b
    for k in ("precision", "recall", "specificity", "f1", "roc_auc"):
        lo, hi = a[k]
        assert lo <= m[k] <= hi and hi - lo < 0.25
    one = bootstrap_ci(np.zeros(20, bool), np.linspace(0, 1, 20), 0.5, 50, 0)
    assert one["roc_auc"] is None and one["specificity"] is not None


def test_run_label_strips_seed():
    assert run_label("runs/oversample-seed2/classifier.safetensors") == "oversample"
    assert run_label("runs/gan_a0.25_seed0/classifier.safetensors") == "gan_a0.25"
    assert run_label("runs/smote/seed1/classifier.safetensors") == "smote"


def test_evaluate_report_and_files(trained, tmp_path):
    ckpt = trained / "run-seed3" / "classifier.safetensors"
    rec = evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", report=tmp_path / "rep",
                                  bootstrap=100, device="cpu"))
    assert rec["label"] == "run" and rec["positive"] == "pneumonia" and rec["threshold"] == 0.5
    assert rec["metrics"]["n"] == 20 and rec["test_counts"] == {"normal": 10, "pneumonia": 10}
    for f in ("metrics.json", "report.md", "predictions.csv", "roc.png", "pr.png", "confusion.png",
              "scores.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0, f
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "rep" / "predictions.csv")))
    tp = sum(r["class"] == "pneumonia" and r["predicted_positive"] == "1" for r in rows)
    assert saved["metrics"]["confusion"]["tp"] == tp and len(rows) == 20
    # the run's training budget (48 images, batch 16, 2 epochs) travels with its metrics
    t = saved["training"]
    assert (t["steps_per_epoch"], t["epochs"], t["steps"]) == (3, 2, 3 * saved["epoch"])
    assert f"- training: {t['steps']} optimizer steps to the kept epoch, of 6 at most" in \
        (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(InputError, match="already exists"):
        evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", report=tmp_path / "rep"))
    tuned = evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", tune_on=trained / "val",
                                    bootstrap=0, device="cpu"))
    assert tuned["threshold_tuning"]["on"] == str(trained / "val") and tuned["ci95"] == {}


def test_evaluate_both_operating_points_in_one_run(trained, tmp_path):
    """--untuned-report: the report at 0.5 written beside the tuned one, each the same as the
    separate run would write (one scoring of the test set instead of two processes)."""
    ckpt = trained / "run-seed3" / "classifier.safetensors"
    both = evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", tune_on=trained / "val",
                                   report=tmp_path / "tuned", untuned_report=tmp_path / "half",
                                   bootstrap=50, device="cpu"))
    half = evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", report=tmp_path / "half-alone",
                                   bootstrap=50, device="cpu"))
    tuned = evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", tune_on=trained / "val",
                                    report=tmp_path / "tuned-alone", bootstrap=50, device="cpu"))
    for a, b in (("half", "half-alone"), ("tuned", "tuned-alone")):
        ra, rb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in (a, b))
        assert ra == rb, (a, b)
        assert (tmp_path / a / "predictions.csv").read_text() == (tmp_path / b / "predictions.csv").read_text()
        assert (tmp_path / a / "roc.png").is_file()
    assert both["untuned"]["threshold"] == 0.5 and both["untuned"]["metrics"] == half["metrics"]
    assert both["metrics"] == tuned["metrics"] and both["threshold"] == tuned["threshold"] != 0.5
    # an explicit untuned threshold, and the ways to get it wrong (refused before any file is written)
    t3 = evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", tune_on=trained / "val",
                                 threshold=0.3, untuned_report=tmp_path / "t3", bootstrap=0, device="cpu"))
    assert t3["untuned"]["threshold"] == 0.3
    assert json.loads((tmp_path / "t3" / "metrics.json").read_text())["threshold"] == 0.3
    with pytest.raises(InputError, match="--untuned-report needs --tune-on"):
        evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", untuned_report=tmp_path / "x"))
    with pytest.raises(InputError, match="apart from --report"):
        evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", tune_on=trained / "val",
                                report=tmp_path / "y", untuned_report=tmp_path / "y" / "half"))
    with pytest.raises(InputError, match="already exists"):
        evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", tune_on=trained / "val",
                                report=tmp_path / "z", untuned_report=tmp_path / "half"))
    with pytest.raises(InputError, match="either --threshold or --tune-on"):
        evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", tune_on=trained / "val", threshold=0.3))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_evaluate_errors(trained, tmp_path):
    ckpt = trained / "run-seed3" / "classifier.safetensors"
    save_checkpoint(tmp_path / "g.safetensors", {"w": torch.zeros(1)}, "generator", {})
    with pytest.raises(InputError, match="generator"):
        evaluate(EvaluateConfig(checkpoint=tmp_path / "g.safetensors", data=trained / "test"))
    for cls in ("normal", "pneumonia", "covid"):
        save_png(tmp_path / "t3" / cls / "0.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(InputError, match="covid.*the model knows only normal, pneumonia"):
        evaluate(EvaluateConfig(checkpoint=ckpt, data=tmp_path / "t3"))
    for cls in ("normal", "pneumonia"):
        save_png(tmp_path / "t32" / cls / "0.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError, match="test images are 32 px, the model was trained on 16 px"):
        evaluate(EvaluateConfig(checkpoint=ckpt, data=tmp_path / "t32"))
    with pytest.raises(InputError, match="--positive covid"):
        evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", positive="covid"))
    # tuning the threshold on the test images themselves, by the same path or a copy
    shutil.copytree(trained / "test", tmp_path / "test-copy")
    with pytest.raises(InputError, match="holds the same files as the test folder"):
        evaluate(EvaluateConfig(checkpoint=ckpt, data=trained / "test", tune_on=tmp_path / "test-copy"))


def _metrics_file(path, label, f1, recall, fp="abc", steps_per_epoch=None, generators=None):
    m = {"precision": 0.8, "recall": recall, "specificity": 0.7, "f1": f1, "roc_auc": None}
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"kind": "xraygan-metrics", "label": label, "metrics": m, "test_fingerprint": fp, "threshold": 0.5}
    if generators is not None:
        rec["generators"] = [{"checkpoint": f"gan/{g}/generator.safetensors", "checkpoint_sha256": g * 8}
                             for g in generators]
    if steps_per_epoch:
        rec["training"] = {"train_images": 64 * steps_per_epoch, "images_per_epoch": 64 * steps_per_epoch,
                           "batch_size": 64, "steps_per_epoch": steps_per_epoch, "epochs": 10, "steps": 40}
    path.write_text(json.dumps(rec))
    return path


def test_compare_groups_by_label_mean_and_std(tmp_path):
    _metrics_file(tmp_path / "r" / "a-seed0" / "metrics.json", "a", 0.60, 0.9)
    _metrics_file(tmp_path / "r" / "a-seed1" / "metrics.json", "a", 0.80, 0.7)
    _metrics_file(tmp_path / "r" / "b-seed0" / "metrics.json", "b", 0.50, 0.5)
    res = compare([tmp_path / "r"], out=tmp_path / "table")
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["a"]["runs"] == 2 and rows["a"]["f1"][0] == pytest.approx(0.70)
    assert rows["a"]["f1"][1] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert rows["b"]["f1"] == (0.5, None) and rows["a"]["roc_auc"] is None
    md = (tmp_path / "table" / "table.md").read_text()
    assert "| a | 2 | 0.800 ± 0.000 | 0.800 ± 0.141 | 0.700 ± 0.000 | 0.700 ± 0.141 | n/a |" in md
    lines = (tmp_path / "table" / "table.csv").read_text().splitlines()
    assert lines[0].startswith("method,runs,precision_mean") and lines[2].startswith("b,1,")
    assert res["warnings"] == []
    _metrics_file(tmp_path / "other.json", "c", 0.5, 0.5, fp="zzz")
    assert "different test sets" in compare([tmp_path / "r", tmp_path / "other.json"])["warnings"][0]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="bad.json: not a metrics.json"):
        compare([tmp_path / "bad.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no metrics.json"):
        compare([tmp_path / "empty"])


def _warns_once(runs, table, note):
    """compare over `runs` into `table` gives one warning, starting with `note`, in its result and
    at the foot of table.md."""
    res = compare([runs], out=table, references=())
    assert len(res["warnings"]) == 1 and res["warnings"][0].startswith(note)
    assert f"**Warning:** {note}" in (table / "table.md").read_text()


def test_compare_says_when_rows_were_given_different_steps(tmp_path):
    """Rows trained for the same epochs on sets of different sizes: the table says each row's
    steps against the baseline's, on stderr and in table.md; equal budgets (or records without
    one) say nothing."""
    for label, spe in (("baseline", 26), ("oversample", 38), ("dcgan", 38), ("undersample", 13)):
        for seed in (0, 1):
            _metrics_file(tmp_path / "r" / f"{label}-seed{seed}" / "metrics.json", label, 0.7, 0.8,
                          steps_per_epoch=spe)
    _warns_once(tmp_path / "r", tmp_path / "t",
                "the rows' classifiers were given different numbers of optimizer steps: baseline 260; "
                "dcgan, oversample 380 (1.5×); undersample 130 (0.5×); a difference between these rows is partly "
                "one of training length")
    # without a baseline the first row is the unit; a row whose seeds differ shows its range
    _metrics_file(tmp_path / "s" / "a-seed0" / "metrics.json", "a", 0.7, 0.8, steps_per_epoch=20)
    _metrics_file(tmp_path / "s" / "b-seed0" / "metrics.json", "b", 0.7, 0.8, steps_per_epoch=10)
    _metrics_file(tmp_path / "s" / "b-seed1" / "metrics.json", "b", 0.7, 0.8, steps_per_epoch=30)
    assert "steps: a 200; b 100–300 (0.5–1.5×);" in compare([tmp_path / "s"], references=())["warnings"][0]
    for spe in (26, None):  # the same budget everywhere, or none recorded
        for label in ("baseline", "oversample"):
            _metrics_file(tmp_path / f"u{spe}" / label / "metrics.json", label, 0.7, 0.8, steps_per_epoch=spe)
        assert compare([tmp_path / f"u{spe}"], references=())["warnings"] == []


def test_compare_says_when_a_rows_seeds_share_one_generator(tmp_path):
    """A generator row whose every seed trained on one generator's images is named (its spread is
    the classifiers' alone); rows without synthetic images, rows whose seeds had generators of
    their own, one-run rows and records that do not say are not."""
    rows = {"baseline": [[], []], "dcgan": [["a1"], ["a1"], ["a1"]], "cdcgan": [["b0"], ["b1"]],
            "mixed": [["c0", "c1"], ["c1", "c0"]], "single": [["d0"]], "old": [None, None]}
    for label, gens in rows.items():
        for seed, g in enumerate(gens):
            _metrics_file(tmp_path / "r" / f"{label}-seed{seed}" / "metrics.json", label, 0.7, 0.8, generators=g)
    _warns_once(tmp_path / "r", tmp_path / "t",
                "every seed of these rows trained on the same generator's images: dcgan (3 runs, one generator), "
                "mixed (2 runs, the same 2 generators); their spread over seeds, and the paired test, leave out how "
                "much other generators would change them (xraygan study trains a generator per seed")


def test_vectorised_bootstrap_matches_the_scikit_learn_loop():
    """Each resample's metrics equal scikit-learn's on the same resampled arrays (ties, duplicate
    draws and one-class resamples included)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from xraygan.evaluate import bootstrap_samples

    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.3
    s = np.round(np.clip(rng.normal(0.3 + 0.4 * y, 0.25), 0, 1), 2)  # rounded: many ties
    got = bootstrap_samples(y, s, 0.5, 400, seed=9)
    idx = np.random.default_rng(9).integers(0, len(y), (400, len(y)))
    ref_roc, ref_ap, ref_f1 = [], [], []
    for i in idx:
        yb, sb = y[i], s[i]
        pb = sb >= 0.5
        tp, fp, fn = (yb & pb).sum(), (~yb & pb).sum(), (yb & ~pb).sum()
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        ref_f1.append(2 * p * r / (p + r) if p + r else 0.0)
        if 0 < yb.sum() < len(yb):
            ref_roc.append(roc_auc_score(yb, sb))
            ref_ap.append(average_precision_score(yb, sb))
    assert np.allclose(got["roc_auc"], ref_roc, atol=1e-9, rtol=0)
    assert np.allclose(got["pr_auc"], ref_ap, atol=1e-9, rtol=0)
    assert np.allclose(got["f1"], ref_f1, atol=1e-9, rtol=0)
    # a set small enough that some resamples hold one class: they are skipped for the AUCs only
    y2, s2 = np.array([True, False, False, False]), np.array([0.9, 0.1, 0.4, 0.4])
    few = bootstrap_samples(y2, s2, 0.5, 200, seed=0)
    assert len(few["f1"]) == 200 and 0 < len(few["roc_auc"]) < 200


def test_numpy_metrics_equal_scikit_learn():
    """binary_metrics's AUCs and the curves evaluate plots are scikit-learn's numbers (ties
    included), computed without importing it."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    from xraygan.metrics import ranking_curves

    rng = np.random.default_rng(4)
    for n, decimals in ((50, 1), (200, 3), (7, 2)):
        y = rng.random(n) < 0.4
        y[:2] = (True, False)
        s = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.25), 0, 1), decimals)
        m = binary_metrics(y, s, 0.5)
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert m["pr_auc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        c = ranking_curves(y, s)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        p, r, _ = precision_recall_curve(y, s)
        for got, ref in ((c["fpr"], fpr), (c["tpr"], tpr), (c["precision"], p), (c["recall"], r)):
            assert got.shape == ref.shape and np.allclose(got, ref, atol=1e-12, rtol=0)


def test_evaluate_does_not_import_scikit_learn_or_torchvision(tmp_path):
    """A study runs evaluate and gradcam once or twice per classifier: each import would cost
    every one of those processes 1.4-1.6 s on two cores."""
    import subprocess
    import sys

    code = ("import sys; from xraygan import evaluate, gradcam, classifier, metrics; "
            "classifier.build_resnet18(classifier.ClassifierNetConfig(num_classes=2, image_size=32)); "
            "print(sorted(m for m in ('sklearn', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
