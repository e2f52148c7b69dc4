"""Upcycling: a trained MoMa 1t1i model becomes an m-t-n-i model whose experts all start as copies.

Every parameter the two models share (embedding, attention, norms, output) is copied; each expert of a group is
the 1t1i model's FFN of that modality (same parameter path, one more leading "expert" axis); routers keep their
fresh initialisation (they have nothing to copy). The caller resets the learning-rate schedule and keeps the data
position.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lm_core.errors import UserError

EXPERT_WEIGHTS = ("gate", "up", "down")


def upcycle_params(source: nnx.State, target: nnx.State) -> nnx.State:
    """`target`-shaped parameters filled from the 1t1i `source` parameters."""
    source_values = {path: variable.get_value() for path, variable in nnx.to_flat_state(source)}
    filled = []
    for path, variable in nnx.to_flat_state(target):
        value, old = variable.get_value(), source_values.get(path)
        if old is not None and old.shape == value.shape:
            new = old
        elif old is not None and path[-1] in EXPERT_WEIGHTS and old.shape == value.shape[1:]:
            new = jnp.broadcast_to(old, value.shape)  # every expert of the group starts as the modality's FFN
        elif path[-1] == "router":
            new = value
        else:
            raise UserError(f"cannot upcycle: parameter {'/'.join(map(str, path))} {value.shape} has no "
                            "counterpart in the source (is the source a 1t1i model of the same size?)")
        filled.append((path, variable.replace(new)))
    return nnx.from_flat_state(filled)
