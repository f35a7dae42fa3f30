"""Cut the real sample that ships with xraygan (`kermany_sample_64.npz`) from the Kermany release.

    python -m xraygan.data.make_sample ../shared/data/chest_xray_224

Reproducible (seed 0) and patient-disjoint: train and val come from the release's train split,
test from its test split; whole patients are assigned to one split (a patient's images beyond a
split's quota are left out, never moved to another split), and an image whose pixels also occur
in an earlier split is dropped. Images are decoded by xraygan's own loader (gray, center crop,
Lanczos) at 64 px. The counts keep the study's 3:1 normal:pneumonia ratio in train and balance
val and test. After writing, it prints the file's sha256; `xraygan.sample.SHA256` must be set to
it (a test checks the shipped file against it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from xraygan.images import is_image_name, load_gray
from xraygan.sources import patient_id

SIZE = 64
QUOTA = {"train": {"normal": 900, "pneumonia": 300}, "val": {"normal": 80, "pneumonia": 80},
         "test": {"normal": 120, "pneumonia": 120}}
FROM = {"train": "train", "val": "train", "test": "test"}  # sample split -> release split
CLASSES = ("normal", "pneumonia")


def png_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def release_files(root: Path, split: str, cls: str) -> list[Path]:
    d = next(p for p in (root / split).iterdir() if p.name.lower() == cls)
    return sorted(p for p in d.iterdir() if is_image_name(p))


def cut(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, list] = defaultdict(list)
    seen: set[bytes] = set()
    for release in ("train", "test"):
        for ci, cls in enumerate(CLASSES):
            groups: dict[str, list[Path]] = defaultdict(list)
            for f in release_files(root, release, cls):
                groups[patient_id(f.stem) or f.stem].append(f)
            order = sorted(groups)
            rng.shuffle(order)
            for split in (s for s in QUOTA if FROM[s] == release):
                need = QUOTA[split][cls]
                while need > 0:
                    for f in groups[order.pop()][:need]:
                        a = load_gray(f, SIZE, "crop")
                        h = hashlib.sha256(a.tobytes()).digest()
                        if h in seen:  # an exact copy of an image already taken
                            continue
                        seen.add(h)
                        out[f"{split}_images"].append(a)
                        out[f"{split}_labels"].append(ci)
                        out[f"{split}_patients"].append(f"{release}/{patient_id(f.stem) or f.stem}")
                        out[f"{split}_files"].append(f"{release}/{f.parent.name}/{f.name}")
                        need -= 1
    arrays = {}
    for k, v in out.items():
        if k.endswith("_images"):  # lossless PNG per image: 4.5 MB where a deflated array is 6.0
            pngs = [png_bytes(a) for a in v]
            split = k[: -len("_images")]
            arrays[f"{split}_png"] = np.frombuffer(b"".join(pngs), dtype=np.uint8)
            arrays[f"{split}_offsets"] = np.cumsum([0] + [len(p) for p in pngs]).astype(np.int64)
        elif k.endswith("_labels"):
            arrays[k] = np.asarray(v, dtype=np.uint8)
        else:
            arrays[k] = np.asarray(v, dtype=str)
    arrays["info"] = np.asarray(json.dumps({
        "source": "Kermany, Zhang, Goldbaum (2018), Labeled Optical Coherence Tomography (OCT) and "
                  "Chest X-Ray Images for Classification, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2",
        "license": "CC BY 4.0", "classes": list(CLASSES), "image_size": SIZE, "seed": seed,
        "quota": QUOTA, "made_by": "python -m xraygan.data.make_sample"}))
    return arrays


def write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (what np.load reads) whose bytes depend only on the arrays: fixed zip timestamps,
    so rerunning the script reproduces the shipped file and its checksum exactly."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in arrays.items():
            b = io.BytesIO()
            np.lib.format.write_array(b, np.ascontiguousarray(v), allow_pickle=False)
            info = zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if k.endswith("_png") else zipfile.ZIP_DEFLATED
            z.writestr(info, b.getvalue(), compresslevel=9)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("release", type=Path, help="the Kermany release (train/ and test/ with NORMAL/, PNEUMONIA/)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("kermany_sample_64.npz"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    arrays = cut(args.release, args.seed)
    data = write_npz(arrays)
    args.out.write_bytes(data)
    counts = {s: np.bincount(arrays[f"{s}_labels"], minlength=2).tolist() for s in QUOTA}
    print(f"{args.out}: {len(data) / 1e6:.2f} MB, counts (normal, pneumonia) {counts}, "
          f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
