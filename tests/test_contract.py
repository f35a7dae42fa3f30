"""Every command line of a study plan is made from a command's config by `to_argv`, and parsing it
back through the command-line layer rebuilds that same config: a renamed or re-defaulted flag
fails here, not in the middle of a study."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_folder
from typer.testing import CliRunner

import xraygan.cli as cli
from xraygan.contract import to_argv
from xraygan.gan import TrainGanConfig
from xraygan.study import DIFFUSION_ROWS, ROWS, StudyConfig, build_plan


class Captured(Exception):
    pass


def parsed_config(monkeypatch, argv: list[str]):
    """The config the command line `argv` builds, captured before the command runs."""
    def capture(fn, cfg, **kw):
        raise Captured(cfg)

    monkeypatch.setattr(cli, "_run_with_progress", capture)
    r = CliRunner().invoke(cli.app, argv)
    assert isinstance(r.exception, Captured), (argv, r.output, r.exception)
    return r.exception.args[0]


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_every_step_of_a_full_plan_parses_back_to_its_config(tmp_path, rng, monkeypatch, device):
    make_folder(tmp_path / "d" / "train", {"normal": 9, "pneumonia": 3}, 16, rng)
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"")
    cfg = StudyConfig(data=tmp_path / "d", out=tmp_path / "s", rows=ROWS + DIFFUSION_ROWS + ("cdcgan_a.3",),
                      seeds=(0, 4), weights=weights, diffaugment="none", device=device, clf_accumulate=2)
    steps, _ = build_plan(cfg)
    made = [s for s in steps if s.config is not None]
    assert {s.argv[0] for s in made} == {"train-gan", "train-diffusion", "generate", "audit", "rebalance",
                                         "train-classifier", "evaluate", "gradcam", "compare"}
    assert len(made) == len(steps)  # every step, the two tables too
    for s in made:
        assert parsed_config(monkeypatch, s.argv) == s.config, s.argv


def test_to_argv_leaves_defaults_out_and_writes_the_rest():
    cfg = TrainGanConfig(data="d/train", out="g", cls="pneumonia", steps=50, ngf=32, ndf=32, diffaugment="",
                         channels_last=False)
    assert to_argv("train-gan", cfg) == ["d/train", "--out", "g", "--class", "pneumonia", "--steps", "50",
                                         "--width", "32", "--diffaugment", "none", "--no-channels-last"]
    with pytest.raises(ValueError, match="takes one --width for ngf and ndf"):
        to_argv("train-gan", replace(cfg, ndf=16))


def test_a_config_field_without_an_option_is_refused_rather_than_dropped(monkeypatch):

    from xraygan import contract

    fake = contract.commands()["generate"]
    monkeypatch.setattr(contract, "_command", lambda name: fake)
    param = next(p for p in fake.params if p.name == "seed")
    monkeypatch.setattr(param, "name", "sead")  # an option renamed in cli.py but not in the config
    from xraygan.generate import GenerateConfig

    with pytest.raises(ValueError, match="option sead has no field in GenerateConfig"):
        contract.to_argv("generate", GenerateConfig(checkpoint="c", out="o", n=1))


def test_a_library_only_setting_is_refused_rather_than_dropped():
    from xraygan.classifier import TrainClassifierConfig

    cfg = TrainClassifierConfig(data=Path("d"), val=Path("d"), out=Path("o"))
    assert to_argv("train-classifier", cfg) == ["d", "--val", "d", "--out", "o"]
    with pytest.raises(ValueError, match="val_is_train=True has no command-line option"):
        to_argv("train-classifier", replace(cfg, val_is_train=True))
