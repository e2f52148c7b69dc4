"""FLOPs savings η: how much less training compute a sparse model needs to reach the dense baseline's final loss.

η = C_dense_final / C_sparse(L_dense_final), where C_sparse(L) is read off the sparse model's loss curve by
interpolating log C linearly between the two logged points around L (the paper's metric, computed overall and per
modality from the text and image loss curves). A curve that never reaches the target gives no η (None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lm_core.errors import UserError


def flops_to_reach(flops: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The compute at which a (noisy) loss curve first reaches `target`, log-interpolated; None if it never does."""
    c, loss = np.asarray(flops, np.float64), np.asarray(losses, np.float64)
    if c.shape != loss.shape or c.size == 0 or np.any(c <= 0) or not np.all(np.isfinite(loss)):
        raise UserError("a loss curve needs matching, finite, positive FLOPs and loss values")
    order = np.argsort(c)
    c, loss = c[order], loss[order]
    reached = np.flatnonzero(loss <= target)
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return float(c[0])
    # between point i-1 (above target) and i (at or below): interpolate log C in the loss
    fraction = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
    return float(math.exp(math.log(c[i - 1]) + fraction * (math.log(c[i]) - math.log(c[i - 1]))))


def flops_savings(dense_flops: Sequence[float], dense_losses: Sequence[float], sparse_flops: Sequence[float],
                  sparse_losses: Sequence[float]) -> float | None:
    """η = C_dense_final / C_sparse(L_dense_final); > 1 means the sparse model gets there with less compute."""
    order = np.argsort(np.asarray(dense_flops, np.float64))
    final_flops = float(np.asarray(dense_flops, np.float64)[order][-1])
    final_loss = float(np.asarray(dense_losses, np.float64)[order][-1])
    needed = flops_to_reach(sparse_flops, sparse_losses, final_loss)
    return None if needed is None else final_flops / needed
