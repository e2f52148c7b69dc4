"""Training only A and P: an optimizer wrapper that leaves every base parameter exactly where it is.

`KVPModel.frozen_base()` already makes the base's gradients exactly zero; this is the second half. Without it
AdamW's decoupled weight decay would still shrink the base, and its moments would double the base's memory.

`freeze_base(optimizer)` is `optax.multi_transform`: `optimizer` for every parameter outside "base/...", and
`set_to_zero` for the base, whose optimizer state is an empty `optax.MaskedNode` (no memory, nothing to
checkpoint).

`trainable_filter` is the same split as an NNX filter, e.g. `nnx.Optimizer(model, tx, wrt=trainable_filter)` or
`nnx.state(model, trainable_filter)`.
"""

from __future__ import annotations

from typing import Any

import jax
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


def freeze_base(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on A and P; a zero update and no optimizer state (an empty MaskedNode) for every base parameter.

    Clipping and weight decay therefore see only the trainable parameters, as if the base were not there.
    """

    def labels(params: optax.Params) -> optax.Params:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if is_frozen_path(path) else "trainable", params)

    return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def make_kvp_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """lm_core's AdamW + warmup/cosine + clipping (paper: AdamW(0.9, 0.95), wd 0.1, clip 1.0), base frozen."""
    return freeze_base(make_optimizer(config))


def _outside_base(path: tuple, value: Any) -> bool:
    del value
    return not path or path[0] != BASE


trainable_filter = nnx.All(nnx.Param, _outside_base)
