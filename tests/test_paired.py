"""Paired comparisons: the two-level bootstrap, Holm, DeLong and the power figures."""

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xraygan.paired import (
    NAMES,
    POWER_Z,
    VERDICT_COLOURS,
    Run,
    delong,
    forest_png,
    holm,
    paired_comparison,
    seeds_needed,
    summary_line,
)


def make_run(label: str, seed: int, y: np.ndarray, score: np.ndarray) -> Run:
    files = tuple(f"{'pneumonia' if t else 'normal'}/{i:04d}.png" for i, t in enumerate(y))
    return Run(label, seed, Path(f"/runs/{label}-seed{seed}/report/metrics.json"), files, y, score, score >= 0.5)


@pytest.fixture
def base():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    score = np.clip(0.5 + (y - 0.5) * 0.3 + rng.normal(0, 0.25, len(y)), 0, 1)
    return y, score


def fixed(y, score, k, rng):
    """The reference's predictions with k of its errors put right."""
    wrong = np.flatnonzero((score >= 0.5) != y)
    s = score.copy()
    pick = rng.choice(wrong, size=k, replace=False)
    s[pick] = np.where(y[pick], 0.9, 0.1)
    return s


def test_identical_rows_no_difference(base):
    y, s = base
    runs = [make_run("baseline", 0, y, s), make_run("same", 0, y, s)]
    res = paired_comparison(runs, ("baseline",), resamples=300)
    m = res["comparisons"][0]["metrics"]
    for k, e in m.items():
        assert e["difference"] == 0 and e["ci95"] == [0, 0] and e["p"] == 1.0 and e["p_holm"] == 1.0
        assert e["verdict"] == "no difference detected"
    assert res["comparisons"][0]["delong"][0]["p"] == 1.0


def test_fixed_errors_flip_the_verdict_where_the_power_figures_say(base):
    y, s = base
    rng = np.random.default_rng(1)
    errors = int(((s >= 0.5) != y).sum())
    ref = make_run("baseline", 0, y, s)
    seen = []
    for k in (0, 2, 4, 6, 8, 10, 12, 16, 20, 30, 40):
        res = paired_comparison([ref, make_run("fixed", 0, y, fixed(y, s, k, rng))], ("baseline",),
                                resamples=1000)
        e = res["comparisons"][0]["metrics"]["balanced_accuracy"]
        assert e["difference"] >= 0 and (k == 0 or e["difference"] > 0)
        seen.append((k, e["difference"], e["se"], e["p"], e["verdict"]))
    assert seen[-1][4] == "better" and seen[-1][3] < 0.01  # 40 of the errors fixed
    assert seen[0][4] == "no difference detected"
    # the flip: detected once the difference passes z(0.975)·SE, within Monte-Carlo error
    for k, d, se, p, verdict in seen:
        ratio = d / se if se else 0
        if ratio > 2.4:
            assert verdict == "better", (k, ratio, p)
        if ratio < 1.6:
            assert verdict == "no difference detected", (k, ratio, p)
    assert 0 < errors


def test_detectable_difference_is_80_percent_power(base):
    """A true difference equal to the reported detectable difference is detected in ~80% of studies."""
    y, s = base
    rng = np.random.default_rng(2)
    ref = make_run("baseline", 0, y, s)
    res = paired_comparison([ref, make_run("same", 0, y, fixed(y, s, 6, rng))], ("baseline",), resamples=400)
    e = res["comparisons"][0]["metrics"]["balanced_accuracy"]
    assert e["detectable_80"] == pytest.approx(POWER_Z * e["se"])
    # normal model of the test: the observed difference ~ N(true, SE); detection when |d| > 1.96 SE
    true = e["detectable_80"]
    draws = rng.normal(true, e["se"], 20000)
    assert np.mean(np.abs(draws) > 1.959964 * e["se"]) == pytest.approx(0.80, abs=0.01)


def test_holm_against_a_hand_example():
    # p sorted: 0.01, 0.02, 0.03, 0.04 with m = 4 → 0.04, 0.06, 0.06, 0.06; then max-accumulated
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.3, 0.04]) == pytest.approx([0.3, 0.08])  # the larger p is already past the bound
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2·0.8 capped at 1, and monotone


def _delong_by_definition(y, a, b):
    """DeLong et al. (1988) as written: structural components by explicit pairwise comparison."""
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    m, n = len(pos), len(neg)

    def psi(x, z):
        return (x > z) + 0.5 * (x == z)

    comps = []
    for s in (a, b):
        k = psi(s[pos][:, None], s[neg][None, :])
        comps.append((k.mean(), k.mean(1), k.mean(0)))
    (auc_a, v10a, v01a), (auc_b, v10b, v01b) = comps
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    L = np.array([1, -1])
    var = L @ s10 @ L / m + L @ s01 @ L / n
    z = (auc_a - auc_b) / math.sqrt(var)
    return auc_a, auc_b, z


def test_delong_matches_the_definition_ties_included():
    rng = np.random.default_rng(3)
    y = rng.random(120) < 0.4
    a = np.round(np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.3, 120), 0, 1), 1)  # many ties
    b = np.round(np.clip(0.5 + (y - 0.5) * 0.2 + rng.normal(0, 0.3, 120), 0, 1), 2)
    got = delong(y, a, b)
    auc_a, auc_b, z = _delong_by_definition(y, a, b)
    assert got["auc_a"] == pytest.approx(auc_a) and got["auc_b"] == pytest.approx(auc_b)
    assert got["z"] == pytest.approx(z)
    assert got["p"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))


def test_seeds_needed():
    # 2.80·sqrt(0.00001 + 0.0002/k) ≤ 0.02  ⇔  k ≥ 0.0002 / ((0.02/2.80)² − 0.00001) = 4.8…
    assert seeds_needed(1e-5, [1e-4, 1e-4], 0.02) == 5
    assert seeds_needed(1e-4, [1e-4, 1e-4], 0.02) is None  # the test set alone is too noisy
    assert seeds_needed(1e-5, [None, 1e-4], 0.02) is None  # one seed: spread unknown


def test_seeds_are_resampled(base):
    """With several seeds the interval widens by the seed spread: wider than one seed's."""
    y, s = base
    rng = np.random.default_rng(4)
    ref = [make_run("baseline", i, y, fixed(y, s, 0, rng)) for i in range(3)]
    one = paired_comparison(ref[:1] + [make_run("x", 0, y, fixed(y, s, 10, rng))], ("baseline",), resamples=500)
    many = paired_comparison(ref + [make_run("x", i, y, fixed(y, s, k, rng)) for i, k in enumerate((0, 10, 30))],
                             ("baseline",), resamples=500)
    w1 = np.diff(one["comparisons"][0]["metrics"]["f1"]["ci95"])[0]
    w3 = np.diff(many["comparisons"][0]["metrics"]["f1"]["ci95"])[0]
    assert w3 > w1
    assert many["comparisons"][0]["metrics"]["f1"]["var_seeds"][0] > 0


def write_report(folder: Path, label: str, seed: int, y: np.ndarray, score: np.ndarray, fp: str = "t1") -> Path:
    """A report folder as evaluate writes it: metrics.json and predictions.csv."""
    import json

    from xraygan.evaluate import write_predictions
    from xraygan.metrics import binary_metrics

    folder.mkdir(parents=True, exist_ok=True)
    classes = ["pneumonia" if t else "normal" for t in y]
    write_predictions(folder / "predictions.csv", [f"{c}/{i:04d}.png" for i, c in enumerate(classes)], classes,
                      y, score, 0.5)
    (folder / "metrics.json").write_text(json.dumps({
        "kind": "xraygan-metrics", "label": label, "seed": seed, "positive": "pneumonia", "threshold": 0.5,
        "test_fingerprint": fp, "metrics": binary_metrics(y, np.round(score, 5), 0.5)}))
    return folder / "metrics.json"


def swapped(y, score, k, rng):
    """The reference's predictions with k errors put right and k right calls made wrong."""
    s = fixed(y, score, k, rng)
    right = rng.choice(np.flatnonzero((score >= 0.5) == y), size=k, replace=False)
    s[right] = np.where(y[right], 0.1, 0.9)
    return s


def make_study(root: Path, base) -> Path:
    y, s = base
    rng = np.random.default_rng(7)
    for seed in range(3):
        write_report(root / f"baseline-seed{seed}" / "report", "baseline", seed, y, fixed(y, s, 0, rng))
        write_report(root / f"oversample-seed{seed}" / "report", "oversample", seed, y, swapped(y, s, 8, rng))
        write_report(root / f"better-seed{seed}" / "report", "better", seed, y, fixed(y, s, 45, rng))
    return root


def test_compare_command_writes_the_paired_tables(tmp_path, base):
    import json

    from typer.testing import CliRunner

    from xraygan.cli import app

    runs = make_study(tmp_path / "runs", base)
    r = CliRunner().invoke(app, ["compare", str(runs), "--out", str(tmp_path / "table"), "--resamples", "500"])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "table" / "table.md").read_text()
    assert "## Paired differences against baseline" in md
    assert "## Paired differences against oversample (the count-matched control" in md
    assert "| better | F1 |" in md and "| better | F1 |" in r.stdout
    rec = json.loads((tmp_path / "table" / "table.json").read_text())
    by = {(c["reference"], c["method"]): c for c in rec["paired"]["comparisons"]}
    assert by[("baseline", "better")]["metrics"]["balanced_accuracy"]["verdict"] == "better"
    assert by[("baseline", "oversample")]["metrics"]["balanced_accuracy"]["verdict"] == "no difference detected"
    assert len(by[("baseline", "better")]["delong"]) == 3  # one per shared seed
    assert "Against baseline: better better on F1" in md
    paired = (tmp_path / "table" / "paired.csv").read_text().splitlines()
    assert paired[0].startswith("reference,method,metric,difference") and len(paired) == 1 + 4 * 5
    # a p at the bootstrap's floor (no resample crossed zero) is printed as a bound, and only such a p
    floor = 2 / (500 + 1)
    for c in rec["paired"]["comparisons"]:
        for k, m in c["metrics"].items():
            lo, hi = m["ci95"]
            cell = f"| {c['method']} | {NAMES[k]} | {m['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
            sect = md.split(f"## Paired differences against {c['reference']}")[1].split("## Paired")[0]
            assert (cell + f"≤ {m['p_holm']:.3f} |" in sect) == (m["p"] <= floor + 1e-12), (c["method"], k)
            assert (cell + f"{m['p_holm']:.3f} |" in sect) == (m["p"] > floor + 1e-12), (c["method"], k)
    assert by[("baseline", "better")]["metrics"]["balanced_accuracy"]["p"] <= floor + 1e-12  # the case was met
    # the forest plot: the detected rows drawn in the verdict's colour
    png = Image.open(tmp_path / "table" / "paired.png").convert("RGB")
    assert colour_pixels(png, VERDICT_COLOURS["better"]) > 20
    # the old spelling still works, with a note
    r = CliRunner().invoke(app, ["evaluate", "--compare", str(runs)])
    assert r.exit_code == 0 and "is now `xraygan compare`" in r.stderr


def test_compare_refuses_what_cannot_be_paired(tmp_path, base):
    from xraygan.errors import InputError
    from xraygan.evaluate import compare

    y, s = base
    runs = make_study(tmp_path / "runs", base)
    with pytest.raises(InputError, match="--reference control: no such row"):
        compare([runs], references=("control",))
    write_report(tmp_path / "other" / "x-seed0" / "report", "other", 0, y[:500], s[:500], fp="t2")
    with pytest.raises(InputError, match="scored on another test set than"):
        compare([runs, tmp_path / "other"])
    assert compare([runs, tmp_path / "other"], references=())["paired"]["comparisons"] == []
    (runs / "better-seed1" / "report" / "predictions.csv").unlink()
    with pytest.raises(InputError, match="predictions.csv: missing"):
        compare([runs])


def test_a_difference_detected_below_the_detectable_size_is_called_out(base):
    """A verdict whose difference is smaller than the 80%-power size is named as found at low
    power; one well above it is not."""
    y, s = base
    rng = np.random.default_rng(1)
    ref = make_run("baseline", 0, y, s)
    kinds = set()
    for k in (8, 10, 12, 14, 16, 20, 30, 40):
        res = paired_comparison([ref, make_run("fixed", 0, y, fixed(y, s, k, rng))], ("baseline",), resamples=1000)
        e = res["comparisons"][0]["metrics"]
        line = summary_line(res, "baseline")
        detected = [n for n in ("f1", "balanced_accuracy") if e[n]["verdict"] == "better"]
        weak = [n for n in detected if e[n]["difference"] < e[n]["detectable_80"]]
        assert ("so likely overstated" in line) == bool(weak), (k, line)
        for n in weak:
            assert f"80% power at {e[n]['detectable_80']:.3f}" in line
        kinds.add("weak" if weak else "strong" if detected else "none")
    assert {"weak", "strong"} <= kinds  # both kinds of verdict were met


def colour_pixels(img: Image.Image, hex_colour: str) -> int:
    """Pixels within a few levels of a colour (antialiasing blends the edges)."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(np.asarray(img, dtype=int) - rgb).max(axis=2) <= 6).sum())


def test_forest_plot_colours_only_detected_differences(base):
    """Identical rows draw no verdict colour; a row with errors put right draws 'better' and no 'worse';
    with nothing compared there is no figure."""
    import io

    y, s = base
    rng = np.random.default_rng(3)
    ref = make_run("baseline", 0, y, s)
    same = paired_comparison([ref, make_run("same", 0, y, s)], ("baseline",), resamples=300)
    img = Image.open(io.BytesIO(forest_png(same))).convert("RGB")
    assert colour_pixels(img, VERDICT_COLOURS["better"]) == colour_pixels(img, VERDICT_COLOURS["worse"]) == 0
    better = paired_comparison([ref, make_run("fixed", 0, y, fixed(y, s, 40, rng))], ("baseline",), resamples=300)
    assert better["comparisons"][0]["metrics"]["f1"]["verdict"] == "better"
    img = Image.open(io.BytesIO(forest_png(better))).convert("RGB")
    assert colour_pixels(img, VERDICT_COLOURS["better"]) > 20
    assert colour_pixels(img, VERDICT_COLOURS["worse"]) == 0
    assert forest_png({"references": [], "comparisons": [], "resamples": 300}) is None
