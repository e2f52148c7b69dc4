"""The KV cache: an explicit pytree passed into the model and returned updated (no hidden mutable state)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lm_core.attention import LayerCache
from lm_core.config import ModelConfig

Array = jax.Array


class KVCache(NamedTuple):
    layers: tuple[LayerCache, ...]  # one per layer; keys stored after QK-norm and RoPE
    segment_ids: Array  # [batch, cache_len] segment id of each filled slot; 0 = empty (never attended)
    index: Array  # int32 scalar: the next free slot (all rows of the batch advance together)

    @property
    def capacity(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(config: ModelConfig, batch_size: int, cache_len: int, dtype: Any = None) -> KVCache:
    dtype = dtype or config.compute_dtype
    shape = (batch_size, cache_len, config.num_kv_heads, config.head_dim)
    layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))
    return KVCache(layers, jnp.zeros((batch_size, cache_len), jnp.int32), jnp.zeros((), jnp.int32))


def cache_logical_axes(cache: KVCache) -> KVCache:
    """Logical axis names of every cache array, for `lm_core.sharding.tree_shardings`."""
    kv_axes = ("batch", "cache_seq", "act_kv_heads", None)
    layers = tuple(LayerCache(kv_axes, kv_axes) for _ in cache.layers)
    return KVCache(layers, ("batch", "cache_seq"), ())
