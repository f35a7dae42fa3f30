from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass
class PlanStep:  # the fields of a study step the estimate's schedule reads
    id: str
    deps: list[str] = field(default_factory=list)
    exclusive: str | None = None


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (present in CI, absent in a user's clone)")
    return SHARED_DATA


def xray_like(rng: np.random.Generator, size: int = 48, bright: bool = False) -> np.ndarray:
    """A small random image with some structure (unique pixels, so no accidental duplicates)."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.3 * np.sin(6 * x + rng.random() * 6) * np.cos(5 * y)
    a = base + rng.normal(0, 0.1, (size, size)) + (0.3 if bright else 0)
    return (np.clip(a, 0, 1) * 255).astype(np.uint8)


def write_img(path: Path, a: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format=fmt)
    return path


def make_folder(root: Path, counts: dict[str, int], size: int, rng: np.random.Generator) -> Path:
    """An image folder root/<class>/NNN.png of random pixels, `counts` images per class."""
    from xraygan.images import save_png

    for cls, n in counts.items():
        for i in range(n):
            save_png(root / cls / f"{cls}-{i:03d}.png",
                     rng.integers(0, 255, (size, size), dtype=np.uint8))
    return root


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small prepared demo dataset at 32 px, shared by tests that only read it."""
    from xraygan.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("demo") / "data"
    prepare(PrepareConfig(out=out, demo=True, demo_count=60, size=32, imbalance=3.0, workers=1))
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny classifier on separable 16-px data (pneumonia brighter), and its test folder."""
    from xraygan.classifier import TrainClassifierConfig, train_classifier
    from xraygan.images import save_png

    root = tmp_path_factory.mktemp("clf")
    rng = np.random.default_rng(0)
    for part, n in (("train", 24), ("val", 8), ("test", 10)):
        for cls, base in (("normal", 70), ("pneumonia", 170)):
            for i in range(n):
                save_png(root / part / cls / f"{cls}{i}.png",
                         np.clip(rng.normal(base, 25, (16, 16)), 0, 255).astype(np.uint8))
    train_classifier(TrainClassifierConfig(data=root / "train", val=root / "val",
                                           out=root / "run-seed3", epochs=2, batch_size=16,
                                           device="cpu", patience=0))
    return root
