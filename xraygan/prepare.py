"""`xraygan prepare`: raw data → `OUT/{train,val,test}/<class>/*.png` + `OUT/dataset.json`.

Steps: scan the source(s) → decode every image to size×size gray in worker processes → find
exact duplicates → group images by patient and duplicate → keep the source's splits, carving
val (and test, for unsplit sources) by group → cut the training split to the requested
imbalance → write into a staging folder renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xraygan import __version__
from xraygan.errors import InputError
from xraygan.fsutil import atomic_write_json, check_out_apart, check_output_free, record_header, staged_dir
from xraygan.images import SQUARE_MODES, encode_png, load_gray, make_square, resize_gray
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


@dataclass(frozen=True)
class PrepareConfig:
    out: Path
    src: Path | None = None
    medmnist: Path | None = None
    demo: bool = False  # procedural phantoms (--phantom; --demo is its old name)
    demo_count: int = 300
    sample: bool = False  # the real Kermany sample shipped with the package
    size: int = 64
    square: str = "crop"
    keep: tuple[tuple[str, int], ...] = ()  # (class, count) in the training split
    imbalance: float | None = None  # majority:minority ratio in train, e.g. 3.0
    minority: str = "pneumonia"
    extra_normal: Path | None = None
    extra_normal_count: int | None = None
    extra_normal_splits: tuple[str, ...] = ("train", "val")  # where extra normals may go
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # for sources without splits
    val_fraction: float = 0.1  # carved from train when the source has no usable val split
    min_val: int = 50  # a source val split smaller than this is folded into train
    class_names: tuple[str, ...] | None = None  # for MedMNIST labels
    seed: int = 0
    workers: int = 0  # 0 = one per CPU core
    strict: bool = False
    force: bool = False

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
        # before anything is read: the output is never the source, inside it or above it, and
        # --force replaces only an earlier prepare output
        check_out_apart(self.out, src=self.src, medmnist=self.medmnist, extra_normal=self.extra_normal)
        check_output_free(self.out, self.force, "prepare")


def _decode_one(args: tuple[Path, int, str]) -> tuple[np.ndarray | None, str | None]:
    path, size, square = args
    try:
        return load_gray(path, size, square), None
    except ValueError as e:
        return None, str(e)
    except OSError as e:  # vanished or unreadable on disk
        return None, e.strerror or str(e)


def decode_items(items: list[Item], cfg: PrepareConfig, progress: Progress | None = None
                 ) -> tuple[list[Item], list[np.ndarray], list[dict]]:
    """Decode every item; returns the readable items, their arrays and the skipped list."""
    jobs = [(it.path, cfg.size, cfg.square) for it in items if it.path is not None]
    workers = cfg.workers or os.cpu_count() or 1
    results: list[tuple[np.ndarray | None, str | None]] = []
    total = len(items)
    if jobs:
        if workers > 1 and len(jobs) >= 64:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                chunk = max(8, min(64, len(jobs) // (workers * 8)))
                for r in pool.map(_decode_one, jobs, chunksize=chunk):
                    results.append(r)
                    if progress and len(results) % 32 == 0:
                        progress("decode", len(results), total)
        else:
            for j in jobs:
                results.append(_decode_one(j))
                if progress and len(results) % 32 == 0:
                    progress("decode", len(results), total)
    it_results = iter(results)
    kept, arrays, skipped = [], [], []
    for it in items:
        if it.path is not None:
            a, reason = next(it_results)
        else:
            a, reason = resize_gray(make_square(it.array, cfg.square), cfg.size), None
        if a is None:
            skipped.append({"file": it.ident, "reason": reason})
        else:
            kept.append(it)
            arrays.append(a)
    if progress:
        progress("decode", total, total)
    return kept, arrays, skipped


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


def pixel_hashes(arrays: list[np.ndarray]) -> list[bytes]:
    """One digest per image: equal digests mean identical pixels after resizing."""
    return [hashlib.blake2b(a.tobytes(), digest_size=16).digest() for a in arrays]


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


def prepare(cfg: PrepareConfig, progress: Progress | None = None) -> dict:
    """Run the whole preparation; returns the `dataset.json` record."""
    cfg.validate()
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    if cfg.sample:
        scan, info = scan_sample()
        src_desc = {"kind": "sample", "name": "kermany_sample_64", "sha256": SAMPLE_SHA256,
                    "license": info["license"], "citation": info["source"]}
    elif cfg.demo:
        scan = scan_demo(cfg.demo_count, cfg.seed)
        src_desc = {"kind": "demo", "count_per_class": cfg.demo_count}
    elif cfg.medmnist is not None:
        scan = scan_medmnist(cfg.medmnist, cfg.class_names)
        src_desc = {"kind": "medmnist", "path": str(cfg.medmnist)}
    else:
        if cfg.src.is_file() and cfg.src.suffix == ".npz":
            scan = scan_medmnist(cfg.src, cfg.class_names)
            src_desc = {"kind": "medmnist", "path": str(cfg.src)}
        else:
            scan = scan_folder_source(cfg.src)
            src_desc = {"kind": scan.layout, "path": str(cfg.src)}
    scans: list[Scan] = [scan]
    sources = [src_desc]
    if cfg.extra_normal is not None:
        extra = scan_extra_normal(cfg.extra_normal, cfg.extra_normal_count, rng)
        scans.append(extra)
        sources.append({"kind": "extra-normal", "path": str(cfg.extra_normal),
                        "count": len(extra.items)})
    items = [it for s in scans for it in s.items]
    skipped = [x for s in scans for x in s.skipped]
    ignored = sum(s.ignored for s in scans)

    items, arrays, bad = decode_items(items, cfg, progress)
    skipped += bad
    if skipped and cfg.strict:
        first = skipped[0]
        raise InputError(f"{first['file']}: {first['reason']} "
                         f"({len(skipped)} unreadable file(s); drop --strict to skip them)")
    classes = sorted({it.cls for it in items})
    for c in sorted({it.cls for s in scans for it in s.items} - set(classes)):
        raise InputError(f"{cfg.src or cfg.medmnist}: class '{c}' has no readable images")

    hashes = pixel_hashes(arrays)
    drop, dup_report = find_duplicates(items, hashes)
    dropped = set(drop)
    kept = [i for i in range(len(items)) if i not in dropped]
    items, arrays, hashes = ([xs[i] for i in kept] for xs in (items, arrays, hashes))
    groups = group_items(items, hashes)

    # --- splits ---
    notes: list[str] = []
    split_of: list[str | None] = [it.split for it in items]
    main_given = {it.split for it in items if it.source != "extra-normal"} - {None}
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

    # --- imbalance in the training split only ---
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

    # --- write ---
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    composition: dict[str, Counter] = defaultdict(Counter)
    total_out = sum(1 for s in split_of if s in SPLITS)
    with staged_dir(cfg.out, cfg.force, "prepare") as tmp:
        used: set[tuple[str, str, str]] = set()
        file_sources: dict[str, str] = {}
        for s in SPLITS:
            for c in classes:
                (tmp / s / c).mkdir(parents=True)
        written = 0
        for it, a, s in zip(items, arrays, split_of):
            if s not in SPLITS:
                continue
            name = it.name
            n = 1
            while (s, it.cls, name) in used:
                n += 1
                name = f"{it.name}-{n}"
            used.add((s, it.cls, name))
            (tmp / s / it.cls / f"{name}.png").write_bytes(encode_png(a))
            file_sources[f"{s}/{it.cls}/{name}.png"] = it.source
            counts[s][it.cls] += 1
            composition[it.cls][it.source] += 1
            written += 1
            if progress and written % 256 == 0:
                progress("write", written, total_out)
        for s in SPLITS:
            for c in classes:
                if counts[s][c] == 0:
                    raise InputError(f"{cfg.src or cfg.medmnist or ('sample' if cfg.sample else 'demo')}: the {s} split would "
                                     f"have no {c} images (too few images or patients)")
        warnings = list(notes)
        confound = None
        src_sets = {c: set(v) for c, v in composition.items()}
        if len({frozenset(v) for v in src_sets.values()}) > 1:
            confound = {c: dict(v) for c, v in composition.items()}
            warnings.append("classes come from different sources ("
                            + "; ".join(f"{c}: {', '.join(sorted(v))}" for c, v in sorted(src_sets.items()))
                            + "): a classifier may learn the source rather than the disease")
        small = [it.array.shape[0] for it in items if it.array is not None and it.array.shape[0] < cfg.size]
        if small:
            warnings.append(f"source images of {min(small)} px were upsampled to {cfg.size} px")
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
            "source_composition": {c: dict(v) for c, v in composition.items()},
            "source_confound": confound,
            # every file's source, when there is more than one: evaluate breaks results down by it
            "file_sources": file_sources if len(set(file_sources.values())) > 1 else None,
            "warnings": warnings,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "seconds": None,
        }
        record["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(tmp / "dataset.json", record)
    if progress:
        progress("write", total_out, total_out)
    return record
