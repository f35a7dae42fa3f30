"""`xraygan evaluate`: honest test-set metrics for one classifier, and the study's comparison table.

One run: precision, recall (sensitivity), specificity, F1 for the positive class, accuracy,
balanced accuracy, ROC-AUC, PR-AUC and the confusion matrix, each with a percentile bootstrap
95% confidence interval (test images resampled with replacement). `--report` adds plots, a
Markdown report and per-image predictions.

Compare: runs are grouped by their method label and summarised as mean ± standard deviation
over the runs (seeds) of each method.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xraygan import __version__
from xraygan.errors import InputError, check_choice, check_float, check_int
from xraygan.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_out_apart,
    check_output_free,
    csv_text,
    has_record,
    overlapping,
    read_json,
    record_header,
    staged_dir,
    write_csv,
)
from xraygan.images import ImageFolder, read_image_folder
from xraygan.metrics import binary_metrics, point_aucs, ranking_curves, resample_aucs, threshold_counts
from xraygan.options import BESIDE, DEVICE_HELP, opt
from xraygan.paired import PAIRED_CSV, forest_png, paired_markdown, paired_rows, summary_line
from xraygan.provenance import file_sources, generator_key
from xraygan.runtime import DEVICES

CI_KEYS = ("precision", "recall", "specificity", "f1", "accuracy", "balanced_accuracy",
           "roc_auc", "pr_auc")
TABLE_KEYS = ("precision", "recall", "specificity", "f1", "balanced_accuracy", "roc_auc")
TABLE_NAMES = {"precision": "Precision", "recall": "Recall", "specificity": "Specificity",
               "f1": "F1", "balanced_accuracy": "Bal. acc.", "roc_auc": "ROC-AUC", "lung_energy": "CAM in lungs"}

# What --tune-on maximises unless --tune-for says: Youden's J weighs sensitivity and specificity
# alike whatever the validation split's class mix; F1 counts only the positive class, so on a
# mostly-pneumonia split (Kermany's val is 74%) it moves the threshold towards calling
# everything pneumonia (docs/RESULTS.md, 128 px).
DEFAULT_TUNE_FOR = "youden"


@dataclass(frozen=True)
class EvaluateConfig:
    checkpoint: Path = opt(help="The classifier: CLF/classifier.safetensors.", argument=True, show_default=False)
    data: Path = opt(help="The test folder, e.g. DATA/test.", argument=True, show_default=False)
    report: Path | None = opt(None, "Write metrics.json, report.md, predictions.csv and ROC/PR/confusion/score "
                                    "plots here; a bare --report writes them to report/ beside the checkpoint.",
                              bare=BESIDE)
    threshold: float | None = opt(None, "Decision threshold on P(positive) (default 0.5).")
    tune_on: Path | None = opt(None, "Tune the threshold on this validation folder instead (see --tune-for).",
                               flags=("--tune-on",))
    tune_for: str | None = opt(None, "With --tune-on: what the threshold maximises there, youden (J = sens + "
                                     "spec - 1, the default: it does not depend on the class mix) or f1.",
                               show_default=False)
    # with tune_on: also the report at the untuned threshold (`threshold`, default 0.5), from the
    # same scores, so both operating points cost one process
    untuned_report: Path | None = opt(None, "With --tune-on: also write the report at the untuned threshold "
                                            "(--threshold, default 0.5) here, from the same scores: both "
                                            "operating points in one run.", flags=("--untuned-report",))
    positive: str | None = opt(None, "Positive class (default: the one recorded in the checkpoint).")
    label: str | None = opt(None, "Method label for compare (default: the run folder name without -seedN).")
    bootstrap: int = opt(1000, "Bootstrap resamples for the 95% intervals (0 = none).")
    seed: int = opt(0, "Seed of the bootstrap.")
    device: str = opt("auto", DEVICE_HELP)
    batch_size: int = 256
    force: bool = opt(False, "Replace an existing report folder.")

    def __post_init__(self):
        if self.report is not None and str(self.report) == BESIDE:  # a bare --report
            object.__setattr__(self, "report", Path(self.checkpoint).parent / "report")
        if self.tune_for is None and self.tune_on is not None:
            object.__setattr__(self, "tune_for", DEFAULT_TUNE_FOR)

    def validate(self) -> None:
        """Every option checked, and the report folders found free, before any image is read."""
        check_int("--bootstrap", self.bootstrap, 0)
        check_int("--batch-size", self.batch_size)
        if self.tune_for is not None:
            check_choice("--tune-for", self.tune_for, ("f1", "youden"))
            if self.tune_on is None:
                raise InputError(f"--tune-for {self.tune_for} needs --tune-on DATA/val: without it the threshold "
                                 "is --threshold, not tuned")
        check_choice("--device", self.device, DEVICES)
        if self.threshold is not None:
            check_float("--threshold", self.threshold, 0.0, 1.0, low_open=False)
        if self.tune_on is not None and Path(self.tune_on).resolve() == Path(self.data).resolve():
            raise InputError(f"--tune-on {self.tune_on}: that is the test folder itself; a threshold tuned on "
                             "the images it is measured on makes every metric optimistic (tune on DATA/val)")
        if self.untuned_report is not None:
            if self.tune_on is None:
                raise InputError("--untuned-report needs --tune-on: without tuning there is one threshold "
                                 "and one report (--report)")
            check_out_apart(self.untuned_report, checkpoint=self.checkpoint, data=self.data, tune_on=self.tune_on)
            if self.report is not None and overlapping(self.untuned_report, self.report):
                raise InputError(f"--untuned-report {self.untuned_report}: give it a folder apart from "
                                 f"--report {self.report} (one report in each)")
            check_output_free(Path(self.untuned_report), self.force, "evaluate")
        if self.report is not None:  # refuse before any work, not after it
            check_out_apart(self.report, checkpoint=self.checkpoint, data=self.data, tune_on=self.tune_on)
            check_output_free(Path(self.report), self.force, "evaluate")
        if self.threshold is not None and self.tune_on is not None and self.untuned_report is None:
            raise InputError("give either --threshold or --tune-on, not both (or add --untuned-report DIR "
                             "for a report at each)")


def run_label(checkpoint: Path) -> str:
    """A method label from the run folder: `runs/oversample-seed1/classifier.safetensors` →
    `oversample`; `runs/oversample/seed1/...` → `oversample`."""
    parent = Path(checkpoint).absolute().parent
    name = re.sub(r"[-_.]?seed[-_]?\d+$", "", parent.name)
    return name or parent.parent.name


def folder_fingerprint(folder: ImageFolder) -> str:
    """Identifies a test set by its class/file names, so compare can tell runs on different sets."""
    h = hashlib.sha256()
    for f, y in zip(folder.files, folder.labels):
        h.update(f"{folder.classes[y]}/{f.name}\n".encode())
    return h.hexdigest()[:16]


def tune_threshold(y: np.ndarray, score: np.ndarray, rule: str) -> float:
    """The threshold among the observed scores that maximises F1 or Youden's J on (y, score)."""
    if rule not in ("f1", "youden"):
        raise InputError(f"--tune-for {rule}: must be f1 or youden")
    y = np.asarray(y, dtype=bool)
    if y.all() or not y.any():
        raise InputError("threshold tuning needs both classes in the validation folder")
    s, tp, fp = threshold_counts(y, score)  # predict positive for every score >= s[i]
    P, N = y.sum(), (~y).sum()
    if rule == "f1":
        crit = 2 * tp / (tp + fp + P)
    else:
        crit = tp / P - fp / N
    return float(s[int(np.argmax(crit))])


def bootstrap_ci(y: np.ndarray, score: np.ndarray, threshold: float, n: int,
                 seed: int) -> dict[str, list[float] | None]:
    """Percentile 95% intervals over `n` resamples of the test images. AUCs skip resamples that
    hold one class only."""
    if n <= 0:
        return {}
    out: dict[str, list[float] | None] = {k: None for k in CI_KEYS}
    for k, v in bootstrap_samples(y, score, threshold, n, seed).items():
        lo, hi = np.percentile(v, [2.5, 97.5])
        out[k] = [round(float(lo), 4), round(float(hi), 4)]
    return out


def bootstrap_samples(y: np.ndarray, score: np.ndarray, threshold: float, n: int,
                      seed: int) -> dict[str, np.ndarray]:
    """Every metric on each of `n` resamples (drawn with replacement, seeded). Vectorised over
    the resamples: 1,000 resamples of 624 images take milliseconds, not 2,000 scikit-learn calls."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    N = len(y)
    idx = rng.integers(0, N, (n, N))
    samples: dict[str, list] = {k: [] for k in ("precision", "recall", "specificity", "f1", "accuracy",
                                                "balanced_accuracy", "roc_auc", "pr_auc")}
    pred = score >= threshold
    for lo in range(0, n, 256):  # blocks bound the memory of the (resamples x images) counts
        block = idx[lo:lo + 256]
        counts = np.zeros((len(block), N), dtype=np.int64)
        np.add.at(counts, (np.arange(len(block))[:, None], block), 1)
        tp = (counts * (y & pred)).sum(1).astype(float)
        fp = (counts * (~y & pred)).sum(1).astype(float)
        fn = (counts * (y & ~pred)).sum(1).astype(float)
        tn = (counts * (~y & ~pred)).sum(1).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            rec = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
            spec = np.where(tn + fp > 0, tn / (tn + fp), 0.0)
            f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
        for k, v in (("precision", prec), ("recall", rec), ("specificity", spec), ("f1", f1),
                     ("accuracy", (tp + tn) / N), ("balanced_accuracy", (rec + spec) / 2)):
            samples[k].append(v)
        npos = (counts * y).sum(1)
        both = (npos > 0) & (npos < N)
        if both.any():
            roc, ap = resample_aucs(y, score, counts[both])
            samples["roc_auc"].append(roc)
            samples["pr_auc"].append(ap)
    return {k: np.concatenate(v) for k, v in samples.items() if v}


def _proportion_ci(hits: np.ndarray, n: int, seed: int) -> list[float] | None:
    """Percentile 95% interval of a proportion (recall over the positives, specificity over the
    negatives) by resampling those images only."""
    if n <= 0 or len(hits) == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(hits), (n, len(hits)))
    lo, hi = np.percentile(hits[idx].mean(1), [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def by_source(sources: np.ndarray, y: np.ndarray, score: np.ndarray, threshold: float, n: int,
              seed: int, positive: str, negative: str) -> tuple[dict, list[str]]:
    """Recall and specificity per source (each with its interval), ROC-AUC within each source that
    holds both classes, the per-source confusion matrix (they sum to the pooled one), and a
    warning for each class whose figures differ between sources by more than their intervals."""
    pred = score >= threshold
    out: dict[str, dict] = {}
    for src in sorted(set(sources.tolist())):
        m = sources == src
        ys, ps, ss = y[m], pred[m], score[m]
        e: dict = {"n": int(m.sum()), "positives": int(ys.sum()),
                   "confusion": {"tp": int((ys & ps).sum()), "fn": int((ys & ~ps).sum()),
                                 "fp": int((~ys & ps).sum()), "tn": int((~ys & ~ps).sum())}}
        if ys.any():
            e["recall"] = float(ps[ys].mean())
            e["recall_ci"] = _proportion_ci(ps[ys].astype(float), n, seed)
        if (~ys).any():
            e["specificity"] = float((~ps[~ys]).mean())
            e["specificity_ci"] = _proportion_ci((~ps[~ys]).astype(float), n, seed)
        if ys.any() and (~ys).any():
            e["roc_auc"] = point_aucs(ys, ss)[0]
        out[src] = e
    warnings = []
    for metric, cls in (("specificity", negative), ("recall", positive)):
        have = [(s, e) for s, e in out.items() if metric in e and e.get(f"{metric}_ci")]
        for i, (a, ea) in enumerate(have):
            for b, eb in have[i + 1:]:
                (la, ha), (lb, hb) = ea[f"{metric}_ci"], eb[f"{metric}_ci"]
                if ha < lb or hb < la:  # the intervals do not overlap
                    hi_s, lo_s = (a, b) if ea[metric] > eb[metric] else (b, a)
                    warnings.append(f"{metric} ({cls}) {out[hi_s][metric]:.2f} on {hi_s} vs "
                                    f"{out[lo_s][metric]:.2f} on {lo_s}: the model may be telling "
                                    "the sources apart rather than the classes")
    return out, warnings


def _scores(model, folder: ImageFolder, pos: int, device, batch_size: int) -> np.ndarray:
    from xraygan.classifier import predict_proba

    return predict_proba(model, folder.images, device, batch_size=batch_size)[:, pos]


def is_done(out: Path) -> bool:
    """Whether `out` holds a finished xraygan evaluate (its own record says so)."""
    return has_record(out, "evaluate")


def evaluate(cfg: EvaluateConfig, progress=None) -> dict:
    from xraygan.classifier import inference_batch, load_classifier
    from xraygan.runtime import resolve_device

    t0 = time.perf_counter()
    cfg.validate()
    device = resolve_device(cfg.device)
    model, meta = load_classifier(cfg.checkpoint, device)
    classes = tuple(meta["classes"])
    positive = (cfg.positive or meta.get("positive") or classes[-1]).lower()
    if positive not in classes:
        raise InputError(f"--positive {positive}: the model's classes are {', '.join(classes)}")
    pos = classes.index(positive)
    test = read_for_model(cfg.data, classes, int(meta["image_size"]), "test")
    if progress:
        progress("evaluate", 0, 3)
    batch = inference_batch(meta, device, cfg.batch_size)
    score = _scores(model, test, pos, device, batch)
    y = test.labels == pos
    test_fingerprint = folder_fingerprint(test)
    fixed = 0.5 if cfg.threshold is None else cfg.threshold
    threshold, tuned = fixed, None
    if cfg.tune_on is not None:
        val = read_for_model(cfg.tune_on, classes, int(meta["image_size"]), "validation")
        if folder_fingerprint(val) == test_fingerprint:
            raise InputError(f"--tune-on {cfg.tune_on}: holds the same files as the test folder {cfg.data}; "
                             "a threshold tuned on the test images makes every metric optimistic "
                             "(tune on DATA/val)")
        threshold = tune_threshold(val.labels == pos, _scores(model, val, pos, device, batch),
                                   cfg.tune_for)
        tuned = {"on": str(cfg.tune_on), "for": cfg.tune_for, "n": len(val.labels)}
    if progress:
        progress("evaluate", 1, 3)
    src_map = file_sources(cfg.data)
    tags = None if not src_map else np.array([src_map.get(f"{test.classes[c]}/{f.name}", "unknown")
                                              for f, c in zip(test.files, test.labels)])

    def record(threshold: float, tuned: dict | None) -> dict:
        """The metrics record at one operating point."""
        m = binary_metrics(y, score, threshold)
        per_source, source_warnings = None, []
        if tags is not None:
            negative = next((c for c in classes if c != positive), positive)
            per_source, source_warnings = by_source(tags, y, score, threshold, cfg.bootstrap, cfg.seed,
                                                    positive, negative)
        return {
            **record_header("metrics"),
            "label": cfg.label or run_label(cfg.checkpoint),
            "checkpoint": str(cfg.checkpoint), "test": str(cfg.data),
            "test_fingerprint": test_fingerprint, "test_counts": test.counts(),
            "classes": list(classes), "positive": positive, "threshold": threshold,
            "threshold_tuning": tuned, "metrics": m,
            "ci95": bootstrap_ci(y, score, threshold, cfg.bootstrap, cfg.seed),
            "bootstrap": {"resamples": cfg.bootstrap, "seed": cfg.seed, "method": "percentile"},
            "by_source": per_source, "warnings": source_warnings,
            "train_source": meta.get("train_source"), "seed": meta.get("seed"),
            "epoch": meta.get("epoch"), "training": meta.get("training"), "generators": meta.get("generators"),
            "xraygan_version": __version__,
        }

    def write(folder: Path, rec: dict) -> None:
        with staged_dir(Path(folder), cfg.force, "evaluate") as tmp:
            atomic_write_json(tmp / "metrics.json", rec)
            names = [test.classes[c] for c in test.labels]
            write_predictions(tmp / "predictions.csv", [f"{c}/{f.name}" for c, f in zip(names, test.files)], names,
                              y, score, rec["threshold"])
            plots = write_plots(tmp, y, score, rec["threshold"], rec["metrics"], positive, rec["label"])
            atomic_write_text(tmp / "report.md", report_markdown(rec, plots))

    rec = record(threshold, tuned)
    if progress:
        progress("evaluate", 2, 3)
    if cfg.report is not None:
        write(cfg.report, rec)
        rec["report"] = str(cfg.report)
    if cfg.untuned_report is not None:  # its own metrics.json, the same as a separate run would write
        untuned = record(fixed, None)
        write(cfg.untuned_report, untuned)
        rec["untuned"] = {"threshold": fixed, "metrics": untuned["metrics"], "ci95": untuned["ci95"],
                          "report": str(cfg.untuned_report)}
    if progress:
        progress("evaluate", 3, 3)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def read_for_model(folder: Path, classes: tuple[str, ...], size: int, what: str) -> ImageFolder:
    """Read an image folder for a trained model: unknown classes or another size is one clear line."""
    try:
        data = read_image_folder(folder, classes=classes)
    except InputError as e:
        if "unknown class" in str(e):
            raise InputError(f"{e}; the model knows only {', '.join(classes)}") from None
        raise
    if data.size != size:
        raise InputError(f"{folder}: {what} images are {data.size} px, the model was trained on "
                         f"{size} px images")
    return data


def write_predictions(path: Path, files: list[str], classes: list[str], y: np.ndarray, score: np.ndarray,
                      threshold: float) -> None:
    """predictions.csv: per test image (`class/file`) its class, score and call; what `compare`
    pairs runs by."""
    pred = score >= threshold
    write_csv(path, ["file", "class", "score", "predicted_positive", "correct"],
              ([f, c, f"{s:.5f}", int(p), int(p == bool(t))] for f, c, t, s, p in zip(files, classes, y, score, pred)))


def write_plots(out: Path, y: np.ndarray, score: np.ndarray, threshold: float, m: dict,
                positive: str, title: str) -> dict[str, str]:
    """ROC, PR, confusion matrix and score histograms as PNGs; returns name → file."""
    from xraygan.plots import fig_png, pyplot

    plt = pyplot()
    files: dict[str, str] = {}

    def save(fig, name: str) -> None:
        atomic_write_bytes(out / name, fig_png(fig))
        files[name.removesuffix(".png")] = name

    both = 0 < y.sum() < len(y)
    if both:
        curves = ranking_curves(y, score)
        fpr, tpr = curves["fpr"], curves["tpr"]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, lw=2, label=f"AUC {m['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=1)
        ax.scatter([1 - m["specificity"]], [m["recall"]], c="red", zorder=3,
                   label=f"threshold {threshold:.2f}")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity (recall)", title=f"ROC: {title}")
        ax.legend(loc="lower right")
        save(fig, "roc.png")
        p, r = curves["precision"], curves["recall"]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(r, p, lw=2, label=f"AP {m['pr_auc']:.3f}")
        ax.axhline(y.mean(), ls="--", c="gray", lw=1, label=f"prevalence {y.mean():.2f}")
        ax.scatter([m["recall"]], [m["precision"]], c="red", zorder=3)
        ax.set(xlabel="recall", ylabel="precision", title=f"PR: {title}", ylim=(0, 1.02))
        ax.legend(loc="lower left")
        save(fig, "pr.png")
    c = m["confusion"]
    mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(mat, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(mat[i, j]), ha="center", va="center",
                    color="white" if mat[i, j] > mat.max() / 2 else "black", fontsize=14)
    ticks = [f"not {positive}", positive]
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=ticks, yticklabels=ticks,
           xlabel="predicted", ylabel="true", title="confusion matrix")
    save(fig, "confusion.png")
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = np.linspace(0, 1, 26)
    ax.hist(score[~y], bins=bins, alpha=0.6, label=f"not {positive} (n={int((~y).sum())})")
    ax.hist(score[y], bins=bins, alpha=0.6, label=f"{positive} (n={int(y.sum())})")
    ax.axvline(threshold, c="red", ls="--", lw=1)
    ax.set(xlabel=f"P({positive})", ylabel="images", title="score histograms")
    ax.legend()
    save(fig, "scores.png")
    return files


def _fmt_ci(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def report_markdown(rec: dict, plots: dict[str, str]) -> str:
    m, ci, c = rec["metrics"], rec["ci95"], rec["metrics"]["confusion"]
    thr = f"{rec['threshold']:.4f}"
    if rec["threshold_tuning"]:
        t = rec["threshold_tuning"]
        thr += f" (tuned for {t['for']} on {t['on']}, {t['n']} images)"
    lines = [f"# Evaluation: {rec['label']}", "",
             f"- checkpoint: `{rec['checkpoint']}` (epoch {rec['epoch']}, seed {rec['seed']})",
             *([f"- training: {budget_phrase(rec['training'])}"] if rec.get("training") else []),
             f"- test set: `{rec['test']}` {rec['test_counts']} (fingerprint {rec['test_fingerprint']})",
             f"- positive class: {rec['positive']}; threshold {thr}",
             f"- 95% intervals: percentile bootstrap, {rec['bootstrap']['resamples']} resamples of the test images",
             "", "| metric | value [95% CI] |", "|---|---|"]
    for k in CI_KEYS:
        lines.append(f"| {k.replace('_', ' ')} | {_fmt_ci(m[k], ci.get(k))} |")
    lines += ["", f"Confusion matrix (rows true, columns predicted): TP {c['tp']}, FN {c['fn']}, "
              f"FP {c['fp']}, TN {c['tn']}.", ""]
    if rec.get("by_source"):
        lines += ["## By source", "", "| source | images | recall [95% CI] | specificity [95% CI] | ROC-AUC |",
                  "|---|---|---|---|---|"]
        for src, e in rec["by_source"].items():
            auc = f"{e['roc_auc']:.3f}" if "roc_auc" in e else "n/a (one class)"
            lines.append(f"| {src} | {e['n']} | {_fmt_ci(e.get('recall'), e.get('recall_ci'))} | "
                         f"{_fmt_ci(e.get('specificity'), e.get('specificity_ci'))} | {auc} |")
        lines.append("")
        lines += [f"**Warning:** {w}" for w in rec["warnings"]] + [""]
    for name, f in plots.items():
        lines.append(f"![{name}]({f})")
    lines += ["", f"Written by xraygan {rec['xraygan_version']}: "
              f"`xraygan evaluate {rec['checkpoint']} {rec['test']} --report DIR`", ""]
    return "\n".join(lines)


def steps_given(t: dict) -> int:
    """The optimizer steps of a checkpoint's training budget (the `training` of its metadata):
    its epochs' steps, whether or not it stopped early."""
    return t["epochs"] * t["steps_per_epoch"]


def budget_phrase(t: dict) -> str:
    """A checkpoint's training budget in words."""
    return (f"{t['steps']} optimizer steps to the kept epoch, of {steps_given(t)} "
            f"at most ({t['epochs']} epochs of {t['steps_per_epoch']} steps: {t['images_per_epoch']} images "
            f"an epoch from a set of {t['train_images']}, batch {t['batch_size']})")


def steps_budget(rec: dict) -> int | None:
    """The optimizer steps a metrics record's run was given; None for a record from before
    checkpoints carried their budget."""
    t = rec.get("training")
    return steps_given(t) if t else None


def unequal_budget_note(groups: dict[str, list[dict]], references: tuple[str, ...]) -> str | None:
    """When the rows were given different optimizer steps, what each row had, as a multiple of
    the first reference row's (or the first row's); None when they were equal or not recorded."""
    budgets = {label: sorted({b for r in runs if (b := steps_budget(r)) is not None})
               for label, runs in groups.items()}
    budgets = {label: b for label, b in budgets.items() if b}
    if len({b for bs in budgets.values() for b in bs}) < 2:
        return None
    ref = next((r for r in references if r in budgets), next(iter(budgets)))
    unit = budgets[ref][0]
    by: dict[str, list[str]] = {}  # the reference first, then the most steps first
    for label, bs in sorted(budgets.items(), key=lambda kv: (kv[0] != ref, -kv[1][0], kv[0])):
        span = f"{bs[0]}" if len(bs) == 1 else f"{bs[0]}–{bs[-1]}"
        times = "" if bs == [unit] else f" ({bs[0] / unit:.2g}×)" if len(bs) == 1 else \
            f" ({bs[0] / unit:.2g}–{bs[-1] / unit:.2g}×)"
        by.setdefault(f"{span}{times}", []).append(label)
    parts = "; ".join(f"{', '.join(labels)} {what}" for what, labels in by.items())
    return (f"the rows' classifiers were given different numbers of optimizer steps: {parts}; a difference "
            "between these rows is partly one of training length (train-classifier --epoch-images gives "
            "every row the same steps, as study does unless told --no-clf-equal-steps)")


def one_generator_note(groups: dict[str, list[dict]]) -> str | None:
    """Rows of several runs whose synthetic images all came from the same generator(s): their
    spread over seeds is the classifiers' alone. None when no row is such (or none recorded it)."""
    def made_by(rec: dict) -> frozenset | None:
        gens = rec.get("generators")
        return frozenset(map(generator_key, gens)) if gens else None

    rows = []
    for label, runs in groups.items():
        sets = [made_by(r) for r in runs]
        if len(runs) > 1 and all(sets) and len(set(sets)) == 1:
            n = len(sets[0])
            rows.append(f"{label} ({len(runs)} runs, {'one generator' if n == 1 else f'the same {n} generators'})")
    if not rows:
        return None
    return (f"every seed of these rows trained on the same generator's images: {', '.join(rows)}; their "
            "spread over seeds, and the paired test, leave out how much other generators would change them "
            "(xraygan study trains a generator per seed unless told --gan-seeds 0)")


# --- compare ----------------------------------------------------------------------------------


def _collect(paths: list[Path]) -> tuple[list[tuple[Path, dict]], list[tuple[Path, dict]]]:
    """metrics.json files (and gradcam.json summaries) from files or folders (searched recursively)."""
    metrics, cams = [], []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(p.rglob("metrics.json")) + sorted(p.rglob("gradcam.json"))
            if not found:
                raise InputError(f"{p}: no metrics.json found in this folder")
        elif p.is_file():
            found = [p]
        else:
            raise InputError(f"{p}: no such file or folder")
        for f in found:
            d = read_json(f)
            kind = d.get("kind") if isinstance(d, dict) else None
            if kind == "xraygan-metrics":
                metrics.append((f, d))
            elif kind == "xraygan-gradcam":
                cams.append((f, d))
            else:
                raise InputError(f"{f}: not a metrics.json written by xraygan evaluate")
    if not metrics:
        raise InputError("nothing to compare: no metrics.json among the inputs")
    return metrics, cams


def _mean_std(v: list[float]) -> tuple[float, float | None]:
    a = np.asarray(v, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


DEFAULT_REFERENCES = ("baseline", "oversample")


@dataclass(frozen=True)
class CompareConfig:
    inputs: tuple[Path, ...] = opt(help="metrics.json files, or folders holding them (searched recursively, with "
                                        "gradcam.json).", argument=True, show_default=False)
    out: Path | None = opt(None, "Write table.md, table.csv, table.json, and the paired tests as paired.csv and a "
                                       "forest plot, paired.png, here.", flags=("--out", "-o"))
    reference: str | None = opt(None, "Rows every other row is tested against, comma-separated, or none (default: "
                                      "baseline and oversample, the count-matched control, where present).")
    resamples: int = opt(1000, "Two-level bootstrap resamples (images and seeds).")
    seed: int = opt(0, "Seed of the bootstrap.")
    power: float = opt(0.02, "The difference to plan for: how many seeds per row would detect it with 80% power.")
    force: bool = opt(False, "Replace an existing table folder.")

    @property
    def references(self) -> tuple[str, ...] | None:
        """The --reference rows: None for the default, () for none."""
        if self.reference is None:
            return None
        if self.reference.strip().lower() == "none":
            return ()
        return tuple(r.strip() for r in self.reference.split(",") if r.strip())


def run_compare(cfg: CompareConfig, progress=None) -> dict:
    """`xraygan compare`: `compare` on a config."""
    return compare(list(cfg.inputs), cfg.out, cfg.force, cfg.references, cfg.resamples, cfg.seed, cfg.power)


def compare(paths: list[Path], out: Path | None = None, force: bool = False,
            references: tuple[str, ...] | None = None, resamples: int = 1000, seed: int = 0,
            power: float = 0.02) -> dict:
    """The study's table: one row per method label, mean ± std over its runs; then every row's
    paired difference to each reference row (default: baseline and oversample, where present;
    `references=()` for none), with the test of `xraygan.paired`."""
    from xraygan.errors import check_float, check_int

    check_int("--resamples", resamples, 100)
    check_float("--power", power, 0.0, 1.0)
    if out is not None:
        check_out_apart(out, **{f"input{i}": p for i, p in enumerate(paths)})
        check_output_free(Path(out), force, "compare")
    metrics, cams = _collect(paths)
    groups: dict[str, list[dict]] = {}
    for _, d in metrics:
        groups.setdefault(d["label"], []).append(d)
    cam_groups: dict[str, list[float]] = {}
    for _, d in cams:
        if d.get("lung_energy_mean") is not None:
            cam_groups.setdefault(d["label"], []).append(d["lung_energy_mean"])
    # runs evaluated on a pooled test set carry per-source figures: one column per (metric, source)
    src_keys = sorted({f"{m}@{src}" for _, d in metrics for src, e in (d.get("by_source") or {}).items()
                       for m in ("recall", "specificity") if m in e})
    keys = list(TABLE_KEYS) + (["lung_energy"] if cam_groups else []) + src_keys
    rows = []
    for label, runs in groups.items():
        row: dict = {"method": label, "runs": len(runs)}
        for k in TABLE_KEYS:
            vals = [r["metrics"][k] for r in runs if r["metrics"].get(k) is not None]  # (older records lack some)
            row[k] = _mean_std(vals) if vals else None
        if cam_groups:
            row["lung_energy"] = _mean_std(cam_groups[label]) if label in cam_groups else None
        for k in src_keys:
            m, src = k.split("@", 1)
            vals = [r["by_source"][src][m] for r in runs if src in (r.get("by_source") or {})
                    and m in r["by_source"][src]]
            row[k] = _mean_std(vals) if vals else None
        rows.append(row)
    warnings = []
    fps = {d["test_fingerprint"] for _, d in metrics}
    if len(fps) > 1:
        warnings.append(f"the runs were evaluated on {len(fps)} different test sets; "
                        "their rows are not comparable")
    # thresholds tuned per run on validation data differ by design; fixed ones should not
    tuned = [d for _, d in metrics if d.get("threshold_tuning")]
    thr = {round(d["threshold"], 6) for _, d in metrics if not d.get("threshold_tuning")}
    if tuned and len(tuned) < len(metrics):
        warnings.append(f"{len(tuned)} of the {len(metrics)} runs tuned their threshold on validation "
                        "data and the others did not; their rows are not comparable")
    elif len(thr) > 1:
        warnings.append(f"the runs used {len(thr)} different thresholds")
    budget = unequal_budget_note(groups, references if references is not None else DEFAULT_REFERENCES)
    if budget:
        warnings.append(budget)
    shared = one_generator_note(groups)
    if shared:
        warnings.append(shared)
    paired = _paired(metrics, groups, references, resamples, seed, power)
    table = table_markdown(rows, keys)
    res = {"rows": rows, "columns": keys, "warnings": warnings, "runs": len(metrics), "paired": paired,
           "table_markdown": table, "answers": [summary_line(paired, r) for r in paired["references"]],
           "markdown": table + paired_markdown(paired), "csv": table_csv(rows, keys)}
    if out is not None:
        with staged_dir(Path(out), force, "compare") as tmp:
            # the file is read without the command's stderr: its warnings go with it
            notes = "".join(f"\n**Warning:** {w}\n" for w in warnings)
            atomic_write_text(tmp / "table.md", res["markdown"] + notes)
            atomic_write_text(tmp / "table.csv", res["csv"])
            if paired["comparisons"]:
                write_csv(tmp / "paired.csv", PAIRED_CSV, paired_rows(paired))
                atomic_write_bytes(tmp / "paired.png", forest_png(paired))
            atomic_write_json(tmp / "table.json", {**record_header("table"), **{
                k: res[k] for k in ("rows", "columns", "warnings", "runs", "paired")}})
        res["out"] = str(out)
    return res


def _paired(metrics: list[tuple[Path, dict]], groups: dict[str, list[dict]], references: tuple[str, ...] | None,
            resamples: int, seed: int, power: float) -> dict:
    """The paired comparisons of the table's rows (see xraygan.paired)."""
    from xraygan.paired import paired_comparison, read_run

    asked = references is not None
    refs = tuple(references) if asked else DEFAULT_REFERENCES
    for r in refs:
        if asked and r not in groups:
            raise InputError(f"--reference {r}: no such row (rows: {', '.join(groups)})")
    if not [r for r in refs if r in groups] or len(groups) < 2:
        return {"references": [], "comparisons": [], "resamples": resamples}
    fps = {d["test_fingerprint"] for _, d in metrics}
    if len(fps) > 1:
        by_fp = {}
        for f, d in metrics:
            by_fp.setdefault(d["test_fingerprint"], f)
        a, b = list(by_fp.values())[:2]
        raise InputError(f"{b}: scored on another test set than {a} (test fingerprints differ); a paired "
                         "comparison needs one test set (give --reference none for the mean ± std table only)")
    runs = [read_run(f, d) for f, d in metrics]
    return paired_comparison(runs, refs, resamples, seed, power)


def _cell(v: tuple[float, float | None] | None) -> str:
    if v is None:
        return "n/a"
    mean, std = v
    return f"{mean:.3f} ± {std:.3f}" if std is not None and not math.isnan(std) else f"{mean:.3f}"


def table_markdown(rows: list[dict], keys: list[str]) -> str:
    head = ["Method", "Runs"] + [TABLE_NAMES.get(k) or "{} ({})".format(*k.split("@", 1)).capitalize()
                                 for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["method"], str(r["runs"])] + [_cell(r[k]) for k in keys]) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict], keys: list[str]) -> str:
    def cells(r: dict) -> list:
        out = [r["method"], r["runs"]]
        for k in keys:
            v = r[k]
            out += ["", ""] if v is None else [f"{v[0]:.4f}", "" if v[1] is None else f"{v[1]:.4f}"]
        return out

    return csv_text(["method", "runs"] + [f"{k}_{s}" for k in keys for s in ("mean", "std")],
                    map(cells, rows))
