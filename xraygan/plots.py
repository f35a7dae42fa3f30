"""Plotting helpers shared by evaluate, gradcam and audit: headless matplotlib, figures as PNG bytes."""

from __future__ import annotations

import functools
import io
import os
import tempfile


@functools.cache
def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported only when plotting.

    matplotlib keeps a font cache and config in ~/.cache and ~/.config unless MPLCONFIGDIR says
    otherwise; xraygan writes nothing outside --out, so (unless the user set it) they go to a
    folder in the temp dir, kept between runs so the font cache is built once.
    """
    if "MPLCONFIGDIR" not in os.environ:
        d = os.path.join(tempfile.gettempdir(), f"xraygan-matplotlib-{os.getuid() if hasattr(os, 'getuid') else 0}")
        os.makedirs(d, exist_ok=True)
        os.environ["MPLCONFIGDIR"] = d
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
