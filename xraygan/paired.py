"""Paired comparisons of a study's rows against a reference row: "does it help?" as a test.

Every run of a study is scored on the same test images, so two rows are compared image by
image. Two sources of noise are known and resampled together in one **two-level bootstrap**
(the hierarchical bootstrap of Davison & Hinkley, *Bootstrap Methods and their Application*,
1997, §3.8; used for seeds × test sets by Bouthillier et al., "Accounting for variance in
machine learning benchmarks", MLSys 2021): in each of B replicates

1. the test images are drawn with replacement, the **same draw for every run** (the pairing);
2. each row's runs (seeds) are drawn with replacement, independently per row (seeds are
   independent trainings; seed 0 of one row has nothing in common with seed 0 of another);
3. each row's metric is the mean over its drawn runs of the metric on the drawn images.

The difference row − reference over the replicates gives the 95% percentile interval and a
two-sided p-value for "no difference" (the bootstrap test by interval inversion:
p = 2·min(share of differences ≤ 0, share ≥ 0), with the +1 correction of Davison & Hinkley
eq. 4.11, so identical rows give p = 1). Holm's step-down correction (Holm 1979) is applied
per reference and metric over the rows compared. For every row, the smallest difference the
study detects at 80% power and α = 0.05 is (z₀.₉₇₅ + z₀.₈₀) · SE, with SE the bootstrap
standard deviation of the difference; a difference detected below it was found at low power and
is likely overstated. With B resamples the smallest two-sided p is 2/(B+1): a p there is printed
as a bound ("≤").

DeLong's test (DeLong, DeLong & Clarke-Pearson 1988, in the O(n log n) form of Sun & Xu 2014)
compares the ROC-AUCs of two runs on the same images, per seed, as a cross-check.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xraygan.errors import InputError
from xraygan.metrics import resample_aucs

HEADLINE = ("f1", "balanced_accuracy", "roc_auc", "recall", "specificity")
Z975, Z80 = 1.959963984540054, 0.8416212335729143
POWER_Z = Z975 + Z80  # a true difference of POWER_Z·SE is detected 80% of the time at α = 0.05


@dataclass(frozen=True)
class Run:
    label: str
    seed: int | None
    source: Path  # the metrics.json
    files: tuple[str, ...]
    y: np.ndarray  # bool: positive class
    score: np.ndarray  # P(positive)
    pred: np.ndarray  # bool: called positive at the run's threshold


def read_run(metrics_path: Path, rec: dict) -> Run:
    """A run's per-image predictions, from the predictions.csv beside its metrics.json."""
    pred_path = Path(metrics_path).parent / "predictions.csv"
    try:
        with open(pred_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise InputError(f"{pred_path}: missing; the paired comparison needs each run's predictions "
                         "(evaluate --report writes them), or give --reference none") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{pred_path}: cannot read ({e})") from None
    try:
        files = tuple(r["file"] for r in rows)
        y = np.array([r["class"] == rec["positive"] for r in rows], dtype=bool)
        score = np.array([float(r["score"]) for r in rows])
        pred = np.array([r["predicted_positive"] == "1" for r in rows], dtype=bool)
    except (KeyError, ValueError) as e:
        raise InputError(f"{pred_path}: not a predictions.csv written by xraygan evaluate ({e})") from None
    return Run(rec["label"], rec.get("seed"), Path(metrics_path), files, y, score, pred)


def check_same_images(runs: list[Run]) -> None:
    """Paired tests need every run scored on the same images, in the same order, with the same truth."""
    first = runs[0]
    for r in runs[1:]:
        if r.files != first.files or not np.array_equal(r.y, first.y):
            n_diff = len(set(r.files) ^ set(first.files))
            raise InputError(f"{r.source}: scored on other test images than {first.source} "
                             f"({len(r.files)} vs {len(first.files)} images, {n_diff} named in only one); "
                             "paired comparisons need one test set")


def resampled_metrics(run: Run, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each headline metric of one run on every resample (`counts[b, i]`: draws of image i)."""
    y, p = run.y, run.pred
    c = counts.astype(np.float64)
    tp, fn = c @ (p & y), c @ (~p & y)
    fp, tn = c @ (p & ~y), c @ (~p & ~y)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        spec = np.where(tn + fp > 0, tn / (tn + fp), 0.0)
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    roc, _ = resample_aucs(y, run.score, counts)
    return {"f1": f1, "balanced_accuracy": (recall + spec) / 2, "roc_auc": roc, "recall": recall,
            "specificity": spec}


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _midrank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j < len(x) and xs[j] == xs[i]:
            j += 1
        ranks[order[i:j]] = 0.5 * (i + j - 1) + 1
        i = j
    return ranks


def delong(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict:
    """DeLong's test of two correlated ROC-AUCs (same images): AUCs, z and two-sided p."""
    y = np.asarray(y, dtype=bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError("DeLong's test needs at least two images of each class")
    v10, v01, aucs = [], [], []
    for s in (np.asarray(score_a, float), np.asarray(score_b, float)):
        pos, neg = s[y], s[~y]
        tx, ty, tz = _midrank(pos), _midrank(neg), _midrank(np.r_[pos, neg])
        auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10.append((tz[:m] - tx) / n)  # per positive: share of negatives scored below it
        v01.append(1.0 - (tz[m:] - ty) / m)  # per negative: share of positives scored above it
        aucs.append(auc)
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    diff = aucs[0] - aucs[1]
    if var <= 0:
        z, p = 0.0, 1.0 if diff == 0 else 0.0
    else:
        z = diff / math.sqrt(var)
        p = math.erfc(abs(z) / math.sqrt(2))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "z": float(z), "p": float(p)}


def _row_stats(runs: list[Run], counts: np.ndarray) -> dict[str, np.ndarray]:
    """metric → (runs, B) resampled values, and metric → (runs,) values on the full test set."""
    per = [resampled_metrics(r, counts) for r in runs]
    full = [resampled_metrics(r, np.ones((1, len(r.y)))) for r in runs]
    return {k: np.stack([p[k] for p in per]) for k in HEADLINE} | {
        f"{k}@full": np.array([f[k][0] for f in full]) for k in HEADLINE}


def paired_comparison(runs: list[Run], references: tuple[str, ...], resamples: int = 1000, seed: int = 0,
                      target: float = 0.02) -> dict:
    """Every row against each reference present, per headline metric (see the module docstring)."""
    check_same_images(runs)
    labels = list(dict.fromkeys(r.label for r in runs))
    refs = [r for r in references if r in labels]
    if not refs:
        return {"references": [], "comparisons": [], "resamples": resamples}
    n = len(runs[0].y)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.int32)
    by_label = {lab: [r for r in runs if r.label == lab] for lab in labels}
    stats = {lab: _row_stats(rs, counts) for lab, rs in by_label.items()}
    # each row's seed draws, once per row: the same draws against every reference
    draws = {lab: rng.integers(0, len(rs), (resamples, len(rs))) for lab, rs in by_label.items()}
    cols = np.arange(resamples)[:, None]

    def boot(lab: str, k: str) -> np.ndarray:  # (B,) row metric: mean over drawn seeds, drawn images
        return stats[lab][k][draws[lab], cols].mean(1)

    comparisons = []
    for ref in refs:
        block = []
        for lab in labels:
            if lab == ref:
                continue
            entry = {"method": lab, "reference": ref, "runs": len(by_label[lab]),
                     "reference_runs": len(by_label[ref]), "metrics": {}}
            for k in HEADLINE:
                d = boot(lab, k) - boot(ref, k)
                point = float(stats[lab][f"{k}@full"].mean() - stats[ref][f"{k}@full"].mean())
                se = float(d.std(ddof=1)) if resamples > 1 else 0.0
                p = min(1.0, 2 * min(int((d <= 0).sum()) + 1, int((d >= 0).sum()) + 1) / (resamples + 1))
                img_only = (stats[lab][k].mean(0) - stats[ref][k].mean(0))  # seeds fixed, images drawn
                var_img = float(img_only.var(ddof=1)) if resamples > 1 else 0.0
                var_seed = [float(stats[x][f"{k}@full"].var(ddof=1)) if len(by_label[x]) > 1 else None
                            for x in (lab, ref)]
                entry["metrics"][k] = {
                    "difference": point, "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
                    "p": p, "se": se, "detectable_80": POWER_Z * se,
                    "var_images": var_img, "var_seeds": var_seed,
                    "seeds_for_target": seeds_needed(var_img, var_seed, target)}
            entry["delong"] = _delong_per_seed(by_label[lab], by_label[ref])
            block.append(entry)
        for k in HEADLINE:
            adj = holm([e["metrics"][k]["p"] for e in block])
            for e, a in zip(block, adj):
                m = e["metrics"][k]
                m["p_holm"] = a
                m["verdict"] = ("better" if m["difference"] > 0 else "worse") if a < 0.05 else "no difference detected"
        comparisons += block
    return {"references": refs, "comparisons": comparisons, "resamples": resamples, "seed": seed,
            "target": target, "images": n}


def seeds_needed(var_img: float, var_seed: list[float | None], target: float, most: int = 1000) -> int | None:
    """Seeds per row for a difference of `target` to be detected with 80% power: the smallest k
    with POWER_Z·sqrt(var_img + (var_a + var_b)/k) ≤ target. None when the seed spread is not
    known (one seed) or when the test set's own noise alone is too large (more images needed)."""
    if any(v is None for v in var_seed):
        return None
    budget = (target / POWER_Z) ** 2 - var_img
    if budget <= 0:
        return None
    k = max(1, math.ceil(sum(var_seed) / budget))
    return k if k <= most else None


def _delong_per_seed(rows: list[Run], refs: list[Run]) -> list[dict]:
    """DeLong's paired AUC test for each seed both rows ran (the same seed number)."""
    ref_by_seed = {r.seed: r for r in refs}
    out = []
    for r in rows:
        other = ref_by_seed.get(r.seed)
        if other is None:
            continue
        try:
            out.append({"seed": r.seed, **delong(r.y, r.score, other.score)})
        except ValueError:
            continue
    return out


NAMES = {"f1": "F1", "balanced_accuracy": "Bal. acc.", "roc_auc": "ROC-AUC", "recall": "Recall",
         "specificity": "Specificity"}
CONTROL = "oversample"  # the count-matched control: the real minority images duplicated to the same count


def reference_title(ref: str) -> str:
    if ref == CONTROL:
        return f"{ref} (the count-matched control: real pneumonia images duplicated to the same count)"
    return ref


ANSWER = ("f1", "balanced_accuracy")  # the metrics each reference's answer line speaks of


def block_of(res: dict, ref: str) -> list[dict]:
    """The comparisons against one reference, in the table's order of rows."""
    return [c for c in res["comparisons"] if c["reference"] == ref]


def at_floor(m: dict, resamples: int) -> bool:
    """No resample fell on the far side of zero: the p-value is the smallest these resamples can
    show, 2/(B+1), and the true one may be smaller (more resamples resolve it)."""
    return m["p"] <= 2 / (resamples + 1) + 1e-12


def p_holm_text(m: dict, resamples: int) -> str:
    """The Holm-corrected p as the tables print it: "≤ 0.018" where the raw p is at the floor
    (every such row of a block then reads the same bound, not the same value)."""
    return f"{'≤ ' if at_floor(m, resamples) else ''}{m['p_holm']:.3f}"


def summary_line(res: dict, ref: str) -> str:
    """The answer first: which rows differ from the reference on F1 or balanced accuracy, and
    which of those differences are smaller than the size the runs detect with 80% power: found at
    lower power than that, they are likely to overstate the true difference (the winner's curse),
    and a few more seeds often take them out of detection."""
    block = block_of(res, ref)
    found = [(c["method"], k, c["metrics"][k]) for c in block for k in ANSWER
             if c["metrics"][k]["verdict"] != "no difference detected"]
    if found:
        line = f"Against {ref}: " + "; ".join(f"{method} {m['verdict']} on {NAMES[k]} ({m['difference']:+.3f}, "
                                              f"Holm p {p_holm_text(m, res['resamples'])})"
                                              for method, k, m in found) + "."
        weak = [f"{method} on {NAMES[k]} ({m['difference']:+.3f}; 80% power at {m['detectable_80']:.3f})"
                for method, k, m in found if abs(m["difference"]) < m["detectable_80"]]
        if weak:
            line += (" Smaller than the size these runs detect with 80% power, so likely overstated "
                     "(more seeds before reporting it): " + "; ".join(weak) + ".")
        return line
    det = [c["metrics"][k]["detectable_80"] for c in block for k in ANSWER]
    span = f"{min(det):.3f}–{max(det):.3f}" if det and min(det) != max(det) else (f"{det[0]:.3f}" if det else "n/a")
    return (f"Against {ref}: no row differs on F1 or balanced accuracy (Holm-corrected, α = 0.05); the smallest "
            f"differences this study could have detected with 80% power are {span}.")


def paired_markdown(res: dict) -> str:
    if not res["comparisons"]:
        return ""
    target = res["target"]
    lines = []
    for ref in res["references"]:
        lines += ["", f"## Paired differences against {reference_title(ref)}", "",
                  summary_line(res, ref), "",
                  f"| Method | Metric | Difference [95% CI] | p (Holm) | Verdict | Detectable (80% power) | "
                  f"Seeds for ±{target:g} |", "|---|---|---|---|---|---|---|"]
        block = block_of(res, ref)
        for c in block:
            for k in HEADLINE:
                m = c["metrics"][k]
                seeds = m["seeds_for_target"]
                seeds = str(seeds) if seeds is not None else ("n/a (1 seed)" if None in m["var_seeds"]
                                                              else "more test images needed")
                lines.append(f"| {c['method']} | {NAMES[k]} | {m['difference']:+.3f} [{m['ci95'][0]:+.3f}, "
                             f"{m['ci95'][1]:+.3f}] | {p_holm_text(m, res['resamples'])} | {m['verdict']} | "
                             f"{m['detectable_80']:.3f} | {seeds} |")
        rows = [c for c in block if c["delong"]]
        if rows:
            seeds = sorted({d["seed"] for c in rows for d in c["delong"]}, key=lambda x: (x is None, x))
            lines += ["", f"DeLong's test of each seed's ROC-AUC against {ref}'s of the same seed (same images; "
                      "training noise not included, no correction): AUC vs AUC, p", "",
                      "| Method | " + " | ".join(f"seed {x}" for x in seeds) + " |", "|---|" + "---|" * len(seeds)]
            for c in rows:
                by = {d["seed"]: d for d in c["delong"]}
                lines.append(f"| {c['method']} | " + " | ".join(
                    f"{by[x]['auc_a']:.3f} vs {by[x]['auc_b']:.3f}, {by[x]['p']:.3f}" if x in by else "" for x in seeds)
                    + " |")
    lines += ["", f"Two-level bootstrap ({res['resamples']} resamples of the {res['images']} test images, the "
              "same draw for both rows, and of each row's seeds); p-values by interval inversion, Holm-corrected "
              "per reference and metric over the rows (≤: no resample crossed zero, so the p is at most that; more "
              "--resamples resolve it); detectable = 2.80 × bootstrap SE, the difference these runs find 80% of the "
              "time (a detected difference below it is likely overstated).", ""]
    return "\n".join(lines)


PAIRED_CSV = ("reference", "method", "metric", "difference", "ci_low", "ci_high", "p", "p_holm", "verdict",
              "se", "detectable_80", "seeds_for_target", "runs", "reference_runs")


def paired_rows(res: dict) -> list[dict]:
    out = []
    for c in res["comparisons"]:
        for k in HEADLINE:
            m = c["metrics"][k]
            out.append({"reference": c["reference"], "method": c["method"], "metric": k,
                        "difference": f"{m['difference']:.5f}", "ci_low": f"{m['ci95'][0]:.5f}",
                        "ci_high": f"{m['ci95'][1]:.5f}", "p": f"{m['p']:.5f}", "p_holm": f"{m['p_holm']:.5f}",
                        "verdict": m["verdict"], "se": f"{m['se']:.5f}", "detectable_80": f"{m['detectable_80']:.5f}",
                        "seeds_for_target": "" if m["seeds_for_target"] is None else m["seeds_for_target"],
                        "runs": c["runs"], "reference_runs": c["reference_runs"]})
    return out


VERDICT_COLOURS = {"better": "#1b7837", "worse": "#b2182b"}


def forest_png(res: dict, dpi: int = 100) -> bytes | None:
    """The paired differences as a forest plot: a row of panels per reference, one panel per
    headline metric, one line per method: the difference (dot) with its 95% interval, filled and
    coloured where Holm's correction leaves it detected, hollow where not, over a grey band of
    ± the difference the runs detect with 80% power. A dot inside its band but filled is a
    verdict found at low power (the answer line's "likely overstated"). None without comparisons."""
    if not res.get("comparisons"):
        return None
    from xraygan.plots import fig_png, pyplot

    plt = pyplot()
    refs = res["references"]
    blocks = {ref: block_of(res, ref) for ref in refs}
    most = max(len(b) for b in blocks.values())
    fig, axes = plt.subplots(len(refs), len(HEADLINE), squeeze=False, sharey="row",
                             figsize=(2.3 * len(HEADLINE), len(refs) * (1.0 + 0.32 * max(most, 3))))
    for i, ref in enumerate(refs):
        block = blocks[ref]
        ys = list(range(len(block)))[::-1]  # the table's order, top down
        for j, k in enumerate(HEADLINE):
            ax = axes[i][j]
            ax.axvline(0, color="0.35", lw=0.8, zorder=1)
            for y, c in zip(ys, block):
                m = c["metrics"][k]
                det = m["detectable_80"]
                ax.add_patch(plt.Rectangle((-det, y - 0.32), 2 * det, 0.64, color="0.88", lw=0, zorder=0))
                lo, hi = m["ci95"]
                colour = VERDICT_COLOURS.get(m["verdict"], "0.45")
                ax.plot([lo, hi], [y, y], color=colour, lw=1.4, zorder=2)
                filled = m["verdict"] in VERDICT_COLOURS
                ax.plot([m["difference"]], [y], "o", ms=5, zorder=3, color=colour,
                        markerfacecolor=colour if filled else "white")
            ax.set_ylim(-0.7, len(block) - 0.3)
            ax.tick_params(labelsize=7)
            ax.grid(axis="x", color="0.93", lw=0.6)
            ax.set_axisbelow(True)
            if i == 0:
                ax.set_title(NAMES[k], fontsize=9)
            if i == len(refs) - 1:
                ax.set_xlabel("difference", fontsize=7)
        axes[i][0].set_yticks(ys, [c["method"] for c in block], fontsize=8)
        axes[i][0].set_ylabel(f"row − {ref}", fontsize=9)
    fig.suptitle("Paired differences, row − reference: dot and 95% interval; filled = detected (Holm-corrected); "
                 "grey band = ± the difference detected with 80% power", fontsize=8, y=1.0)
    fig.tight_layout()
    return fig_png(fig, dpi)
