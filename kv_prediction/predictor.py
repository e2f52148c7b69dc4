"""The KV predictor P: per base layer, one linear map (with bias) for keys and one for values.

Base layer i's K (resp. V) is predicted from aux layer j(i)'s K (resp. V), flattened over KV heads:
kv_heads_A·head_dim_A -> kv_heads_B·head_dim_B. No nonlinearity and no mixing across layers (paper §"Parts").
Everything lives in the pre-QK-norm, pre-RoPE space of `lm_core.attention.LayerKV`: the base applies its own
key norm and rotary embedding when it reads the predicted cache.

The kernel is stored unflattened as [kv_heads_A, head_dim_A, kv_heads_B, head_dim_B] (the same linear map) so the
output heads can carry the "kv_heads" logical axis and shard over `tensor` exactly like the base's own K,V.

Initialisation: when the aux and base K,V have the same shape (every LP aux, and canonical auxes of the same
width) the maps start as the identity with zero bias, so a fresh LP predictor hands the base the copied layers'
own K,V, which is already a sensible cache; otherwise they start from a fan-in truncated normal (zero bias), as
the reference's `nn.Linear` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kv_prediction.layer_map import validate_layer_map
from lm_core.attention import LayerKV
from lm_core.config import ModelConfig
from lm_core.layers import fan_in_init, param

Array = jax.Array
KERNEL_AXES = (None, None, "kv_heads", None)  # [kv_heads_A, head_dim_A, kv_heads_B, head_dim_B]
BIAS_AXES = ("kv_heads", None)  # [kv_heads_B, head_dim_B]


def identity_init(key: Array, shape: tuple[int, ...], dtype: jnp.dtype) -> Array:
    """An identity map in the 4-axis kernel layout (needs (kv_A, hd_A) == (kv_B, hd_B))."""
    del key
    kv_heads, head_dim = shape[:2]
    return jnp.eye(kv_heads * head_dim, dtype=dtype).reshape(shape)


class KVLinear(nnx.Module):
    """One affine map from an aux layer's K (or V) to a base layer's K (or V)."""

    def __init__(self, in_heads: int, in_dim: int, out_heads: int, out_dim: int, *, identity: bool,
                 config: ModelConfig, rngs: nnx.Rngs):
        init: Callable = identity_init if identity else fan_in_init((0, 1), (2, 3))
        self.compute_dtype = config.compute_dtype
        self.kernel = param(rngs, init, (in_heads, in_dim, out_heads, out_dim), KERNEL_AXES, config.weights_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (out_heads, out_dim), BIAS_AXES, config.weights_dtype)

    def __call__(self, x: Array) -> Array:
        """x: [batch, seq, kv_heads_A, head_dim_A] -> [batch, seq, kv_heads_B, head_dim_B]."""
        dtype = self.compute_dtype
        y = jnp.einsum("bskh,khmd->bsmd", x.astype(dtype), self.kernel[...].astype(dtype))
        return y + self.bias[...].astype(dtype)


class LayerPredictor(nnx.Module):
    """The key map and the value map of one base layer."""

    def __init__(self, base_config: ModelConfig, aux_config: ModelConfig, *, identity: bool, rngs: nnx.Rngs):
        shapes = (aux_config.num_kv_heads, aux_config.head_dim, base_config.num_kv_heads, base_config.head_dim)
        self.keys = KVLinear(*shapes, identity=identity, config=base_config, rngs=rngs)
        self.values = KVLinear(*shapes, identity=identity, config=base_config, rngs=rngs)

    def __call__(self, aux_kv: LayerKV) -> LayerKV:
        return LayerKV(self.keys(aux_kv.keys), self.values(aux_kv.values))


class KVPredictor(nnx.Module):
    """Maps the aux model's per-layer K,V (n_aux layers) to a predicted base K,V (n_base layers)."""

    def __init__(self, base_config: ModelConfig, aux_config: ModelConfig, layer_map: Sequence[int], *,
                 rngs: nnx.Rngs, identity_when_square: bool = True):
        self.layer_map = validate_layer_map(layer_map, base_config.num_layers, aux_config.num_layers)
        self.num_aux_layers = aux_config.num_layers
        same_shape = (aux_config.num_kv_heads, aux_config.head_dim) == (base_config.num_kv_heads,
                                                                        base_config.head_dim)
        identity = identity_when_square and same_shape
        self.layers = nnx.List([LayerPredictor(base_config, aux_config, identity=identity, rngs=rngs)
                                for _ in self.layer_map])

    def __call__(self, aux_kv: Sequence[LayerKV]) -> tuple[LayerKV, ...]:
        """aux_kv: n_aux x LayerKV [batch, seq, kv_A, hd_A] -> n_base x LayerKV [batch, seq, kv_B, hd_B]."""
        if len(aux_kv) != self.num_aux_layers:
            raise ValueError(f"the predictor expects K,V of {self.num_aux_layers} aux layers, got {len(aux_kv)}")
        return tuple(layer(aux_kv[j]) for layer, j in zip(self.layers, self.layer_map, strict=True))
