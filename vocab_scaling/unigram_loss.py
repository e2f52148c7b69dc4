"""The vocabulary-insensitive loss L_u and bits per character.

Per-token loss cannot compare models with different vocabularies: a larger V predicts fewer, rarer tokens.
L_u = -(1/T) Σ log(p(w_i | w_<i) / p_unigram(w_i)) subtracts what a context-free unigram model already knows, so
it measures what the model learned beyond token frequencies. It can be negative (better than unigram gives < 0).
Bits per character, total nats / (chars · ln 2), is the other vocabulary-independent measure; report both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from lm_core.errors import UserError


def unigram_distribution(tokens: ArrayLike | Iterable[ArrayLike], vocab_size: int, *,
                         counts: bool = False) -> np.ndarray:
    """p_unigram over `vocab_size` ids from token id arrays (or, with counts=True, a [vocab_size] count array).

    Ids never seen get count 1 before normalising (as the paper does), so log p_unigram is finite for every id a
    model can predict. Returns float64 [vocab_size] summing to 1.
    """
    if not (isinstance(vocab_size, int | np.integer) and vocab_size > 0):
        raise UserError(f"vocab_size={vocab_size!r} must be a positive integer")
    if counts:
        totals = np.asarray(tokens, dtype=np.float64)
        if totals.shape != (vocab_size,):
            raise UserError(f"counts has shape {totals.shape}; expected ({vocab_size},), one count per id")
        if not np.all(np.isfinite(totals)) or np.any(totals < 0):
            raise UserError("counts must be finite and non-negative")
    else:
        totals = np.zeros(vocab_size, dtype=np.float64)
        arrays = [tokens] if isinstance(tokens, np.ndarray | jax.Array) else tokens
        for ids in arrays:
            ids = np.asarray(ids).ravel()
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise UserError(f"token ids range over [{ids.min()}, {ids.max()}]; valid ids are 0..{vocab_size - 1}")
            totals += np.bincount(ids.astype(np.int64), minlength=vocab_size)
    totals = np.where(totals == 0, 1.0, totals)
    return totals / totals.sum()


def unigram_normalized_loss(nll_per_token: ArrayLike, target_ids: ArrayLike, log_unigram: ArrayLike) -> float:
    """L_u = mean over tokens of (nll + log p_unigram(target)) = -(1/T) Σ log(p / p_unigram), in nats.

    Offline (numpy, float64) version for whole arrays; inside a jitted evaluation use `unigram_sums`.
    """
    nll = np.asarray(nll_per_token, dtype=np.float64)
    targets = np.asarray(target_ids)
    if nll.shape != targets.shape or nll.size == 0:
        raise UserError(f"nll_per_token {nll.shape} and target_ids {targets.shape} must have one equal, "
                        "non-empty shape")
    return float(np.mean(nll + np.asarray(log_unigram, dtype=np.float64)[targets]))


def unigram_sums(nll: jax.Array, targets: jax.Array, mask: jax.Array, log_unigram: jax.Array) -> dict[str, jax.Array]:
    """{"unigram_nll": Σ mask · (nll + log p_unigram(target))}: jit-safe, summed so evaluation batches add up.

    nll, targets, mask: [batch, seq]; log_unigram: [vocab]. Divide the total by the number of tokens (Σ mask,
    which the trainer's evaluation already sums as "tokens") for L_u. Summing in float32 is enough: L_u is
    compared at the 1e-3 level and a batch sums at most ~1e6 terms of magnitude ~10.
    """
    log_p = jnp.take(jnp.asarray(log_unigram, jnp.float32), targets)  # [batch, seq]
    per_token = nll.astype(jnp.float32) + log_p
    # Weighted like lm_core.loss.cross_entropy (nll * mask, tokens = Σ mask), so the two sums share a denominator.
    return {"unigram_nll": jnp.sum(per_token * mask.astype(jnp.float32))}


def bits_per_character(total_nll_nats: float, chars: float) -> float:
    """Total nats of the text over its characters, in bits: nats / (chars · ln 2)."""
    if not chars > 0:
        raise UserError(f"chars={chars!r} must be positive to compute bits per character")
    return float(total_nll_nats) / (float(chars) * math.log(2.0))
