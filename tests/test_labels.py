"""Label CSVs: the RSNA, NIH and CheXpert layouts as published, and a sheet of one's own."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_img
from dicomfix import real_images, write_dicom

from xraygan.errors import InputError
from xraygan.labels import cell_values, norm_value, parse_classes
from xraygan.prepare import PrepareConfig, prepare


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def run(tmp_path, src, name="out", val_fraction=0.3, min_val=50, csv=(), **spec):
    return prepare(PrepareConfig(out=tmp_path / name, src=src, size=32, workers=1, label_csv=tuple(csv), **spec,
                                 split=(0.6, 0.2, 0.2), val_fraction=val_fraction, min_val=min_val))


def make_rsna(root: Path) -> Path:
    """stage_2_train_images/<patientId>.dcm + stage_2_train_labels.csv (one row per box)."""
    rows = []
    for label in (0, 1):
        for i, a in enumerate(real_images(24, label)):
            pid = f"{label}{i:03d}c1f-5a4e-4d1f-b0a2-{i:012d}"
            write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", a, patient=pid, view="AP" if i % 2 else "PA")
            boxes = 2 if label else 1  # pneumonia rows come once per box
            rows += [[pid, "264" if label else "", "152" if label else "", "213" if label else "",
                      "379" if label else "", label]] * boxes
    return write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)


def test_rsna_preset_collapses_box_rows_and_keeps_ids_private(tmp_path):
    make_rsna(tmp_path / "rsna")
    rec = run(tmp_path, tmp_path / "rsna" / "stage_2_train_images", preset="rsna")
    total = {c: sum(rec["counts"][s][c] for s in rec["counts"]) for c in rec["classes"]}
    assert total == {"normal": 24, "pneumonia": 24}  # 72 rows, 48 images
    assert rec["labels"]["rows"] == 72 and rec["labels"]["images"] == 48
    assert rec["sources"][0]["kind"] == "rsna"
    text = (tmp_path / "out" / "dataset.json").read_text()
    names = " ".join(p.name for p in (tmp_path / "out").rglob("*.png"))
    assert "c1f-5a4e" not in text and "c1f-5a4e" not in names  # the patientId is the file name here


def make_nih(root: Path) -> Path:
    """images_00N/images/<patient>_<follow-up>.png, Data_Entry_2017.csv, test_list.txt."""
    rows, test = [], []
    findings = ["No Finding", "Pneumonia", "Infiltration|Pneumonia", "Effusion", "No Finding", "Pneumonia"]
    normal, pneu = real_images(40, 0), real_images(40, 1)
    for i in range(60):
        f = findings[i % len(findings)]
        a = pneu[i % 40] if "Pneumonia" in f else normal[i % 40]
        pid = i // 3 + 1
        name = f"{pid:08d}_{i % 3:03d}.png"
        write_img(root / f"images_{i // 30 + 1:03d}" / "images" / name, a)
        view = "LL" if i == 7 else ("PA" if i % 2 else "AP")
        rows.append([name, f, i % 3, pid, 40, "M", view, 2500, 2048, 0.168, 0.168])
        if pid > 16:
            test.append(name)
    write_img(root / "images_001" / "images" / "99999999_000.png", normal[0])  # on disk, not in the CSV
    rows.append(["00000077_000.png", "No Finding", 0, 77, 40, "F", "PA", 2500, 2048, 0.168, 0.168])  # missing
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return write_csv(root / "Data_Entry_2017.csv",
                     ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                      "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                      "OriginalImagePixelSpacing[x", "y]"], rows)


def test_nih_preset_findings_official_test_list_and_reports(tmp_path):
    make_nih(tmp_path / "nih")
    rec = run(tmp_path, tmp_path / "nih", preset="nih")
    lab = rec["labels"]
    assert lab["missing_count"] == 1 and lab["missing_examples"] == ["00000077_000.png"]
    assert lab["not_in_csv_count"] == 1 and lab["not_in_csv_examples"] == ["images_001/images/99999999_000.png"]
    assert lab["unmatched_values"] == {"Effusion": 10}  # other findings: left out by default
    assert rec["views_skipped"] == {"LATERAL": 1}
    out = tmp_path / "out"
    test_names = set((tmp_path / "nih" / "test_list.txt").read_text().split())
    got_test = {p.name for p in (out / "test").rglob("*.png")}
    assert got_test and got_test <= {n for n in test_names}
    assert not {p.name for p in (out / "train").rglob("*.png")} & test_names
    assert "00000003_002.png" in {p.name for p in (out / "train" / "pneumonia").glob("*.png")} | \
        {p.name for p in (out / "val" / "pneumonia").glob("*.png")}  # Infiltration|Pneumonia
    # --other keeps them as a class of their own
    rec2 = run(tmp_path, tmp_path / "nih", "out2", preset="nih", other="other")
    assert rec2["classes"] == ["normal", "other", "pneumonia"]


def make_chexpert(root: Path) -> Path:
    """CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/viewN_frontal.jpg + train.csv/valid.csv."""
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Pneumonia"]
    normal, pneu = real_images(52, 0), real_images(52, 1)
    values = ["1.0", "0.0", "", "-1.0"]
    for split, n, off in (("train", 40, 0), ("valid", 12, 40)):
        rows = []
        for i in range(n):
            v = values[i % 4]
            a = pneu[off + i] if v in ("1.0", "-1.0") else normal[off + i]
            rel = f"CheXpert-v1.0-small/{split}/patient{i // 2 + (0 if split == 'train' else 500):05d}/study1/view{i % 2 + 1}_frontal.jpg"
            write_img(root / rel, a, "JPEG")
            no_finding = "1.0" if v == "" else ""  # a 0.0 for pneumonia is another finding's row
            rows.append([rel, "Female", 50, "Frontal", "AP", no_finding, v])
        write_csv(root / "CheXpert-v1.0-small" / f"{split}.csv", header, rows)
    return root / "CheXpert-v1.0-small"


@pytest.mark.parametrize("uncertain,pneumonia", [("ignore", 13), ("positive", 26), ("negative", 13)])
def test_chexpert_preset_uncertain_policies(tmp_path, uncertain, pneumonia):
    """Normal is No Finding: a row negative for pneumonia with another finding is left out."""
    src = make_chexpert(tmp_path / "cx")
    rec = run(tmp_path, src, preset="chexpert", uncertain=uncertain)
    total = {c: sum(rec["counts"][s][c] for s in rec["counts"]) for c in rec["classes"]}
    assert total["pneumonia"] == pneumonia and total["normal"] == 13
    assert rec["labels"]["uncertain_rows"] == 13
    assert rec["labels"]["unmatched_rows"] == 13 + (13 if uncertain == "negative" else 0)
    assert rec["labels"]["files"][1].endswith("valid.csv")
    # the split comes from the path; valid/ is too small to keep (< 50) so it joins train, and the
    # test split (private in CheXpert) is carved by patient
    assert any("no test split" in w for w in rec["warnings"]) and rec["val_carved_from_train"]
    names = [p.name for p in (tmp_path / "out").rglob("*.png")]
    assert len(set(names)) == len(names) == sum(sum(c.values()) for c in rec["counts"].values())
    assert all(n.startswith(("train_patient", "valid_patient")) for n in names)  # named by path: unique


def test_own_sheet_with_split_column_and_numeric_values(tmp_path):
    src = tmp_path / "imgs"
    rows = []
    for i, a in enumerate(real_images(30, 0)):
        write_img(src / f"n{i}.png", a)
        rows.append([f"n{i}.png", "0.0", f"pt{i}", ["train", "val", "test"][i % 3]])
    for i, a in enumerate(real_images(30, 1)):
        write_img(src / f"p{i}.png", a)
        rows.append([f"p{i}", "1", f"pt{100 + i}", ["train", "validation", "test"][i % 3]])  # no extension
    sheet = write_csv(tmp_path / "labels.csv", ["file", "dx", "pt", "fold"], rows)
    rec = run(tmp_path, src, csv=(sheet,), path_column="file", label_column="DX", patient_column="pt",
              split_column="fold", classes="pneumonia=1;normal=0", min_val=10)
    assert rec["counts"]["test"] == {"normal": 10, "pneumonia": 10}
    assert rec["counts"]["val"] == {"normal": 10, "pneumonia": 10}


def test_a_sheet_without_its_options_is_refused_with_what_it_holds(tmp_path):
    """The refusal lists the sheet's columns, then the label column's values with their counts
    (NIH-style `|` findings counted one by one), so the user can write the option from it."""
    src = tmp_path / "imgs"
    write_img(src / "a.png", real_images(1, 0)[0])
    sheet = write_csv(tmp_path / "sheet.csv", ["Image", "Finding Labels", "Patient"],
                      [["a.png", "No Finding", "1"], ["b.png", "Pneumonia|Effusion", "2"],
                       ["c.png", "Pneumonia", "3"], ["d.png", "", "4"]])
    with pytest.raises(InputError, match=r"sheet\.csv: give --path-column COLUMN.*its columns: "
                                         r"Image, Finding Labels, Patient"):
        run(tmp_path, src, csv=(sheet,))
    with pytest.raises(InputError, match=r"sheet\.csv: give --label-column COLUMN"):
        run(tmp_path, src, csv=(sheet,), path_column="Image")
    with pytest.raises(InputError) as e:
        run(tmp_path, src, csv=(sheet,), path_column="Image", label_column="finding labels")
    assert "which Finding Labels values mean which class" in str(e.value)
    assert "its values: Pneumonia (2), " in str(e.value)
    assert all(f"{v} (1)" in str(e.value) for v in ("No Finding", "Effusion", "(blank)"))
    assert not (tmp_path / "out").exists()


def test_a_class_no_row_gives_is_refused_not_a_one_class_dataset(tmp_path):
    """'Normal' where the sheet writes 'No Finding' used to make a pneumonia-only dataset."""
    src = tmp_path / "imgs"
    rows = []
    for i, a in enumerate(real_images(6, 0)):
        write_img(src / f"n{i}.png", a)
        rows.append([f"n{i}.png", "No Finding"])
    for i, a in enumerate(real_images(6, 1)):
        write_img(src / f"p{i}.png", a)
        rows.append([f"p{i}.png" if i else "gone.png", "Pneumonia"])
    sheet = write_csv(tmp_path / "sheet.csv", ["Image", "Finding"], rows)
    spec = dict(csv=(sheet,), path_column="Image", label_column="Finding", min_val=1)
    with pytest.raises(InputError, match=r"sheet\.csv: no image of class normal: .*'No Finding' \(6\)\)"
                                         r"; 1 rows name no image found \(first: 'gone.png'"):
        run(tmp_path, src, classes="pneumonia=Pneumonia;normal=Normal", **spec)
    assert not (tmp_path / "out").exists()
    rec = run(tmp_path, src, classes="pneumonia=Pneumonia;normal=No Finding", **spec)
    assert sum(rec["counts"][s]["normal"] for s in ("train", "val", "test")) == 6


def write_csv_gz(path: Path, header: list[str], rows: list[list]) -> Path:
    import gzip
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(buf.getvalue().encode()))
    return path


def make_mimic(root: Path) -> Path:
    """MIMIC-CXR-JPG 2.0.0 in miniature: files/pNN/p<subject>/s<study>/<dicom_id>.jpg, and the
    gzipped CheXpert-labeler sheet (one row per study), split and metadata sheets (per image)."""
    normal, pneu = real_images(48, 0), real_images(48, 1)
    labels, splits, meta = [], [], []
    for k in range(24):  # 24 studies of 12 subjects, two images each (the second lateral in every 4th)
        subject, study = 10000000 + k // 2, 50000000 + k
        # pneumonia, not mentioned (No Finding), another finding, uncertain
        value = ["1.0", "", "0.0", "", "1.0", "", "-1.0", ""][k % 8]
        split = "test" if subject >= 10000010 else ("validate" if subject == 10000008 else "train")
        for j in range(2):
            dicom_id = f"{k:04d}{j}aa-{study}"
            a = (pneu if value == "1.0" else normal)[2 * k + j]
            write_img(root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg",
                      a, "JPEG")
            splits.append([dicom_id, study, subject, split])
            meta.append([dicom_id, subject, study, "LATERAL" if j and k % 4 == 0 else ("PA" if j else "AP")])
        labels.append([subject, study, "1.0" if value == "0.0" else "", value, "1.0" if value == "" else ""])
    write_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz",
                 ["subject_id", "study_id", "Atelectasis", "Pneumonia", "No Finding"], labels)
    write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], splits)
    write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz",
                 ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta)
    return root / "files"


def test_mimic_preset_labels_every_image_of_a_study_with_the_official_split(tmp_path):
    src = make_mimic(tmp_path / "mimic-cxr-jpg" / "2.0.0")
    rec = run(tmp_path, src, preset="mimic", min_val=1)
    lab = rec["labels"]
    assert lab["preset"] == "mimic" and lab["rows"] == 24 and lab["image_splits"].endswith("split.csv.gz")
    # 3 uncertain studies dropped (U-Ignore), 3 with another finding left out; 6 pneumonia and
    # 12 No Finding studies, 2 images each, less the lateral of every 4th study (the pneumonia ones)
    assert lab["uncertain_dropped"] == 3 and lab["unmatched_rows"] == 3 and rec["views_skipped"] == {"LATERAL": 6}
    total = {c: sum(rec["counts"][s][c] for s in rec["counts"]) for c in ("normal", "pneumonia")}
    assert total == {"normal": 24, "pneumonia": 6}
    # the official split, by subject: subjects 10 and 11 (studies 20-23) are test, 8 is validate
    assert rec["counts"]["test"] == {"normal": 4, "pneumonia": 1} and rec["counts"]["val"] == {"normal": 2,
                                                                                              "pneumonia": 1}
    names = {p.name for p in (tmp_path / "out" / "test").rglob("*.png")}
    assert len(names) == 5 and all(n.startswith(("0020", "0021", "0023")) for n in names)
    rec = run(tmp_path, src, name="pos", preset="mimic", uncertain="positive", views=("PA", "AP", "LATERAL"),
              min_val=1)
    assert sum(rec["counts"][s]["pneumonia"] for s in rec["counts"]) == 18 and not rec["views_skipped"]


def test_padchest_preset_reads_findings_written_as_a_list(tmp_path):
    """PadChest: ImageID in numbered folders, 16-bit PNGs, `Labels` as a Python-style list,
    `Projection` L for lateral."""
    root = tmp_path / "padchest"
    rows = []
    normal, pneu = real_images(40, 0), real_images(40, 1)
    findings = ["['normal']", "['pneumonia', 'infiltrates']", "[' chronic changes', 'pneumonia']",
                "['cardiomegaly']", "['normal']"]
    for i in range(40):
        f = findings[i % 5]
        a = (pneu if "pneumonia" in f else normal)[i].astype(np.uint16) * 257  # 16-bit, as released
        name = f"{1000 + i}_{i:03d}.png"
        write_img(root / str(i % 3) / name, a)
        rows.append([name, str(i % 3), f"pat{i // 2}", "L" if i == 4 else "PA", f])
    write_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
              ["ImageID", "ImageDir", "PatientID", "Projection", "Labels"], rows)
    rec = run(tmp_path, root, preset="padchest", min_val=1)
    total = {c: sum(rec["counts"][s][c] for s in rec["counts"]) for c in ("normal", "pneumonia")}
    assert total == {"normal": 15, "pneumonia": 16}  # 16 normal less one lateral; 8 'cardiomegaly' left out
    assert rec["views_skipped"] == {"LATERAL": 1} and rec["labels"]["unmatched_values"] == {"['cardiomegaly']": 8}
    assert cell_values("['pneumonia', 'infiltrates']") == ["pneumonia", "infiltrates"]
    assert cell_values("Pneumonia|Effusion") == ["Pneumonia", "Effusion"] and cell_values("[]") == []


def test_class_columns_read_a_sheet_with_a_column_per_finding(tmp_path):
    """A sheet with a 0/1 column per finding (as CheXpert, MIMIC-CXR and VinDr-CXR write them):
    a row is of the class whose column reads 1; two classes at once drop the image, none leaves
    it out."""
    src = tmp_path / "imgs"
    rows = []
    normal, pneu = real_images(30, 0), real_images(30, 1)
    for i in range(30):
        kind = i % 5  # 0, 1: pneumonia (1: with consolidation); 2: no finding; 3: effusion; 4: both flags
        write_img(src / f"x{i}.png", (pneu if kind in (0, 1, 4) else normal)[i])
        rows.append([f"x{i}.png", int(kind in (0, 1, 4)), int(kind == 1), int(kind in (2, 4)), int(kind == 3)])
    sheet = write_csv(tmp_path / "findings.csv", ["image_id", "Pneumonia", "Consolidation", "No finding",
                                                  "Pleural effusion"], rows)
    rec = run(tmp_path, src, csv=(sheet,), path_column="image_id", min_val=1,
              class_columns="pneumonia=pneumonia|Consolidation;normal=No finding")
    total = {c: sum(rec["counts"][s][c] for s in rec["counts"]) for c in ("normal", "pneumonia")}
    assert total == {"normal": 6, "pneumonia": 12}
    assert rec["labels"]["conflicting_images"] == 6 and rec["labels"]["unmatched_rows"] == 6
    with pytest.raises(InputError, match="give either --class-columns .* or --label-column"):
        run(tmp_path, src, name="o2", csv=(sheet,), path_column="image_id", label_column="Pneumonia",
            class_columns="pneumonia=Pneumonia;normal=No finding")
    with pytest.raises(InputError, match=r"findings\.csv: no column 'Cardiomegaly' \(--class-columns\)"):
        run(tmp_path, src, name="o2", csv=(sheet,), path_column="image_id",
            class_columns="pneumonia=Pneumonia;normal=Cardiomegaly")


def test_majority_of_readers_decides_an_image_read_by_several(tmp_path):
    """VinDr-CXR writes one row per radiologist: unanimous (the default) drops an image the
    readers disagree on; --agreement majority keeps the class more than half of its rows name."""
    src = tmp_path / "imgs"
    rows = []
    normal, pneu = real_images(30, 0), real_images(30, 1)
    votes = [("1", "1", "1"), ("1", "1", "0"), ("0", "0", "0"), ("0", "0", "1"), ("1", "0", "")]
    for i in range(30):
        v = votes[i % 5]  # Pneumonia per reader; 0 = No finding, "" = another finding only
        write_img(src / f"img{i:03d}.png", (pneu if v.count("1") >= 2 else normal)[i])
        for rad, p in enumerate(v):
            rows.append([f"img{i:03d}", f"R{rad + 1}", int(p == "1"), int(p == "0")])
    sheet = write_csv(tmp_path / "image_labels_train.csv", ["image_id", "rad_id", "Pneumonia", "No finding"], rows)
    spec = dict(csv=(sheet,), path_column="image_id", class_columns="pneumonia=Pneumonia;normal=No finding",
                min_val=1)
    rec = run(tmp_path, src, **spec)
    total = {c: sum(rec["counts"][s][c] for s in rec["counts"]) for c in ("normal", "pneumonia")}
    assert total == {"normal": 6, "pneumonia": 6} and rec["labels"]["conflicting_images"] == 18
    rec = run(tmp_path, src, name="maj", agreement="majority", **spec)
    total = {c: sum(rec["counts"][s][c] for s in rec["counts"]) for c in ("normal", "pneumonia")}
    assert total == {"normal": 12, "pneumonia": 12} and rec["labels"]["no_majority_images"] == 6


def test_vindr_preset_majority_of_readers_and_the_official_split_from_the_folders(tmp_path):
    """VinDr-CXR: train/<image_id>.dicom read by three radiologists (a row each, a 0/1 column per
    finding), test/ by a consensus row; the split is the folder the file lies in."""
    root = tmp_path / "vindr"
    normal, pneu = real_images(40, 0), real_images(40, 1)
    header = ["image_id", "rad_id", "Pneumonia", "Other disease", "No finding"]
    train, test = [], []
    for i in range(40):
        image_id = f"{i:03d}e1a2b3c4d5"
        votes = [(1, 1, 1), (1, 1, 0), (0, 0, 0), (0, 0, 1)][i % 4]  # per reader: 1 pneumonia, 0 no finding
        split = "test" if i >= 30 else "train"
        write_dicom(root / split / f"{image_id}.dicom", (pneu if sum(votes) >= 2 else normal)[i],
                    patient=None, uid=f"1.2.3.{i}")
        if split == "train":
            train += [[image_id, f"R{k}", v, 0, 1 - v] for k, v in enumerate(votes)]
        else:
            test.append([image_id, "R8", int(sum(votes) >= 2), 0, int(sum(votes) < 2)])
    write_csv(root / "image_labels_train.csv", header, train)
    write_csv(root / "image_labels_test.csv", header, test)
    rec = run(tmp_path, root, preset="vindr", min_val=1)
    assert rec["labels"]["agreement"] == "majority" and rec["labels"]["no_majority_images"] == 0
    assert rec["counts"]["test"] == {"normal": 6, "pneumonia": 4}  # test/ as published
    assert sum(rec["counts"][s]["pneumonia"] for s in ("train", "val")) == 16
    rec = run(tmp_path, root, name="unanimous", preset="vindr", agreement="unanimous", min_val=1)
    assert rec["labels"]["conflicting_images"] == 15  # the (1,1,0) and (0,0,1) images of train/


def test_class_values_parse_and_compare():
    assert parse_classes("pneumonia=1;normal=0|(blank)") == {"pneumonia": {"1"}, "normal": {"0", "(blank)"}}
    assert norm_value(" 1.0 ") == "1" and norm_value("No Finding") == "no finding" and norm_value("") == "(blank)"
    for bad in ("pneumonia", "pneumonia=1", "a=1;b=1", "a=1;a=2"):
        with pytest.raises(InputError):
            parse_classes(bad)


def test_cli_reports_labels(tmp_path):
    from typer.testing import CliRunner

    from xraygan.cli import app

    make_nih(tmp_path / "nih")
    r = CliRunner().invoke(app, ["prepare", str(tmp_path / "nih"), "--preset", "nih", "--out",
                                 str(tmp_path / "o"), "--size", "32", "--workers", "1", "--val-fraction", "0.3"])
    assert r.exit_code == 0, r.output
    assert "1 named but not found, 1 on disk but not in the CSV" in r.output
    assert "views left out: 1 LATERAL" in r.output
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["labels"]["preset"] == "nih"


def test_views_compare_in_upper_case_for_sheets_as_for_dicom(tmp_path):
    make_nih(tmp_path / "nih")
    rec = prepare(PrepareConfig(out=tmp_path / "o", src=tmp_path / "nih", size=32, workers=1, val_fraction=0.3,
                                preset="nih", views=("ap",)))
    assert set(rec["views_skipped"]) == {"PA", "LATERAL"}  # "ap" kept the AP rows, as AP would
