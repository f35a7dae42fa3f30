import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_img, xray_like
from PIL import Image

from xraygan.errors import InputError
from xraygan.prepare import PrepareConfig, prepare
from xraygan.sources import patient_id


def cfg(out, **kw):
    kw.setdefault("workers", 1)
    return PrepareConfig(out=out, **kw)


def make_kermany(root: Path, rng, n_train=(20, 30), n_test=(6, 6), nested=False):
    """A tiny Kermany-style release; a few patients have several images."""
    base = root / "chest_xray" / "chest_xray" if nested else root / "chest_xray"
    for split, (nn, npn) in (("train", n_train), ("test", n_test)):
        for i in range(nn):
            write_img(base / split / "NORMAL" / f"IM-{i // 2:04d}-{i % 2 + 1:04d}.jpeg",
                      xray_like(rng), "JPEG")
        for i in range(npn):
            kind = "bacteria" if i % 2 else "virus"
            write_img(base / split / "PNEUMONIA" / f"person{i // 3}_{kind}_{i}.jpeg",
                      xray_like(rng, bright=True), "JPEG")
    (base / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0\0junk")
    write_img(root / "chest_xray" / "__MACOSX" / "train" / "NORMAL" / "._IM-0000-0001.jpeg",
              xray_like(rng), "JPEG")
    return root / "chest_xray"


def files(out: Path, split: str, cls: str) -> list[str]:
    return sorted(p.name for p in (out / split / cls).glob("*.png"))


@pytest.mark.parametrize("nested", [False, True])
def test_kermany_layout_keeps_test_and_carves_val_by_patient(tmp_path, rng, nested):
    src = make_kermany(tmp_path, rng, nested=nested)
    rec = prepare(cfg(tmp_path / "out", src=src, size=16))
    out = tmp_path / "out"
    assert rec["classes"] == ["normal", "pneumonia"]
    assert rec["counts"]["test"] == {"normal": 6, "pneumonia": 6}  # never changed
    assert sum(rec["counts"]["train"].values()) + sum(rec["counts"]["val"].values()) == 50
    assert rec["val_carved_from_train"] and rec["counts"]["val"]["pneumonia"] > 0
    # no patient in two of train/val
    for cls in ("normal", "pneumonia"):
        tr = {patient_id(Path(n).stem.rsplit("-", 0)[0]) for n in files(out, "train", cls)}
        va = {patient_id(Path(n).stem) for n in files(out, "val", cls)}
        assert not tr & va
    assert rec["ignored_count"] >= 1  # .DS_Store; __MACOSX is never looked at
    img = Image.open(next((out / "train" / "normal").glob("*.png")))
    assert img.mode == "L" and img.size == (16, 16)
    assert json.loads((out / "dataset.json").read_text())["counts"] == rec["counts"]


def test_patient_ids():
    assert patient_id("person123_bacteria_45") == "person123"
    assert patient_id("IM-0115-0001") == "im-0115"
    assert patient_id("NORMAL2-IM-1427-0001") == "normal2-im-1427"
    assert patient_id("00000013_005") == "00000013"
    assert patient_id("scan") is None


def test_unsplit_folder_split_by_patient_and_fractions(tmp_path, rng):
    src = tmp_path / "src"
    for i in range(60):  # 20 patients × 3 images
        write_img(src / "Normal" / f"{i // 3:08d}_{i % 3:03d}.png", xray_like(rng))
        write_img(src / "Pneumonia" / f"person{i // 3}_virus_{i}.png", xray_like(rng, bright=True))
    rec = prepare(cfg(tmp_path / "out", src=src, size=16, split=(0.6, 0.2, 0.2)))
    c = rec["counts"]
    assert sum(c[s]["normal"] for s in c) == 60
    assert c["train"]["normal"] == 36 and c["val"]["normal"] == 12 and c["test"]["normal"] == 12
    seen = {}
    for s in ("train", "val", "test"):
        for n in files(tmp_path / "out", s, "normal"):
            p = patient_id(Path(n).stem)
            assert seen.setdefault(p, s) == s, f"patient {p} in {seen[p]} and {s}"


def test_classes_say_which_folders_mean_which_class(tmp_path, rng):
    """A hospital export's folder names ('0 - Normal', 'Pneumonia (bacterial)', 'viral', 'COVID')
    become the study's classes with --classes: several folders merge into one class, folders it
    does not name are left out and counted, and a class no folder is named for is refused."""
    src = tmp_path / "export"
    folders = {"0 - Normal": 12, "Pneumonia (bacterial)": 6, "viral": 6, "COVID": 5}
    for k, (name, n) in enumerate(folders.items()):
        for i in range(n):
            write_img(src / name / f"p{k}{i:03d}_000.png", xray_like(rng, bright=k in (1, 2)))
    classes = "pneumonia=pneumonia (bacterial)|Viral;normal=0 - normal"
    rec = prepare(cfg(tmp_path / "out", src=src, size=16, classes=classes, split=(0.5, 0.25, 0.25)))
    assert rec["classes"] == ["normal", "pneumonia"]
    assert {c: sum(rec["counts"][s][c] for s in rec["counts"]) for c in rec["classes"]} == {"normal": 12,
                                                                                            "pneumonia": 12}
    assert rec["folders_left_out"] == {"COVID": 5} and rec["sources"][0]["classes"] == classes
    with pytest.raises(InputError, match=r"export: no class folder is named as --classes gives class normal "
                                         r"\(folders: 0 - Normal, COVID, Pneumonia \(bacterial\), viral\)"):
        prepare(cfg(tmp_path / "o2", src=src, size=16, classes="pneumonia=viral;normal=Normal"))
    assert not (tmp_path / "o2").exists()


def test_classes_map_the_folders_of_every_split(tmp_path, rng):
    src = make_kermany(tmp_path, rng)
    rec = prepare(cfg(tmp_path / "out", src=src, size=16, classes="sick=PNEUMONIA;healthy=NORMAL"))
    assert rec["classes"] == ["healthy", "sick"] and rec["counts"]["test"] == {"healthy": 6, "sick": 6}
    (src / "test" / "PNEUMONIA").rename(src / "test" / "PNEUMONIA-old")
    with pytest.raises(InputError, match=r"chest_xray/test: no class folder is named as --classes gives "
                                         r"class sick \(folders: NORMAL, PNEUMONIA-old\)"):
        prepare(cfg(tmp_path / "o2", src=src, size=16, classes="sick=PNEUMONIA;healthy=NORMAL"))


def test_medmnist_npz_any_size(tmp_path, rng):
    npz = tmp_path / "tiny.npz"
    arrays = {}
    for s, n in (("train", 40), ("val", 10), ("test", 10)):
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 64, 64), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 4 == 0).astype(np.uint8).reshape(-1, 1)
    np.savez(npz, **arrays)
    rec = prepare(cfg(tmp_path / "out", medmnist=npz, size=32, min_val=5))
    assert rec["counts"]["val"] == {"normal": 7, "pneumonia": 3}
    assert rec["counts"]["test"] == {"normal": 7, "pneumonia": 3}
    assert rec["counts"]["train"] == {"normal": 30, "pneumonia": 10}
    assert Image.open(tmp_path / "out" / "train" / "normal" / "train-00001.png").size == (32, 32)


def test_npz_src_is_medmnist_but_a_folder_named_npz_stays_a_folder(tmp_path, rng):
    npz = tmp_path / "tiny.npz"
    np.savez(npz, **{f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (
        ("images", rng.integers(0, 255, (12, 8, 8), dtype=np.uint8)),
        ("labels", (np.arange(12) % 3 == 0).astype(np.uint8)))})
    rec = prepare(cfg(tmp_path / "a", src=npz, size=8, min_val=1))
    assert rec["sources"][0]["kind"] == "medmnist"
    folder = make_kermany(tmp_path / "export.npz", rng)
    rec = prepare(cfg(tmp_path / "b", src=folder.parent, size=8))
    assert rec["sources"][0]["kind"] != "medmnist" and rec["counts"]["test"] == {"normal": 6, "pneumonia": 6}


def test_medmnist_bad_file(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(InputError, match=r"x\.npz: not a MedMNIST file"):
        prepare(cfg(tmp_path / "out", medmnist=bad))
    (tmp_path / "y.npz").write_text("garbage")
    with pytest.raises(InputError, match=r"y\.npz: not a readable"):
        prepare(cfg(tmp_path / "out", medmnist=tmp_path / "y.npz"))


def test_duplicates_kept_in_one_split_and_dropped_across_given_splits(tmp_path, rng):
    src = make_kermany(tmp_path, rng)
    same = xray_like(rng)
    for i in range(4):  # the same picture under four patients' names
        write_img(src / "train" / "NORMAL" / f"IM-09{i:02d}-0001.png", same)
    write_img(src / "test" / "NORMAL" / "IM-0999-0001.png", xray_like(rng))
    leak = xray_like(rng)
    write_img(src / "train" / "NORMAL" / "IM-0990-0001.png", leak)
    write_img(src / "test" / "NORMAL" / "IM-0991-0001.png", leak)
    rec = prepare(cfg(tmp_path / "out", src=src, size=16))
    d = rec["duplicates"]
    assert d["groups"] == 2 and d["dropped_across_splits"] == 1
    assert any("IM-0990-0001" in f for f in d["dropped_files"])
    out = tmp_path / "out"
    where = [s for s in ("train", "val") for n in files(out, s, "normal") if n.startswith("IM-09")
             and n[5:7] in ("00", "01", "02", "03")]
    assert len(where) == 4 and len(set(where)) == 1  # all copies in the same split
    assert "IM-0991-0001.png" in files(out, "test", "normal")


def test_bad_files_skipped_and_listed_or_fatal(tmp_path, rng):
    src = make_kermany(tmp_path, rng)
    (src / "train" / "NORMAL" / "IM-0500-0001.jpeg").write_bytes(b"not a jpeg at all")
    good = src / "train" / "PNEUMONIA" / "person0_virus_0.jpeg"
    trunc = src / "train" / "PNEUMONIA" / "person99_virus_99.jpeg"
    trunc.write_bytes(good.read_bytes()[:200])
    (src / "train" / "NORMAL" / "notes.xyz").write_text("hello")
    rec = prepare(cfg(tmp_path / "out", src=src, size=16))
    reasons = {Path(s["file"]).name: s["reason"] for s in rec["skipped"]}
    assert "not an image" in reasons["IM-0500-0001.jpeg"]
    assert "person99_virus_99.jpeg" in reasons
    assert "notes.xyz" in reasons and rec["skipped_count"] == 3
    with pytest.raises(InputError, match=r"\(3 unreadable file\(s\)"):
        prepare(cfg(tmp_path / "out2", src=src, size=16, strict=True))
    assert not (tmp_path / "out2").exists()


def test_layout_errors_name_the_path(tmp_path, rng):
    with pytest.raises(InputError, match=r"nowhere: folder not found"):
        prepare(cfg(tmp_path / "o", src=tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    write_img(tmp_path / "flat" / "a.png", xray_like(rng))
    with pytest.raises(InputError, match=r"flat: unknown layout"):
        prepare(cfg(tmp_path / "o", src=tmp_path / "flat"))
    src = make_kermany(tmp_path / "k", rng)
    for f in (src / "test" / "PNEUMONIA").iterdir():
        f.unlink()
    with pytest.raises(InputError, match=r"PNEUMONIA: class folder holds no images"):
        prepare(cfg(tmp_path / "o", src=src))
    (src / "test" / "PNEUMONIA").rmdir()
    with pytest.raises(InputError, match=r"test: class folder 'pneumonia' is missing"):
        prepare(cfg(tmp_path / "o", src=src))
    assert not (tmp_path / "o").exists()


def test_imbalance_only_in_train_seeded(tmp_path, rng):
    src = make_kermany(tmp_path, rng, n_train=(40, 40))
    a = prepare(cfg(tmp_path / "a", src=src, size=16, keep=(("pneumonia", 5),), seed=3))
    b = prepare(cfg(tmp_path / "b", src=src, size=16, keep=(("pneumonia", 5),), seed=3))
    assert a["counts"]["train"]["pneumonia"] == 5 and a["counts"]["test"]["pneumonia"] == 6
    assert a["imbalance"]["removed_files"] == b["imbalance"]["removed_files"]
    assert files(tmp_path / "a", "train", "pneumonia") == files(tmp_path / "b", "train", "pneumonia")
    r = prepare(cfg(tmp_path / "r", src=src, size=16, imbalance=3.0))
    assert r["counts"]["train"]["pneumonia"] == round(r["counts"]["train"]["normal"] / 3)
    with pytest.raises(InputError, match="--keep pneumonia=999: the training split has only"):
        prepare(cfg(tmp_path / "x", src=src, size=16, keep=(("pneumonia", 999),)))
    with pytest.raises(InputError, match="--keep covid=1: no such class"):
        prepare(cfg(tmp_path / "x", src=src, size=16, keep=(("covid", 1),)))


def test_extra_normal_with_csv_and_source_warning(tmp_path, rng):
    src = make_kermany(tmp_path, rng)
    nih = tmp_path / "nih" / "images"
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    for i in range(24):
        name = f"{i // 2:08d}_{i % 2:03d}.png"
        write_img(nih / name, xray_like(rng))
        rows.append(f"{name},{'No Finding' if i < 20 else 'Effusion'},{i % 2},{i // 2}")
    (tmp_path / "nih" / "Data_Entry_2017.csv").write_text("\n".join(rows))
    rec = prepare(cfg(tmp_path / "out", src=src, size=16, extra_normal=nih, extra_normal_count=12))
    comp = rec["source_composition"]["normal"]
    assert comp["extra-normal"] == 12 and rec["counts"]["test"]["normal"] == 6
    assert rec["source_confound"] is not None
    assert any("learn the source" in w for w in rec["warnings"])


def test_demo_source_labelled_synthetic(tmp_path):
    rec = prepare(cfg(tmp_path / "out", demo=True, demo_count=40, size=32))
    assert rec["synthetic_demo"] and "not for medical conclusions" in rec["note"]
    assert sum(rec["counts"][s]["pneumonia"] for s in rec["counts"]) == 40


def test_output_not_overwritten_without_force_and_atomic(tmp_path, rng, monkeypatch):
    out = tmp_path / "out"
    prepare(cfg(out, demo=True, demo_count=30, size=16))
    before = sorted(p.name for p in (out / "train" / "normal").iterdir())
    with pytest.raises(InputError, match="already exists"):
        prepare(cfg(out, demo=True, demo_count=30, size=16, seed=1))

    import xraygan.prepare as prep

    def boom(*a, **k):
        raise RuntimeError("disk died")

    monkeypatch.setattr(prep, "atomic_write_json", boom)
    with pytest.raises(RuntimeError):
        prepare(cfg(out, demo=True, demo_count=30, size=16, seed=1, force=True))
    assert sorted(p.name for p in (out / "train" / "normal").iterdir()) == before
    assert not list(tmp_path.glob(".out.partial-*"))
