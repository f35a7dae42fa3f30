"""Find the images of a raw source and describe each one as an `Item` for `prepare`.

Layouts understood:
- split: `SRC/{train,val,test}/<class>/...` (the Kermany release; also nested a level or two
  deeper, as the Kaggle archive is), class folder names matched case-insensitively;
- folder: `SRC/<class>/...`, unsplit;
- MedMNIST `.npz` (`train_images`, `train_labels`, ... at any size);
- any of these folder layouts holding DICOM files (`.dcm`, or no extension and the DICM
  preamble) as well as or instead of image files;
- images anywhere under a folder, labelled by a CSV (`xraygan.labels`);
- an extra-normal folder (NIH ChestX-ray8), optionally with its `Data_Entry_2017.csv`;
- the procedural demo phantoms.
"""

from __future__ import annotations

import csv
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xraygan.dicom import is_dicom_file
from xraygan.errors import InputError
from xraygan.fsutil import RECORD_NAMES, xraygan_record
from xraygan.images import is_ignored, is_image_name

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "validate": "val", "test": "test", "testing": "test"}

# File-name patterns that carry a patient id: Kermany pneumonia (`person123_bacteria_45`),
# Kermany normal (`IM-0115-0001`, `NORMAL2-IM-1427-0001`), NIH ChestX-ray8 (`00000013_005`).
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^((?:normal2-)?im-\d+)-", re.IGNORECASE),
    re.compile(r"^(\d{8})_\d{3}$"),
)


def patient_id(stem: str) -> str | None:
    """The patient id a file name carries, or None. `person123_virus_7` → `person123`."""
    for pat in _PATIENT_PATTERNS:
        m = pat.match(stem)
        if m:
            return m.group(1).lower()
    return None


@dataclass
class Item:
    """One source image before decoding."""

    cls: str
    source: str  # "kermany", "folder", "medmnist", "extra-normal", "demo"
    split: str | None  # the split the source gave it, or None
    patient: str | None
    name: str  # output file stem
    ident: str  # how reports name it (a path, or `train[12]` for arrays)
    path: Path | None = None
    array: np.ndarray | None = None
    dicom: bool = False  # read with pydicom; its file name and header stay out of every output


def is_data_file(path: Path) -> bool:
    return is_image_name(path) or is_dicom_file(path)


def file_item(path: Path, cls: str | None, source: str, split: str | None,
              patient: str | None = None) -> Item:
    """An Item for a data file `list_files` found (an image or a DICOM, so a file that is not an
    image is a DICOM: its preamble is not read again). A DICOM's patient comes from its header
    when it is decoded."""
    dicom = not is_image_name(path)
    return Item(cls=cls, source=source, split=split,
                patient=patient if patient is not None or dicom else patient_id(path.stem),
                name=path.stem, ident=str(path), path=path, dicom=dicom)


@dataclass
class Scan:
    items: list[Item]
    ignored: int  # OS litter and other non-data files passed over silently
    skipped: list[dict]  # files that look like data but are not images
    layout: str
    views_skipped: dict[str, int] = field(default_factory=dict)  # view → images left out for it
    folders_left_out: dict[str, int] = field(default_factory=dict)  # class folder → images, not in --classes


def list_files(root: Path) -> tuple[list[Path], int, list[dict]]:
    """Image files below root (recursive, sorted), ignored count, skipped non-images. Folders
    that hold an xraygan record (an earlier prepare, generate, ...) are passed over whole."""
    files, ignored, skipped = [], 0, []
    rec = xraygan_record(root)
    if rec is not None:
        raise InputError(f"{root}: holds {rec.name}, an xraygan output, not raw data")
    listing = sorted(root.rglob("*"))  # one walk of the tree (a large source is slow to walk)
    outputs = {p.parent for p in listing if p.name in RECORD_NAMES and xraygan_record(p.parent) is not None}
    for p in listing:
        if not p.is_file():
            continue
        if outputs and any(o in p.parents for o in outputs):
            ignored += 1
            continue
        if is_ignored(p.relative_to(root)):
            ignored += 1
        elif is_data_file(p):
            files.append(p)
        elif p.suffix.lower() in (".csv", ".txt", ".md", ".json", ".pdf", ".xlsx"):
            ignored += 1  # metadata that travels with a download
        else:
            skipped.append({"file": str(p), "reason": f"not an image file (extension '{p.suffix}')"})
    return files, ignored, skipped


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not is_ignored(Path(p.name))
                  and xraygan_record(p) is None)


def _split_dirs(d: Path) -> dict[str, Path]:
    out = {}
    for p in _subdirs(d):
        s = SPLIT_NAMES.get(p.name.lower())
        if s is not None:
            if s in out:
                raise InputError(f"{d}: two folders for the {s} split ({out[s].name}, {p.name})")
            out[s] = p
    return out if "train" in out else {}


def find_layout(src: Path) -> tuple[str, Path]:
    """('split', root) or ('folder', root); searches two levels down for a split layout."""
    if not src.exists():
        raise InputError(f"{src}: folder not found")
    if not src.is_dir():
        raise InputError(f"{src}: not a folder (give a folder of images, or --medmnist FILE.npz)")
    rec = xraygan_record(src)
    if rec is not None:
        raise InputError(f"{src}: holds {rec.name}, so it is xraygan output, not raw data "
                         "(give the original folder)")
    level = [src]
    for _ in range(3):
        for d in level:
            if _split_dirs(d):
                return "split", d
        level = [c for d in level for c in _subdirs(d)]
    classes = _subdirs(src)
    if classes and any(is_data_file(f) for c in classes for f in c.rglob("*")):
        return "folder", src
    raise InputError(f"{src}: unknown layout (expected SRC/train/<class>/ and SRC/test/<class>/ "
                     "image folders, or SRC/<class>/ image folders)")


def _class_dirs(d: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in _subdirs(d):
        c = p.name.lower()
        if c in out:
            raise InputError(f"{d}: class folders {out[c].name} and {p.name} differ only in case")
        out[c] = p
    return out


def _map_class_dirs(where: Path, cdirs: dict[str, Path], folder_class: Callable[[str], str | None],
                    wanted: tuple[str, ...], left_out: dict[str, int]) -> dict[str, list[Path]]:
    """One split's class folders under --classes: class → its folders (several merge), the
    others counted in `left_out`; a class with no folder here is refused, naming the folders."""
    out: dict[str, list[Path]] = {}
    for _, d in sorted(cdirs.items()):
        c = folder_class(d.name)
        if c is None:
            left_out[d.name] = left_out.get(d.name, 0) + len(list_files(d)[0])
        else:
            out.setdefault(c, []).append(d)
    for c in wanted:
        if c not in out:
            raise InputError(f"{where}: no class folder is named as --classes gives class {c} "
                             f"(folders: {', '.join(d.name for d in cdirs.values()) or 'none'})")
    return out


def scan_folder_source(src: Path, folder_class: Callable[[str], str | None] | None = None,
                       wanted: tuple[str, ...] = ()) -> Scan:
    """Class folders, in a split layout or not. With `folder_class` (from --classes: a folder's
    name → its class, or None to leave it out) the classes are `wanted`, each made of the
    folders named for it; without, every folder is a class of its own (lower-cased name)."""
    kind, root = find_layout(Path(src))
    items: list[Item] = []
    ignored, skipped = 0, []
    left_out: dict[str, int] = {}
    if kind == "split":
        splits = {s: _class_dirs(d) for s, d in _split_dirs(root).items()}
        if folder_class is not None:
            grouped = {s: _map_class_dirs(_split_dirs(root)[s], cdirs, folder_class, wanted, left_out)
                       for s, cdirs in splits.items()}
        else:
            classes = sorted(set().union(*(set(c) for c in splits.values())))
            if len(classes) < 2:
                raise InputError(f"{root}: need at least two class folders, found {classes or 'none'}")
            for s, cdirs in splits.items():
                for c in classes:
                    if c not in cdirs:
                        raise InputError(f"{root / _split_dirs(root)[s].name}: class folder '{c}' is "
                                         f"missing (found: {', '.join(sorted(cdirs)) or 'none'})")
            grouped = {s: {c: [d] for c, d in cdirs.items()} for s, cdirs in splits.items()}
    else:
        cdirs = _class_dirs(root)
        if folder_class is not None:
            grouped = {None: _map_class_dirs(root, cdirs, folder_class, wanted, left_out)}
        else:
            if len(cdirs) < 2:
                raise InputError(f"{root}: need at least two class folders, found {sorted(cdirs)}")
            grouped = {None: {c: [d] for c, d in cdirs.items()}}
    for s, by_class in grouped.items():
        for c, dirs in sorted(by_class.items()):
            for d in dirs:
                files, ign, skip = list_files(d)
                ignored += ign
                skipped += skip
                if not files:
                    raise InputError(f"{d}: class folder holds no images")
                items += [file_item(f, c, "kermany" if kind == "split" else "folder", s) for f in files]
    return Scan(items, ignored, skipped, kind, folders_left_out=left_out)


def scan_medmnist(path: Path, class_names: tuple[str, ...] | None = None) -> Scan:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz file ({e})") from None
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in keys]
    if not splits or any(f"{s}_labels" not in keys for s in splits):
        raise InputError(f"{path}: not a MedMNIST file (expected keys train_images, train_labels, "
                         f"...; found {', '.join(sorted(keys))})")
    try:
        arrays = {s: (data[f"{s}_images"], data[f"{s}_labels"].reshape(-1)) for s in splits}
    except (ValueError, OSError, zipfile.BadZipFile) as e:  # e.g. object arrays (pickles)
        raise InputError(f"{path}: cannot read its arrays ({e})") from None
    for s, (x, y) in arrays.items():
        if y.dtype.kind not in "iu" or not len(y):
            raise InputError(f"{path}: {s}_labels must be non-empty integers (found {y.dtype}, {len(y)} values)")
        if y.min() < 0:
            raise InputError(f"{path}: {s}_labels has negative labels")
    labels = sorted(set().union(*(set(np.unique(y).tolist()) for _, y in arrays.values())))
    if class_names is None:
        class_names = ("normal", "pneumonia") if labels == [0, 1] else tuple(
            f"class{i}" for i in range(max(labels) + 1))
    if max(labels) >= len(class_names):
        raise InputError(f"{path}: labels go up to {max(labels)} but only {len(class_names)} "
                         "class names were given")
    items = []
    for s, (x, y) in arrays.items():
        if x.ndim not in (3, 4) or x.dtype != np.uint8 or len(x) != len(y):
            raise InputError(f"{path}: {s}_images has shape {x.shape} {x.dtype}, expected "
                             "(N, H, W) or (N, H, W, 3) uint8 matching the labels")
        if x.ndim == 4:  # RGB MedMNIST sets: ITU-R 601 luma, as for RGB files
            x = np.round(x[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114],
                                                                   np.float32)).astype(np.uint8)
        for i in range(len(x)):
            items.append(Item(cls=class_names[int(y[i])], source="medmnist", split=s,
                              patient=None, name=f"{s}-{i:05d}", ident=f"{path.name}:{s}[{i}]",
                              array=x[i]))
    return Scan(items, 0, [], "medmnist")


def scan_extra_normal(src: Path, count: int | None, rng: np.random.Generator,
                      csv_path: Path | None = None) -> Scan:
    """Healthy images to add to the normal class (NIH ChestX-ray8 or any folder of images).

    With a `Data_Entry_2017.csv` (given, or found in the folder or its parent) only rows whose
    "Finding Labels" is "No Finding" are taken, and the CSV's patient ids are used.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: extra-normal folder not found")
    files, ignored, skipped = list_files(src)
    if csv_path is None:
        for cand in (src / "Data_Entry_2017.csv", src.parent / "Data_Entry_2017.csv"):
            if cand.is_file():
                csv_path = cand
                break
    patients: dict[str, str] = {}
    if csv_path is not None:
        try:
            with open(csv_path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except OSError as e:
            raise InputError(f"{csv_path}: cannot read ({e.strerror})") from None
        if not rows or "Image Index" not in rows[0] or "Finding Labels" not in rows[0]:
            raise InputError(f"{csv_path}: expected columns 'Image Index' and 'Finding Labels'")
        healthy = {r["Image Index"]: (r.get("Patient ID") or "").strip()
                   for r in rows if r["Finding Labels"].strip() == "No Finding"}
        files = [f for f in files if f.name in healthy]
        patients = {k: f"nih{int(v):08d}" if v.isdigit() else v for k, v in healthy.items() if v}
    if not files:
        raise InputError(f"{src}: no usable images for --extra-normal"
                         + (f" (none marked 'No Finding' in {csv_path})" if csv_path else ""))
    if count is not None and count < len(files):
        pick = np.sort(rng.choice(len(files), size=count, replace=False))
        files = [files[i] for i in pick]
    items = [Item(cls="normal", source="extra-normal", split=None,
                  patient=patients.get(f.name) or patient_id(f.stem), name=f.stem,
                  ident=str(f), path=f) for f in files]
    return Scan(items, ignored, skipped, "extra-normal")


def scan_sample() -> tuple[Scan, dict]:
    """The real sample shipped with the package (xraygan.sample), with its splits and patients."""
    from xraygan.sample import load_sample

    splits, info = load_sample()
    classes = info["classes"]
    items = [Item(cls=classes[int(sp.labels[i])], source="kermany-sample", split=s, patient=sp.patients[i],
                  name=Path(sp.files[i]).stem, ident=f"sample:{sp.files[i]}", array=sp.images[i])
             for s, sp in splits.items() for i in range(len(sp.labels))]
    return Scan(items, 0, [], "sample"), info


def scan_demo(count_per_class: int, seed: int) -> Scan:
    from xraygan.phantom import demo_images

    items = [Item(cls=c, source="demo", split=None, patient=p, name=f"demo-{p}-{i:05d}",
                  ident=f"demo[{i}]", array=a)
             for i, (c, p, a) in enumerate(demo_images(count_per_class, 128, seed))]
    return Scan(items, 0, [], "demo")
