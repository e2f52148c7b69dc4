"""AdamW with linear warmup and a cosine or linear decay, global-norm clipping: what every experiment shares."""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

from lm_core.errors import UserError
from lm_core.stacked import STACKED_BLOCKS

# After the warmup the learning rate falls from the peak to final_lr_fraction x the peak at total_steps, along a
# half cosine ("cosine") or a straight line ("linear", MoMa / Chameleon).
DECAYS = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 1000
    final_lr_fraction: float = 0.1  # the decay ends at this fraction of the peak
    decay: str = "cosine"  # one of DECAYS
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables

    def __post_init__(self) -> None:
        # Written as `not <valid range>` so NaN (which fails every comparison) is refused too, and infinity.
        if not 0 < self.learning_rate < math.inf:
            raise UserError(f"learning_rate={self.learning_rate} must be a finite positive number")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise UserError(f"warmup_steps={self.warmup_steps} must be >= 0 and total_steps={self.total_steps} > 0")
        if not 0 <= self.final_lr_fraction <= 1:
            raise UserError(f"final_lr_fraction={self.final_lr_fraction} must be within [0, 1]")
        if self.decay not in DECAYS:
            raise UserError(f"decay={self.decay!r} is unknown; valid: {list(DECAYS)}")
        if not 0 <= self.grad_clip < math.inf:
            raise UserError(f"grad_clip={self.grad_clip} must be a finite number >= 0 (0 disables clipping)")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be within [0, 1)")
        if not 0 <= self.weight_decay < math.inf:
            raise UserError(f"weight_decay={self.weight_decay} must be a finite number >= 0")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """0 -> peak linearly over warmup_steps, then `decay` to final_lr_fraction x peak at total_steps."""
    warmup = min(config.warmup_steps, config.total_steps)
    decay_steps = max(config.total_steps, warmup + 1)  # counted from step 0, warmup included (optax's convention)
    end_value = config.learning_rate * config.final_lr_fraction
    if config.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=config.learning_rate,
                                                  warmup_steps=warmup, decay_steps=decay_steps, end_value=end_value)
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup),
                                 optax.linear_schedule(config.learning_rate, end_value, decay_steps - warmup)],
                                [warmup])


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                        weight_decay=config.weight_decay, mask=_decay_mask)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw


def _decay_mask(params: optax.Params) -> optax.Params:
    # Decay matrices only: norm scales (1-D) are not decayed, the usual practice for transformers. A stacked
    # model's block parameters (lm_core.stacked) have one more axis, for their layer.
    def is_matrix(path: tuple, p: jax.Array) -> bool:
        stacked = any(getattr(key, "key", None) == STACKED_BLOCKS for key in path)
        return p.ndim - stacked > 1

    return jax.tree_util.tree_map_with_path(is_matrix, params)
