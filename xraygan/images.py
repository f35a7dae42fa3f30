"""Images on disk: decoding any real-world file to 8-bit grayscale, and image folders.

An image folder is `DIR/<class>/*.png`, classes sorted by name (normal = 0, pneumonia = 1).
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from xraygan.errors import InputError
from xraygan.fsutil import atomic_write_bytes

IMAGE_EXTS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm", ".pnm"}
)
# Files a real download carries that are not data and are not worth reporting.
IGNORED_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx"})
SQUARE_MODES = ("crop", "pad")


def is_ignored(path: Path) -> bool:
    """Hidden files, macOS resource forks and OS litter are not data."""
    return any(p.startswith(".") or p.lower() in IGNORED_NAMES for p in path.parts[-3:])


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def to_gray8(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an 8-bit grayscale array.

    - RGB/CMYK/YCbCr: ITU-R 601 luma.  RGBA/LA/palette with transparency: composited onto black
      (the background of an X-ray), not left with arbitrary colours under the alpha.
    - 16-bit and 32-bit integer or float images: the image's own range is stretched linearly to
      0..255. PIL's `convert("L")` would clip them to 255 instead.
    """
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba).convert("L")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            return np.zeros(a.shape, dtype=np.uint8)
        return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8)


def make_square(a: np.ndarray, mode: str) -> np.ndarray:
    """Center-crop to the short side, or pad with black to the long side."""
    h, w = a.shape
    if h == w:
        return a
    if mode == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return a[top : top + s, left : left + s]
    s = max(h, w)
    out = np.zeros((s, s), dtype=a.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top : top + h, left : left + w] = a
    return out


def resize_gray(a: np.ndarray, size: int, reducing_gap: float | None = None) -> np.ndarray:
    """Antialiased resize of a square 8-bit array (Lanczos; box-filtered when shrinking).

    `reducing_gap` (PIL's) first shrinks by an integer box filter to within that factor of the
    target (see resize_fast)."""
    if a.shape == (size, size):
        return a
    return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.LANCZOS,
                                                reducing_gap=reducing_gap))


def resize_fast(a: np.ndarray, size: int) -> np.ndarray:
    """resize_gray for full-resolution sources decoded whole (DICOM), where a JPEG's draft
    decode cannot shrink the work. A Kermany X-ray at 1024 px to 224 px: 2.9 ms instead of
    6.3 ms, at most 2 gray levels (mean 0.22) from full Lanczos. (At a gap of 3.0 PIL does no
    box step for 1024 → 224 and is no faster.)"""
    return resize_gray(a, size, reducing_gap=2.0)


MIN_SIDE = 8  # px: smaller images are skipped as unusable


def load_gray(source: Path | bytes, size: int, square: str = "crop") -> np.ndarray:
    """Decode an image file to a `size`×`size` uint8 array.

    JPEGs are decoded at a reduced DCT scale (`Image.draft`) that still leaves at least twice
    the target size, so a 4-megapixel X-ray is never fully decoded to make a 64-px image.
    Raises ValueError with a short reason for unreadable, truncated or non-image files.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            with img:
                if img.format == "JPEG":
                    w, h = img.size
                    short = min(w, h) if square == "crop" else max(w, h)
                    scale = short / (2 * size)
                    if scale >= 2:
                        img.draft("L", (int(w / scale) + 1, int(h / scale) + 1))
                img.load()
                img = ImageOps.exif_transpose(img)
                a = to_gray8(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ValueError(_reason(e)) from None
    if a.ndim != 2 or min(a.shape) < 1:
        raise ValueError(f"unexpected image shape {a.shape}")
    side = min(a.shape) if square == "crop" else max(a.shape)
    if side < max(MIN_SIDE, size // 8):  # upscaled more than 8x it is a blur, not an X-ray
        raise ValueError(f"too small ({a.shape[1]}x{a.shape[0]} px) to make a {size} px image")
    return resize_gray(make_square(a, square), size)


def _reason(e: Exception) -> str:
    msg = str(e) or type(e).__name__
    if "cannot identify image file" in msg:
        return "not an image file (cannot identify format)"
    if "truncated" in msg.lower():
        return "truncated image file"
    return msg.split("\n")[0]


def encode_png(a: np.ndarray) -> bytes:
    """PNG bytes of a uint8 gray (H, W) or RGB (H, W, 3) array."""
    buf = io.BytesIO()
    Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def save_png(path: Path, a: np.ndarray) -> None:
    """Write an 8-bit grayscale PNG atomically."""
    atomic_write_bytes(path, encode_png(a))


# --- image folders -------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolder:
    """An image folder decoded into memory: `images` is uint8 (N, H, W), `labels` int64 (N,)."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[Path, ...]
    images: np.ndarray
    labels: np.ndarray

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}


def list_image_folder(root: Path) -> dict[str, list[Path]]:
    """Class name → sorted image files of `root/<class>/`. Errors name the path."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: folder not found")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not is_ignored(d))
    if not classes:
        raise InputError(f"{root}: no class folders (expected {root}/<class>/*.png)")
    out: dict[str, list[Path]] = {}
    for c in classes:
        files = sorted(p for p in (root / c).iterdir()
                       if p.is_file() and is_image_name(p) and not is_ignored(p))
        if not files:
            raise InputError(f"{root / c}: class folder holds no images")
        out[c] = files
    return out


def read_image_folder(root: Path, classes: tuple[str, ...] | None = None,
                      only: tuple[str, ...] | None = None) -> ImageFolder:
    """Decode every PNG of an image folder into one uint8 array (one size per dataset).

    `classes` fixes the class order (a model's classes); `only` keeps a subset of classes.
    """
    listing = list_image_folder(root)
    names = tuple(classes) if classes is not None else tuple(listing)
    for c in (only or names):
        if c not in listing:
            raise InputError(f"{Path(root) / c}: class folder missing (found: {', '.join(listing)})")
    unknown = sorted(set(listing) - set(names))
    if unknown:
        raise InputError(f"{root}: unknown class folder(s) {', '.join(unknown)} "
                         f"(expected {', '.join(names)})")
    keep = only or names
    files = [f for c in names if c in keep for f in listing[c]]
    labels = np.asarray([i for i, c in enumerate(names) if c in keep for _ in listing[c]], dtype=np.int64)
    first = _read_gray(files[0])
    images = _image_array(len(files), first.shape[0])
    fill = functools.partial(_fill, images, files, first.shape[0])
    # PNG decoding releases the GIL: threads use every core without copying arrays between
    # processes (50,000 images at 128 px in ~1/cores of the one-thread time)
    workers = min(os.cpu_count() or 1, 8)
    chunks = [range(s, min(s + 512, len(files))) for s in range(0, len(files), 512)]
    if workers > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, chunks))
    else:
        for ch in chunks:
            fill(ch)
    return ImageFolder(Path(root), names, tuple(files), images, labels)


# Above this many bytes an image folder is decoded into a memory-mapped temporary file instead
# of anonymous memory: the pages are the page cache's, so a 100,000-image set at 224 px (5 GB)
# does not count against the process, and is read back at memory speed once cached.
MEMMAP_OVER = 2 << 30


def _image_array(n: int, size: int) -> np.ndarray:
    if n * size * size <= MEMMAP_OVER:
        return np.empty((n, size, size), dtype=np.uint8)
    import tempfile

    with tempfile.TemporaryFile(prefix="xraygan-images-") as f:  # unlinked: nothing is left behind
        f.truncate(n * size * size)
        return np.memmap(f, dtype=np.uint8, mode="r+", shape=(n, size, size))


def _read_gray(f: Path) -> np.ndarray:
    try:
        with Image.open(f) as img:
            a = to_gray8(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{f}: cannot read image ({_reason(e)})") from None
    if a.shape[0] != a.shape[1]:
        raise InputError(f"{f}: image is {a.shape[1]}x{a.shape[0]}, expected square images")
    return a


def image_side(f: Path) -> int:
    """The side of one square image (read and checked as the whole folder will be)."""
    return _read_gray(f).shape[0]


def _fill(images: np.ndarray, files: list[Path], size: int, idx: range) -> None:
    for i in idx:
        a = _read_gray(files[i])
        if a.shape[0] != size:
            raise InputError(f"{files[i]}: image is {a.shape[0]} px, the others are {size} px")
        images[i] = a
