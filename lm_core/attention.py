"""Grouped-query self-attention with rotary embeddings, optional QK-norm and an explicit KV cache.

Two seams for paper packages:
- every call returns this layer's keys and values as projected, BEFORE QK-norm and RoPE (`LayerKV`), which is
  the space a KV predictor learns to produce;
- `injected_kv` replaces the layer's own K,V projections by given ones (same pre-norm, pre-RoPE space), so a
  frozen model can run on predicted K,V.

The cache is a plain pytree passed in and returned (see `lm_core.kv_cache`); it holds keys AFTER QK-norm and
RoPE so that decoding never re-rotates old keys.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.layers import RMSNorm, apply_rope, dense, fan_in_init, param
from lm_core.sharding import constrain

Array = jax.Array
MASKED = -1e30  # added to scores of masked keys; finite so fully masked rows (padding) stay NaN-free


class LayerKV(NamedTuple):
    keys: Array  # [batch, seq, kv_heads, head_dim], before QK-norm and RoPE
    values: Array  # [batch, seq, kv_heads, head_dim]


class LayerCache(NamedTuple):
    keys: Array  # [batch, cache_len, kv_heads, head_dim], after QK-norm and RoPE
    values: Array  # [batch, cache_len, kv_heads, head_dim]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd, dtype = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim,
                               config.weights_dtype)
        self.config = config
        self.query_proj = param(rngs, fan_in_init(0, (1, 2)), (d, h, hd), ("embed", "heads", "head_dim"), dtype)
        self.key_proj = param(rngs, fan_in_init(0, (1, 2)), (d, kv, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.value_proj = param(rngs, fan_in_init(0, (1, 2)), (d, kv, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.out_proj = param(rngs, fan_in_init((0, 1), 2), (h, hd, d), ("heads", "head_dim", "embed"), dtype)
        if config.qk_norm:
            self.query_norm = RMSNorm(hd, config, rngs=rngs)
            self.key_norm = RMSNorm(hd, config, rngs=rngs)

    def project_kv(self, x: Array) -> LayerKV:
        dtype = self.config.compute_dtype
        keys = dense(x, self.key_proj[...].astype(dtype))  # [batch, seq, kv_heads, hd]
        values = dense(x, self.value_proj[...].astype(dtype))
        return LayerKV(keys, values)

    def keys_for_cache(self, keys: Array, positions: Array) -> Array:
        """Pre-RoPE keys -> the form the cache stores (QK-norm, then RoPE at their positions)."""
        if self.config.qk_norm:
            keys = self.key_norm(keys)
        return apply_rope(keys, positions, self.config.rope_theta)

    def __call__(self, x: Array, positions: Array, segment_ids: Array, *, cache: LayerCache | None = None,
                 cache_segment_ids: Array | None = None, cache_index: Array | None = None,
                 injected_kv: LayerKV | None = None) -> tuple[Array, LayerCache | None, LayerKV]:
        """x: [batch, seq, d_model]. Without a cache, tokens attend causally within their own segment.

        With a cache, this call's K,V are written at slots [cache_index, cache_index + seq) and queries attend to
        every filled slot up to their own whose segment id matches (`cache_segment_ids` already includes this
        call's segment ids).
        """
        config, dtype = self.config, self.config.compute_dtype
        queries = dense(x, self.query_proj[...].astype(dtype))  # [batch, seq, heads, hd]
        kv = injected_kv if injected_kv is not None else self.project_kv(x)
        keys, values = kv.keys.astype(dtype), kv.values.astype(dtype)
        if config.qk_norm:
            queries = self.query_norm(queries)
        queries = constrain(apply_rope(queries, positions, config.rope_theta),
                            ("batch", "act_seq", "act_heads", None))
        keys = self.keys_for_cache(keys, positions)

        seq_len = x.shape[1]
        if cache is None:
            new_cache = None
            query_slots = jnp.arange(seq_len)
            key_slots = query_slots
            key_segments = segment_ids
        else:
            index = jnp.asarray(cache_index, jnp.int32)
            new_cache = LayerCache(
                jax.lax.dynamic_update_slice_in_dim(cache.keys, keys.astype(cache.keys.dtype), index, axis=1),
                jax.lax.dynamic_update_slice_in_dim(cache.values, values.astype(cache.values.dtype), index, axis=1),
            )
            keys, values = new_cache.keys.astype(dtype), new_cache.values.astype(dtype)
            query_slots = index + jnp.arange(seq_len)
            key_slots = jnp.arange(keys.shape[1])
            key_segments = cache_segment_ids

        mask = (key_slots[None, None, :] <= query_slots[None, :, None]) & (
            segment_ids[:, :, None] == key_segments[:, None, :])  # [batch, q_seq, k_seq]
        out = grouped_query_attention(queries, keys, values, mask)  # [batch, seq, heads, hd]
        out = dense(out, self.out_proj[...].astype(dtype), contract=2)
        return out, new_cache, kv


def grouped_query_attention(queries: Array, keys: Array, values: Array, mask: Array) -> Array:
    """Softmax attention where each group of query heads shares one key/value head.

    queries: [batch, q_seq, heads, hd]; keys, values: [batch, k_seq, kv_heads, hd]; mask: [batch, q_seq, k_seq].
    """
    batch, q_seq, heads, head_dim = queries.shape
    kv_heads = keys.shape[2]
    grouped = queries.reshape(batch, q_seq, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgh,btkh->bkgqt", grouped, keys).astype(jnp.float32) * head_dim**-0.5
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgqt,btkh->bqkgh", weights, values)
    return out.reshape(batch, q_seq, heads, head_dim)
