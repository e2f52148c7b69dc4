"""Auxiliary-model specs as written in configs: "lp0.50" (layer-pruned base) or "c64x2" (canonical d=64, 2 layers)."""

from __future__ import annotations

import re

from flax import nnx

from kv_prediction.auxiliary import validate_pair
from kv_prediction.model import KVPModel
from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.model import Transformer

VALID = "lp<fraction> (lp0.75, lp0.50, lp0.25) or c<d_model>x<layers> (e.g. c64x2)"


def is_layer_pruned(spec: str) -> bool:
    return spec.startswith("lp")


def keep_fraction(spec: str) -> float:
    try:
        value = float(spec[2:])
    except ValueError:
        raise UserError(f"auxiliary spec {spec!r} is not valid; valid: {VALID}") from None
    if not 0 < value < 1:
        raise UserError(f"auxiliary spec {spec!r}: the kept fraction must be in (0, 1); valid: {VALID}")
    return value


def canonical_config(base: ModelConfig, spec: str) -> ModelConfig:
    """A smaller model of the base's family: same vocabulary, head size, QK-norm and context length."""
    match = re.fullmatch(r"c(\d+)x(\d+)", spec)
    if not match:
        raise UserError(f"auxiliary spec {spec!r} is not valid; valid: {VALID}")
    d_model, layers = int(match[1]), int(match[2])
    if d_model % base.head_dim:
        raise UserError(f"auxiliary spec {spec!r}: d_model={d_model} must be a multiple of the base's head_dim="
                        f"{base.head_dim}")
    heads = d_model // base.head_dim
    kv_heads = heads if heads % base.num_query_groups else heads // base.num_query_groups
    config = base.replace(d_model=d_model, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, d_ff=0,
                          head_dim=base.head_dim)
    validate_pair(base, config)
    return config


def auxiliary_config(base: ModelConfig, spec: str) -> ModelConfig:
    if is_layer_pruned(spec):
        from kv_prediction.auxiliary import layer_pruned_config

        return layer_pruned_config(base, keep_fraction(spec))
    return canonical_config(base, spec)


def build_kvp_model(base_config: ModelConfig, spec: str, seed: int) -> KVPModel:
    """A KVPModel with a freshly initialised base (weights are loaded later) and the auxiliary `spec`."""
    rngs = nnx.Rngs(seed)
    base = Transformer(base_config, rngs=rngs)
    if is_layer_pruned(spec):
        return KVPModel.layer_pruned(base, keep_fraction(spec), rngs=rngs)
    return KVPModel(base, Transformer(canonical_config(base_config, spec), rngs=rngs), rngs=rngs)
