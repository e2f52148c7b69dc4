"""f(V): tokens per character as a function of vocabulary size.

Training data is measured in characters H because characters do not depend on the tokenizer; the tokens a model
sees are D = H · f(V). The paper fits f(V) = a·ln²V + b·lnV + c (natural log) on tokenizers of many sizes trained
on one corpus, and caps V at 200K before evaluating it because the fitted quadratic turns upward beyond its
minimum (near V ≈ 236K for the paper's constants), which no real tokenizer does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike

from lm_core.errors import UserError

VOCAB_CAP = 200_000  # f is evaluated at min(V, 200K): beyond, the fitted quadratic turns upward (module docstring)


@dataclasses.dataclass(frozen=True)
class FCurve:
    """f(V) = a·ln²V + b·lnV + c tokens per character, V capped at `VOCAB_CAP`."""

    a: float
    b: float
    c: float

    def __call__(self, vocab_size: ArrayLike) -> np.ndarray | float:
        log_v = np.log(np.minimum(np.asarray(vocab_size, dtype=np.float64), VOCAB_CAP))
        value = self.a * log_v**2 + self.b * log_v + self.c
        return float(value) if np.ndim(value) == 0 else value

    def derivative(self, vocab_size: ArrayLike) -> np.ndarray | float:
        """df/dV = (2a·lnV + b) / V below the cap; 0 above it, where f is held constant."""
        v = np.asarray(vocab_size, dtype=np.float64)
        slope = np.where(v < VOCAB_CAP, (2.0 * self.a * np.log(np.minimum(v, VOCAB_CAP)) + self.b) / v, 0.0)
        return float(slope) if np.ndim(slope) == 0 else slope

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


# The paper's published fit on SlimPajama; our own corpus gets its own curve from `fit_tokens_per_char`.
PAPER_F = FCurve(a=0.00639222, b=-0.15811069, c=1.20470122)


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def measure_tokens_per_char(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Tokens per character of `tokenizer` over `texts`: total tokens / total characters (one point of f)."""
    tokens = chars = 0
    for text in texts:
        tokens += len(tokenizer.encode(text))
        chars += len(text)
    if chars == 0:
        raise UserError("measure_tokens_per_char: the texts hold no characters; give at least one non-empty text")
    return tokens / chars


def fit_tokens_per_char(vocab_sizes: Sequence[float], tokens_per_char: Sequence[float]) -> FCurve:
    """Least-squares fit of a·ln²V + b·lnV + c to measured (V, tokens/char) points.

    The model is linear in (a, b, c), so the least-squares solution is exact (scipy.linalg.lstsq); V is capped
    as in `FCurve.__call__` so the curve and the fit agree on the same inputs.
    """
    v = np.asarray(vocab_sizes, dtype=np.float64)
    y = np.asarray(tokens_per_char, dtype=np.float64)
    if v.shape != y.shape or v.ndim != 1:
        raise UserError(f"fit_tokens_per_char: got {v.shape} vocabulary sizes and {y.shape} measurements; "
                        "give two 1-D sequences of the same length")
    if len(np.unique(np.minimum(v, VOCAB_CAP))) < 3:
        raise UserError(f"fit_tokens_per_char: {len(v)} points with {len(np.unique(v))} distinct vocabulary sizes; "
                        "a quadratic in ln V needs at least 3 distinct sizes")
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(y)) and np.all(v > 1) and np.all(y > 0)):
        raise UserError("fit_tokens_per_char: vocabulary sizes must be finite and > 1, tokens per character "
                        "finite and > 0")
    log_v = np.log(np.minimum(v, VOCAB_CAP))
    design = np.stack([log_v**2, log_v, np.ones_like(log_v)], axis=1)  # [points, 3]
    (a, b, c), *_ = scipy.linalg.lstsq(design, y)
    return FCurve(float(a), float(b), float(c))


def plot_tokens_per_char(path: str | Path, vocab_sizes: Sequence[float], tokens_per_char: Sequence[float],
                         curve: FCurve, *, reference: FCurve | None = PAPER_F) -> Path:
    """PNG of the measured points, the fitted curve and (by default) the paper's curve for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = np.asarray(vocab_sizes, dtype=np.float64)
    grid = np.geomspace(max(v.min() / 1.5, 2.0), v.max() * 1.5, 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(v, tokens_per_char, "o", label="measured")
    ax.plot(grid, curve(grid), label=f"fit: {curve.a:.5f}·ln²V {curve.b:+.5f}·lnV {curve.c:+.4f}")
    if reference is not None:
        ax.plot(grid, reference(grid), "--", alpha=0.6, label="paper (SlimPajama)")
    ax.set_xscale("log")
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("tokens per character f(V)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
