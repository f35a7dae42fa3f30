"""`xraygan prepare`: raw data → `OUT/{train,val,test}/<class>/*.png` + `OUT/dataset.json`.

Steps: scan the source(s) → decode every image to size×size gray in worker processes, each
written at once as a PNG into the staging folder (memory stays bounded: only a 16-byte pixel
digest per image comes back) → find exact duplicates → group images by patient and duplicate →
keep the source's splits, carving val (and test, for unsplit sources) by group → cut the
training split to the requested imbalance → rename each PNG to its split and class, and the
staging folder into place at the end. An interrupted run leaves only the hidden staging
folder, removed by the next run.

DICOM sources: file names and header values never reach an output. A DICOM image is named
`<patient hash>-<image hash>`, both salted with a digest of every SOPInstanceUID (or path) in
the source plus `--salt`, which nobody holding only the outputs can recompute; the same source
gives the same names again.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xraygan import __version__
from xraygan.dicom import DicomSkip, read_dicom
from xraygan.errors import InputError
from xraygan.fsutil import atomic_write_json, check_out_apart, check_output_free, record_header, staged_dir
from xraygan.images import SQUARE_MODES, encode_png, load_gray, make_square, resize_gray
from xraygan.labels import LabelSpec, norm_value, parse_classes, scan_labelled
from xraygan.options import given_options, opt
from xraygan.phantom import DEMO_NOTE
from xraygan.sample import SHA256 as SAMPLE_SHA256
from xraygan.sources import (
    Item,
    Scan,
    scan_demo,
    scan_extra_normal,
    scan_folder_source,
    scan_medmnist,
    scan_sample,
)

SPLITS = ("train", "val", "test")
Progress = Callable[[str, int, int], None]


def _keep(values: list[str]) -> tuple[tuple[str, int], ...]:
    out = []
    for v in values:
        cls, sep, n = v.partition("=")
        if not sep or not n.strip().isdigit():
            raise InputError(f"--keep '{v}': expected CLASS=COUNT, e.g. pneumonia=1460")
        out.append((cls.strip().lower(), int(n)))
    return tuple(out)


def _fractions(v: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in v.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(math.isfinite(f) for f in parts):
        raise InputError(f"--split '{v}': expected three fractions, e.g. 0.8,0.1,0.1")
    return parts  # type: ignore[return-value]


def _words(v: str | None) -> tuple[str, ...] | None:
    return None if v is None else tuple(x.strip() for x in v.split(",") if x.strip())


def _comma(v) -> str | None:
    return None if v is None else ",".join(map(str, v))


@dataclass(frozen=True, kw_only=True)  # SRC is optional and comes first, --out is required
class PrepareConfig:
    src: Path | None = opt(None, "Raw data: the Kermany chest_xray/ folder (train/test/<CLASS>/), any "
                                 "SRC/<class>/ folder, a folder of DICOM files labelled by a CSV, or a MedMNIST "
                                 ".npz.", argument=True, show_default=False)
    out: Path = opt(help="Output dataset folder.", flags=("--out", "-o"))
    medmnist: Path | None = opt(None, "A MedMNIST .npz file as the source.")
    sample: bool = opt(False, "Use the real sample shipped with xraygan: 1,600 Kermany chest X-rays at 64 px "
                              "(CC BY 4.0), split by patient; --size 64 or less.", flags=("--sample",))
    demo: bool = opt(False, "Use procedural phantom X-rays (synthetic, for tests; not for medical conclusions). "
                            "--demo is its old name.", flags=("--phantom", "--demo"))
    demo_count: int = opt(300, "Phantom images per class.")
    size: int = opt(64, "Output image size in pixels (square).")
    square: str = opt("crop", "How to make images square: crop (center) or pad.")
    keep: tuple[tuple[str, int], ...] = opt(
        (), "Keep only COUNT images of CLASS in the training split, chosen at random with the seed, e.g. "
            "--keep pneumonia=1460. Repeatable.", cli=list[str], parse=_keep,
        text=lambda v: [f"{c}={n}" for c, n in v])
    imbalance: float | None = opt(None, "Cut the --minority class in the training split to (largest other "
                                        "class)/R; --imbalance 3 gives the study's 3:1 normal:pneumonia.")
    minority: str = opt("pneumonia", "The class --imbalance cuts.")
    extra_normal: Path | None = opt(None, "Folder of extra healthy images (e.g. NIH ChestX-ray8; with "
                                          "Data_Entry_2017.csv only 'No Finding' rows are used), added to the "
                                          "normal class in train/val.")
    extra_normal_count: int | None = opt(None, "At most this many extra-normal images (chosen at random with "
                                               "the seed).")
    extra_normal_splits: tuple[str, ...] = opt(
        ("train", "val"), "Splits the extra-normal images go to, by patient: train,val (the source's test split "
                          "stays as published) or train,val,test (the study's pooled protocol: then evaluate "
                          "reports results per source).", cli=str, parse=_words, text=_comma)
    split: tuple[float, float, float] = opt((0.8, 0.1, 0.1), "train,val,test fractions for sources that have "
                                            "no splits.", cli=str, parse=_fractions, text=_comma)
    val_fraction: float = opt(0.1, "Share of train carved out (by patient) as val when the source has no val "
                                   "split.")
    min_val: int = 50  # a source val split smaller than this is folded into train
    classes: str | None = opt(None, "With --labels: which label values mean which class, CLASS=VALUE[|VALUE...] "
                                    "separated by ';' (\"pneumonia=Pneumonia;normal=No Finding\", "
                                    "\"pneumonia=1;normal=0|(blank)\"). With class folders: which folders mean "
                                    "which class, the same way (\"pneumonia=bacterial|viral;normal=0 - Normal\"; "
                                    "other folders are left out and counted). With MedMNIST: comma-separated "
                                    "names for labels 0,1,... (default normal,pneumonia).")
    label_csv: tuple[Path, ...] = opt((), "A CSV that labels the images below SRC (repeatable: CheXpert's "
                                          "train.csv and valid.csv). See --path-column, --label-column, "
                                          "--classes, or --preset.", flags=("--labels",))
    preset: str | None = opt(None, "The column layout of a public release: rsna (stage_2_train_labels.csv), nih "
                                   "(Data_Entry_2017.csv, with test_list.txt as the test split), chexpert "
                                   "(train.csv, valid.csv), padchest (PADCHEST_..._labels_160K_01.02.19.csv, "
                                   "findings as a list), vindr (image_labels_train.csv and _test.csv, a row per "
                                   "reader), mimic (MIMIC-CXR or -JPG 2.0.0: "
                                   "mimic-cxr-2.0.0-chexpert.csv.gz, one row per study, with the -split and "
                                   "-metadata sheets for the official split and the views). Found beside SRC or "
                                   "in its parent unless --labels is given; any column option overrides the "
                                   "preset's.")
    path_column: str | None = opt(None, "CSV column naming the image: a path below SRC, a file name, or a name "
                                        "without extension.")
    label_column: str | None = opt(None, "CSV column holding the label.")
    class_columns: str | None = opt(None, "Instead of --label-column and --classes, for sheets with a 0/1 column per "
                                          "finding (CheXpert, MIMIC-CXR): which column means which class, "
                                          "CLASS=COLUMN[|COLUMN...] separated by ';' (\"pneumonia=Pneumonia;normal=No "
                                          "Finding\"); a row is of the class whose column reads 1 (-1 by "
                                          "--uncertain).")
    patient_column: str | None = opt(None, "CSV column holding the patient id (default: DICOM PatientID, else "
                                           "the path or file name).")
    split_column: str | None = opt(None, "CSV column holding train/val/test, or '(path)': the train/valid/test "
                                         "folder in the image's path (default: split by patient).")
    view_column: str | None = opt(None, "CSV column holding the view (PA, AP, LATERAL, Frontal/Lateral); DICOMs "
                                        "use ViewPosition.")
    test_list: Path | None = opt(None, "File of image names, one a line, that form the test split (NIH's "
                                       "test_list.txt); the other images are train, and val is carved from "
                                       "train by patient.")
    uncertain: str = opt("ignore", "Label -1 (CheXpert's uncertain): ignore (drop the image), positive (read as "
                                   "1) or negative (read as 0): the paper's U-Ignore, U-Ones, U-Zeros.")
    agreement: str | None = opt(None, "Several rows for one image (one per reader, as VinDr-CXR writes them): "
                                      "unanimous (rows naming different classes drop the image; rows naming "
                                      "none do not count) or majority (the class more than half of its rows "
                                      "name). Default: unanimous; majority for --preset vindr.")
    other: str | None = opt(None, "A class name for images whose label matches no class (other findings); "
                                  "default: left out, and counted in dataset.json.")
    views: tuple[str, ...] | None = opt(None, "Keep only these views, e.g. PA,AP (images without a view are "
                                              "then left out too); default: all but lateral views, which are "
                                              "counted in dataset.json.", cli=str | None, parse=_words,
                                        text=_comma)
    salt: str = opt("", "A secret mixed into the hashed DICOM patient and image names (never written); give "
                        "the same one to link exports of the same patients.", envvar="XRAYGAN_SALT",
                    show_default=False)
    seed: int = opt(0, "Seed for splits, imbalance and demo data.")
    workers: int = opt(0, "Decoding processes (0 = one per CPU core).")
    strict: bool = opt(False, "Stop at the first unreadable file instead of skipping it.")
    force: bool = opt(False, "Replace an existing output folder.")

    def __post_init__(self):
        for name in ("minority", "preset", "uncertain", "agreement", "other"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, getattr(self, name).lower())

    @property
    def labels(self) -> LabelSpec | None:
        """SRC's images labelled by a CSV (--labels / --preset / a column option), else None."""
        described = [getattr(self, n) for n in ("path_column", "label_column", "class_columns", "patient_column",
                                                "split_column", "view_column", "test_list", "other")]
        if not self.label_csv and self.preset is None and all(v is None for v in described):
            return None
        return LabelSpec(csv=tuple(self.label_csv), preset=self.preset, path_column=self.path_column,
                         label_column=self.label_column, classes=self.classes, class_columns=self.class_columns,
                         patient_column=self.patient_column,
                         split_column=self.split_column, view_column=self.view_column, uncertain=self.uncertain,
                         agreement=self.agreement, other=self.other, test_list=self.test_list)

    @property
    def medmnist_source(self) -> Path | None:
        """The MedMNIST .npz file this run reads: --medmnist, or SRC when it names an .npz file (a
        folder that happens to end in .npz stays a folder)."""
        if self.medmnist is not None:
            return self.medmnist
        src = self.src
        return src if src is not None and src.suffix == ".npz" and not src.is_dir() else None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """--classes for a MedMNIST source: the names of labels 0, 1, ... (for class folders and
        label sheets it says which names or values mean which class)."""
        return _words(self.classes) if self.classes and self.labels is None else None

    def validate(self) -> None:
        given = ([x for x in (self.src, self.medmnist) if x is not None] + ([1] if self.demo else [])
                 + ([1] if self.sample else []))
        if len(given) != 1:
            raise InputError("give exactly one source: SRC, --medmnist FILE.npz, --sample or --phantom")
        if self.sample and self.size > 64:
            raise InputError(f"--size {self.size}: the shipped sample is 64 px; use --size 64 or less")
        if not 8 <= self.size <= 1024:
            raise InputError(f"--size {self.size}: must be between 8 and 1024")
        if self.square not in SQUARE_MODES:
            raise InputError(f"--square {self.square}: must be one of {', '.join(SQUARE_MODES)}")
        if self.keep and self.imbalance is not None:
            raise InputError("give either --keep or --imbalance, not both")
        if self.imbalance is not None and self.imbalance <= 0:
            raise InputError(f"--imbalance {self.imbalance}: must be positive")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise InputError(f"--split {self.split}: three fractions that sum to 1")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.demo_count < 4:
            raise InputError(f"--demo-count {self.demo_count}: must be at least 4")
        if self.extra_normal_count is not None and self.extra_normal_count < 1:
            raise InputError(f"--extra-normal-count {self.extra_normal_count}: must be at least 1")
        if not self.extra_normal_splits or any(x not in SPLITS for x in self.extra_normal_splits):
            raise InputError(f"--extra-normal-splits {','.join(self.extra_normal_splits)}: a comma list "
                             "of train, val, test")
        if self.workers < 0:
            raise InputError(f"--workers {self.workers}: must be 0 (one per core) or more")
        if any(n < 0 for _, n in self.keep):
            raise InputError("--keep: counts must not be negative")
        if self.labels is not None:
            lab = self.labels
            if not lab.csv and lab.preset is None:
                given = [o for o, v in (("--path-column", lab.path_column), ("--label-column", lab.label_column),
                                        ("--class-columns", lab.class_columns), ("--patient-column", lab.patient_column),
                                        ("--split-column", lab.split_column), ("--view-column", lab.view_column),
                                        ("--test-list", lab.test_list), ("--other", lab.other)) if v is not None]
                raise InputError(f"{', '.join(given)}: describe a label CSV; give --labels FILE.csv or --preset")
            if self.src is None or self.medmnist_source is not None:
                raise InputError("--labels/--preset label the images of a folder: give that folder as SRC")
        # an option whose subject is absent would be passed over without a word
        needs = {"extra_normal_count": (self.extra_normal, "--extra-normal DIR"),
                 "extra_normal_splits": (self.extra_normal, "--extra-normal DIR"),
                 "uncertain": (self.labels, "a label sheet (--labels or --preset)"),
                 "agreement": (self.labels, "a label sheet (--labels or --preset)"),
                 "minority": (self.imbalance, "--imbalance R")}
        for name, text in given_options(self, *needs).items():
            if needs[name][0] is None:
                raise InputError(f"{text}: only applies with {needs[name][1]}, which was not given")
        if self.classes and (self.sample or self.demo):
            raise InputError("--classes: the shipped sample and the phantoms have their classes; it names the "
                             "classes of class folders, a label sheet or a MedMNIST file")
        if (self.classes and self.extra_normal is not None
                and "normal" not in (self.class_names if self.medmnist_source else parse_classes(self.classes))):
            raise InputError(f"--extra-normal adds to class normal, which --classes {self.classes!r} does not "
                             "name")
        if self.views is not None and (not self.views or any(not re.fullmatch(r"\w+", v) for v in self.views)):
            raise InputError(f"--views {','.join(self.views)}: a comma list of view positions, e.g. PA,AP")
        # before anything is read: the output is never the source, inside it or above it, and
        # --force replaces only an earlier prepare output
        csvs = self.labels.csv if self.labels is not None else ()
        check_out_apart(self.out, src=self.src, medmnist=self.medmnist, extra_normal=self.extra_normal,
                        test_list=self.labels.test_list if self.labels is not None else None,
                        **{f"labels{i or ''}": p for i, p in enumerate(csvs)})
        check_output_free(self.out, self.force, "prepare")


def wanted_views(cfg: PrepareConfig) -> tuple[str, ...] | None:
    """--views as the DICOM header and the label sheets are compared with it (upper case)."""
    return tuple(v.upper() for v in cfg.views) if cfg.views is not None else None


def _decode_job(job: tuple) -> tuple:
    """Decode one file and write its PNG as `dest`: (digest, reason, skipped view, patient, key).
    Decoding problems are the file's (a reason); a refused write is the machine's and is raised."""
    path, dicom, size, square, views, dest = job
    patient = key = None
    try:
        if dicom:
            d = read_dicom(path, size, square, views)
            a, patient, key = d.pixels, d.patient, d.key
        else:
            a = load_gray(path, size, square)
    except DicomSkip as e:
        return None, None, e.view, None, None
    except ValueError as e:
        return None, str(e), None, None, None
    except OSError as e:  # vanished or unreadable on disk
        return None, (e.strerror or str(e)), None, None, None
    Path(dest).write_bytes(encode_png(a))
    return hashlib.blake2b(a.tobytes(), digest_size=16).digest(), None, None, patient, key


@dataclass
class Decoded:
    """What decoding left: the readable items with their PNGs in `work`, digests, the rest."""

    items: list[Item]
    pngs: list[Path]
    hashes: list[bytes]
    keys: list[str]  # DICOM SOPInstanceUIDs (salt material), "" for other items
    skipped: list[tuple[Item, str]]
    views_skipped: Counter


def decode_items(items: list[Item], cfg: PrepareConfig, work: Path, progress: Progress | None = None
                 ) -> Decoded:
    """Decode every item into `work/NNNNNNN.png`, files in worker processes fed lazily (a
    100,000-image source is never a list of arrays or of pending futures)."""
    views = wanted_views(cfg)
    total = len(items)
    jobs = [(i, it) for i, it in enumerate(items) if it.path is not None]
    results: dict[int, tuple] = {}
    done = 0

    def tick() -> None:
        if progress and (done % 32 == 0 or done == total):
            progress("decode", done, total, images=done)

    tick()  # the clock starts before the first image, so starting the workers counts in the pace
    for i, it in enumerate(items):  # in-memory sources (MedMNIST, sample, phantoms)
        if it.path is None:
            a = resize_gray(make_square(it.array, cfg.square), cfg.size)
            (work / f"{i:07d}.png").write_bytes(encode_png(a))
            results[i] = (hashlib.blake2b(a.tobytes(), digest_size=16).digest(), None, None, None, None)
            done += 1
            tick()
    args = ((it.path, it.dicom, cfg.size, cfg.square, views, work / f"{i:07d}.png") for i, it in jobs)
    workers = cfg.workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) >= 64:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            chunk = max(4, min(64, len(jobs) // (workers * 16)))
            for (i, _), r in zip(jobs, pool.imap(_decode_job, args, chunksize=chunk)):
                results[i] = r
                done += 1
                tick()
    else:
        for (i, _), job in zip(jobs, args):
            results[i] = _decode_job(job)
            done += 1
            tick()
    out = Decoded([], [], [], [], [], Counter())
    for i, it in enumerate(items):
        digest, reason, view, patient, key = results[i]
        if view is not None:
            out.views_skipped[view] += 1
        elif digest is None:
            out.skipped.append((it, reason))
        else:
            if it.dicom and it.patient is None:  # a CSV's patient column wins over the header
                it.patient = patient or it.path.stem  # no PatientID: the file is its own patient
            out.items.append(it)
            out.pngs.append(work / f"{i:07d}.png")
            out.hashes.append(digest)
            out.keys.append(key or "")
    if progress:
        progress("decode", total, total, images=total)
    return out


def _salted(salt: bytes, value: str) -> str:
    return hashlib.blake2b(value.encode("utf-8"), digest_size=5, key=salt).hexdigest()


def dicom_salt(items: list[Item], keys: list[str], user_salt: str) -> bytes:
    """A key for the DICOM name hashes that only the source can give: a digest of every image's
    SOPInstanceUID (or path), plus the user's --salt. Same source, same names."""
    h = hashlib.blake2b(digest_size=32)
    for k in sorted(k or str(it.path) for it, k in zip(items, keys) if it.dicom):
        h.update(k.encode("utf-8") + b"\n")
    h.update(user_salt.encode("utf-8"))
    return h.digest()


def public_names(items: list[Item], keys: list[str], skipped: list[Item], salt: bytes) -> None:
    """Give DICOM items hashed output names and idents (in place); other items keep theirs."""
    for it, k in zip(items, keys):
        if it.dicom:
            it.name = f"{_salted(salt, 'patient:' + str(it.patient))}-{_salted(salt, 'image:' + (k or str(it.path)))}"
            it.ident = f"dicom:{it.name}"
    for it in skipped:
        if it.dicom:
            it.ident = f"dicom:file-{_salted(salt, 'file:' + str(it.path))}"


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


_SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2, None: 3}


def find_duplicates(items: list[Item], hashes: list[bytes]) -> tuple[list[int], dict]:
    """Exact duplicates (same pixels after resizing).

    A duplicate that the source put in two different splits would leak between them: only the
    copies in the most protected split (test, then val, then train) are kept. Returns the
    indices to drop and a report.
    """
    by_hash: dict[bytes, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        by_hash[h].append(i)
    groups = [g for g in by_hash.values() if len(g) > 1]
    drop: list[int] = []
    conflicts = 0
    for g in groups:
        splits = {items[i].split for i in g}
        if len(splits) > 1:
            best = min(splits, key=lambda s: _SPLIT_PRIORITY[s])
            drop += [i for i in g if items[i].split != best]
        if len({items[i].cls for i in g}) > 1:
            conflicts += 1
    report = {"groups": len(groups), "images": sum(len(g) for g in groups),
              "dropped_across_splits": len(drop), "label_conflict_groups": conflicts,
              "dropped_files": sorted(items[i].ident for i in drop)}
    return sorted(drop), report


def group_items(items: list[Item], hashes: list[bytes]) -> list[int]:
    """A group id per item: same patient (within a source and source split) or same pixels."""
    uf = _UnionFind(len(items))
    first: dict[object, int] = {}
    for i, (it, h) in enumerate(zip(items, hashes)):
        keys: list[object] = [h]
        if it.patient is not None:
            keys.append((it.source, it.split, it.patient))
        for k in keys:
            if k in first:
                uf.union(first[k], i)
            else:
                first[k] = i
    return [uf.find(i) for i in range(len(items))]


def split_groups(idx: list[int], items: list[Item], groups: list[int],
                 fractions: dict[str, float], rng: np.random.Generator) -> dict[str, list[int]]:
    """Assign whole groups to splits, per class (a group's majority class), by fractions."""
    members: dict[int, list[int]] = defaultdict(list)
    for i in idx:
        members[groups[i]].append(i)
    by_class: dict[str, list[int]] = defaultdict(list)
    for g, m in members.items():
        by_class[Counter(items[i].cls for i in m).most_common(1)[0][0]].append(g)
    out: dict[str, list[int]] = {s: [] for s in fractions}
    names = list(fractions)
    for c in sorted(by_class):
        gs = sorted(by_class[c])
        rng.shuffle(gs)
        total = sum(len(members[g]) for g in gs)
        bounds = np.cumsum([fractions[s] for s in names]) * total
        done = 0
        for g in gs:
            s = next((n for n, b in zip(names, bounds) if done < b - 1e-9), names[-1])
            out[s] += members[g]
            done += len(members[g])
    return out


def _scan(cfg: PrepareConfig, rng: np.random.Generator) -> tuple[list[Scan], list[dict], dict | None]:
    """The source(s) as Items, their descriptions for the record, and the label-CSV report."""
    labels = None
    if cfg.sample:
        scan, info = scan_sample()
        src_desc = {"kind": "sample", "name": "kermany_sample_64", "sha256": SAMPLE_SHA256,
                    "license": info["license"], "citation": info["source"]}
    elif cfg.demo:
        scan = scan_demo(cfg.demo_count, cfg.seed)
        src_desc = {"kind": "demo", "count_per_class": cfg.demo_count}
    elif (path := cfg.medmnist_source) is not None:
        scan = scan_medmnist(path, cfg.class_names)
        src_desc = {"kind": "medmnist", "path": str(path)}
    elif cfg.labels is not None:
        scan, labels = scan_labelled(cfg.src, cfg.labels, wanted_views(cfg))
        src_desc = {"kind": labels["preset"] or "csv", "path": str(cfg.src)}
    else:
        folder_class, wanted = None, ()
        if cfg.classes:  # which folder names mean which class, as a sheet's values do
            mapping = parse_classes(cfg.classes)
            value_class = {v: c for c, vals in mapping.items() for v in vals}
            wanted = tuple(mapping)

            def folder_class(name: str) -> str | None:
                return value_class.get(norm_value(name))
        scan = scan_folder_source(cfg.src, folder_class, wanted)
        src_desc = {"kind": scan.layout, "path": str(cfg.src)}
        if cfg.classes:
            src_desc["classes"] = cfg.classes
    if cfg.views is not None and not any(it.dicom for it in scan.items) and not (
            labels and (labels["columns"]["view_column"] or labels["image_views"])):
        raise InputError(f"--views {','.join(cfg.views)}: {cfg.src or cfg.medmnist or 'the source'} gives no "
                         "view for its images (views come from DICOM headers or a label sheet's --view-column)")
    scans: list[Scan] = [scan]
    sources = [src_desc]
    if cfg.extra_normal is not None:
        extra = scan_extra_normal(cfg.extra_normal, cfg.extra_normal_count, rng)
        scans.append(extra)
        sources.append({"kind": "extra-normal", "path": str(cfg.extra_normal), "count": len(extra.items)})
    return scans, sources, labels


def _assign_splits(cfg: PrepareConfig, items: list[Item], groups: list[int], rng: np.random.Generator
                   ) -> tuple[list[str | None], bool, list[str]]:
    """Each item's split: the source's where it has them, val carved from train by patient when
    the source has none worth keeping, the rest split by patient by fractions."""
    notes: list[str] = []
    split_of: list[str | None] = [it.split for it in items]
    main_given = {it.split for it in items if it.source != "extra-normal"} - {None}
    if main_given and "test" not in main_given:  # CheXpert: train and valid only (its test set is private)
        notes.append("the source has no test split: test carved from train by patient "
                     f"({cfg.split[2]:.0%}, --split)")
        carved = split_groups([i for i, s in enumerate(split_of) if s == "train"], items, groups,
                              {"train": 1 - cfg.split[2], "test": cfg.split[2]}, rng)
        for i in carved["test"]:
            split_of[i] = "test"
        main_given.add("test")
    val_count = sum(1 for s in split_of if s == "val")
    val_carved = bool(main_given) and val_count < cfg.min_val
    if val_carved:
        if val_count:
            notes.append(f"the source's val split has only {val_count} images (< {cfg.min_val}):"
                         " folded into train, and val carved from train by patient")
        split_of = ["train" if s == "val" else s for s in split_of]
        train_idx = [i for i, s in enumerate(split_of) if s == "train"]
        carved = split_groups(train_idx, items, groups,
                              {"train": 1 - cfg.val_fraction, "val": cfg.val_fraction}, rng)
        for i in carved["val"]:
            split_of[i] = "val"
    # extra images are split on their own, by patient, into the splits named for them: pooling
    # them never changes the primary source's splits (default train and val, so the source's
    # test split stays comparable with published numbers)
    extra = [i for i, s in enumerate(split_of) if s is None and items[i].source == "extra-normal"]
    if extra:
        named = [x for x in SPLITS if x in cfg.extra_normal_splits]
        weights = dict(zip(SPLITS, cfg.split))
        total = sum(weights[x] for x in named) or 1.0
        for s, idx in split_groups(extra, items, groups, {x: weights[x] / total for x in named}, rng).items():
            for i in idx:
                split_of[i] = s
    unsplit = [i for i, s in enumerate(split_of) if s is None]
    if unsplit:
        if "test" in main_given:  # keep the source's test split as it is (comparable numbers)
            tr, va, _ = cfg.split
            fr = {"train": tr / (tr + va), "val": va / (tr + va)}
        else:
            fr = dict(zip(SPLITS, cfg.split))
        for s, idx in split_groups(unsplit, items, groups, fr, rng).items():
            for i in idx:
                split_of[i] = s
    return split_of, val_carved, notes


def _cut_imbalance(cfg: PrepareConfig, items: list[Item], split_of: list[str | None], classes: list[str],
                   rng: np.random.Generator) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Mark training images removed to make the requested imbalance (in place in `split_of`)."""
    train_by_class: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(split_of):
        if s == "train":
            train_by_class[items[i].cls].append(i)
    keep = dict(cfg.keep)
    if cfg.imbalance is not None:
        if cfg.minority not in classes:
            raise InputError(f"--minority {cfg.minority}: no such class (classes: {', '.join(classes)})")
        others = [len(v) for c, v in train_by_class.items() if c != cfg.minority]
        keep = {cfg.minority: int(round(max(others) / cfg.imbalance))}
    removed: dict[str, list[str]] = {}
    for c, n in keep.items():
        if c not in classes:
            raise InputError(f"--keep {c}={n}: no such class (classes: {', '.join(classes)})")
        have = len(train_by_class[c])
        if n > have:
            raise InputError(f"--keep {c}={n}: the training split has only {have} {c} images")
        cut = sorted(rng.permutation(sorted(train_by_class[c]))[: have - n].tolist())
        for i in cut:
            split_of[i] = "removed"
        removed[c] = sorted(items[i].ident for i in cut)
    return keep, removed


def _place(cfg: PrepareConfig, tmp: Path, dec: Decoded, split_of: list[str | None], classes: list[str],
           progress: Progress | None) -> tuple[dict, dict[str, Counter], dict[str, str]]:
    """Rename each decoded PNG to SPLIT/CLASS/NAME.png; the PNGs of images left out are deleted."""
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    composition: dict[str, Counter] = defaultdict(Counter)
    file_sources: dict[str, str] = {}
    used: set[tuple[str, str, str]] = set()
    for s in SPLITS:
        for c in classes:
            (tmp / s / c).mkdir(parents=True)
    total_out = sum(1 for s in split_of if s in SPLITS)
    written = 0
    for it, png, s in zip(dec.items, dec.pngs, split_of):
        if s not in SPLITS:
            png.unlink()
            continue
        name = it.name
        n = 1
        while (s, it.cls, name) in used:
            n += 1
            name = f"{it.name}-{n}"
        used.add((s, it.cls, name))
        os.replace(png, tmp / s / it.cls / f"{name}.png")
        file_sources[f"{s}/{it.cls}/{name}.png"] = it.source
        counts[s][it.cls] += 1
        composition[it.cls][it.source] += 1
        written += 1
        if progress and written % 256 == 0:
            progress("write", written, total_out)
    for s in SPLITS:
        for c in classes:
            if counts[s][c] == 0:
                raise InputError(f"{cfg.src or cfg.medmnist or ('sample' if cfg.sample else 'demo')}: the {s} "
                                 f"split would have no {c} images (too few images or patients)")
    return counts, composition, file_sources


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def prepare(cfg: PrepareConfig, progress: Progress | None = None) -> dict:
    """Run the whole preparation; returns the `dataset.json` record, plus (not written) the
    local paths of skipped files under `skipped_local`, for the terminal."""
    cfg.validate()
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    scans, sources, labels = _scan(cfg, rng)
    items = [it for s in scans for it in s.items]
    scan_skipped = [x for s in scans for x in s.skipped]
    ignored = sum(s.ignored for s in scans)
    with staged_dir(cfg.out, cfg.force, "prepare") as tmp:
        work = tmp / ".decoded"
        work.mkdir()
        dec = decode_items(items, cfg, work, progress)
        views_skipped = Counter(dec.views_skipped)
        for s in scans:
            views_skipped.update(s.views_skipped)
        private = any(it.dicom for it in items)
        skipped_local = scan_skipped + [{"file": str(it.path), "reason": r} for it, r in dec.skipped]
        skipped = scan_skipped
        if private:  # no path of a DICOM source reaches the record: they often carry the patient
            salt = dicom_salt(dec.items, dec.keys, cfg.salt)
            public_names(dec.items, dec.keys, [it for it, _ in dec.skipped], salt)
            skipped = [{"file": f"file-{_salted(salt, x['file'])}", "reason": x["reason"]} for x in scan_skipped]
        skipped += [{"file": it.ident, "reason": r} for it, r in dec.skipped]
        if skipped and cfg.strict:
            raise InputError(f"{skipped_local[0]['file']}: {skipped_local[0]['reason']} "
                             f"({len(skipped)} unreadable file(s); drop --strict to skip them)")
        classes = sorted({it.cls for it in dec.items})
        for c in sorted({it.cls for s in scans for it in s.items} - set(classes)):
            raise InputError(f"{cfg.src or cfg.medmnist}: class '{c}' has no readable images")
        drop, dup_report = find_duplicates(dec.items, dec.hashes)
        for i in drop:
            dec.pngs[i].unlink()
        dropped = set(drop)
        kept = [i for i in range(len(dec.items)) if i not in dropped]
        dec.items, dec.pngs, dec.hashes = ([xs[i] for i in kept] for xs in (dec.items, dec.pngs, dec.hashes))
        groups = group_items(dec.items, dec.hashes)
        split_of, val_carved, notes = _assign_splits(cfg, dec.items, groups, rng)
        keep, removed = _cut_imbalance(cfg, dec.items, split_of, classes, rng)
        counts, composition, file_sources = _place(cfg, tmp, dec, split_of, classes, progress)
        work.rmdir()
        warnings = list(notes)
        confound = None
        src_sets = {c: set(v) for c, v in composition.items()}
        if len({frozenset(v) for v in src_sets.values()}) > 1:
            confound = {c: dict(v) for c, v in composition.items()}
            warnings.append("classes come from different sources ("
                            + "; ".join(f"{c}: {', '.join(sorted(v))}" for c, v in sorted(src_sets.items()))
                            + "): a classifier may learn the source rather than the disease")
        small = [it.array.shape[0] for it in dec.items if it.array is not None and it.array.shape[0] < cfg.size]
        if small:
            warnings.append(f"source images of {min(small)} px were upsampled to {cfg.size} px")
        config = _jsonable(asdict(cfg))
        if private:
            config["salt"] = "(given)" if cfg.salt else ""  # a secret: never written
        record = {
            **record_header("dataset"), "created_by": f"xraygan {__version__} prepare",
            "sources": sources,
            "synthetic_demo": cfg.demo,
            "license": "CC BY 4.0 (Kermany et al. 2018): credit the source" if cfg.sample else None,
            "note": DEMO_NOTE if cfg.demo else None,
            "image_size": cfg.size, "square": cfg.square, "seed": cfg.seed,
            "classes": classes,
            "counts": counts,
            "imbalance": {"keep": keep, "removed_counts": {c: len(v) for c, v in removed.items()},
                          "removed_files": removed},
            "val_carved_from_train": val_carved,
            "duplicates": dup_report,
            "skipped": skipped, "skipped_count": len(skipped), "ignored_count": ignored,
            "views_skipped": dict(sorted(views_skipped.items())),
            # class folders --classes gave no class: folder name → images
            "folders_left_out": {k: v for sc in scans for k, v in sorted(sc.folders_left_out.items())},
            "dicom": {"images": sum(1 for it in dec.items if it.dicom),
                      "names": "salted hashes of the patient id and the image; no header value is written"}
                     if private else None,
            "labels": labels,
            "source_composition": {c: dict(v) for c, v in composition.items()},
            "source_confound": confound,
            # every file's source, when there is more than one: evaluate breaks results down by it
            "file_sources": file_sources if len(set(file_sources.values())) > 1 else None,
            "warnings": warnings,
            "config": config,
            "seconds": None,
        }
        record["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(tmp / "dataset.json", record)
    if progress:
        total_out = sum(sum(v.values()) for v in counts.values())
        progress("write", total_out, total_out)
    return {**record, "skipped_local": skipped_local}
