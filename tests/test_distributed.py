"""Both trainers under `torchrun --nproc-per-node 2` with gloo on the CPU: rank 0 alone writes,
checkpoints keep the single-process format (a 2-process run resumes on 1 and back), and the
other commands read them unchanged. Under a minute."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "xraygan", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def xraygan(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xraygan", *args], cwd=cwd, capture_output=True, text=True)


def log_steps(run) -> list[int]:
    with open(run / "log.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_train_gan_on_two_processes_resumes_on_one_and_back(demo_data, tmp_path):
    run = tmp_path / "gan"
    common = ["train-gan", str(demo_data / "train"), "--out", str(run), "--batch-size", "8",
              "--log-every", "2", "--save-every", "2", "--device", "cpu"]
    r = torchrun(*common, "--steps", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("trained 4 steps") == 1  # rank 0 reports; rank 1 is silent
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["processes"] == 2
    assert log_steps(run) == [1, 2, 3, 4]
    r = xraygan(*common, "--steps", "6", "--resume", cwd=tmp_path)  # one process
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(*common, "--steps", "8", "--resume", cwd=tmp_path)  # and two again
    assert r.returncode == 0, r.stderr[-3000:]
    assert log_steps(run) == list(range(1, 9))
    r = xraygan("generate", str(run / "generator.safetensors"), "-n", "4", "--out", str(tmp_path / "syn"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # a batch that does not split over the processes is one clear error, before any folder
    r = torchrun("train-gan", str(demo_data / "train"), "--out", str(tmp_path / "odd"), "--batch-size", "9",
                 "--steps", "1", "--device", "cpu", cwd=tmp_path)
    assert r.returncode != 0 and "--batch-size 9: must split into 2 equal shares" in r.stderr
    assert not (tmp_path / "odd").exists()


def test_train_classifier_on_two_processes(demo_data, tmp_path):
    run = tmp_path / "clf"
    r = torchrun("train-classifier", str(demo_data / "train"), "--val", str(demo_data / "val"), "--out", str(run),
                 "--epochs", "2", "--batch-size", "16", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("best epoch") == 1
    with open(run / "log.csv", newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2]
    assert json.loads((run / "config.json").read_text())["processes"] == 2
    r = xraygan("evaluate", str(run / "classifier.safetensors"), str(demo_data / "test"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["metrics"]["confusion"]["tp"] >= 0
    r = xraygan("train-classifier", str(demo_data / "train"), "--val", str(demo_data / "val"), "--out", str(run),
                "--epochs", "3", "--batch-size", "16", "--device", "cpu", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
