"""Plotting helpers shared by evaluate, gradcam and audit: headless matplotlib, figures as PNG bytes."""

from __future__ import annotations

import io


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colormap(name: str):
    pyplot()
    from matplotlib import colormaps

    return colormaps[name]


def fig_png(fig, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes (tight bounding box) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()
