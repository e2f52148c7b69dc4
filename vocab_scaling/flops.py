"""Training compute in the paper's accounting: C ≈ 6 (N_nv + V·d) · H · f(V).

N_v = V·d is counted once (the output layer; the input embedding is a lookup and costs no FLOPs), and the data
is H characters, D = H·f(V) tokens, so a larger vocabulary costs more per token but needs fewer tokens.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from vocab_scaling.tokenization_curve import PAPER_F, FCurve

# The paper ties width to N_nv for predictions at scales nobody trained: (largest N_nv, d) steps, then 24576.
WIDTH_TABLE: tuple[tuple[float, int], ...] = (
    (50e6, 512), (200e6, 768), (500e6, 1024), (1e9, 1536), (2e9, 2048), (5e9, 3200), (10e9, 4096),
    (20e9, 5120), (50e9, 6048), (100e9, 8192), (200e9, 12288), (500e9, 16384), (1000e9, 20480),
)
WIDTH_ABOVE_TABLE = 24576


def width_for(n_nv: float) -> int:
    """The paper's step table d(N_nv): N_nv ≤ 50M → 512, ..., ≤ 1000B → 20480, above → 24576."""
    for largest, width in WIDTH_TABLE:
        if n_nv <= largest:
            return width
    return WIDTH_ABOVE_TABLE


def tokens_from_chars(chars: ArrayLike, vocab_size: ArrayLike, f: FCurve = PAPER_F) -> np.ndarray | float:
    """D = H · f(V): the tokens a tokenizer of size V makes of H characters."""
    tokens = np.asarray(chars, dtype=np.float64) * f(vocab_size)
    return float(tokens) if np.ndim(tokens) == 0 else tokens


def chars_from_tokens(tokens: ArrayLike, vocab_size: ArrayLike, f: FCurve = PAPER_F) -> np.ndarray | float:
    """H = D / f(V), the inverse of `tokens_from_chars`."""
    chars = np.asarray(tokens, dtype=np.float64) / f(vocab_size)
    return float(chars) if np.ndim(chars) == 0 else chars


def paper_flops(n_nv: ArrayLike, vocab_size: ArrayLike, d: ArrayLike, chars: ArrayLike,
                f: FCurve = PAPER_F) -> np.ndarray | float:
    """C = 6 (N_nv + V·d) · H · f(V) training FLOPs (input-embedding FLOPs ignored, as in the paper)."""
    n_v = np.asarray(vocab_size, dtype=np.float64) * np.asarray(d, dtype=np.float64)
    flops = 6.0 * (np.asarray(n_nv, dtype=np.float64) + n_v) * tokens_from_chars(chars, vocab_size, f)
    return float(flops) if np.ndim(flops) == 0 else flops
