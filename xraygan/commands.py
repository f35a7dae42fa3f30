"""The commands: for each, its config, the library function that runs it, the summary it prints
on stderr, and its help. `cli.py` builds every command's options from its config's fields
(`options.opt`), so this table and the configs are all there is to a command.

Torch-free and light: `xraygan --help` reads the help lines from here without importing any
command's module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xraygan.options import JSON_HELP


@dataclass(frozen=True)
class ConfigCommand:
    """A command whose options are its config's fields: `run` in `module` takes the config `config`
    and a callback (a progress bar, or what `callback` makes for the config); `report` prints its
    summary on stderr."""
    module: str
    config: str
    run: str
    report: Callable[[dict, Any], None]
    doc: str
    json_help: str | None = JSON_HELP  # None: no --json
    progress: bool = True  # a progress bar while it runs
    callback: Callable[[Any], Callable] | None = None  # the callback for a config, instead of a progress bar
    json_of: Callable[[dict], dict] | None = None  # what --json prints (default: the whole result)
    stdout_of: Callable[[dict], str] | None = None  # what goes to stdout without --json (default: nothing)


# the order of `xraygan --help`: the pipeline's, then the tools
COMMAND_ORDER = ("prepare", "train-gan", "train-diffusion", "generate", "rebalance", "train-classifier",
                 "compare", "evaluate", "gradcam", "demo", "audit", "score-review", "probe-sources", "review",
                 "study")
# Old spellings that still work: (command, flag) → the command it is now. The flag is dropped and
# its values become the new command's arguments (`audit --score-review A --score-review B` is
# `score-review A B`); a note says so.
RENAMED = {("evaluate", "--compare"): "compare", ("audit", "--sources"): "probe-sources",
           ("audit", "--score-review"): "score-review"}


def _warn(lines) -> None:
    from xraygan.console import err

    for w in lines or ():
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def _report_prepare(rec: dict, cfg) -> None:
    _print_prepared(rec, rec.get("skipped_local", []), cfg.out)


def _report_evaluate(rec: dict, cfg) -> None:
    from rich.table import Table

    from xraygan.console import err
    from xraygan.evaluate import CI_KEYS

    t = Table(title=f"{rec['label']}: {rec['test']} {rec['test_counts']}, positive "
                    f"{rec['positive']}, threshold {rec['threshold']:.3f}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("95% CI", justify="right")
    for k in CI_KEYS:
        v, ci = rec["metrics"][k], rec["ci95"].get(k)
        t.add_row(k, "n/a" if v is None else f"{v:.3f}", f"{ci[0]:.3f} - {ci[1]:.3f}" if ci else "")
    err.print(t)
    c = rec["metrics"]["confusion"]
    err.print(f"confusion: TP {c['tp']}  FN {c['fn']}  FP {c['fp']}  TN {c['tn']}"
              + (f"; report: {rec['report']}/report.md" if cfg.report else ""), highlight=False)
    if "untuned" in rec:
        u = rec["untuned"]
        err.print(f"at threshold {u['threshold']:.3f}: " + ", ".join(
            f"{k} {'n/a' if u['metrics'][k] is None else format(u['metrics'][k], '.3f')}"
            for k in ("precision", "recall", "specificity", "f1")) + f"; report: {u['report']}/report.md",
            highlight=False, soft_wrap=True)
    for src, e in (rec.get("by_source") or {}).items():
        parts = [f"{m} {e[m]:.3f} [{e[m + '_ci'][0]:.3f}, {e[m + '_ci'][1]:.3f}]" if e.get(m + "_ci")
                 else f"{m} {e[m]:.3f}" for m in ("recall", "specificity") if m in e]
        if "roc_auc" in e:
            parts.append(f"ROC-AUC {e['roc_auc']:.3f}")
        err.print(f"  source {src} ({e['n']} images): " + "; ".join(parts), highlight=False)
    _warn(rec.get("warnings"))


def _report_audit(rec: dict, cfg) -> None:
    from rich.table import Table

    from xraygan.console import err

    t = Table(title=f"audit of {cfg.synthetic} against {cfg.real} ({rec['seconds']} s)")
    for col in ("class", "space", "FD", "KID", "precision", "recall", "density", "coverage", "real/synth AUC",
                "near-copies"):
        t.add_column(col, justify="right" if col not in ("class", "space") else "left")
    for c, d in rec["classes"].items():
        for s, v in d["spaces"].items():
            t.add_row(c, s, *(("n/a" if v[m] is None else f"{v[m]:.4g}")
                              for m in ("fd", "kid", "precision", "recall", "density", "coverage",
                                        "real_vs_synthetic_auc")),
                      str(d["memorisation"]["flagged"]))
    err.print(t)
    err.print(f"report: {cfg.out}/report.md; flagged near-copies: {cfg.out}/flagged/; review sheet: "
              f"{cfg.out}/review/sheet.html", highlight=False)


def _review_ready(cfg) -> Callable[[str, int, int], None]:
    """What `review` says once it listens: where to open the page (and a warning off the loopback)."""
    from xraygan.console import err
    from xraygan.review import is_loopback

    def ready(url: str, answered: int, total: int) -> None:
        if not is_loopback(cfg.host):
            err.print(f"[bold yellow]warning:[/] serving on {cfg.host}: the review images leave this machine's "
                      "loopback; anyone who can reach it can see them", highlight=False, soft_wrap=True)
        err.print(f"reader {cfg.reader}: {answered} of {total} answered; open {url} (Ctrl-C stops; answers are "
                  "saved after every image)", highlight=False, soft_wrap=True)

    return ready


def _report_served(res: dict, cfg) -> None:
    from xraygan.console import err

    err.print(f"{res['answered']} of {res['total']} answered, in {res['answers']}", highlight=False)


def _say(cfg) -> Callable[[str], None]:
    """The study's progress: one plain line per step started, done or failed."""
    from xraygan.console import err

    return lambda line: err.print(line, highlight=False, soft_wrap=True, markup=False)


def _report_study(res: dict, cfg) -> None:
    from xraygan.console import err

    if "script" in res:  # --dry-run / --print-commands: the plan is the output
        return
    for t, path in res["tables"].items():
        plot = Path(path).parent / "paired.png"
        err.print(f"{'Threshold 0.5' if t == 'table' else 'Threshold tuned on the validation split'}: {path}"
                  f"{f' (the paired tests drawn: {plot})' if plot.is_file() else ''}", highlight=False)
    err.print(f"study: {res['ran']} steps run, {res['skipped']} already done, in {res['seconds']:.0f} s "
              f"({res['jobs']} at a time); per-step times in {cfg.out}/times.csv", highlight=False, soft_wrap=True)


def _study_stdout(res: dict) -> str:
    """The plan, or the two tables (the study's answer) one after the other."""
    if "script" in res:
        return res["script"]
    return "\n".join(Path(p).read_text(encoding="utf-8") for p in res["tables"].values())


def _print_prepared(rec: dict, local: list[dict], out: Path) -> None:
    """prepare's summary on stderr: what was skipped and why (`local`: the files skipped, with
    their local paths, which dataset.json leaves out), the label and duplicate reports, the
    counts table."""
    from xraygan.console import counts_table, err

    for s in local[:20]:
        err.print(f"[yellow]skipped[/] {s['file']}: {s['reason']}", highlight=False)
    if rec["skipped_count"] > 20:
        err.print(f"[yellow]... and {rec['skipped_count'] - 20} more skipped (see dataset.json)")
    for w in rec["warnings"]:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if rec["views_skipped"]:
        err.print("views left out: " + ", ".join(f"{n} {v}" for v, n in rec["views_skipped"].items()),
                  highlight=False, soft_wrap=True)
    if rec.get("folders_left_out"):
        err.print("class folders left out (not in --classes): "
                  + ", ".join(f"{d} ({n} images)" for d, n in rec["folders_left_out"].items()),
                  highlight=False, soft_wrap=True)
    lab = rec["labels"]
    if lab:
        err.print(f"labels: {lab['images']} images from {lab['rows']} rows; "
                  f"{lab['missing_count']} named but not found, {lab['not_in_csv_count']} on disk but not in "
                  f"the CSV, {lab['unmatched_rows']} rows matching no class (left out"
                  f"{'' if not lab['other'] else ' → ' + lab['other']}), {lab['uncertain_rows']} uncertain, "
                  f"{lab['conflicting_images']} with conflicting rows"
                  + (f", {lab['no_majority_images']} without a majority" if lab["agreement"] == "majority" else ""),
                  highlight=False, soft_wrap=True)
    d = rec["duplicates"]
    err.print(f"duplicates: {d['images']} images in {d['groups']} groups of identical pixels "
              f"(kept together in one split; {d['dropped_across_splits']} dropped across splits)")
    removed = rec["imbalance"]["removed_counts"]
    if removed:
        err.print("imbalance: removed " + ", ".join(f"{n} {c}" for c, n in removed.items())
                  + " training images")
    err.print(counts_table(f"{out} ({rec['image_size']} px, {rec['seconds']} s)", rec["counts"]))
    if rec["synthetic_demo"]:
        err.print(f"[bold yellow]note:[/] {rec['note']}")


def _report_compare(res: dict, cfg) -> None:
    from xraygan.console import err

    sys.stderr.write(res["markdown"])
    for w in res["warnings"]:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if cfg.out:
        err.print(f"wrote {cfg.out}/table.md, table.csv, table.json{', paired.csv, paired.png' if res['paired']['comparisons'] else ''} "
                  f"({res['runs']} runs)", highlight=False)


def _compare_json(res: dict) -> dict:
    return {k: res[k] for k in ("rows", "columns", "warnings", "runs", "paired")}


def _report_review(res: dict, cfg) -> None:
    from xraygan.audit import readers_markdown
    from xraygan.console import err

    if cfg.one_sheet:
        err.print(f"{res['answered']} answered ({res['blank']} blank): accuracy {res['accuracy']:.2f}, "
                  f"synthetic spotted {res['synthetic_spotted']}, real recognised {res['real_recognised']}, "
                  f"p = {res['p_value']:.3g}: {res['verdict']}; mean quality {res['mean_quality']}",
                  highlight=False)
    else:
        sys.stderr.write(readers_markdown(res))


def _report_probe(res: dict, cfg) -> None:
    from xraygan.console import err

    for c, pairs in res["classes"].items():
        for name, v in pairs.items():
            aucs = "; ".join(f"{k.replace('_auc', '')} space AUC {v[k]:.3f}" for k in ("pca_auc", "classifier_auc")
                             if v.get(k) is not None)
            err.print(f"{c}: {name} ({', '.join(f'{n} {k}' for k, n in v['counts'].items())}): {aucs}: "
                      f"{v['verdict']}", highlight=False)


def _report_diffusion(res: dict, cfg) -> None:
    from xraygan.console import err

    err.print(f"trained {res['steps']} steps in {res['seconds']} s ({res['images_per_s']:.0f} img/s, "
              f"{res['device']}, {res['precision']}; {res['parameters']:,} parameters); model: "
              f"{res['checkpoint']}; sample grids: {res['samples']}", highlight=False, soft_wrap=True)


def _report_gan(res: dict, cfg) -> None:
    from xraygan.console import err

    _warn(res["warnings"])
    err.print(f"trained {res['steps']} steps in {res['seconds']} s "
              f"({res['images_per_s']:.0f} img/s, {res['device']}, {res['precision']}); "
              f"generator: {res['generator']}; sample grids: {res['samples']}", highlight=False)


def _report_demo(res: dict, cfg) -> None:
    from xraygan.console import err

    a = res["synthetic_audit"]
    err.print(f"\n[bold]Synthetic pneumonia images[/] ({res['synthetic_images']}, DCGAN, {res['gan']['steps']} "
              f"steps) against the real training images, in the {a['space']} feature space: "
              f"precision {a['precision']:.2f}, recall {a['recall']:.2f}, coverage {a['coverage']:.2f}, "
              f"FD {a['fd']:.3g}; near-copies of training images: {a['near_copies']} of {a['of']}",
              highlight=False)
    if res["collapsed"]:
        err.print(f"[bold red]The DCGAN collapsed:[/] its images cover almost none of the real images' "
                  f"variety (recall {a['recall']:.2f}, coverage {a['coverage']:.2f}; see {res['figure']}). "
                  "Its row below is not a result about GAN oversampling. Try more --gan-steps, or "
                  "--size 64 on a GPU.", highlight=False)
    err.print(f"\n[bold]Comparison on the {'phantom' if cfg.phantom else 'sample'} test set[/] "
              f"({res['total_seconds']:.0f} s in all):", highlight=False)
    sys.stderr.write(res["markdown"])
    err.print(f"\nreal vs synthetic: {res['figure']}\n"
              f"reports:           {cfg.out}/runs/<row>/report/report.md  (plots beside them)\n"
              f"audit:             {a['report']}\n"
              f"GAN samples:       {res['gan']['samples']}/, synthetic preview {res['gan']['preview']}\n"
              f"Grad-CAMs:         {cfg.out}/runs/<row>/cams/grid.png\n"
              f"table:             {res['table']} (+ .csv; paired.png the paired tests); timings: {cfg.out}/demo.json", highlight=False)
    if res.get("note"):
        err.print(f"[bold yellow]note:[/] {res['note']}", highlight=False)
    elif not cfg.phantom:
        err.print("data: 1,600 real pediatric chest X-rays from Kermany et al. (2018), CC BY 4.0",
                  highlight=False)


def _report_generate(res: dict, cfg) -> None:
    from xraygan.console import err

    err.print(f"wrote {res['count']} {res['label']} images to {res['folder']} "
              f"({res['first']} … {res['last']})", highlight=False)
    _warn(res["warnings"])


def _report_rebalance(rec: dict, cfg) -> None:
    from xraygan.console import counts_table, err

    err.print(counts_table(f"{cfg.out} ({cfg.method})", rec["origins"]))


def _report_classifier(res: dict, cfg) -> None:
    from xraygan.console import err

    _warn(res.get("warnings"))
    err.print(f"best epoch {res['best_epoch']} of {res['epochs_run']} (validation "
              f"{cfg.select} {res[f'best_val_{cfg.select}']:.3f}); {res['images_per_s']:.0f} img/s; "
              f"checkpoint: {res['checkpoint']}", highlight=False)


def _report_gradcam(rec: dict, cfg) -> None:
    from xraygan.console import err

    per = ", ".join(f"{c} {v['lung_energy_mean']}" for c, v in rec["per_class"].items())
    err.print(f"{rec['label']}: layer {rec['layer']} ({rec['layer_map_size']}x{rec['layer_map_size']}); "
              f"CAM energy inside the lung region {rec['lung_energy_mean']} (uniform map: "
              f"{rec['region_area_fraction']}; per class: {per}); grid: {cfg.out}/grid.png", highlight=False)


def _without(*keys: str) -> Callable[[dict], dict]:
    return lambda res: {k: v for k, v in res.items() if k not in keys}


CONFIG_COMMANDS: dict[str, ConfigCommand] = {}
CONFIG_COMMANDS["prepare"] = ConfigCommand(
    "xraygan.prepare", "PrepareConfig", "prepare", _report_prepare,
    """Turn raw chest X-rays into OUT/{train,val,test}/{normal,pneumonia}/*.png + dataset.json.

    SRC may hold images or DICOM files (.dcm, or no extension), in class folders or labelled by a
    CSV. DICOM file names and header values never reach the output (names are salted hashes).

    Example: xraygan prepare chest_xray/ --out data --size 64 --imbalance 3
             xraygan prepare rsna/stage_2_train_images --preset rsna --out data --size 224
             xraygan prepare --sample --out data --size 32
    """, json_help="Print dataset.json on stdout.", json_of=_without("skipped_local"))
CONFIG_COMMANDS["evaluate"] = ConfigCommand(
    "xraygan.evaluate", "EvaluateConfig", "evaluate", _report_evaluate,
    """Measure a classifier on a test folder: metrics with 95% intervals, and a report (`xraygan compare` tabulates runs).

    Example: xraygan evaluate runs/clf/classifier.safetensors data/test --report
             xraygan compare runs/ --out results/      (was: evaluate --compare)
    """)
CONFIG_COMMANDS["audit"] = ConfigCommand(
    "xraygan.audit", "AuditConfig", "audit", _report_audit,
    """Audit synthetic images: realism and diversity (FD, KID, precision/recall), near-copies of
    training images, and a blinded review sheet for a radiologist.

    Example: xraygan audit --real data/train --synthetic synth --out audit
             xraygan score-review audit/review/          (the filled sheets; was audit --score-review)
    """)
CONFIG_COMMANDS["review"] = ConfigCommand(
    "xraygan.review", "ReviewConfig", "serve", _report_served,
    """Serve the blinded real-vs-synthetic reading as a local web page: one image at a time, dark
    background, zoom and window/level, R / S, realism 1-5, a note; every answer saved at once to
    AUDIT/review/<reader>.csv (resumes where the reader stopped). Score with
    `xraygan score-review AUDIT/review/`.

    Example: xraygan review audit --reader smith      (then open http://127.0.0.1:8000/)
    """, json_help=None, callback=_review_ready)
CONFIG_COMMANDS["study"] = ConfigCommand(
    "xraygan.study", "StudyConfig", "study", _report_study,
    """Run the study's whole grid: GANs, synthetic images, audits, then per row and seed rebalance,
    train-classifier, evaluate (threshold 0.5 and tuned on val) and gradcam, then the tables.

    Each step is an ordinary xraygan command (logged in OUT/logs/); finished steps are skipped on a
    rerun and interrupted training resumes, so the same command continues a study.

    Example: xraygan study data64 --out study64 --seeds 0 1 2 --jobs 8
    """, callback=_say, stdout_of=_study_stdout)
CONFIG_COMMANDS["demo"] = ConfigCommand(
    "xraygan.demo", "DemoConfig", "demo", _report_demo,
    """Run the whole study on the real chest X-ray sample shipped with xraygan and print the table.

    prepare --sample → train-gan → generate → rebalance (none, oversample, gan) → train-classifier
    → evaluate → gradcam → audit of the synthetic images → compare, in about two minutes on two
    CPU cores.

    Example: xraygan demo --out demo
    """, json_of=_without("markdown"))
CONFIG_COMMANDS["compare"] = ConfigCommand(
    "xraygan.evaluate", "CompareConfig", "run_compare", _report_compare,
    """The study's table (mean ± std per method), then each row's paired difference to the baseline
    and to over-sampling: 95% interval over test images and seeds, Holm-corrected p, a verdict, the
    smallest difference the study could detect, and DeLong's AUC test per seed.

    Example: xraygan compare study/runs/*/report --out study/table
             xraygan compare runs/ --reference baseline --power 0.02
    """, progress=False, json_of=_compare_json, stdout_of=lambda res: res["markdown"])
CONFIG_COMMANDS["train-gan"] = ConfigCommand(
    "xraygan.gan", "TrainGanConfig", "train_gan", _report_gan,
    """Train a DCGAN on the minority class, or a conditional DCGAN (--conditional) on all.

    Example: xraygan train-gan data/train --out runs/dcgan --epochs 25
             xraygan train-gan data/train --conditional --alpha 0.25 --out runs/cdcgan
             torchrun --nproc-per-node 4 -m xraygan train-gan data/train --out runs/dcgan
    """)
CONFIG_COMMANDS["train-diffusion"] = ConfigCommand(
    "xraygan.diffusion", "TrainDiffusionConfig", "train_diffusion", _report_diffusion,
    """Train a denoising diffusion model (DDPM) on the minority class, or a conditional one on all.

    Example: xraygan train-diffusion data/train --out runs/ddpm --steps 4000
             xraygan train-diffusion data/train --conditional --out runs/cddpm
    """)


CONFIG_COMMANDS["score-review"] = ConfigCommand(
    "xraygan.audit", "ScoreReviewConfig", "run_score_review", _report_review,
    """Score a blinded review: per reader accuracy and a binomial test (could they tell synthetic
    from real?), quality ratings, and with several readers the pooled figures and Cohen's or
    Fleiss' κ; the audit's report.md gets a "Reader study" section.

    Example: xraygan score-review audit/review/
             xraygan score-review audit/review/review.csv
    """, progress=False)
CONFIG_COMMANDS["probe-sources"] = ConfigCommand(
    "xraygan.audit", "ProbeSourcesConfig", "probe_sources", _report_probe,
    """Within each class, can a linear model tell the images' sources apart? Held-out ROC-AUC in
    pixel-PCA space (and a classifier's features) and a verdict: a shortcut a classifier could
    learn instead of the disease.

    Example: xraygan probe-sources data/train
    """, progress=False)
CONFIG_COMMANDS["generate"] = ConfigCommand(
    "xraygan.generate", "GenerateConfig", "generate", _report_generate,
    """Write N synthetic images from a GAN generator or a diffusion model into OUT/<label>/.

    Example: xraygan generate runs/dcgan/generator.safetensors -n 2925 --out synth
             xraygan generate runs/ddpm/diffusion.safetensors -n 805 --out synth-ddpm --sampling-steps 50
    """)
CONFIG_COMMANDS["rebalance"] = ConfigCommand(
    "xraygan.rebalance", "RebalanceConfig", "rebalance", _report_rebalance,
    """Write a rebalanced copy of a training folder (files hard-linked where possible).

    Example: xraygan rebalance data/train --method gan --synthetic synth --out balanced
    """, json_help="Print rebalance.json on stdout.")
CONFIG_COMMANDS["train-classifier"] = ConfigCommand(
    "xraygan.classifier", "TrainClassifierConfig", "train_classifier", _report_classifier,
    """Train a one-channel ResNet-18 and keep the best epoch on the validation split.

    Example: xraygan train-classifier balanced --val data/val --out runs/clf --class-weights balanced
             torchrun --nproc-per-node 4 -m xraygan train-classifier balanced --val data/val --out runs/clf
    """)
CONFIG_COMMANDS["gradcam"] = ConfigCommand(
    "xraygan.gradcam", "GradcamConfig", "gradcam", _report_gradcam,
    """Grad-CAM overlays per class, and the share of CAM energy inside the lung fields.

    Example: xraygan gradcam runs/clf/classifier.safetensors data/test --out runs/clf/cams -n 8
    """)
