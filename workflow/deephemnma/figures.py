"""Figures: matplotlib with the Agg backend (imported lazily), PNGs written atomically."""

from __future__ import annotations

import os

from .files import atomic_path


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (imported lazily: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
