"""A study's memory: every step's batch checked against the free memory before any step runs (in
the study's options), and no steps started together whose peaks add up to more than is free."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import PlanStep

from xraygan import estimate as est
from xraygan import stepmemory
from xraygan.errors import InputError
from xraygan.stepmemory import PlanMemory, fits, plan_data, step_needs
from xraygan.study import StudyConfig, build_plan, run_study

GIB = 2**30


S = PlanStep


def test_steps_start_together_only_where_their_peaks_fit_the_free_memory():
    assert fits([], 50 * GIB, 10 * GIB)  # alone a step always starts (the plan's check passed it)
    assert fits([4 * GIB], 5 * GIB, 10 * GIB)  # 9 of the 9 GiB (90 %) that may be taken
    assert not fits([4 * GIB], 5 * GIB + 1, 10 * GIB)
    assert fits([4 * GIB], 50 * GIB, None)  # the device does not say: nothing waits
    assert fits([50 * GIB], 0, 10 * GIB)  # a step that holds no network (rebalance) never waits
    # the step's own check at its start asks for its upper bound of what the running ones leave
    # (4 GiB held of 10: it may ask 5.4); refused there, the step would fail, so it waits
    assert fits([4 * GIB], GIB, 10 * GIB, rule=5 * GIB)
    assert not fits([4 * GIB], GIB, 10 * GIB, rule=6 * GIB)
    # two diffusion models of 6 GiB each on 10 GiB free run one after the other; the 1 GiB
    # classifier runs beside the first, so it is not on the critical path
    steps = [S("ddpm"), S("cddpm"), S("clf")]
    secs = {"ddpm": 10.0, "cddpm": 10.0, "clf": 5.0}
    todo = {s.id for s in steps}
    assert est.schedule(steps, todo, secs, 2) == 15.0  # (no memory: ddpm and cddpm together)
    waited: set[str] = set()
    mem = PlanMemory({"ddpm": 6 * GIB, "cddpm": 6 * GIB, "clf": GIB}, 10 * GIB, "test")
    assert est.schedule(steps, todo, secs, 2, mem, waited) == 20.0
    assert waited == {"cddpm"}
    assert est.schedule(steps, todo, secs, 2, PlanMemory(mem.peaks, 20 * GIB, "test")) == 15.0


def test_each_step_s_need_is_its_command_s_batch_in_the_study_s_options(demo_data, tmp_path):
    cfg = StudyConfig(data=demo_data, out=tmp_path / "s", rows=("baseline", "dcgan", "ddpm"), seeds=(0,),
                      gan_batch=16, diffusion_batch=8, clf_accumulate=2)
    steps = build_plan(cfg)[0]
    pd = plan_data(demo_data)
    needs = step_needs(steps, {s.id for s in steps}, pd, torch.device("cpu"))
    gan, = needs["train-gan dcgan"]
    assert (gan.family, gan.batch, gan.flags, gan.images) == ("gan", 16, ("--gan-batch", ""), pd.train[pd.minority])
    diff, = needs["train-diffusion ddpm"]
    assert (diff.family, diff.batch, diff.flags) == ("diffusion", 8, ("--diffusion-batch", ""))
    clf = needs["train-classifier baseline seed 0"]
    assert clf[0].batch == 32 and clf[0].accumulate == (2, 64) and clf[0].flags == (None, "--clf-accumulate")
    assert clf[0].images == pd.n_train + pd.val  # the set it trains on and the validation split, decoded
    assert not any(k.startswith(("rebalance", "compare")) for k in needs)  # no network: nothing to hold
    # a command that fits its batch to the free memory is counted at the batch it would take
    gen, = needs["generate dcgan"]
    assert gen.adapts and gen.bytes(pd.size, None) > gen.bytes(pd.size, 1)
    # the peak grows with the batch as memory.training_bytes does
    assert diff.bytes(pd.size, None) < stepmemory.Need(**{**diff.__dict__, "batch": 16}).bytes(pd.size, None)


def test_a_batch_that_cannot_fit_is_refused_before_the_study_makes_anything(demo_data, tmp_path):
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-m", "xraygan", "study", str(demo_data), "--out", str(out), "--rows", "ddpm",
                        "--seeds", "0", "--diffusion-batch", "4096"], capture_output=True, text=True,
                       env={**os.environ, "XRAYGAN_MEMORY_LIMIT": "2500M"})
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: study step train-diffusion ddpm: a batch of 4096 at 32 px needs about "), last
    assert "give --diffusion-batch " in last and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_steps_whose_peaks_do_not_fit_together_run_one_after_the_other(demo_data, tmp_path, monkeypatch):
    """With --jobs 2 two GANs start together, unless the memory found free cannot hold both: then
    the second waits for the first to end, and says so once."""
    real = stepmemory.plan_memory

    def tight(steps, todo, pd, device):  # the plan's own peaks, with room for one GAN at a time
        m = real(steps, todo, pd, device)
        gans = [m.peaks[s] for s in todo if s.startswith("train-gan")]
        return PlanMemory(m.peaks, int(1.2 * max(gans) / 0.9), "test")

    monkeypatch.setattr(stepmemory, "plan_memory", tight)
    said: list[str] = []
    cfg = StudyConfig(data=demo_data, out=tmp_path / "s", rows=("dcgan", "cdcgan_a0.5"), seeds=(0,), gan_steps=2,
                      gan_batch=8, clf_epochs=1, audit=False, jobs=2, device="cpu")
    run_study(cfg, said.append)
    at = {line: i for i, line in enumerate(said)}
    first, second = "train-gan dcgan", "train-gan cdcgan_a0.5"
    wait = [line for line in said if line.startswith(f"wait   {second}: needs about ")]
    assert len(wait) == 1 and f"and {first} holds about " in wait[0], said
    done_first = next(i for line, i in at.items() if line.startswith(f"done   {first} "))
    assert at[f"start  {first}"] < at[wait[0]] < done_first < at[f"start  {second}"]


def test_a_gpu_s_free_memory_is_read_outside_the_study_s_process(monkeypatch):
    """CUDA started in the study's process would hold GPU memory all study long: on a GPU the
    free memory is asked in a measurement's process."""
    asked = []

    class Apart:
        def __call__(self, fn, args, threads, what):
            asked.append((fn, args, what))
            return 8 * GIB, "free GPU memory"

    monkeypatch.setattr(est, "Apart", Apart)
    assert stepmemory.device_free(torch.device("cuda")) == (8 * GIB, "free GPU memory")
    assert asked and asked[0][0] is stepmemory.free_bytes
    with pytest.raises(InputError):  # (on the CPU it is read here; a bad limit is one error line)
        monkeypatch.setenv("XRAYGAN_MEMORY_LIMIT", "lots")
        stepmemory.device_free(torch.device("cpu"))


@pytest.mark.parametrize("command, family, accumulate, ours", [
    ("train-gan", "gan", None, ("--gan-batch", "")),
    ("train-diffusion", "diffusion", None, ("--diffusion-batch", "")),
    ("train-classifier", "classifier", (2, 64), (None, "--clf-accumulate")),
])
def test_a_step_s_own_memory_refusal_is_told_in_the_study_s_options(command, family, accumulate, ours):
    """Memory taken by another program while the study runs can still make a step refuse its
    batch at its start: the study's FAILED line names the study's option, as its own check does."""
    from xraygan.memory import refusal
    from xraygan.study import _in_study_terms

    args = (family, 50_000_000, 1_000_000, 64, 2 * GIB, "available memory", torch.device("cpu"), 64, accumulate)
    step_says = refusal(*args)  # in the command's own options
    assert "--batch-size" in step_says or "--accumulate" in step_says
    assert _in_study_terms(command, step_says) == refusal(*args, ours)
    assert _in_study_terms(command, "error: something else --batch-size") == "error: something else --batch-size"
