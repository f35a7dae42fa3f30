"""Procedural chest X-ray phantoms: SYNTHETIC DEMO DATA for trying the pipeline.

These pictures are drawn from a handful of ellipses, arcs and noise: a body outline, two dark
lung fields crossed by ribs, a spine, a heart shadow and a diaphragm; "pneumonia" phantoms add
patchy opacities inside one or both lungs. They let `xraygan demo` and the tests run on a fresh
machine with no dataset. They are not medical images and support no medical conclusion.
"""

from __future__ import annotations

import numpy as np

DEMO_NOTE = ("synthetic demo data (procedural phantoms from xraygan.phantom) for trying the "
             "pipeline; not medical images, not for medical conclusions")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    g = rng.random((cells + 1, cells + 1))
    x = np.linspace(0, cells, size, endpoint=False)
    i = x.astype(int)
    f = x - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _soft_ellipse(x, y, cx, cy, rx, ry, edge=0.08):
    """1 inside the ellipse, 0 outside, with a soft edge (a fraction of the radius)."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1 - r) / edge, 0, 1)


def phantom(rng: np.random.Generator, size: int = 128, pneumonia: bool = False) -> np.ndarray:
    """One `size`×`size` uint8 phantom radiograph (bright = dense, as on a film).

    Densities add up like attenuation: soft tissue, minus air in the lungs, plus ribs, spine,
    heart and diaphragm, plus (for pneumonia) fluid-filled patches inside the lung fields.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size  # 0..1, y down
    j = lambda s: rng.normal(0, s)  # noqa: E731 - per-image anatomical variation
    cx = 0.5 + j(0.015)
    body = _soft_ellipse(x, y, cx, 0.6, 0.47 + j(0.02), 0.64, edge=0.05)
    img = 0.06 + 0.5 * body

    lungs = np.zeros_like(img)
    lung_cx = []
    for side in (-1, 1):
        lx = cx + side * (0.17 + j(0.01))
        lung_cx.append(lx)
        lungs = np.maximum(lungs, _soft_ellipse(x, y, lx, 0.47 + j(0.015), 0.125 + j(0.008),
                                                0.29 + j(0.015), edge=0.15))
    img -= 0.3 * lungs

    period = 0.075 + j(0.004)
    arcs = np.mod(y - 0.9 * (x - cx) ** 2 + rng.random() * period, period) / period
    ribs = np.clip(1 - np.abs(arcs - 0.5) / 0.14, 0, 1) * body * (y < 0.8)
    img += 0.09 * ribs

    img += 0.3 * np.clip(1 - np.abs(x - cx) / 0.035, 0, 1) ** 0.5 * body  # spine
    heart = _soft_ellipse(x, y, cx + 0.07 + j(0.01), 0.63 + j(0.015), 0.14 + j(0.01),
                          0.12 + j(0.01), edge=0.25)
    img += 0.28 * heart
    dome = 0.78 + 0.3 * (x - cx) ** 2 + j(0.01)
    img += 0.22 * np.clip((y - dome) / 0.03, 0, 1) * body  # diaphragm and abdomen

    if pneumonia:
        # patchy consolidation: thresholded smooth noise inside one or both lungs
        patches = np.clip((_smooth_noise(rng, size, int(rng.integers(5, 9))) - 0.45) * 2.5, 0, 1)
        region = lungs * (1 - heart)
        if rng.random() < 0.6:  # often one lung only
            region *= np.abs(x - lung_cx[int(rng.integers(2))]) < 0.15
        if rng.random() < 0.5:  # often the lower zone
            region *= np.clip((y - 0.4) / 0.1, 0, 1)
        img += (0.2 + j(0.03)) * patches * region

    img += 0.05 * _smooth_noise(rng, size, cells=16)  # film and tissue texture
    img += rng.normal(0, 0.012, img.shape)  # quantum noise
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def demo_images(count_per_class: int, size: int = 128, seed: int = 0):
    """Yield (class, patient_id, array) for a demo set; some patients have two images."""
    rng = np.random.default_rng(seed)
    for cls in ("normal", "pneumonia"):
        made, patient = 0, 0
        while made < count_per_class:
            views = 2 if rng.random() < 0.2 else 1
            for _ in range(min(views, count_per_class - made)):
                yield cls, f"{cls}{patient:04d}", phantom(rng, size, pneumonia=(cls == "pneumonia"))
                made += 1
            patient += 1
