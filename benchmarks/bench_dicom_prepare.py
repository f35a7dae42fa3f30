"""`xraygan prepare` on a PACS-like DICOM export against a naive one-process pydicom + PIL loop.

Makes N DICOMs from the real Kermany release in ../shared/data/chest_xray_224 (each image
upsampled to 1024 px, stored at 12 bits, every other one MONOCHROME1, PatientID from the file
name, a flip for each further pass over the release so no two files are the same), then times,
in one run and on the same files:

  naive   : one process; dcmread, pixel_array, pydicom's modality LUT and VOI LUT, min-max to
            8 bits, MONOCHROME1 inverted, PIL resize, PNG save: what a converter written in a
            hurry does;
  prepare : the whole `xraygan prepare SRC --size S` (worker processes, duplicates, patient
            splits, the dataset record), as a user runs it.

Peak memory is the largest sum of resident memory over the prepare process and its workers,
sampled every 0.1 s from /proc.

    python benchmarks/bench_dicom_prepare.py --count 20000 --size 224 --work /tmp/dicom-bench
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224"


def _make_one(job: tuple[Path, Path, int, int]) -> None:
    src, dest, flip, i = job
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from dicomfix import write_dicom

    a = np.asarray(Image.open(src).convert("L").resize((1024, 1024), Image.BICUBIC))
    if flip:
        a = a[:, ::-1]
    write_dicom(dest, a, patient=f"{src.stem.split('_')[0]}-{flip}", bits=12,
                photometric="MONOCHROME1" if i % 2 else "MONOCHROME2", view="PA")


def make_export(root: Path, count: int) -> None:
    files = sorted(p for p in SHARED.rglob("*.jpeg"))
    jobs = []
    for i in range(count):
        src = files[i % len(files)]
        flip = i // len(files)
        cls = src.parent.name.lower()
        jobs.append((src, root / cls / f"{i // 4:05d}" / f"IM{i:06d}", flip, i))  # PACS: no extension
    todo = [j for j in jobs if not j[1].exists()]
    with multiprocessing.Pool() as pool:
        for _ in pool.imap_unordered(_make_one, todo, chunksize=16):
            pass


def naive(files: list[Path], out: Path, size: int) -> None:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        a = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-9) * 255
        if ds.PhotometricInterpretation == "MONOCHROME1":
            a = 255 - a
        Image.fromarray(a.astype(np.uint8)).resize((size, size)).save(out / f"{k:06d}.png")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    total = 0
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_prepare(src: Path, out: Path, size: int, workers: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "xraygan", "prepare", str(src), "--out", str(out), "--size", str(size),
           "--workers", str(workers), "--force"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.1)
    dt = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if proc.returncode:
        raise SystemExit(f"prepare failed:\n{err[-2000:]}")
    return dt, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--naive-count", type=int, default=None, help="files the naive loop converts (default: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/xraygan-dicom-bench"),
                    help="kept between runs: the export is made once")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED}: the Kermany release is needed to make the DICOMs")
    src = args.work / "export"
    t0 = time.perf_counter()
    make_export(src, args.count)
    files = sorted(p for p in src.rglob("IM*") if p.is_file())[: args.count]
    gb = sum(p.stat().st_size for p in files) / 1e9
    print(f"export: {len(files)} DICOMs, 1024 px 12-bit, half MONOCHROME1, {gb:.1f} GB "
          f"(made or checked in {time.perf_counter() - t0:.0f} s)", flush=True)
    n_naive = args.naive_count or len(files)
    t0 = time.perf_counter()
    naive(files[:n_naive], args.work / "naive", args.size)
    t_naive = time.perf_counter() - t0
    print(f"naive   : {n_naive} files in {t_naive:.1f} s = {n_naive / t_naive:.1f} img/s", flush=True)
    t_prep, peak = run_prepare(src, args.work / "prepared", args.size, args.workers)
    print(f"prepare : {len(files)} files in {t_prep:.1f} s = {len(files) / t_prep:.1f} img/s, "
          f"peak resident memory {peak:.0f} MB (prepare and its workers together)")
    print(f"ratio   : {(len(files) / t_prep) / (n_naive / t_naive):.2f}x the naive loop's images/s "
          f"({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
