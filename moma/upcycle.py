"""Upcycling: a trained MoMa 1t1i model becomes an m-t-n-i model whose experts all start as copies.

Every parameter the two models share (embedding, attention, norms, output, MoD routers) is copied; each expert of
a group is the 1t1i model's FFN of that modality (1t1i stores it as a group of one stacked expert, so this is a
broadcast along the "expert" axis); the expert routers, which have nothing to copy, keep their fresh
initialisation. The caller turns on router noise (`router_noise=True` in the target config plus
`moma.experts.with_router_noise` around the loss), resets the learning-rate schedule and keeps the data position.

At init the upcycled model is NOT the 1t1i model: a token's FFN output becomes FFN(x) · Σ_j g_j over the experts
that chose it (anywhere from 0 to |group| of them, gates in (0, 1)), which the tests check exactly.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lm_core.errors import UserError
from lm_core.model import Transformer
from moma.depths import build_moma_model
from moma.variants import MoMaConfig

EXPERT_WEIGHTS = ("gate", "up", "down")


def check_upcycle(source: MoMaConfig, target: MoMaConfig) -> None:
    """Upcycling goes from moe_1t1i to moe_<m>t<n>i with the same modality split and depth routing."""
    if (source.text_experts, source.image_experts) != (1, 1):
        raise UserError(f"upcycling starts from a moe_1t1i model, not {source.variant!r}")
    if not (target.text_experts and target.image_experts):
        raise UserError(f"upcycling produces a moe_<m>t<n>i model, not {target.variant!r}")
    for field in ("image_token_range", "mod", "mod_capacity"):
        if getattr(source, field) != getattr(target, field):
            raise UserError(f"cannot upcycle {source.variant!r} into {target.variant!r}: {field} differs "
                            f"({getattr(source, field)} vs {getattr(target, field)})")


def upcycle_params(source: nnx.State, target: nnx.State) -> nnx.State:
    """`target`-shaped parameters filled from the 1t1i `source` parameters (works on sharded states too)."""
    source_values = {path: variable.get_value() for path, variable in nnx.to_flat_state(source)}
    used, filled = set(), []
    for path, variable in nnx.to_flat_state(target):
        value, old = variable.get_value(), source_values.get(path)
        if old is not None and old.shape == value.shape:
            new = old
        elif old is not None and path[-1] in EXPERT_WEIGHTS and _one_expert_of(old.shape, value.shape):
            new = jnp.broadcast_to(old, value.shape)  # [1, ...] -> [experts, ...]: every expert = the modality FFN
        elif old is None and path[-1] == "router":
            new = value  # a fresh expert router
        else:
            found = "missing" if old is None else f"shaped {old.shape}"
            raise UserError(f"cannot upcycle: target parameter {'/'.join(map(str, path))} {value.shape} is "
                            f"{found} in the source (is the source a 1t1i model of the same size?)")
        used.add(path)
        filled.append((path, variable.replace(new)))
    if leftover := sorted("/".join(map(str, p)) for p in set(source_values) - used):
        raise UserError(f"cannot upcycle: source parameters {leftover[:3]} have no place in the target")
    return nnx.from_flat_state(filled)


def _one_expert_of(source: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether `source` is `target` with one expert where it has several (axis 0, or 1 behind stacked layers)."""
    return len(source) == len(target) and sum(s != t for s, t in zip(source, target, strict=True)) == 1 and all(
        s == t or s == 1 for s, t in zip(source, target, strict=True))


def upcycle_model(source_model: Transformer, source: MoMaConfig, target: MoMaConfig, *, rngs: nnx.Rngs
                  ) -> Transformer:
    """A new `target` model (routers initialised from `rngs`) holding the upcycled weights of `source_model`."""
    check_upcycle(source, target)
    model = build_moma_model(source_model.config, target, rngs=rngs)
    nnx.update(model, upcycle_params(nnx.state(source_model, nnx.Param), nnx.state(model, nnx.Param)))
    return model
