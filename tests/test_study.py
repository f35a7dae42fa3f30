"""`xraygan study`: the plan, skipping what is done, failures that do not stop independent steps,
and a --print-commands script that runs as written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_folder

from xraygan.errors import InputError
from xraygan.study import (
    StudyConfig,
    build_plan,
    commands_script,
    default_jobs,
    generator_of,
    generator_tag,
    plan_text,
    unequal_steps_note,
)

pytestmark = pytest.mark.slow  # whole pipelines: `pytest -m "not slow"` leaves them out

TINY = ["--gan-steps", "2", "--gan-batch", "8", "--clf-epochs", "1"]


def xraygan(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xraygan", *args], cwd=cwd, capture_output=True, text=True)


def failed_steps(r: subprocess.CompletedProcess) -> str:
    """A failed study's FAILED lines and the end of each failed step's log, for an assertion message."""
    out = []
    for line in r.stderr.splitlines():
        if line.startswith("FAILED"):
            out.append(line)
            log = Path(line.rsplit("log: ", 1)[-1].strip())
            if log.is_file():
                out.append("  " + "\n  ".join(log.read_text(errors="replace").splitlines()[-8:]))
    return "\n".join(out + ["", r.stderr[-1500:]])


def test_plan_for_a_row_subset(demo_data, tmp_path):
    cfg = StudyConfig(data=demo_data, out=tmp_path / "s", rows=("oversample", "cdcgan_a0.3"), seeds=(0, 4),
                      gan_steps=5, clf_epochs=2)
    steps, info = build_plan(cfg)
    ids = [s.id for s in steps]
    assert ids[:3] == ["train-gan cdcgan_a0.3", "generate cdcgan_a0.3", "audit cdcgan_a0.3"]  # GANs first
    assert ids.count("compare table") == 1 and ids[-2:] == ["compare table", "compare table-tuned"]
    # a GAN per classifier seed × 3 + 2 rows × 2 seeds × 4 (rebalance, train, evaluate at both
    # thresholds, gradcam) + 2 tables
    assert len(steps) == 2 * 3 + 2 * 2 * 4 + 2
    by = {s.id: s for s in steps}
    assert by["rebalance oversample seed 4"].deps == [] and by["rebalance oversample seed 4"].stage == 1
    assert by["rebalance cdcgan_a0.3 seed 0"].deps == ["generate cdcgan_a0.3"]
    assert by["rebalance cdcgan_a0.3 seed 4"].deps == ["generate cdcgan_a0.3-gan4"]
    gan4 = by["train-gan cdcgan_a0.3-gan4"].argv
    assert gan4[gan4.index("--seed") + 1] == "4"
    assert len(build_plan(replace(cfg, gan_seeds=(0,)))[0]) == 3 + 2 * 2 * 4 + 2  # one generator for both
    assert by["train-classifier cdcgan_a0.3 seed 0"].stage == 4
    assert "--no-keep-state" in by["train-classifier cdcgan_a0.3 seed 0"].argv  # never extended: 171 MB less a run
    assert "--no-keep-state" in by["train-gan cdcgan_a0.3"].argv  # nor a generator: 393 MB less at 224 px
    assert set(by["compare table"].deps) == {f"{k} {r} seed {s}" for k in ("evaluate", "gradcam")
                                            for r in ("oversample", "cdcgan_a0.3") for s in (0, 4)}
    gan = by["train-gan cdcgan_a0.3"].argv
    assert gan[gan.index("--alpha") + 1] == "0.3" and "--conditional" in gan
    assert info["synthetic_needed"] == info["counts"]["normal"] - info["counts"]["pneumonia"]
    gen = by["generate cdcgan_a0.3"].argv
    assert gen[gen.index("-n") + 1] == str(info["synthetic_needed"])
    assert all(s.stage > max((by[d].stage for d in s.deps), default=0) for s in steps)
    # a finished step (its command's record) is skipped; a started one is given --force/--resume
    bal = tmp_path / "s" / "balanced" / "oversample-seed0"
    bal.mkdir(parents=True)
    (bal / "rebalance.json").write_text(json.dumps({"kind": "xraygan-rebalance"}))
    clf = tmp_path / "s" / "runs" / "oversample-seed4"
    clf.mkdir(parents=True)
    (clf / "log.csv").write_text("epoch\n")
    text = plan_text(steps)
    assert "done   stage 1  rebalance oversample seed 0\n" in text
    assert "redo   stage 2  train-classifier oversample seed 4" in text  # no state file: --force
    # evaluate writes two reports: either one there already means an earlier attempt (redo, --force)
    rep = tmp_path / "s" / "runs" / "oversample-seed0" / "report"
    rep.mkdir(parents=True)
    (rep / "metrics.json").write_text("{}")
    assert "redo   stage 3  evaluate oversample seed 0  (after" in plan_text(steps)
    assert by["evaluate oversample seed 0"].command()[-1] == "--force"
    shutil.rmtree(rep)
    script = commands_script(steps, "xraygan")
    assert "rebalance oversample seed 0\n" not in script and "# stage 1: rebalance oversample seed 4\n" in script
    assert script.count("\n") == 5 + len(steps) - 1


@pytest.mark.parametrize("rows, message", [
    (("baseline", "nonsense"), "--rows nonsense: unknown row"),
    (("cdcgan_a1.5",), "--rows cdcgan_a1.5: unknown row"),
    (("baseline", "baseline"), "named twice"),
])
def test_bad_rows_are_refused(demo_data, tmp_path, rows, message):
    with pytest.raises(InputError, match=message):
        StudyConfig(data=demo_data, out=tmp_path / "s", rows=rows).validate()


def test_study_folder_is_never_inside_the_data_or_foreign(demo_data, tmp_path):
    r = xraygan("study", str(demo_data), "--out", str(demo_data / "study"), "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "error:" in r.stderr.strip().splitlines()[-1]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    r = xraygan("study", str(demo_data), "--out", str(tmp_path / "mine"), "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "not a study folder" in r.stderr.strip().splitlines()[-1]


def test_default_jobs():
    assert default_jobs(1, cuda=False) == 1 and default_jobs(1, cuda=True) == 1
    assert default_jobs(2, cuda=False) == 2 and default_jobs(2, cuda=True) == 2
    assert default_jobs(16, cuda=False) == 8 and default_jobs(16, cuda=True) == 8


def test_a_generator_tag_names_its_row_and_seed_back():
    for row in ("dcgan", "cdcgan_a0.5", "cddpm"):
        for g in (0, 1, 12):
            assert generator_of(generator_tag(row, g)) == (row, g)
    assert generator_of("cdcgan_a0.75-ganx") == ("cdcgan_a0.75-ganx", 0)  # not a seed: the name as it is


def test_tiny_study_in_parallel_then_resumed_with_a_failing_step(demo_data, tmp_path):
    """2 rows × 2 seeds with --jobs 2; then a rerun with one more row in which one step fails:
    what was done is skipped, the independent steps still run, the table takes what finished and
    the exit code says something failed."""
    out = tmp_path / "study"
    args = ["study", str(demo_data), "--out", str(out), "--seeds", "0", "1", *TINY, "--jobs", "2"]
    r = xraygan(*args, "--rows", "baseline", "dcgan", cwd=tmp_path)
    assert r.returncode == 0, failed_steps(r)
    table = (out / "table" / "table.md").read_text()
    assert "| baseline | 2 |" in table and "| dcgan | 2 |" in table and "Bal. acc." in table
    assert f"(the paired tests drawn: {out / 'table' / 'paired.png'})" in " ".join(r.stderr.split())
    tuned = json.loads((out / "table-tuned" / "table.json").read_text())
    assert tuned["warnings"] == [] and tuned["runs"] == 4
    metrics = {(row, s): json.loads((out / "runs" / f"{row}-seed{s}" / "report-tuned" / "metrics.json").read_text())
               for row in ("baseline", "dcgan") for s in (0, 1)}
    assert all(m["threshold_tuning"] for m in metrics.values())
    # each seed's images came from a generator of its own, and the checkpoints say which
    made_by = [[g["checkpoint"] for g in metrics["dcgan", s]["generators"]] for s in (0, 1)]
    assert made_by == [[str(out / "gan" / t / "generator.safetensors")] for t in ("dcgan", "dcgan-gan1")]
    assert metrics["baseline", 0]["generators"] == []
    assert (out / "audit" / "dcgan" / "audit.json").is_file() and (out / "audit" / "dcgan-gan1" / "audit.json").is_file()
    states = [*out.glob("runs/*/state.safetensors"), *out.glob("gan/*/state.safetensors")]
    assert all(f.stat().st_size < 100_000 for f in states) and len(states) == 6  # the record alone
    times = (out / "times.csv").read_text().splitlines()
    assert len(times) == 1 + 2 * 3 + 2 * 2 * 4 + 2 and all(",done," in t for t in times[1:])
    assert r.stdout.count("| baseline | 2 |") == 2  # both tables printed

    # an interrupted GAN (fewer steps than asked) is resumed, not restarted
    cfg = StudyConfig(data=demo_data, out=out, rows=("dcgan",), seeds=(0,), gan_steps=4)
    gan = next(s for s in build_plan(cfg)[0] if s.id == "train-gan dcgan")
    assert not gan.done() and gan.command()[-1] == "--resume"

    # one more row whose seed-0 rebalance cannot run (a file of the user's in its output folder)
    bad = out / "balanced" / "oversample-seed0"
    bad.mkdir(parents=True)
    (bad / "keep-me.txt").write_text("not xraygan's")
    r = xraygan(*args, "--rows", "baseline", "dcgan", "oversample", cwd=tmp_path)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "1 step failed (rebalance oversample seed 0)" in last and str(out / "logs") in last
    assert (bad / "keep-me.txt").read_text() == "not xraygan's"
    assert "22 already done" in r.stderr  # 2 GANs × 3 + 2 rows × 2 seeds × 4
    log = (out / "logs" / "rebalance-oversample-seed-0.log").read_text()
    assert "not an output of xraygan rebalance" in log and "Traceback" not in log
    table = (out / "table" / "table.md").read_text()
    assert "| oversample | 1 |" in table and "| baseline | 2 |" in table
    status = {ln.split(",")[0]: ln.split(",")[1] for ln in (out / "times.csv").read_text().splitlines()[1:]}
    assert status["train-classifier oversample seed 0"] == "blocked"
    assert status["gradcam oversample seed 1"] == "done"

    # --print-commands: the steps left, as a script that runs as written
    (bad / "keep-me.txt").unlink()
    r = xraygan(*args, "--rows", "baseline", "dcgan", "oversample", "--print-commands", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln and not ln.startswith(("#", "set "))]
    assert [ln.rsplit("# ", 1)[1] for ln in lines] == [
        "stage 1: rebalance oversample seed 0", "stage 2: train-classifier oversample seed 0",
        "stage 3: evaluate oversample seed 0",
        "stage 3: gradcam oversample seed 0", "stage 6: compare table", "stage 6: compare table-tuned"]
    script = tmp_path / "rest.sh"
    script.write_text(r.stdout)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| oversample | 2 |" in (out / "table" / "table.md").read_text()
    r = xraygan(*args, "--rows", "baseline", "dcgan", "oversample", "--dry-run", cwd=tmp_path)
    assert [ln.split()[0] for ln in r.stdout.splitlines()].count("done") == 2 * 3 + 3 * 2 * 4
    assert "note: at the same --clf-epochs" not in r.stderr  # every row trains the baseline's steps
    r = xraygan(*args, "--rows", "baseline", "dcgan", "oversample", "--no-clf-equal-steps", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "this study was run with --clf-equal-steps (now --no-clf-equal-steps)" in \
        r.stderr.strip().splitlines()[-1]
    r = xraygan(*args[:3], str(tmp_path / "one-pass"), *args[4:], "--rows", "baseline", "oversample",
                "--no-clf-equal-steps", "--dry-run", cwd=tmp_path)
    assert "note: at the same --clf-epochs the rows train these multiples" in r.stderr  # before the plan is run


def test_diffusion_rows_in_the_plan(demo_data, tmp_path):
    cfg = StudyConfig(data=demo_data, out=tmp_path / "s", rows=("ddpm", "cddpm"), seeds=(0,), diffusion_steps=7)
    by = {s.id: s for s in build_plan(cfg)[0]}
    ddpm, cddpm = by["train-diffusion ddpm"].argv, by["train-diffusion cddpm"].argv
    assert ddpm[ddpm.index("--steps") + 1] == "7" and "--conditional" not in ddpm
    assert "--conditional" in cddpm and cddpm[cddpm.index("--class") + 1] == "pneumonia"
    gen = by["generate cddpm"]
    assert gen.deps == ["train-diffusion cddpm"] and gen.argv[1].endswith("cddpm/diffusion.safetensors")
    assert by["rebalance ddpm seed 0"].deps == ["generate ddpm"] and "audit ddpm" in by


def test_a_generator_setting_may_change_until_its_generators_have_started(demo_data, tmp_path):
    """A finished GAN grid takes a diffusion row at a step count and DDIM steps of its own; a
    setting a started step used, or one that shapes every row's classifiers, is refused."""

    from xraygan.fsutil import atomic_write_json, record_header
    from xraygan.study import check_study_folder

    out = tmp_path / "s"
    grid = StudyConfig(data=demo_data, out=out, rows=("oversample", "dcgan"), seeds=(0,), gan_steps=2)
    out.mkdir()
    atomic_write_json(out / "study.json", {**record_header("study"), "settings": grid.settings()})

    def start(folder: str) -> None:
        (out / folder).mkdir(parents=True)
        (out / folder / "config.json").write_text("{}")

    start("gan/dcgan")
    added = replace(grid, rows=("cddpm",), diffusion_steps=9, sampling_steps=5)
    assert check_study_folder(added) is not None  # continued, not refused
    gen = {s.id: s for s in build_plan(added)[0]}["generate cddpm"].argv
    assert gen[gen.index("--sampling-steps") + 1] == "5"
    assert "--sampling-steps" not in {s.id: s for s in build_plan(grid)[0]}["generate dcgan"].argv
    with pytest.raises(InputError, match="--gan-steps 2 .now 3."):
        check_study_folder(replace(added, gan_steps=3))
    assert check_study_folder(replace(added, clf_epochs=3)) is not None  # no classifier yet
    start("runs/oversample-seed0")
    with pytest.raises(InputError, match="--clf-epochs 20 .now 3."):
        check_study_folder(replace(added, clf_epochs=3))
    start("diffusion/cddpm")
    with pytest.raises(InputError, match="diffusion-steps 4000 .now 9."):
        check_study_folder(added)
    start("synth/cddpm")
    with pytest.raises(InputError, match="sampling-steps 50 .now 5."):
        check_study_folder(replace(added, diffusion_steps=4000))
    # a record older than a setting: the study ran with the setting's default
    atomic_write_json(out / "study.json", {**record_header("study"), "settings": {
        k: v for k, v in grid.settings().items() if k != "sampling_steps"}})
    assert check_study_folder(replace(added, diffusion_steps=4000, sampling_steps=50)) is not None
    with pytest.raises(InputError, match="sampling-steps 50 .now 5."):
        check_study_folder(replace(added, diffusion_steps=4000))


def test_a_study_s_generators_can_be_given_to_classifiers_of_other_settings(demo_data, tmp_path):
    """--clf-select and --weights are study settings: each row's classifier keeps the epoch the
    study says, one study never mixes pretrained and scratch classifiers, and a copy of a study
    without its runs/ reruns the classifiers with other settings on the same generators."""
    from xraygan.fsutil import atomic_write_json, record_header
    from xraygan.study import check_study_folder

    w, w2 = tmp_path / "r18.pth", tmp_path / "other.pth"
    w.write_bytes(b"one file")
    w2.write_bytes(b"another file")
    out = tmp_path / "s"
    grid = StudyConfig(data=demo_data, out=out, rows=("baseline", "dcgan"), seeds=(0,), weights=w)
    trains = [s.argv for s in build_plan(replace(grid, clf_select="f1"))[0] if s.id.startswith("train-classifier")]
    assert len(trains) == 2 and all(a[a.index("--select") + 1] == "f1" for a in trains)
    assert not any("--select" in s.argv for s in build_plan(grid)[0])  # auc, the command's default
    out.mkdir()
    atomic_write_json(out / "study.json", {**record_header("study"), "settings": grid.settings()})
    (out / "gan" / "dcgan").mkdir(parents=True)
    (out / "gan" / "dcgan" / "config.json").write_text("{}")
    moved = tmp_path / "elsewhere.pth"
    moved.write_bytes(w.read_bytes())  # the same weights under another name are the same setting
    assert check_study_folder(replace(grid, weights=moved)) is not None
    assert check_study_folder(replace(grid, weights=None, clf_select="f1")) is not None  # no run yet
    (out / "runs" / "baseline-seed0").mkdir(parents=True)
    (out / "runs" / "baseline-seed0" / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"--weights \S*r18\.pth .now none."):
        check_study_folder(replace(grid, weights=None))
    with pytest.raises(InputError, match=r"--weights \S*r18\.pth .now \S*other\.pth."):
        check_study_folder(replace(grid, weights=w2))
    with pytest.raises(InputError, match="--clf-select auc .now f1."):
        check_study_folder(replace(grid, clf_select="f1"))
    # the tuning criterion shapes only the tuned reports: classifiers may be kept for another one
    evals = [s.argv for s in build_plan(replace(grid, tune_for="f1"))[0] if s.id.startswith("evaluate")]
    assert len(evals) == 2 and all(a[a.index("--tune-for") + 1] == "f1" for a in evals)
    assert check_study_folder(replace(grid, tune_for="f1")) is not None
    (out / "runs" / "baseline-seed0" / "report-tuned").mkdir()
    (out / "runs" / "baseline-seed0" / "report-tuned" / "metrics.json").write_text("{}")
    with pytest.raises(InputError, match="--tune-for youden .now f1."):
        check_study_folder(replace(grid, tune_for="f1"))
    with pytest.raises(InputError, match="--clf-select 'loss': must be one of f1, auc"):
        replace(grid, out=tmp_path / "t", clf_select="loss", weights=None).validate()
    # a record from before the weights, the selection and the tuning criterion were recorded: the
    # weights are not known, so not compared; the other two were F1 then, the default of the day
    atomic_write_json(out / "study.json", {**record_header("study"), "settings": {
        k: v for k, v in grid.settings().items() if k not in ("weights", "clf_select", "tune_for")}})
    assert check_study_folder(replace(grid, weights=w2, clf_select="f1", tune_for="f1")) is not None
    with pytest.raises(InputError, match="--clf-select f1 .now auc."):
        check_study_folder(replace(grid, tune_for="f1"))
    with pytest.raises(InputError, match="--tune-for f1 .now youden."):
        check_study_folder(replace(grid, clf_select="f1"))


def test_equal_steps_gives_every_classifier_the_real_training_set_s_count_per_epoch(demo_data, tmp_path):
    """Each row's classifier takes --epoch-images of the training set's count (the default), so
    over- and under-sampled rows train the baseline's steps; --no-clf-equal-steps gives one pass
    over each row's own set. A study setting like the others; a record from before it was one
    pass."""
    from xraygan.fsutil import atomic_write_json, record_header
    from xraygan.study import check_study_folder

    out = tmp_path / "s"
    grid = StudyConfig(data=demo_data, out=out, rows=("baseline", "undersample", "oversample"), seeds=(0, 1))
    one_pass = replace(grid, clf_equal_steps=False)
    steps, info = build_plan(grid)
    trains = [s.argv for s in steps if s.id.startswith("train-classifier")]
    n = sum(info["counts"].values())
    assert len(trains) == 6 and all(a[a.index("--epoch-images") + 1] == str(n) for a in trains)
    assert not any("--epoch-images" in s.argv for s in build_plan(one_pass)[0])
    # with one pass, the study says at its start what that means for each row's steps
    note = unequal_steps_note(one_pass, build_plan(one_pass)[0], info["counts"])
    assert note.startswith("at the same --clf-epochs the rows train") and "oversample 1.5×; undersample 0.5×" in note
    assert unequal_steps_note(grid, steps, info["counts"]) is None
    only = replace(one_pass, rows=("baseline", "class_weights"))
    assert unequal_steps_note(only, build_plan(only)[0], info["counts"]) is None
    out.mkdir()
    atomic_write_json(out / "study.json", {**record_header("study"), "settings": one_pass.settings()})
    assert check_study_folder(grid) is not None  # no classifier yet
    (out / "runs" / "baseline-seed0").mkdir(parents=True)
    (out / "runs" / "baseline-seed0" / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"run with --no-clf-equal-steps \(now --clf-equal-steps\)"):
        check_study_folder(grid)
    # a record from before the setting: its classifiers took one pass, and it goes on that way
    atomic_write_json(out / "study.json", {**record_header("study"), "settings": {
        k: v for k, v in grid.settings().items() if k != "clf_equal_steps"}})
    assert check_study_folder(one_pass) is not None
    with pytest.raises(InputError, match="--no-clf-equal-steps"):
        check_study_folder(grid)


def test_gan_seeds_give_each_classifier_seed_a_generator_of_its_own(demo_data, tmp_path):
    """--gan-seeds 0 1: each generator row trains a generator per seed (seed 0 keeps the row's
    folders, so a one-generator study keeps its layout), and classifier seed s rebalances with
    the generator seeded gan_seeds[s mod n]; a setting locked once a generator row's rebalanced
    set exists (the other rows' sets do not depend on it)."""
    from xraygan.fsutil import atomic_write_json, record_header
    from xraygan.study import check_study_folder

    out = tmp_path / "s"
    grid = StudyConfig(data=demo_data, out=out, rows=("baseline", "dcgan"), seeds=(0, 1, 2), gan_seeds=(0, 1))
    by = {s.id: s for s in build_plan(grid)[0]}
    assert {i for i in by if i.startswith(("train-gan", "generate", "audit"))} == {
        "train-gan dcgan", "generate dcgan", "audit dcgan", "train-gan dcgan-gan1", "generate dcgan-gan1",
        "audit dcgan-gan1"}
    gan1 = by["train-gan dcgan-gan1"].argv
    assert gan1[gan1.index("--out") + 1] == str(out / "gan" / "dcgan-gan1") and gan1[gan1.index("--seed") + 1] == "1"
    assert "--seed" not in by["train-gan dcgan"].argv  # the one-generator study's command, unchanged
    for seed, tag in ((0, "dcgan"), (1, "dcgan-gan1"), (2, "dcgan")):
        step = by[f"rebalance dcgan seed {seed}"]
        assert step.deps == [f"generate {tag}"]
        assert step.argv[step.argv.index("--synthetic") + 1] == str(out / "synth" / tag)
    assert by["rebalance baseline seed 1"].deps == []
    out.mkdir()
    atomic_write_json(out / "study.json", {**record_header("study"), "settings": grid.settings()})
    assert check_study_folder(replace(grid, gan_seeds=(0,))) is not None  # nothing rebalanced yet
    for other in ("baseline-seed0", "oversample-seed1"):  # sets no generator seed changes
        (out / "balanced" / other).mkdir(parents=True)
        (out / "balanced" / other / "rebalance.json").write_text("{}")
    assert check_study_folder(replace(grid, gan_seeds=(0,))) is not None
    (out / "balanced" / "dcgan-seed0").mkdir(parents=True)
    (out / "balanced" / "dcgan-seed0" / "rebalance.json").write_text("{}")
    with pytest.raises(InputError, match=r"run with --gan-seeds 0 1 \(now 0\)"):
        check_study_folder(replace(grid, gan_seeds=(0,)))
    # no --gan-seeds is a generator per classifier seed: the same as naming those seeds
    assert check_study_folder(replace(grid, seeds=(0, 1), gan_seeds=None)) is not None
    with pytest.raises(InputError, match=r"run with --gan-seeds 0 1 \(now unset: a generator per classifier seed\)"):
        check_study_folder(replace(grid, gan_seeds=None))  # seeds 0 1 2: a third generator
    (out / "study.json").write_text(json.dumps({**record_header("study"), "settings": {
        k: v for k, v in grid.settings().items() if k != "gan_seeds"}}))  # a record from before the setting
    with pytest.raises(InputError, match=r"run with --gan-seeds 0 \(now unset: a generator per classifier seed\)"):
        check_study_folder(replace(grid, gan_seeds=None))
    assert check_study_folder(replace(grid, gan_seeds=(0,))) is not None
    with pytest.raises(InputError, match="--gan-seeds: a seed is named twice"):
        replace(grid, gan_seeds=(1, 1)).validate()


def test_steps_that_can_only_run_alone_get_every_core(demo_data, tmp_path):
    """Adding a generator row to a finished study: its training and then its generation have
    nothing beside them, so they are found from the plan (not from timing) and get all cores."""
    from xraygan.study import alone_steps

    cfg = StudyConfig(data=demo_data, out=tmp_path / "s", rows=("oversample", "ddpm"), seeds=(0, 1), gan_seeds=(0,))
    steps, _ = build_plan(cfg)
    assert alone_steps(steps, {s.id for s in steps}) == set()  # the oversample row runs beside them
    row = {s.id for s in steps if "ddpm" in s.id or s.inputs is not None}
    assert alone_steps(steps, row) == {"train-diffusion ddpm", "generate ddpm"}
    one_run = {"train-classifier oversample seed 0", "evaluate oversample seed 0", "gradcam oversample seed 0"}
    assert alone_steps(steps, one_run) == {"train-classifier oversample seed 0"}


def test_an_absent_device_is_refused_before_the_study_starts_but_may_be_planned_for(demo_data, tmp_path):
    import torch

    from xraygan.study import study

    if torch.cuda.is_available():
        pytest.skip("this machine has the CUDA device the test asks for in vain")
    cfg = StudyConfig(data=demo_data, out=tmp_path / "s", rows=("baseline",), seeds=(0,), device="cuda")
    with pytest.raises(InputError, match="--device cuda: no CUDA device"):
        study(cfg)
    assert not (tmp_path / "s").exists()  # refused before the folder, not in a failed first step
    script = study(replace(cfg, print_commands=True))["script"]
    assert "--device cuda" in script  # a plan for the cluster's GPU nodes, printed on a login node


def test_weights_go_to_every_classifier(demo_data, tmp_path):
    w = tmp_path / "r18.safetensors"
    w.write_bytes(b"placeholder: only the path is planned here")
    steps, _ = build_plan(StudyConfig(data=demo_data, out=tmp_path / "s", rows=("baseline", "class_weights"),
                                      seeds=(0,), weights=w))
    trains = [s.argv for s in steps if s.id.startswith("train-classifier")]
    assert len(trains) == 2 and all(a[a.index("--weights") + 1] == str(w.absolute()) for a in trains)
    with pytest.raises(InputError, match="weights file not found"):
        StudyConfig(data=demo_data, out=tmp_path / "t", weights=tmp_path / "none.safetensors").validate()
    # read before any step: a file no classifier can start from fails now, not after the GANs
    with pytest.raises(InputError, match=r"r18\.safetensors: cannot read weights"):
        StudyConfig(data=demo_data, out=tmp_path / "t", weights=w).validate()
    assert not (tmp_path / "t").exists()


def test_a_step_runs_in_a_process_of_its_own_with_its_output_in_its_log(tmp_path):
    """The study's steps are forked from a server that imported torch once; each still runs its
    command line through the command-line layer, in its own session, with its exit code and its
    output (progress, errors) in its log."""
    from xraygan.workers import context, step_main

    ctx = context()
    if ctx is None:
        pytest.skip("no fork server on this system: steps start as new Pythons")
    bad, good = tmp_path / "bad.log", tmp_path / "good.log"
    argv = ["rebalance", str(tmp_path / "missing"), "--method", "none", "--out", str(tmp_path / "o")]
    p = ctx.Process(target=step_main, args=(argv, str(bad), 1))
    p.start()
    p.join()
    assert p.exitcode == 2
    assert bad.read_text().strip().splitlines()[-1].startswith("error:") and "missing" in bad.read_text()
    assert not (tmp_path / "o").exists()
    q = ctx.Process(target=step_main, args=(["--version"], str(good), 1))
    q.start()
    q.join()
    assert q.exitcode == 0 and good.read_text().startswith("xraygan ")


def test_a_forked_step_sees_the_study_s_environment_and_folder_now(tmp_path, rng, monkeypatch):
    """The fork server keeps the environment and working folder it started with; a step gets the
    study's as they are when it starts (a library caller may change them between two studies)."""
    from xraygan.workers import context, step_main

    ctx = context()
    if ctx is None:
        pytest.skip("no fork server on this system: steps start as new Pythons")
    make_folder(tmp_path / "here" / "d", {"normal": 4, "pneumonia": 4}, 16, rng)
    monkeypatch.setenv("XRAYGAN_MEMORY_LIMIT", "not-a-size")  # read by the batch check, after the images
    log = tmp_path / "step.log"
    argv = ["train-gan", "d", "--out", "g", "--class", "pneumonia", "--steps", "1", "--batch-size", "2",
            "--device", "cpu"]  # relative to `here`
    p = ctx.Process(target=step_main, args=(argv, str(log), 1, dict(os.environ), str(tmp_path / "here")))
    p.start()
    p.join()
    assert p.exitcode == 2, log.read_text()
    assert "XRAYGAN_MEMORY_LIMIT='not-a-size': not a size" in log.read_text()
