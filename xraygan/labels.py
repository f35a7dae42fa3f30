"""Images labelled by a CSV: `prepare IMAGES --labels FILE.csv` (and the public layouts' presets).

One option set covers the public chest X-ray releases and a hospital's own sheet:

- `--path-column`: the image, as a path relative to IMAGES (leading folders the CSV has and
  IMAGES lacks are dropped: CheXpert's `CheXpert-v1.0-small/train/...`), a file name found
  anywhere below IMAGES (NIH's `00000013_005.png` in `images_001/images/`), or a name without
  its extension (RSNA's `patientId` for `<patientId>.dcm`).
- `--label-column` and `--classes "pneumonia=Pneumonia;normal=No Finding"`: a class is given by
  the values that mean it, `|`-separated (`normal=0|(blank)`); a label cell is split on `|` as
  NIH writes several findings, and a class matches when one of its values is among them.
  Numbers compare as numbers (`1` = `1.0`). `(blank)` is an empty cell.
- `--class-columns "pneumonia=Pneumonia;normal=No Finding"` instead, for a sheet with a 0/1
  column per finding (the CheXpert labeler's, so the CheXpert and MIMIC presets): a row is of
  the class whose column reads 1; normal is then No Finding, not "no pneumonia".
- `--uncertain ignore|positive|negative` for `-1` cells (CheXpert): drop the row (U-Ignore),
  read it as 1 (U-Ones) or as 0 (U-Zeros), as in the CheXpert paper.
- A row that matches no class (another finding) is left out by default: as `normal` it would
  teach the classifier that, say, an effusion is healthy, and as a class of its own it changes
  the question; `--other NAME` makes it a class of its own when that is the question.
- Several rows for one image (RSNA writes one per box) are one image; rows that disagree on its
  class drop it, counted.
- `--patient-column` (else the DICOM header's PatientID, else the patient in the path or file
  name), `--split-column` (train/val/test values), `--test-list FILE` (the official NIH
  `test_list.txt`: those images are the test split, the rest train), `--view-column`.
- MIMIC-CXR labels studies, not images: its preset reads a row's `study_id` as the folder
  `s<study_id>` and labels every image in it; per-image sheets (keyed by the file's stem, the
  `dicom_id`) give the official split and the view. Sheets may be gzipped.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from xraygan.dicom import normalise_view, view_allowed
from xraygan.errors import InputError
from xraygan.sources import SPLIT_NAMES, Item, Scan, file_item, list_files

UNCERTAIN = ("ignore", "positive", "negative")
AGREEMENT = ("unanimous", "majority")
BLANK = "(blank)"
PATH_SPLIT = "(path)"  # split_column value: the split is a folder of the path (CheXpert's train/valid)


@dataclass(frozen=True)
class LabelSpec:
    csv: tuple[Path, ...] = ()
    path_column: str | None = None
    label_column: str | None = None
    classes: str | None = None  # "pneumonia=1;normal=0"
    class_columns: str | None = None  # "pneumonia=Pneumonia;normal=No Finding": a 0/1 column per class
    patient_column: str | None = None
    split_column: str | None = None
    view_column: str | None = None
    uncertain: str = "ignore"
    agreement: str | None = None  # several rows for one image: unanimous (None: the preset's, else this) or majority
    other: str | None = None  # class for rows that match none (default: left out)
    test_list: Path | None = None
    preset: str | None = None
    # set by a preset whose rows name a study, not an image (MIMIC-CXR): a row labels every image
    # in the folder `folder_format.format(value)`; per-image tables give the split and the view
    folder_format: str | None = None
    image_splits: Path | None = None  # CSV: IMAGE_KEY (the file's stem), split
    image_views: Path | None = None  # CSV: IMAGE_KEY, view


CHEXPERT_CLASSES = "pneumonia=Pneumonia;normal=No Finding"

# The public layouts, as their releases write them. `csv` names the file looked for beside
# IMAGES (and in its parent) when --labels is not given; `test_list` likewise.
PRESETS: dict[str, dict] = {
    "rsna": dict(csv=("stage_2_train_labels.csv",), path_column="patientId", label_column="Target",
                 patient_column="patientId", classes="pneumonia=1;normal=0"),
    "nih": dict(csv=("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"), path_column="Image Index",
                label_column="Finding Labels", patient_column="Patient ID", view_column="View Position",
                classes="pneumonia=Pneumonia;normal=No Finding", test_list="test_list.txt"),
    # the CheXpert labeler writes a 1 / 0 / -1 / blank column per finding: normal is No Finding
    "chexpert": dict(csv=("train.csv", "valid.csv"), path_column="Path", class_columns=CHEXPERT_CLASSES,
                     split_column=PATH_SPLIT, view_column="Frontal/Lateral"),
    # PadChest: 16-bit PNGs in numbered folders, the findings as a list in one cell
    "padchest": dict(csv=("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
                          "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"),
                     path_column="ImageID", label_column="Labels", patient_column="PatientID",
                     view_column="Projection", classes="pneumonia=pneumonia;normal=normal"),
    # VinDr-CXR 1.0.0: train/<image_id>.dicom read by 3 radiologists (a row each), test/ by a consensus
    "vindr": dict(csv=("image_labels_train.csv", "image_labels_test.csv"), path_column="image_id",
                  class_columns="pneumonia=Pneumonia;normal=No finding", split_column=PATH_SPLIT,
                  agreement="majority"),
    # MIMIC-CXR(-JPG) 2.0.0: files/p10/p10000032/s50414267/<dicom_id>.dcm|.jpg; the CheXpert
    # labeler's sheet has one row per study; the official split and the views are per image
    "mimic": dict(csv=("mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-chexpert.csv"), path_column="study_id",
                  class_columns=CHEXPERT_CLASSES, patient_column="subject_id",
                  folder_format="s{}",
                  image_splits=("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"),
                  image_views=("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv")),
}
ONE_SHEET = ("nih", "mimic", "padchest")  # presets that read the first of their label files found, not all
IMAGE_TABLES = {"image_splits": ("dicom_id", "split"), "image_views": ("dicom_id", "ViewPosition")}


def resolve_spec(images: Path, spec: LabelSpec) -> LabelSpec:
    """Fill what the user left out from the preset, find its files, and check the options."""
    images = Path(images)
    if spec.preset is not None:
        if spec.preset not in PRESETS:
            raise InputError(f"--preset {spec.preset}: must be one of {', '.join(PRESETS)}")
        p = PRESETS[spec.preset]
        files = ("csv", "test_list", *IMAGE_TABLES)
        # a label given by the user replaces the preset's in whichever form it is given
        mine = spec.class_columns is not None or spec.label_column is not None or spec.classes is not None
        label = ("class_columns", "label_column", "classes")
        fill = {k: v for k, v in p.items() if k not in files and getattr(spec, k) is None
                and not (mine and k in label)}
        spec = replace(spec, **fill)
        places = (images, images.parent)
        if not spec.csv:
            found = tuple(d / n for n in p["csv"] for d in places if (d / n).is_file())
            if spec.preset in ONE_SHEET:
                found = found[:1]  # NIH's 2020 file replaces the 2017 one; MIMIC's .csv.gz as published
            if not found:
                raise InputError(f"{images}: no {' or '.join(p['csv'])} here or in its parent "
                                 f"(give the label file with --labels)")
            spec = replace(spec, csv=found)
        if spec.test_list is None and p.get("test_list"):
            where = [d / p["test_list"] for d in (spec.csv[0].parent, *places)]
            spec = replace(spec, test_list=next((w for w in where if w.is_file()), None))
        for k in IMAGE_TABLES:  # optional: without them, split by patient, views from the DICOM header
            if getattr(spec, k) is None and p.get(k):
                where = [d / n for n in p[k] for d in (spec.csv[0].parent, *places)]
                spec = replace(spec, **{k: next((w for w in where if w.is_file()), None)})
    if not spec.csv:
        raise InputError(f"--labels FILE.csv is needed (or --preset {'|'.join(PRESETS)})")
    for f in spec.csv:
        if f.is_dir():
            raise InputError(f"{f}: is a folder, not a CSV file (--labels)")
        if not f.is_file():
            raise InputError(f"{f}: label file not found (--labels)")
    if spec.class_columns is not None and (spec.label_column or spec.classes):
        raise InputError("give either --class-columns (a 0/1 column per class) or --label-column with "
                         "--classes (one column whose values name the class), not both")
    needed = [("--path-column", spec.path_column)]
    if spec.class_columns is None:
        needed += [("--label-column", spec.label_column), ("--classes", spec.classes)]
    for opt, v in needed:
        if not v:
            raise InputError(_what_is_missing(spec, opt))
    if spec.uncertain not in UNCERTAIN:
        raise InputError(f"--uncertain {spec.uncertain}: must be one of {', '.join(UNCERTAIN)}")
    spec = replace(spec, agreement=spec.agreement or "unanimous")
    if spec.agreement not in AGREEMENT:
        raise InputError(f"--agreement {spec.agreement}: must be one of {', '.join(AGREEMENT)}")
    if spec.test_list is not None and not Path(spec.test_list).is_file():
        raise InputError(f"{spec.test_list}: test list not found (--test-list)")
    spec_classes(spec)
    return spec


def spec_classes(spec: LabelSpec) -> dict[str, frozenset[str]]:
    """The classes a sheet's options give: --classes' values, or --class-columns' columns."""
    if spec.class_columns is None:
        return parse_classes(spec.classes)
    return parse_classes(spec.class_columns, "--class-columns")


def _what_is_missing(spec: LabelSpec, opt: str) -> str:
    """The error for a label sheet given without `opt`: what the sheet holds, so the user can
    write the option from the message (its columns, or the label column's values by count)."""
    path = spec.csv[0]
    header, rows = read_csv_rows(path)
    presets = f"or --preset {'|'.join(PRESETS)} for a public release's sheet"
    if opt != "--classes":
        what = "the image's path or file name" if opt == "--path-column" else "the label"
        shown = ", ".join(header[:12]) + (" …" if len(header) > 12 else "")
        also = (", or --class-columns \"pneumonia=COLUMN;normal=COLUMN\" for a 0/1 column per class"
                if opt == "--label-column" else "")
        return (f"{path}: give {opt} COLUMN, the column holding {what} (its columns: {shown}){also}, "
                f"{presets}")
    column = _column(path, header, spec.label_column, "--label-column")
    values: Counter = Counter()
    for row in rows:
        cell = row.get(column) or ""
        values.update({t.strip() or BLANK for t in cell_values(cell)} or {BLANK})
    shown = ", ".join(f"{v} ({n})" for v, n in values.most_common(8)) + (" …" if len(values) > 8 else "")
    return (f"{path}: give --classes to say which {column} values mean which class, e.g. "
            '--classes "pneumonia=VALUE;normal=VALUE|VALUE" '
            f"(its values: {shown or 'none'}), {presets}")


def norm_value(v: str) -> str:
    """How label values compare: trimmed, case-folded, numbers as numbers ("1.0" = "1")."""
    v = v.strip()
    if not v:
        return BLANK
    try:
        f = float(v)
    except ValueError:
        return v.casefold()
    return str(int(f)) if f.is_integer() else repr(f)


def _raw_values(text: str, cls: str) -> list[str]:
    """The values (or column names) `CLASS=A|B;...` gives `cls`, as written."""
    for part in text.split(";"):
        name, _, values = part.partition("=")
        if name.strip().lower() == cls:
            return [v.strip() for v in values.split("|") if v.strip()]
    return []


def parse_classes(text: str, option: str = "--classes") -> dict[str, frozenset[str]]:
    """`"pneumonia=1;normal=0|(blank)"` → {"pneumonia": {"1"}, "normal": {"0", "(blank)"}} (with
    `--class-columns` the values are column names)."""
    out: dict[str, frozenset[str]] = {}
    for part in (p for p in text.split(";") if p.strip()):
        cls, sep, values = part.partition("=")
        cls = cls.strip().lower()
        if not sep or not cls or not values.strip() or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", cls):
            raise InputError(f"{option} {text!r}: expected CLASS=VALUE[|VALUE...] separated by ';', "
                             "e.g. 'pneumonia=Pneumonia;normal=No Finding' (class names: letters, digits, - or _)")
        if cls in out:
            raise InputError(f"{option} {text!r}: class {cls} given twice")
        out[cls] = frozenset(norm_value(v) if v.strip() != BLANK else BLANK for v in values.split("|"))
    if len(out) < 2:
        raise InputError(f"{option} {text!r}: need at least two classes")
    seen: dict[str, str] = {}
    for c, vals in out.items():
        for v in vals:
            if v in seen:
                raise InputError(f"{option} {text!r}: value {v!r} means both {seen[v]} and {c}")
            seen[v] = c
    return out


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A label sheet as header + rows: UTF-8 (with or without BOM) or UTF-16 with BOM (Excel's
    "Unicode text"), comma, semicolon or tab separated, plain or gzipped (`.csv.gz`)."""
    try:
        raw = Path(path).read_bytes()
        if Path(path).suffix.lower() == ".gz":  # as PhysioNet publishes MIMIC-CXR's sheets
            raw = gzip.decompress(raw)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({(e.strerror or type(e).__name__).lower()})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InputError(f"{path}: not a readable .gz file ({e})") from None
    try:
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start}); "
                         "save it as UTF-8 CSV") from None
    first = text.split("\n", 1)[0]
    delim = max(",;\t", key=first.count)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        rows = list(reader)
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV file ({e})") from None
    header = [h for h in (reader.fieldnames or []) if h is not None]
    if not header:
        raise InputError(f"{path}: empty CSV file (no header row)")
    return header, rows


class _FileIndex:
    """Find a CSV's path value among the files below IMAGES (see the module docstring)."""

    def __init__(self, root: Path, files: list[Path]):
        self.rel = {f.relative_to(root).as_posix(): f for f in files}
        self.by_name: dict[str, list[Path]] = defaultdict(list)
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        self.by_folder: dict[str, list[Path]] = defaultdict(list)
        for f in files:
            self.by_name[f.name].append(f)
            self.by_stem[f.stem].append(f)
            self.by_folder[f.parent.name].append(f)

    def find_all(self, value: str, folder_format: str | None) -> tuple[list[Path], str | None]:
        """The images a row names: one file, or with `folder_format` every image in that folder
        (a study id, `50414267` or `50414267.0` as a spreadsheet may write it → `s50414267`)."""
        if folder_format is None:
            f, why = self.find(value)
            return ([f] if f is not None else []), why
        v = value.strip()
        v = v.split(".")[0] if re.fullmatch(r"\d+\.0*", v) else v
        return (list(self.by_folder.get(folder_format.format(v), [])) if v else []), (None if v else "empty")

    def find(self, value: str) -> tuple[Path | None, str | None]:
        v = value.strip().replace("\\", "/").lstrip("./")
        parts = [p for p in v.split("/") if p]
        for k in range(len(parts)):
            hit = self.rel.get("/".join(parts[k:]))
            if hit is not None:
                return hit, None
        if not parts:
            return None, "empty path"
        for index, key in ((self.by_name, parts[-1]), (self.by_stem, parts[-1])):
            hits = index.get(key, [])
            if len(hits) == 1:
                return hits[0], None
            if len(hits) > 1:
                return None, f"{len(hits)} files are named {key}"
        return None, None


_PATH_PATIENT = (re.compile(r"^(patient\d+)$", re.IGNORECASE), re.compile(r"^(p\d{8})$"))  # CheXpert, MIMIC


def _path_patient(value: str) -> str | None:
    for part in value.replace("\\", "/").split("/")[:-1]:
        for pat in _PATH_PATIENT:
            m = pat.match(part)
            if m:
                return m.group(1).lower()
    return None


def _path_split(value: str) -> str | None:
    for part in value.replace("\\", "/").split("/")[:-1]:
        s = SPLIT_NAMES.get(part.lower())
        if s is not None:
            return s
    return None


def _column(path: Path, header: list[str], name: str | None, opt: str) -> str | None:
    if name is None or name == PATH_SPLIT:
        return name
    if name in header:
        return name
    folded = {h.strip().casefold(): h for h in header}
    if name.strip().casefold() in folded:
        return folded[name.strip().casefold()]
    raise InputError(f"{path}: no column '{name}' ({opt}); its columns are {', '.join(header[:12])}"
                     + (" …" if len(header) > 12 else ""))


def cell_values(cell: str) -> list[str]:
    """The values one label cell holds: `|`-separated as NIH writes several findings, or a list
    as PadChest writes them (`['pneumonia', 'infiltrates']`); none for an empty cell."""
    text = cell.strip()
    if text.startswith("[") and text.endswith("]"):
        return [v for v in (p.strip().strip("'\"").strip() for p in text[1:-1].split(",")) if v]
    return text.split("|") if text else []


def _row_classes(cell: str, spec: LabelSpec, value_class: dict, counts: Counter, unmatched: Counter) -> set:
    """The classes one row's label cell names (`|`-separated values), with CheXpert's uncertain
    -1 resolved by --uncertain and unmatched values sent to --other; empty when the row is dropped
    (`counts` and `unmatched` say why)."""
    tokens = {norm_value(t) for t in cell_values(cell)} or {BLANK}
    if "-1" in tokens:
        counts["uncertain"] += 1
        if spec.uncertain == "ignore":
            counts["uncertain_dropped"] += 1
            return set()
        tokens = (tokens - {"-1"}) | {"1" if spec.uncertain == "positive" else "0"}
    hit = {value_class[t] for t in tokens if t in value_class}
    if not hit:
        unmatched[cell.strip() or BLANK] += 1
        if spec.other is None:
            return set()
        hit = {spec.other}
    return hit


def _image_table(spec: LabelSpec, kind: str) -> dict[str, str] | None:
    """A preset's per-image table (`IMAGE_TABLES`) as image key → value, None when not found."""
    path = getattr(spec, kind)
    if path is None:
        return None
    header, rows = read_csv_rows(path)
    key, value = (_column(path, header, c, f"the {kind.replace('_', ' ')} table") for c in IMAGE_TABLES[kind])
    return {(r.get(key) or "").strip(): (r.get(value) or "").strip() for r in rows}


def _split_value(path: Path, value: str) -> str | None:
    if not value:
        return None  # split with the unsplit images, by patient
    split = SPLIT_NAMES.get(value.lower())
    if split is None:
        raise InputError(f"{path}: split value {value!r} is not train, validate or test")
    return split


def _row_classes_by_columns(row: dict, class_cols: dict[str, list[str]], spec: LabelSpec, counts: Counter,
                            unmatched: Counter) -> set:
    """The classes whose 0/1 columns read 1 in this row (CheXpert's -1, uncertain, resolved by
    --uncertain); empty when the row is dropped (`counts` and `unmatched` say why)."""
    cells = {c: {norm_value(row.get(col) or "") for col in cols} for c, cols in class_cols.items()}
    if any("-1" in v for v in cells.values()):
        counts["uncertain"] += 1
        if spec.uncertain == "ignore":
            counts["uncertain_dropped"] += 1
            return set()
    yes = {"1", "-1"} if spec.uncertain == "positive" else {"1"}
    hit = {c for c, v in cells.items() if v & yes}
    if not hit:
        unmatched["no class column reads 1"] += 1
        if spec.other is None:
            return set()
        hit = {spec.other}
    return hit


def _row_split(entry: dict, spec: LabelSpec, on_disk: str) -> str | None:
    """The split an image's first row gives (a split column), or with `--split-column (path)` the
    train/valid/test folder in the path the row writes (CheXpert) or, failing that, in the
    image's own path below IMAGES (VinDr-CXR's train/ and test/)."""
    r, cols = entry["row"], entry["cols"]
    if cols["split_column"] == PATH_SPLIT:
        return _path_split(entry["value"]) or _path_split(on_disk)
    if not cols["split_column"]:
        return None
    sv = (r.get(cols["split_column"]) or "").strip().lower()
    split = SPLIT_NAMES.get(sv)
    if sv and split is None:
        raise InputError(f"{spec.csv[0]}: split value {sv!r} in '{cols['split_column']}' is not "
                         "train, val or test")
    return split


def _check_every_class_made(spec: LabelSpec, classes: dict, per_file: dict, items: list[Item],
                            unmatched: Counter, views_skipped: Counter, counts: Counter,
                            missing: list[str]) -> None:
    """A class that --classes names but no image ends up in is refused: a value that does not
    match the sheet's spelling ('Normal' for 'No Finding') would otherwise make a one-class
    dataset, and the study's classifier would learn nothing from it."""
    made = Counter(it.cls for it in items)
    lacking = [c for c in classes if not made[c]]
    if not lacking:
        return
    c = lacking[0]
    if any(c in e["classes"] for e in per_file.values()):
        raise InputError(f"{spec.csv[0]}: every image of class {c} was left out (views skipped: "
                         f"{dict(views_skipped) or 'none'}; conflicting labels: {counts['conflicting']})")
    common = ", ".join(f"{v!r} ({n})" for v, n in unmatched.most_common(8))
    lost = (f"; {len(missing)} rows name no image found (first: {missing[0]!r}, --path-column "
            f"{spec.path_column})" if missing else "")
    if spec.class_columns:
        raise InputError(f"{spec.csv[0]}: no image of class {c}: no row naming an image reads 1 in its "
                         f"column(s) {', '.join(_raw_values(spec.class_columns, c))} (--class-columns){lost}")
    raise InputError(f"{spec.csv[0]}: no image of class {c}: no row naming an image has a "
                     f"'{spec.label_column}' value --classes {spec.classes!r} gives it (values matching no "
                     f"class: {common or 'none'}){lost}")


def scan_labelled(images: Path, spec: LabelSpec, views: tuple[str, ...] | None) -> tuple[Scan, dict]:
    """Items for the labelled images below IMAGES, and the `labels` report for dataset.json."""
    images = Path(images)
    if not images.is_dir():
        raise InputError(f"{images}: image folder not found" if not images.exists() else
                         f"{images}: not a folder (give the folder that holds the images)")
    spec = resolve_spec(images, spec)
    classes = spec_classes(spec)
    value_class = {v: c for c, vals in classes.items() for v in vals}
    files, ignored, skipped = list_files(images)
    index = _FileIndex(images, files)
    test_names = None
    if spec.test_list is not None:
        test_names = {ln.strip() for ln in Path(spec.test_list).read_text(encoding="utf-8-sig").splitlines()
                      if ln.strip()}
    image_splits = _image_table(spec, "image_splits")
    image_splits = image_splits and {k: _split_value(spec.image_splits, v) for k, v in image_splits.items()}
    image_views = _image_table(spec, "image_views")
    # one entry per image: the classes its rows say, and the first row's patient/split/view
    per_file: dict[Path, dict] = {}
    named: Counter = Counter()  # every file some row names, labelled or not: how many rows
    counts: Counter = Counter()
    unmatched: Counter = Counter()
    missing: list[str] = []
    rows_total = 0
    for csv_path in spec.csv:
        header, rows = read_csv_rows(csv_path)
        cols = {k: _column(csv_path, header, getattr(spec, k), "--" + k.replace("_", "-"))
                for k in ("path_column", "label_column", "patient_column", "split_column", "view_column")}
        class_cols = spec.class_columns and {c: [_column(csv_path, header, name, "--class-columns") for name in
                                                 _raw_values(spec.class_columns, c)] for c in classes}
        rows_total += len(rows)
        for r in rows:
            pv = (r.get(cols["path_column"]) or "").strip()
            found, why = index.find_all(pv, spec.folder_format)
            if not found:
                counts["ambiguous_path" if why and why != "empty" else "missing_file"] += 1
                missing.append(pv + (f" ({why})" if why else ""))
                continue
            named.update(found)
            hit = (_row_classes_by_columns(r, class_cols, spec, counts, unmatched) if class_cols else
                   _row_classes(r.get(cols["label_column"]) or "", spec, value_class, counts, unmatched))
            if not hit:
                continue
            for f in found:
                entry = per_file.setdefault(f, {"classes": set(), "votes": Counter(), "row": r, "cols": cols,
                                                "value": pv})
                entry["classes"] |= hit
                entry["votes"].update(hit)
    if not per_file:  # every row that names an image matched no class: `unmatched` holds their values
        common = ", ".join(f"{v!r}" for v, _ in unmatched.most_common(8))
        if counts["missing_file"] + counts["ambiguous_path"] == rows_total and rows_total:
            raise InputError(f"{spec.csv[0]}: none of its {rows_total} rows names an image found below {images} "
                             f"(first: {missing[0]!r}; --path-column {spec.path_column})")
        if spec.class_columns:
            raise InputError(f"--class-columns {spec.class_columns!r}: no row of {spec.csv[0]} reads 1 in any "
                             "of these columns")
        raise InputError(f"--classes {spec.classes!r}: matches no row of {spec.csv[0]} "
                         f"(values in '{spec.label_column}': {common or 'none'})")
    items: list[Item] = []
    views_skipped: Counter = Counter()
    source = spec.preset or "csv"
    for f in files:
        e = per_file.get(f)
        if e is None:
            continue
        if spec.agreement == "majority":  # the class more than half of the image's rows name
            cls, n = e["votes"].most_common(1)[0]
            if 2 * n <= named[f]:
                counts["no_majority"] += 1
                continue
        elif len(e["classes"]) > 1:
            counts["conflicting"] += 1
            continue
        else:
            cls = next(iter(e["classes"]))
        r, cols = e["row"], e["cols"]
        if cols["view_column"] or image_views is not None:
            view = normalise_view(r.get(cols["view_column"]) if cols["view_column"] else image_views.get(f.stem))
            if not view_allowed(view, views):
                views_skipped[view or "none"] += 1
                continue
        split = (_row_split(e, spec, f.relative_to(images).as_posix()) if test_names is None
                 else ("test" if f.name in test_names else "train"))
        if image_splits is not None:
            split = image_splits.get(f.stem, split)
        patient = (r.get(cols["patient_column"]) or "").strip() if cols["patient_column"] else ""
        patient = patient or _path_patient(e["value"]) or None
        it = file_item(f, cls, source, split, patient)
        if len(index.by_stem[f.stem]) > 1:  # CheXpert's view1_frontal.jpg in every study folder
            it.name = "_".join(f.relative_to(images).with_suffix("").parts)
        items.append(it)
    not_in_csv = [f for f in files if f not in named]
    if not items:
        raise InputError(f"{images}: no labelled image is left (views skipped: "
                         f"{dict(views_skipped) or 'none'}; conflicting labels: {counts['conflicting']})")
    _check_every_class_made(spec, classes, per_file, items, unmatched, views_skipped, counts, missing)
    private = any(it.dicom for it in items)
    report = {
        "files": [str(f) for f in spec.csv], "preset": spec.preset, "classes": spec.classes,
        "class_columns": spec.class_columns,
        "columns": {k: getattr(spec, k) for k in ("path_column", "label_column", "patient_column",
                                                   "split_column", "view_column")},
        "uncertain": spec.uncertain, "other": spec.other,
        "test_list": str(spec.test_list) if spec.test_list else None,
        "image_splits": str(spec.image_splits) if spec.image_splits else None,
        "image_views": str(spec.image_views) if spec.image_views else None,
        "rows": rows_total, "images": len(items),
        "missing_count": counts["missing_file"], "ambiguous_path_count": counts["ambiguous_path"],
        "not_in_csv_count": len(not_in_csv),
        "uncertain_rows": counts["uncertain"], "uncertain_dropped": counts["uncertain_dropped"],
        "conflicting_images": counts["conflicting"], "agreement": spec.agreement,
        "no_majority_images": counts["no_majority"],
        "unmatched_rows": sum(unmatched.values()),
        "unmatched_values": dict(unmatched.most_common(10)) if not private else None,
        # names from the sheet and the disk, so a user can find them; not with DICOM, whose
        # file names are often the patient id (RSNA)
        "missing_examples": missing[:20] if not private else None,
        "not_in_csv_examples": [str(f.relative_to(images)) for f in not_in_csv[:20]] if not private else None,
    }
    return Scan(items, ignored, skipped, "labels", dict(views_skipped)), report
