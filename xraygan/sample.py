"""The real sample shipped with xraygan: 1,600 chest X-rays at 64 px from Kermany et al. (2018,
CC BY 4.0), patient-disjoint train (900 normal / 300 pneumonia, the study's 3:1), val (80 / 80)
and test (120 / 120). Cut from the release by `python -m xraygan.data.make_sample` (see there);
`xraygan prepare --sample` writes it as an ordinary prepared folder.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xraygan.errors import InputError

FILE = Path(__file__).parent / "data" / "kermany_sample_64.npz"
SHA256 = "c8a40d9aa52086754365f8d53953f52ccf5be86d41b1c75878eb9def0fa9bca8"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SampleSplit:
    images: np.ndarray  # (N, 64, 64) uint8
    labels: np.ndarray  # (N,) 0 = normal, 1 = pneumonia
    patients: tuple[str, ...]  # "train/person12": the release split and its patient id
    files: tuple[str, ...]  # the release's file each image was cut from


def load_sample() -> tuple[dict[str, SampleSplit], dict]:
    """The sample's splits and its info record, checked against the shipped checksum."""
    try:
        data = FILE.read_bytes()
    except OSError as e:
        raise InputError(f"{FILE}: the shipped sample is missing ({e.strerror}); reinstall xraygan") from None
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise InputError(f"{FILE}: checksum does not match the shipped sample; reinstall xraygan")
    from PIL import Image

    z = np.load(io.BytesIO(data), allow_pickle=False)
    out = {}
    for s in SPLITS:
        png, off = z[f"{s}_png"].tobytes(), z[f"{s}_offsets"]
        images = np.stack([np.asarray(Image.open(io.BytesIO(png[off[i]:off[i + 1]])))
                           for i in range(len(off) - 1)])
        out[s] = SampleSplit(images, z[f"{s}_labels"].astype(np.int64), tuple(z[f"{s}_patients"].tolist()),
                             tuple(z[f"{s}_files"].tolist()))
    return out, json.loads(str(z["info"].reshape(-1)[0]))
