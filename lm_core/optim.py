"""AdamW with linear warmup and cosine decay, global-norm clipping: the optimizer every experiment shares."""

from __future__ import annotations

import dataclasses

import jax
import optax

from lm_core.errors import UserError
from lm_core.stacked import STACKED_BLOCKS


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 1000
    final_lr_fraction: float = 0.1  # cosine decays to this fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise UserError(f"learning_rate={self.learning_rate} must be positive")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise UserError(f"warmup_steps={self.warmup_steps} must be >= 0 and total_steps={self.total_steps} > 0")
        if not 0 <= self.final_lr_fraction <= 1:
            raise UserError(f"final_lr_fraction={self.final_lr_fraction} must be within [0, 1]")
        if self.grad_clip < 0:
            raise UserError(f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    warmup = min(config.warmup_steps, config.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.total_steps, warmup + 1), end_value=config.learning_rate * config.final_lr_fraction)


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
