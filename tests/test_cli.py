import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_img, xray_like
from PIL import Image
from typer.testing import CliRunner

from xraygan.cli import app

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


def test_prepare_demo_json(tmp_path):
    r = runner.invoke(app, ["prepare", "--demo", "--demo-count", "30", "--out", str(tmp_path / "d"),
                            "--size", "16", "--json", "--keep", "pneumonia=10"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["counts"]["train"]["pneumonia"] == 10 and rec["synthetic_demo"]


def test_input_error_is_one_line_exit_2(tmp_path):
    r = runner.invoke(app, ["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "missing: folder not found" in lines[0]
    assert "Traceback" not in r.output


def test_bad_keep_value_is_usage_error(tmp_path):
    r = runner.invoke(app, ["prepare", "--demo", "--out", str(tmp_path / "o"), "--keep", "pneumonia"])
    assert r.exit_code == 2 and "CLASS=COUNT" in r.output


def test_every_command_documented_in_readme():
    text = README.read_text()
    from xraygan.contract import commands

    for name, cmd in commands().items():
        assert re.search(rf"xraygan {name}\b", text), f"README does not show `xraygan {name}`"
        assert cmd.help and "xraygan " in cmd.help, f"{name}: no example"


def test_gan_commands_compose(demo_data, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["train-gan", str(demo_data / "train"), "--out", str(run), "--epochs", "1",
                            "--batch-size", "8", "--nz", "8", "--width", "4", "--device", "cpu",
                            "--conditional", "--alpha", "0.25", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["conditional"] is True
    r = runner.invoke(app, ["generate", str(run / "generator.safetensors"), "-n", "5",
                            "--out", str(tmp_path / "synth")])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "synth" / "pneumonia").glob("synthetic-run-*.png"))) == 5
    r = runner.invoke(app, ["generate", str(run / "discriminator.safetensors"), "-n", "5",
                            "--out", str(tmp_path / "s2")])
    assert r.exit_code == 2 and "is a discriminator checkpoint" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1


@pytest.mark.slow
def test_classifier_commands_compose_end_to_end(demo_data, tmp_path):
    """rebalance → train-classifier → evaluate --report → gradcam → evaluate --compare, as a
    shell script would run them."""
    def ok(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r

    runs = tmp_path / "runs"
    for method in ("none", "oversample"):
        ok("rebalance", demo_data / "train", "--method", method, "--out", tmp_path / f"bal-{method}")
        for seed in (0, 1):
            run = runs / f"{method}-seed{seed}"
            ok("train-classifier", tmp_path / f"bal-{method}", "--val", demo_data / "val", "--out", run,
               "--epochs", "1", "--batch-size", "32", "--small-stem", "no", "--seed", seed,
               "--device", "cpu")
            r = ok("evaluate", run / "classifier.safetensors", demo_data / "test", "--report",  # bare:
                   "--bootstrap", "50", "--json")  # the report goes beside the checkpoint
            rec = json.loads(r.stdout)
            assert rec["label"] == method and (run / "report" / "report.md").is_file()
    r = ok("gradcam", runs / "none-seed0" / "classifier.safetensors", demo_data / "test",
           "--out", runs / "none-seed0" / "cams", "-n", "2", "--json")
    assert json.loads(r.stdout)["images"] == rec["metrics"]["n"]
    r = ok("evaluate", "--compare", runs, "--out", tmp_path / "table")
    assert "| none | 2 |" in r.stdout and "| oversample | 2 |" in r.stdout
    assert "CAM in lungs" in r.stdout  # the gradcam summary joins its method's row
    # a file that is not a checkpoint: one line, exit 2
    r = runner.invoke(app, ["evaluate", str(runs / "none-seed0" / "report" / "metrics.json"),
                            str(demo_data / "test")])
    assert r.exit_code == 2 and len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_on_the_real_sample(tmp_path):
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--out", str(out), "--size", "16", "--gan-steps", "2", "--clf-epochs", "1",
                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["rows"] == ["baseline", "oversample", "dcgan"] and res["data"] == "sample"
    for row in res["rows"]:
        assert Path(res["reports"][row]).is_file() and Path(res["gradcam_grids"][row]).is_file()
    table = (out / "table" / "table.md").read_text()
    assert all(f"| {row} | 1 |" in table for row in res["rows"]) and "CAM in lungs" in table
    assert res["train_counts"] == {"normal": 900, "pneumonia": 300} and res["synthetic_images"] == 600
    assert len(list((out / "synth" / "dcgan" / "pneumonia").glob("synthetic-*.png"))) == 600
    a = res["synthetic_audit"]
    audit = json.loads((out / "audit" / "dcgan" / "audit.json").read_text())["classes"]["pneumonia"]["spaces"]
    assert a["space"] == "classifier" and all(a[k] == audit["classifier"][k] for k in ("recall", "coverage", "fd"))
    assert f"recall {a['recall']:.2f}, coverage {a['coverage']:.2f}" in r.stderr
    assert isinstance(res["collapsed"], bool) and Path(res["figure"]).is_file()
    assert "Synthetic pneumonia images (600, DCGAN, 2 steps)" in r.stderr
    assert "Kermany et al. (2018), CC BY 4.0" in r.stderr
    r = runner.invoke(app, ["demo", "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.stderr


@pytest.mark.slow
def test_demo_on_phantoms(tmp_path):
    r = runner.invoke(app, ["demo", "--phantom", "--out", str(tmp_path / "d"), "--count", "60", "--size", "16",
                            "--gan-steps", "2", "--clf-epochs", "1", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["data"] == "phantom" and "not medical images" in r.stderr


@pytest.mark.slow
def test_a_224_px_set_flows_through_every_command(tmp_path):
    """prepare --size 224 → train-gan → generate → rebalance → train-classifier → evaluate → gradcam,
    one step or epoch each with tiny widths: the size the field's classifiers use."""
    rng = np.random.default_rng(0)
    for cls in ("NORMAL", "PNEUMONIA"):
        for i in range(12):
            write_img(tmp_path / "src" / cls / f"{cls.lower()}{i:02d}.png",
                      xray_like(rng, 240, bright=cls == "PNEUMONIA"))

    def ok(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, (args[0], r.output[-1500:])
        return r

    data = tmp_path / "data"
    ok("prepare", tmp_path / "src", "--out", data, "--size", "224", "--split", "0.5,0.25,0.25", "--workers", "1")
    ok("train-gan", data / "train", "--out", tmp_path / "gan", "--class", "pneumonia", "--steps", "1",
       "--batch-size", "4", "--width", "4", "--nz", "8", "--device", "cpu")
    ok("generate", tmp_path / "gan" / "generator.safetensors", "-n", "3", "--out", tmp_path / "synth", "--device", "cpu")
    synth = sorted((tmp_path / "synth" / "pneumonia").glob("*.png"))
    assert len(synth) == 3 and Image.open(synth[0]).size == (224, 224)  # generate makes the training size
    ok("rebalance", data / "train", "--method", "gan", "--synthetic", tmp_path / "synth", "--out", tmp_path / "bal")
    ok("train-classifier", tmp_path / "bal", "--val", data / "val", "--out", tmp_path / "clf", "--epochs", "1",
       "--batch-size", "4", "--device", "cpu")
    ckpt = tmp_path / "clf" / "classifier.safetensors"
    ok("evaluate", ckpt, data / "test", "--report", tmp_path / "rep", "--bootstrap", "20")
    r = ok("gradcam", ckpt, data / "test", "--out", tmp_path / "cams", "-n", "1", "--json")
    assert json.loads(r.stdout)["layer"] == "layer4"  # 7×7 at 224 px


def test_progress_in_a_log_is_a_few_plain_lines_with_the_pace_since_the_first_report(monkeypatch, capsys):
    """Written to a file (a cluster job's log, a study step's log), progress is plain lines: one
    per PLAIN_EVERY_S and one at the end; img/s leaves out the work done before the first report
    (it once counted it, and overstated the pace)."""
    from xraygan import console

    now = [0.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: now[0])
    with console.progress_bar() as cb:
        for t, done, figures in [(0, 10, {}),  # the first report, after 10 steps
                                 (5, 20, {"loss": 0.5}),  # too soon for another line
                                 (31, 40, {"loss": 0.25}),  # a line
                                 (40, 100, {"loss": 0.125}),  # the end
                                 (41, 100, {"loss": 0.125})]:  # said once
            now[0] = float(t)
            cb("train-clf", done, 100, **figures, images=64 * done)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    # 1920 images in 31 s since the first report: 61.9 img/s (not 2560 / 31 = 82.6), 60 steps left
    assert lines[0].startswith("train-clf  40/100 40%  loss 0.25  img/s 61.9  0:00:31  ETA 0:01:02")
    assert "100/100 100%  loss 0.125  img/s 144  0:00:40" in lines[1] and "ETA" not in lines[1]
