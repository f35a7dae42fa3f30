"""`xraygan study --estimate`: each step priced from measured units by the rules the commands
follow, the executor's schedule replayed, nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from conftest import PlanStep

from xraygan import estimate as est
from xraygan.checkpoint import save_checkpoint
from xraygan.study import StudyConfig, build_plan

S = PlanStep


def test_schedule_replays_the_executor():
    steps = [S("gan"), S("gen", ["gan"]), S("audit a", ["gen"], "audit"), S("audit b", ["gen"], "audit"),
             S("clf"), S("table", ["audit a", "audit b", "clf"])]
    secs = {"gan": 10, "gen": 1, "audit a": 4, "audit b": 4, "clf": 6, "table": 0}
    todo = {s.id for s in steps}
    assert est.schedule(steps, todo, secs, 1) == sum(secs.values())
    # two at a time: gan and clf start together; the two audits may not overlap
    assert est.schedule(steps, todo, secs, 2) == 10 + 1 + 4 + 4
    assert est.schedule(steps, todo, secs, 8) == 10 + 1 + 4 + 4
    # what is done is not waited for
    assert est.schedule(steps, todo - {"gan", "gen"}, secs, 2) == 8


def test_hours():
    assert [est.hours(x) for x in (0.2, 12, 600, 3 * 3600, 3 * 86400)] == ["< 1 s", "12 s", "10 min", "3.0 h",
                                                                          "3.0 days"]


def test_steps_are_priced_from_the_units_by_the_commands_rules(demo_data, tmp_path, monkeypatch):
    """With every measurement fixed, each step's figure is its work times the units: GAN steps
    left (a resumed run counts only the rest), the rebalanced set's size, all epochs."""
    unit = 0.25
    monkeypatch.setattr(est, "timed", lambda fn, device, warmup=1: unit)
    monkeypatch.setattr(est, "png_rates", lambda files: (0.001, 0.002))
    cfg = StudyConfig(data=demo_data, out=tmp_path / "s", rows=("baseline", "oversample", "dcgan"), seeds=(0,),
                      gan_steps=40, gan_batch=8, clf_epochs=3, clf_equal_steps=False)
    steps, info = build_plan(cfg)
    counts, need = info["counts"], info["synthetic_needed"]
    n, maj, mn = sum(counts.values()), max(counts.values()), min(counts.values())
    n_val = sum(1 for _ in (demo_data / "val").rglob("*.png"))
    n_test = sum(1 for _ in (demo_data / "test").rglob("*.png"))
    # the GAN stopped after 30 of its 40 steps
    run = tmp_path / "s" / "gan" / "dcgan"
    run.mkdir(parents=True)
    save_checkpoint(run / "state.safetensors", {"x": torch.zeros(1)}, "gan-state", {}, step=30)
    todo = {s.id for s in steps if s.inputs is not None or s.attempt()[0] != "done"}
    seen = []
    e = est.estimate(steps, todo, demo_data, 2, lambda sid: 1, torch.device("cpu"), seen.append, separate=False)
    sec = e.seconds
    assert sec["train-gan dcgan"] == pytest.approx(10 * unit + mn * 0.001)
    per_img = unit / 64  # a classifier step of 64 images, an inference batch of 64, a CAM batch of 32
    assert sec["train-classifier baseline seed 0"] == pytest.approx(
        (n + n_val) * 0.001 + 3 * (n * per_img + n_val * per_img))
    assert sec["train-classifier oversample seed 0"] == pytest.approx(
        (2 * maj + n_val) * 0.001 + 3 * (2 * maj * per_img + n_val * per_img))
    # with equal steps (the default), an epoch is the real training set's count of the over-sampled set's images
    eq = est.estimate(build_plan(replace(cfg, clf_equal_steps=True))[0], todo, demo_data, 2, lambda sid: 1,
                      torch.device("cpu"), lambda line: None, separate=False).seconds
    assert eq["train-classifier oversample seed 0"] == pytest.approx(
        (2 * maj + n_val) * 0.001 + 3 * (n * per_img + n_val * per_img))
    assert eq["train-classifier baseline seed 0"] == pytest.approx(sec["train-classifier baseline seed 0"])
    assert sec["generate dcgan"] == pytest.approx(need * (unit / min(256, need) + 0.002))
    assert sec["evaluate baseline seed 0"] == pytest.approx((n_test + n_val) * (0.001 + per_img))
    assert sec["gradcam baseline seed 0"] == pytest.approx(n_test * (0.001 + unit / 32))
    assert sec["rebalance oversample seed 0"] == 0.0
    # the audit trains its feature classifier (3 epochs on the training set) when none is cached
    assert sec["audit dcgan"] > 3 * n * per_img
    assert e.serial == pytest.approx(sum(sec.values()))
    assert e.wall <= e.serial
    # one measurement per network and thread count, each said before it is made
    assert len(seen) == len(set(seen)) and any("DCGAN step" in line for line in seen)


def test_estimate_on_the_command_line_writes_nothing(demo_data, tmp_path):
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-m", "xraygan", "study", str(demo_data), "--out", str(out), "--estimate",
                        "--rows", "baseline", "dcgan", "--seeds", "0", "--gan-steps", "50", "--clf-epochs", "2",
                        "--patience", "1", "--jobs", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    gan = next(ln for ln in lines if "train-gan dcgan" in ln)
    assert gan.startswith("run    stage 1") and gan.split()[-1] in ("s", "min", "h")
    assert "steps to run, 0 done: about" in r.stdout and "1 step at a time" in r.stdout
    assert "counted at --clf-epochs 2 (early stopping after 1 " in r.stdout
    assert "Memory: the largest step, " in r.stdout and " free (available memory)." in r.stdout
    assert "measuring a DCGAN step (batch 64) at 32 px on cpu" in r.stderr
    assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "xraygan", "study", str(demo_data), "--out", str(out), "--estimate",
                        "--print-commands"], capture_output=True, text=True)
    assert r.returncode == 2 and "give one of them" in r.stderr.strip().splitlines()[-1]
    # --json: the figures for a script, the same plan text beside them
    r = subprocess.run([sys.executable, "-m", "xraygan", "study", str(demo_data), "--out", str(out), "--estimate",
                        "--rows", "baseline", "--seeds", "0", "--clf-epochs", "1", "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout)
    e = rec["estimate"]
    assert e["steps"]["train-classifier baseline seed 0"] > 0 and 0 < e["seconds"] <= e["one_after_another"]
    assert e["memory"]["peak_bytes"]["train-classifier baseline seed 0"] > 2**30 and e["memory"]["waiting"] == []
    assert "train-classifier baseline seed 0" in rec["script"] and "early stopping" not in rec["script"]
    assert not out.exists()


def test_a_batch_a_step_would_refuse_is_said_before_anything_is_measured_at_it(demo_data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "xraygan", "study", str(demo_data), "--out", str(tmp_path / "s"),
                        "--estimate", "--rows", "dcgan", "--seeds", "0", "--gan-batch", "8192"],
                       capture_output=True, text=True, env={**os.environ, "XRAYGAN_MEMORY_LIMIT": "2500M"})
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: study step train-gan dcgan: ") and "a batch of 8192 at 32 px" in last
    assert "give --gan-batch " in last  # the study's option, not train-gan's --batch-size
    assert "Traceback" not in r.stderr


def test_ctrl_c_while_measuring_is_one_line_and_leaves_no_process(demo_data, tmp_path):
    """Ctrl-C reaches the study and the measurement's process alike: the measurement ends, the
    study says so in one line, and nothing is left running or written."""
    p = subprocess.Popen([sys.executable, "-m", "xraygan", "study", str(demo_data), "--out", str(tmp_path / "s"),
                          "--estimate", "--rows", "dcgan", "--seeds", "0", "--gan-batch", "2048"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = []
    for line in p.stderr:  # wait until the slow measurement has started
        seen.append(line)
        if "measuring a DCGAN step" in line:
            break
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 130
    err = "".join(seen) + rest
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted")
    assert not (tmp_path / "s").exists()
    deadline = time.monotonic() + 15  # the fork server ends with the study, then what it forked
    while True:
        ps = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(p.pid)], capture_output=True, text=True).stdout
        alive = [ln.split()[0] for ln in ps.splitlines() if ln.split() and not ln.split()[1].startswith("Z")]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert alive == [], f"processes left running: {alive}"
