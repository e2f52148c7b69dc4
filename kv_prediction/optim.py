"""Training only A and P: an optimizer wrapper that leaves every base parameter exactly where it is.

`KVPModel.frozen_base()` already makes the base's gradients exactly zero; this is the second half. Without it
AdamW's decoupled weight decay would still shrink the base, and its moments would double the base's memory.

`freeze_base(optimizer)` runs `optimizer` on a view of the parameter tree in which every base leaf (paths "base/...")
is an EMPTY array of the same rank, and returns all-zero updates for the base. So gradient clipping and weight
decay see only A and P, the base holds no optimizer state, and the state keeps the parameters' tree structure.
That last point is why this is not `optax.multi_transform` (`set_to_zero` for the base): multi_transform puts
`optax.MaskedNode`s into the state, which `lm_core.train_step.init_train_state` cannot yet pair with parameter
shardings (`optax.tree_map_params` without a MaskedNode-aware `is_leaf`).

`trainable_filter` is the same split as an NNX filter, e.g. `nnx.Optimizer(model, tx, wrt=trainable_filter)` or
`nnx.state(model, trainable_filter)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kv_prediction.model import BASE
from lm_core.optim import OptimizerConfig, make_optimizer


def _key_name(entry: Any) -> Any:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return getattr(entry, attribute)
    return entry


def is_frozen_path(path: tuple) -> bool:
    """True for the parameters of the base model (paths "base/...")."""
    return bool(path) and _key_name(path[0]) == BASE


def without_base(tree: Any) -> Any:
    """`tree` with every base leaf replaced by an empty array of the same rank and dtype (no memory)."""

    def empty_if_frozen(path: tuple, leaf: Any) -> Any:
        if not is_frozen_path(path):
            return leaf
        return jnp.zeros((0,) * len(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(empty_if_frozen, tree)


def freeze_base(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on A and P; a zero update and no optimizer state for every base parameter."""

    def init(params: optax.Params) -> optax.OptState:
        return optimizer.init(without_base(params))

    def update(grads: optax.Updates, state: optax.OptState, params: optax.Params | None = None
               ) -> tuple[optax.Updates, optax.OptState]:
        trainable_params = None if params is None else without_base(params)
        updates, state = optimizer.update(without_base(grads), state, trainable_params)

        def zero_if_frozen(path: tuple, update: jax.Array, grad: jax.Array) -> jax.Array:
            return jnp.zeros_like(grad) if is_frozen_path(path) else update

        return jax.tree_util.tree_map_with_path(zero_if_frozen, updates, grads), state

    return optax.GradientTransformation(init, update)


def make_kvp_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """lm_core's AdamW + warmup/cosine + clipping (paper: AdamW(0.9, 0.95), wd 0.1, clip 1.0), base frozen."""
    return freeze_base(make_optimizer(config))


def _outside_base(path: tuple, value: Any) -> bool:
    del value
    return not path or path[0] != BASE


trainable_filter = nnx.All(nnx.Param, _outside_base)
