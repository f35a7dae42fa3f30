"""Hostile input, as a new user types it: every case must end in one clear error line (the last
line on stderr), no traceback, the right exit code, and no file outside the command's own output
changed. Plus the three ways earlier versions destroyed a user's data, each tried for real."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder, write_img, xray_like
from typer.testing import CliRunner

from xraygan.cli import app

runner = CliRunner()


_HASHED: dict[tuple, str] = {}


def tree_hash(root: Path) -> dict[str, str]:
    """Every file's content hash, read again only when the file's inode, size or mtime changed:
    any write changes one of them, and the 180 MB resume states are hashed once, not per case."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in _HASHED:
                _HASHED[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = _HASHED[key]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """One small copy of everything a user has: raw images, a prepared set, a GAN run, synthetic
    images, a classifier run, review sheets. Cases only read it."""
    from xraygan.classifier import TrainClassifierConfig, train_classifier
    from xraygan.gan import TrainGanConfig, train_gan
    from xraygan.generate import GenerateConfig, generate
    from xraygan.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(5)
    raw = root / "parent" / "raw"
    for c in ("normal", "pneumonia"):
        for i in range(20):
            write_img(raw / c / f"{c}{i}.png", xray_like(rng, 40))
    (root / "parent" / "NOTES.txt").write_text("my notes\n")
    data = root / "data"
    prepare(PrepareConfig(out=data, demo=True, demo_count=40, size=16, imbalance=2.0, workers=1))
    gan = root / "gan"
    train_gan(TrainGanConfig(data=data / "train", out=gan, steps=2, batch_size=8, nz=8, ngf=4, ndf=4,
                             device="cpu"))
    synth = root / "synth"
    generate(GenerateConfig(gan / "generator.safetensors", synth, n=4, device="cpu"))
    clf = root / "clf"
    train_classifier(TrainClassifierConfig(data=data / "train", val=data / "val", out=clf, epochs=1,
                                           batch_size=16, small_stem="no", device="cpu", precision="fp32"))
    np.savez(root / "object.npz", train_images=np.array([None, 1], dtype=object),
             train_labels=np.array([0, 1]))
    (root / "junk.npz").write_bytes(b"not a zip")
    (root / "afile").write_text("x")
    (root / "copies").mkdir()  # real training images passed off as synthetic ones
    shutil.copytree(data / "train" / "pneumonia", root / "copies" / "pneumonia")
    rev = root / "audit"
    (rev / "review").mkdir(parents=True)
    (rev / "review_key.json").write_text(json.dumps(
        {"kind": "xraygan-review-key", "items": {"r01": {"truth": "real"}, "r02": {"truth": "synthetic"}}}))
    (rev / "review" / "latin1.csv").write_bytes("id,guess,quality,comment\nr01,real,3,trés bien\n".encode("latin-1"))
    (rev / "review" / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (rev / "review" / "q9.csv").write_text("id,guess,quality,comment\nr01,real,9,\n")
    (rev / "review" / "qneg.csv").write_text("id,guess,quality,comment\nr01,real,-2,\n")
    (rev / "review" / "dup.csv").write_text("id,guess,quality,comment\nr01,real,3,\nr01,synthetic,3,\n")
    (rev / "review" / "bom.csv").write_bytes("\ufeffid,guess,quality,comment\nr01,real,4,\nr02,synthetic,2,\n"
                                             .encode("utf-8"))
    lab = root / "lab"  # images labelled by a sheet
    rows = []
    for c, v in (("normal", 0), ("pneumonia", 1)):
        for i in range(6):
            write_img(lab / "imgs" / f"{c}{i}.png", xray_like(rng, 40))
            rows.append(f"{c}{i}.png,{v},Hôpital\n")
    (lab / "labels.csv").write_text("file,dx,site\n" + "".join(rows), encoding="utf-8")
    (lab / "cp1252.csv").write_bytes(("file,dx,site\n" + "".join(rows)).encode("cp1252"))
    return {"root": root, "raw": raw, "parent": root / "parent", "data": data, "gan": gan, "lab": lab,
            "G": gan / "generator.safetensors", "D": gan / "discriminator.safetensors", "synth": synth,
            "clf": clf, "C": clf / "classifier.safetensors", "rev": rev}


P = "prepare --demo --demo-count 20 --size 16 --out {tmp}/o"
TG = "train-gan {data}/train --out {tmp}/g --steps 1 --batch-size 8 --width 4 --nz 8 --device cpu"
TC = "train-classifier {data}/train --val {data}/val --out {tmp}/c --epochs 1 --device cpu"
EV = "evaluate {C} {data}/test --report {tmp}/r"
GC = "gradcam {C} {data}/test --out {tmp}/cams"
RB = "rebalance {data}/train --out {tmp}/b"
SR = "audit --score-review {rev}/review/"
L = ("prepare {lab}/imgs --labels {lab}/labels.csv --path-column file --label-column dx "
     "--classes 'pneumonia=1;normal=0' --size 16 --out {tmp}/o")
DM = "demo --out {tmp}/d --count 40 --size 16 --gan-steps 1 --clf-epochs 1 --device cpu"

# (command line, exit code, what the last line must say)
CASES = [
    # prepare: the output is never the source, inside it or above it; bad options
    ("prepare {raw} --out {raw} --size 16", 2, "also the input"),
    ("prepare {raw} --out {raw} --size 16 --force", 2, "also the input"),
    ("prepare {raw} --out {raw}/prepared --size 16", 2, "lies inside the input"),
    ("prepare {raw} --out {parent} --size 16 --force", 2, "contains the input"),
    ("prepare {data} --out {tmp}/o --size 16", 2, "xraygan output, not raw data"),
    ("prepare --medmnist {root}/object.npz --out {tmp}/o", 2, "cannot read its arrays"),
    ("prepare --medmnist {root}/junk.npz --out {tmp}/o", 2, "not a readable .npz"),
    ("prepare {root}/missing --out {tmp}/o", 2, "folder not found"),
    ("prepare --out {tmp}/o", 2, "give exactly one source"),
    (P.replace("16", "4", 1).replace("--size 16", "--size 4"), 2, "--size 4"),
    (P + " --size abc", 2, "'--size'"),
    (P + " --keep pneumonia", 2, "CLASS=COUNT"),
    (P + " --imbalance 0", 2, "--imbalance"),
    (P + " --imbalance -1", 2, "--imbalance"),
    (P + " --split 0.5,0.5", 2, "three fractions"),
    (P + " --split nan,0.5,0.5", 2, "three fractions"),
    (P + " --val-fraction 1.5", 2, "--val-fraction"),
    (P + " --square diamond", 2, "--square"),
    (P.replace("--demo-count 20", "--demo-count 0"), 2, "--demo-count"),
    (P + " --workers -1", 2, "--workers"),
    ("prepare --demo --size 16 --out {root}/afile", 2, "not a folder"),
    ("prepare --demo --size 16 --out {parent} --force", 2, "not an output of xraygan prepare"),
    # prepare with a label sheet
    (L.replace("labels.csv", "cp1252.csv"), 2, "cp1252.csv: not UTF-8 text (byte 0xf4"),
    (L.replace("--label-column dx", "--label-column diagnosis"), 2, "labels.csv: no column 'diagnosis'"),
    (L.replace("pneumonia=1;normal=0", "pneumonia=yes;normal=no"), 2, "matches no row of"),
    (L.replace("{lab}/labels.csv", "{lab}/imgs"), 2, "is a folder, not a CSV file"),
    (L.replace("{lab}/labels.csv", "{lab}/none.csv"), 2, "label file not found"),
    (L.replace("--path-column file", "--path-column site"), 2, "none of its 12 rows names an image"),
    (L.replace("pneumonia=1;normal=0", "pneumonia=1"), 2, "need at least two classes"),
    (L.replace("pneumonia=1;normal=0", "pneumonia"), 2, "expected CLASS=VALUE"),
    (L.replace("pneumonia=1;normal=0", "pneumonia=1;normal=7"), 2, "labels.csv: no image of class normal"),
    (L.replace("--classes 'pneumonia=1;normal=0' ", ""), 2, "labels.csv: give --classes to say which dx values"),
    (L.replace("--path-column file ", ""), 2, "labels.csv: give --path-column COLUMN"),
    ("prepare {raw} --classes 'pneumonia=sick;normal=well' --out {tmp}/o --size 16", 2,
     "no class folder is named as --classes gives class pneumonia"),
    (P + " --classes 'pneumonia=1;normal=0'", 2, "--classes: the shipped sample and the phantoms"),
    ("prepare {raw} --views PA --out {tmp}/o --size 16", 2, "gives no view for its images"),
    (P + " --extra-normal-count 5", 2, "--extra-normal-count 5: only applies with --extra-normal DIR"),
    (P + " --uncertain positive", 2, "--uncertain positive: only applies with a label sheet"),
    (P + " --minority normal", 2, "--minority normal: only applies with --imbalance R"),
    (L + " --uncertain maybe", 2, "--uncertain maybe"),
    (L + " --agreement most", 2, "--agreement most: must be one of unanimous, majority"),
    (P + " --agreement majority", 2, "--agreement majority: only applies with a label sheet"),
    (L + " --views 'P A'", 2, "--views P A"),
    (L + " --out {lab}/imgs/o", 2, "lies inside the input"),
    ("prepare {lab}/imgs --preset padchest2 --out {tmp}/o", 2,
     "--preset padchest2: must be one of rsna, nih, chexpert, padchest, vindr, mimic"),
    ("prepare {lab}/imgs --preset mimic --out {tmp}/o", 2, "no mimic-cxr-2.0.0-chexpert.csv.gz or mimic-cxr-2.0.0-chexpert.csv"),
    ("prepare {lab}/imgs --preset nih --out {tmp}/o", 2, "no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv"),
    ("prepare {lab}/imgs --path-column file --out {tmp}/o", 2, "--path-column: describe a label CSV"),
    ("prepare --medmnist {root}/junk.npz --labels {lab}/labels.csv --out {tmp}/o", 2, "label the images of a folder"),
    # review: the reader page
    ("review {rev} --port 0", 2, "no review/images/"),
    ("review {tmp}/none --port 0", 2, "no review/images/"),
    ("review {rev} --reader ../etc --port 0", 2, "--reader '../etc'"),
    ("review {rev} --reader review --port 0", 2, "not 'review'"),
    ("review {rev} --port 70000", 2, "--port 70000"),
    ("audit --score-review {rev}/review/latin1.csv --score-review {rev}/review/latin1.csv", 2, "not UTF-8"),
    # train-gan
    (TG.replace("--width 4", "--width 0"), 2, "--width 0"),
    (TG.replace("--nz 8", "--nz 0"), 2, "--nz 0"),
    (TG.replace("--batch-size 8", "--batch-size 0"), 2, "--batch-size 0"),
    (TG.replace("--batch-size 8", "--batch-size -4"), 2, "--batch-size -4"),
    (TG + " --lr nan", 2, "--lr nan"),
    (TG + " --lr inf", 2, "--lr inf"),
    (TG + " --lr 0", 2, "--lr 0"),
    (TG.replace("--steps 1", "--steps 0"), 2, "--steps 0"),
    (TG + " --epochs 0", 2, "--epochs 0"),
    (TG + " --conditional --alpha 1.5", 2, "--alpha 1.5"),
    (TG + " --ema 1", 2, "--ema 1"),
    (TG + " --diffaugment blur", 2, "unknown policy 'blur'"),
    (TG + " --device tpu", 2, "--device"),
    (TG + " --precision fp8", 2, "--precision"),
    (TG + " --save-every 0", 2, "--save-every 0"),
    (TG + " --log-every 0", 2, "--log-every 0"),
    (TG.replace("{tmp}/g", "{data}/train/run"), 2, "inside the input"),
    (TG.replace("{tmp}/g", "{data}"), 2, "contains the input"),
    (TG.replace("{tmp}/g", "{parent}") + " --force", 2, "not an output of xraygan train-gan"),
    (TG.replace("{data}/train", "{root}/missing"), 2, "not found"),
    (TG + " --class covid", 2, "covid"),
    (TG + " --resume", 2, "nothing to resume"),
    (TG.replace("{tmp}/g", "{gan}") + " --resume --lr 0.001", 2, "(now 0.001)"),
    (TG.replace("{tmp}/g", "{gan}"), 2, "already exists"),
    # generate: never into a folder of real images, --force or not
    ("generate {G} -n 5 --out {data}/train", 2, "did not write"),
    ("generate {G} -n 5 --out {data}/train --force", 2, "did not write"),
    ("generate {G} -n 5 --out {data}", 2, "did not write"),
    ("generate {G} -n 5 --out {gan}", 2, "contains the input"),
    ("generate {G} -n 0 --out {tmp}/s", 2, "-n 0"),
    ("generate {G} -n 2 --out {tmp}/s --sampling-steps 5", 2, "only for diffusion models"),
    ("generate {G} -n -3 --out {tmp}/s", 2, "-n -3"),
    ("generate {G} -n 2 --batch-size 0 --out {tmp}/s", 2, "--batch-size 0"),
    ("generate {D} -n 2 --out {tmp}/s", 2, "discriminator checkpoint"),
    ("generate {root}/none.safetensors -n 2 --out {tmp}/s", 2, "not found"),
    ("generate {G} -n 2 --label covid --out {tmp}/s", 2, "--label covid"),
    ("generate {G} -n 2 --append --force --out {tmp}/s", 2, "not both"),
    ("generate {G} -n 2 --out {synth}", 2, "already holds 4"),
    ("generate {C} -n 2 --out {tmp}/s", 2, "classifier checkpoint"),
    # rebalance
    (RB + " --method magic", 2, "--method magic"),
    (RB + " --method oversample --ratio 0", 2, "--ratio 0"),
    (RB + " --method oversample --ratio nan", 2, "--ratio nan"),
    (RB + " --method gan", 2, "needs --synthetic"),
    (RB + " --method gan --synthetic {data}/train", 2, "overlaps the training folder"),
    (RB + " --method gan --synthetic {data}", 2, "overlaps the training folder"),
    (RB + " --method gan --synthetic {root}/copies", 2, "the same file as the training image"),
    (RB.replace("{tmp}/b", "{data}/train/b") + " --method none", 2, "inside the input"),
    (RB + " --method smote --smote-k 0", 2, "--smote-k 0"),
    (RB + " --method oversample --synthetic {tmp}/s", 2, "/s: --method oversample does not use it (it applies to --method gan)"),
    (RB + " --method none --ratio 0.5", 2, "--ratio 0.5: --method none does not use it"),
    (RB + " --method augment --smote-space pca", 2, "--smote-space pca: --method augment does not use it"),
    (RB.replace("{tmp}/b", "{parent}") + " --method none --force", 2, "not an output of xraygan rebalance"),
    # train-classifier
    (TC + " --batch-size 0", 2, "--batch-size 0"),
    (TC + " --batch-size -4", 2, "--batch-size -4"),
    (TC + " --lr nan", 2, "--lr nan"),
    (TC.replace("--epochs 1", "--epochs 0"), 2, "--epochs 0"),
    (TC + " --patience -1", 2, "--patience -1"),
    (TC + " --epoch-images 1", 2, "--epoch-images 1: must be at least 2"),
    (TC + " --epoch-images many", 2, "--epoch-images"),
    (TC.replace("--val {data}/val", "--val {data}/train"), 2, "that is the training folder itself"),
    (TC + " --class-weights maybe", 2, "--class-weights"),
    (TC + " --small-stem perhaps", 2, "--small-stem"),
    (TC.replace("{tmp}/c", "{data}/val/c"), 2, "inside the input"),
    (TC + " --weights {root}/none.safetensors", 2, "not found"),
    (TC.replace("{tmp}/c", "{clf}") + " --resume --lr 0.5", 2, "--resume with different"),
    # evaluate
    (EV + " --bootstrap -5", 2, "--bootstrap -5"),
    (EV + " --threshold 1.5", 2, "--threshold 1.5"),
    (EV + " --threshold nan", 2, "--threshold nan"),
    (EV + " --tune-for accuracy", 2, "--tune-for"),
    (EV + " --tune-for youden", 2, "--tune-for youden needs --tune-on"),
    (EV + " --tune-for f1", 2, "--tune-for f1 needs --tune-on"),
    (EV.replace("{tmp}/r", "{data}/test/r"), 2, "inside the input"),
    (EV.replace("{tmp}/r", "{clf}"), 2, "contains the input"),
    ("evaluate {G} {data}/test", 2, "generator checkpoint"),
    ("evaluate {C} {root}/missing", 2, "not found"),
    ("evaluate --compare", 2, "Missing argument 'inputs'"),
    ("evaluate --compare {tmp} --report {tmp}/r", 2, "No such option: --report"),
    (EV + " --untuned-report {tmp}/u", 2, "--untuned-report needs --tune-on"),
    (EV + " --tune-on {data}/val --untuned-report {tmp}/r/u", 2, "apart from --report"),
    (EV + " --tune-on {data}/val --untuned-report {data}/val/u", 2, "inside the input"),
    (EV + " --tune-on {data}/test", 2, "that is the test folder itself"),
    (EV + " --tune-on {data}/../data/test/", 2, "that is the test folder itself"),
    # gradcam
    (GC + " --layer fc", 2, "not a feature map"),
    (GC + " --layer ''", 2, "--layer ''"),
    (GC + " --layer avgpool", 2, "CAM is a constant"),
    (GC + " --layer nope", 2, "no such layer"),
    (GC + " -n 0", 2, "-n 0"),
    (GC + " --target weird", 2, "--target weird"),
    (GC.replace("{tmp}/cams", "{data}/test/cams"), 2, "inside the input"),
    # audit and the review sheet
    (SR + "latin1.csv", 2, "not UTF-8 text"),
    (SR + "binary.csv", 2, "not UTF-8 text (byte 128)"),
    (SR + "q9.csv", 2, "quality 9 must be between 1 and 5"),
    ("score-review {rev}/review/latin1.csv", 2, "not UTF-8 text"),
    ("compare {tmp}/nothing --out {tmp}/t", 2, "nothing: no such file or folder"),
    ("train-diffusion {data}/train --out {tmp}/d --steps 0 --device cpu", 2, "--steps 0"),
    ("train-diffusion {data}/train --out {data}/train/d --steps 1 --device cpu", 2, "inside the input"),
    ("train-diffusion {data}/train --out {tmp}/d --p-uncond 0.2 --device cpu", 2, "give --conditional too"),
    ("score-review {rev}/review/nope.csv", 2, "nope.csv"),
    ("probe-sources {tmp}/missing", 2, "missing: folder not found"),
    ("probe-sources {data}/train", 2, "nothing to probe"),
    # options are checked before any image is read: the folder's own problem is not reached
    ("probe-sources {data}/train --pca-components 0", 2, "--pca-components 0: must be at least 1"),
    ("probe-sources {data}/train --classifier {tmp}/none.safetensors", 2,
     "none.safetensors: classifier checkpoint not found"),
    ("audit --sources {data}/train --out {tmp}/a", 2, "No such option: --out"),
    (SR + "latin1.csv --real {data}/train", 2, "No such option: --real"),
    (SR + "qneg.csv", 2, "quality -2 must be between 1 and 5"),
    (SR + "dup.csv", 2, "appears twice"),
    ("audit --real {data}/train --synthetic {synth} --out {tmp}/a --k 0", 2, "--k 0"),
    ("audit --real {data}/train --synthetic {synth} --out {synth}/a --classifier none", 2, "inside the input"),
    ("audit --real {root}/missing --synthetic {synth} --out {tmp}/a", 2, "not found"),
    ("audit --real {data}/train --out {tmp}/a", 2, "Missing option '--synthetic'"),
    ("audit --real {data}/train --synthetic {synth} --out {tmp}/a --classifier {root}/x.safetensors", 2,
     "file not found"),
    # demo
    (DM.replace("--gan-steps 1", "--gan-steps 0"), 2, "--gan-steps 0"),
    (DM.replace("--clf-epochs 1", "--clf-epochs 0"), 2, "--clf-epochs 0"),
    (DM.replace("--size 16", "--size 18"), 2, "--size 18: the generators make 16-512 px images"),
    (DM.replace("--count 40", "--count 0"), 2, "--count 0"),
    (DM.replace("{tmp}/d", "{parent}") + " --force", 2, "not an output of xraygan demo"),
    # a name longer than the file system allows, as output and as input
    (EV.replace("{tmp}/r", "{tmp}/" + "a" * 300), 1, "file name too long"),
    (EV.replace("{data}/test", "{root}/" + "a" * 300), 1, "file name too long"),
    # an output inside an image folder xraygan made would be read as one more class of it
    ("generate {G} -n 2 --out {data}/train/synthetic --device cpu", 2, "an image folder written by xraygan prepare"),
    (RB.replace("{tmp}/b", "{data}/val/b") + " --method none", 2, "an image folder written by xraygan prepare"),
    (EV.replace("{tmp}/r", "{synth}/report"), 2, "an image folder written by xraygan generate"),
    (TC.replace("{tmp}/c", "{synth}/pneumonia/c"), 2, "an image folder written by xraygan generate"),
    # micro-batches the batch cannot fill, refused before any step
    (TC + " --accumulate 40", 2, "--accumulate 40: more micro-batches than --batch-size 64 can fill"),
    ("study {data} --out {tmp}/st --rows baseline --seeds 0 --clf-accumulate 33 --device cpu", 2,
     "--clf-accumulate 33: more micro-batches than the classifier's batch of 64 can fill"),
    ("study {data} --out {tmp}/st --rows ddpm --seeds 0 --diffusion-batch 1 --device cpu", 2, "--diffusion-batch 1"),
    ("study {data} --out {tmp}/st --rows dcgan --seeds 0 --gan-seeds x --device cpu", 2,
     "--gan-seeds 'x': seeds are whole numbers"),
    ("study {data} --out {tmp}/st --rows dcgan --seeds 0 --gan-seeds 1 1 --device cpu", 2,
     "--gan-seeds: a seed is named twice"),
    # --estimate is the plan with times, --print-commands the plan as a script: not both
    ("study {data} --out {tmp}/st --rows baseline --seeds 0 --estimate --print-commands", 2, "give one of them"),
    ("study {data} --out {data}/st --rows baseline --seeds 0 --estimate", 2, "inside"),
    # an output folder under a file: `--out results.csv/run`
    *[(c.replace("{tmp}/", "{root}/afile/"), 2, "afile is a file, not a folder")
      for c in (P, TG, TC, EV, GC, RB + " --method oversample", DM,
                "generate {G} -n 2 --out {tmp}/s --device cpu",
                "audit --real {data}/train --synthetic {synth} --out {tmp}/a --classifier none",
                "study {data} --out {tmp}/st --rows baseline --seeds 0 --clf-epochs 1 --device cpu")],
]


@pytest.mark.parametrize("line,code,says", CASES, ids=[f"{i:03d}-{c[0].split()[0]}" for i, c in enumerate(CASES)])
def test_hostile_input(world, tmp_path, line, code, says):
    argv = shlex.split(line.format(tmp=tmp_path, **world))
    before = tree_hash(world["root"])
    r = runner.invoke(app, argv)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == code, (argv, r.exit_code, r.stderr)
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    assert lines and says in lines[-1], (argv, lines[-3:])
    assert lines[-1].startswith("error:"), lines[-1]
    assert tree_hash(world["root"]) == before, "a file outside the command's output changed"
    assert not any(tmp_path.iterdir()), f"a refused command left {sorted(tmp_path.iterdir())}"


def test_every_command_is_tried():
    from xraygan.contract import commands as every_command

    commands = set(every_command())
    tried = {c[0].split()[0] for c in CASES}
    assert commands - tried == set(), f"no hostile case for {sorted(commands - tried)}"


def test_excel_bom_sheet_is_read(world):
    r = runner.invoke(app, ["audit", "--score-review", str(world["rev"] / "review" / "bom.csv"), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["answered"] == 2


def test_unexpected_error_is_one_line_with_a_log(world, tmp_path, monkeypatch):
    import xraygan.evaluate

    def boom(*a, **k):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(xraygan.evaluate, "binary_metrics", boom)
    r = runner.invoke(app, ["evaluate", str(world["C"]), str(world["data"] / "test")])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("internal error: ZeroDivisionError: planted") and "please report" in last
    log = Path(last.rsplit("details in ", 1)[1])
    assert "Traceback" in log.read_text() and "planted" in log.read_text()
    log.unlink()


def test_warnings_for_accepted_but_suspicious_options(world, tmp_path):
    r = runner.invoke(app, shlex.split(TG.format(tmp=tmp_path, **world)) + ["--alpha", "0.3"])
    assert r.exit_code == 0, r.stderr
    assert "--alpha has no effect without --conditional" in r.stderr
    only_normal = make_folder(tmp_path / "n", {"normal": 10}, 16, np.random.default_rng(0))
    r = runner.invoke(app, ["train-gan", str(only_normal), "--out", str(tmp_path / "g2"), "--steps", "1",
                            "--batch-size", "4", "--width", "4", "--nz", "8", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert "the GAN learns normal images" in r.stderr


def test_tiny_images_are_skipped_not_upscaled(tmp_path, rng):
    src = tmp_path / "src"
    for c in ("normal", "pneumonia"):
        for i in range(20):
            write_img(src / c / f"{i}.png", xray_like(rng, 40))
    write_img(src / "normal" / "dot.png", np.full((1, 1), 128, np.uint8))
    r = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "o"), "--size", "16", "--json"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert any(s["file"].endswith("dot.png") and "too small (1x1 px)" in s["reason"] for s in rec["skipped"])


def test_resume_against_other_data_is_refused(world, tmp_path):
    from xraygan.gan import TrainGanConfig, train_gan

    run = tmp_path / "g"
    train_gan(TrainGanConfig(data=world["data"] / "train", out=run, steps=1, batch_size=8, nz=8, ngf=4, ndf=4,
                             device="cpu"))
    other = make_folder(tmp_path / "other", {"normal": 20, "pneumonia": 10}, 16, np.random.default_rng(3))
    r = runner.invoke(app, ["train-gan", str(other), "--out", str(run), "--steps", "2", "--batch-size", "8",
                            "--width", "4", "--nz", "8", "--device", "cpu", "--resume"])
    assert r.exit_code == 2 and "different training images" in r.stderr.strip().splitlines()[-1]


# --- the three ways data was lost, each tried -------------------------------------------------


def test_generate_force_never_deletes_real_images(world, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    before = tree_hash(data)
    for extra in ([], ["--force"], ["--append"]):
        r = runner.invoke(app, ["generate", str(world["G"]), "-n", "5", "--out", str(data / "train"), *extra])
        assert r.exit_code == 2, r.stderr
    assert tree_hash(data) == before
    # --force on its own output removes only what the record lists: a file a user dropped there
    # stops it instead of being deleted
    synth = tmp_path / "synth"
    assert runner.invoke(app, ["generate", str(world["G"]), "-n", "3", "--out", str(synth)]).exit_code == 0
    (synth / "pneumonia" / "mine.png").write_bytes(b"user's file")
    r = runner.invoke(app, ["generate", str(world["G"]), "-n", "3", "--out", str(synth), "--force"])
    assert r.exit_code == 2 and "mine.png" in r.stderr
    assert (synth / "pneumonia" / "mine.png").read_bytes() == b"user's file"


def test_only_xraygan_image_folders_refuse_outputs_inside_them(world, tmp_path):
    """data/train/x is refused (a new class of the training set); the same shape under another
    tool's dataset.json (nnU-Net writes one) is the user's own folder and stays usable."""
    from xraygan.fsutil import image_folder_around

    assert image_folder_around(world["data"] / "train" / "x" / "y") == (world["data"] / "train", "prepare")
    assert image_folder_around(world["synth"] / "pneumonia" / "x") == (world["synth"], "generate")
    assert image_folder_around(world["data"] / "runs") is None  # beside the splits is fine
    (tmp_path / "proj" / "train").mkdir(parents=True)
    (tmp_path / "proj" / "dataset.json").write_text('{"name": "another tool"}')
    assert image_folder_around(tmp_path / "proj" / "train" / "runs") is None


def test_prepare_force_never_deletes_the_source_or_its_parent(world, tmp_path):
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(world["parent"], parent)
    before = tree_hash(parent)
    for out in (parent / "raw", parent, parent / "raw" / "x"):
        r = runner.invoke(app, ["prepare", str(parent / "raw"), "--out", str(out), "--size", "16", "--force"])
        assert r.exit_code == 2, r.stderr
    assert tree_hash(parent) == before and (parent / "NOTES.txt").read_text() == "my notes\n"
    # --force does replace an earlier prepare output
    out = tmp_path / "prepared"
    for _ in range(2):
        r = runner.invoke(app, ["prepare", str(parent / "raw"), "--out", str(out), "--size", "16", "--force"])
        assert r.exit_code == 0, r.stderr


def test_outputs_inside_a_source_are_never_read_as_raw(world, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(world["raw"], src)
    shutil.copytree(world["data"], src / "normal" / "old-output")  # an earlier output, moved in
    r = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "o"), "--size", "16", "--json"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    total = sum(sum(v.values()) for v in rec["counts"].values())
    assert total == 40  # the 20 raw images per class, none of the PNGs of the old output


def test_interrupted_generate_is_not_accepted_as_complete(world, tmp_path, monkeypatch):
    import xraygan.generate as gen

    out = tmp_path / "synth"
    real_save = gen.save_png
    calls = {"n": 0}

    def dying(path, a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_save(path, a)

    monkeypatch.setattr(gen, "save_png", dying)
    r = runner.invoke(app, ["generate", str(world["G"]), "-n", "6", "--out", str(out)])
    assert r.exit_code == 130
    assert not out.exists()  # nothing half-written: the staging folder went with it
    monkeypatch.setattr(gen, "save_png", real_save)
    assert runner.invoke(app, ["generate", str(world["G"]), "-n", "6", "--out", str(out)]).exit_code == 0
    # a crash between moving files and finishing the record: rebalance refuses, --force repairs
    rec = json.loads((out / "generation.json").read_text())
    rec["runs"][0]["status"] = "writing"
    (out / "generation.json").write_text(json.dumps(rec))
    r = runner.invoke(app, ["rebalance", str(world["data"] / "train"), "--method", "gan", "--synthetic",
                            str(out), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "did not finish" in r.stderr
    assert runner.invoke(app, ["generate", str(world["G"]), "-n", "2", "--out", str(out), "--force"]).exit_code == 0
    assert sorted(p.name for p in (out / "pneumonia").iterdir()) == ["synthetic-gan-000001.png",
                                                                      "synthetic-gan-000002.png"]


def test_append_keeps_one_record_of_all_runs(world, tmp_path):
    out = tmp_path / "s"
    assert runner.invoke(app, ["generate", str(world["G"]), "-n", "3", "--out", str(out)]).exit_code == 0
    assert runner.invoke(app, ["generate", str(world["G"]), "-n", "2", "--out", str(out), "--append",
                               "--seed", "1"]).exit_code == 0
    rec = json.loads((out / "generation.json").read_text())
    assert rec["kind"] == "xraygan-synthetic-images" and rec["total"] == 5 and rec["counts"] == {"pneumonia": 5}
    assert [(r["first_index"], r["count"], r["status"]) for r in rec["runs"]] == [(1, 3, "done"), (4, 2, "done")]


def test_records_of_xraygan_0_1_are_still_read(world, tmp_path):
    """A generation.json written before runs were named: its files are recognised as generate's
    by the name they carry, so --append and --force work, and a foreign file still stops --force."""
    out = tmp_path / "old"
    assert runner.invoke(app, ["generate", str(world["G"]), "-n", "3", "--out", str(out)]).exit_code == 0
    rec = json.loads((out / "generation.json").read_text())
    for r in rec["runs"]:
        del r["run_name"], r["status"]
    (out / "generation.json").write_text(json.dumps(rec))
    assert runner.invoke(app, ["generate", str(world["G"]), "-n", "2", "--out", str(out), "--append"]).exit_code == 0
    assert sorted(p.name for p in (out / "pneumonia").iterdir())[-1] == "synthetic-gan-000005.png"
    r = runner.invoke(app, ["generate", str(world["G"]), "-n", "1", "--out", str(out), "--force"])
    assert r.exit_code == 0, r.stderr
    assert [p.name for p in (out / "pneumonia").iterdir()] == ["synthetic-gan-000001.png"]


class _FullDisk:
    """A file object on a full disk: every write fails as the kernel would say it."""

    def __init__(self, fd, *a, **k):
        import os

        os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_earlier_file_and_says_which(tmp_path, monkeypatch):
    import xraygan.fsutil as fsutil
    from xraygan.errors import WriteError

    target = tmp_path / "metrics.json"
    target.write_text("earlier\n")
    monkeypatch.setattr(fsutil.os, "fdopen", _FullDisk)
    with pytest.raises(WriteError) as e:
        fsutil.atomic_write_text(target, "new\n")
    assert str(e.value).startswith(f"{target}: could not write it (no space left on device)")
    assert target.read_text() == "earlier\n" and sorted(tmp_path.iterdir()) == [target]


def test_full_disk_is_one_error_line_not_an_internal_error(world, tmp_path, monkeypatch):
    import xraygan.fsutil as fsutil

    monkeypatch.setattr(fsutil.os, "fdopen", _FullDisk)
    r = runner.invoke(app, ["evaluate", str(world["C"]), str(world["data"] / "test"),
                            "--report", str(tmp_path / "r"), "--bootstrap", "0"])
    last = r.stderr.strip().splitlines()[-1]
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith("error:") and "no space left on device" in last, last
    assert not any(tmp_path.iterdir()), sorted(tmp_path.rglob("*"))


def test_refused_file_operation_is_the_users_to_fix(world, tmp_path, monkeypatch):
    """An OSError the machine raises outside our own writers (here: a permission denied while
    copying images) names the file, with no crash log."""
    import errno

    import xraygan.rebalance

    def denied(src, dst, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    def cross_device(src, dst, *a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))

    monkeypatch.setattr(xraygan.rebalance.os, "link", cross_device)
    monkeypatch.setattr(xraygan.rebalance.shutil, "copyfile", denied)
    r = runner.invoke(app, shlex.split(RB.format(tmp=tmp_path, **world)) + ["--method", "oversample"])
    last = r.stderr.strip().splitlines()[-1]
    assert r.exit_code == 1 and "please report" not in last, r.stderr
    assert last.startswith("error:") and "permission denied" in last and str(tmp_path) in last, last
    assert not any(tmp_path.iterdir()), sorted(tmp_path.rglob("*"))
