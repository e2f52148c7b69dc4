"""Plot helpers shared by the reports (matplotlib, headless), and PNG grids of images (the VQ image tokenizer's
reconstructions, for inspection by eye)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
              ylabel: str, logx: bool = False) -> Path:
    """One PNG with a line per named (x, y) series."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_reconstruction_grid(path: str | os.PathLike, originals: np.ndarray, reconstructions: np.ndarray, *,
                              columns: int = 8, scale: int = 4) -> Path:
    """A PNG of image pairs: each row of `columns` originals is followed by a row of their reconstructions.

    originals, reconstructions: [N, H, W, 3] uint8. Pixels are enlarged `scale` times (nearest neighbour) so
    32x32 images are inspectable.
    """
    from PIL import Image

    originals, reconstructions = np.asarray(originals, np.uint8), np.asarray(reconstructions, np.uint8)
    if originals.shape != reconstructions.shape or originals.ndim != 4 or len(originals) == 0:
        raise ValueError(f"shapes {originals.shape} and {reconstructions.shape} must be equal [N, H, W, 3], N > 0")
    n, h, w, _ = originals.shape
    rows = -(-n // columns)
    gap = 2
    grid = np.full((rows * 2 * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        x = gap + c * (w + gap)
        for k, images in enumerate((originals, reconstructions)):
            y = gap + (2 * r + k) * (h + gap)
            grid[y:y + h, x:x + w] = images[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(path)
    return path


def stack_images(items: Sequence[Any], count: int) -> np.ndarray:
    """[min(count, len(items)), H, W, 3] uint8 from the first items of an image split (ImageCaption-like)."""
    return np.stack([items[i].image for i in range(min(count, len(items)))])
