"""Grouped-query self-attention with rotary embeddings, optional QK-norm and an explicit KV cache.

Two seams for paper packages:
- every call returns this layer's keys and values as projected, BEFORE QK-norm and RoPE (`LayerKV`), which is
  the space a KV predictor learns to produce;
- `injected_kv` replaces the layer's own K,V projections by given ones (same pre-norm, pre-RoPE space), so a
  frozen model can run on predicted K,V.

The cache is a plain pytree passed in and returned (see `lm_core.kv_cache`); it holds keys AFTER QK-norm and
RoPE so that decoding never re-rotates old keys.

What attention computes is `reference_attention` at the end of this file, written plainly; `attend` runs it or one
of the optimised implementations in `lm_core.attention_kernels`, chosen by `ModelConfig.attention_impl`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.attention_kernels import (
    MASKED,
    causal_blocks,
    dot_product_attention,
    grouped_query_attention,
    splash_attention,
    trace_platform,
)
from lm_core.config import ATTENTION_IMPLS, ModelConfig
from lm_core.layers import RMSNorm, apply_rope, dense, fan_in_init, param, rope_frequencies
from lm_core.sharding import constrain

Array = jax.Array


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
        return apply_rope(keys, positions, rope_frequencies(self.config))

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
        queries = constrain(apply_rope(queries, positions, rope_frequencies(config)),
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
        # Without a cache, query slot i only sees key slots <= i, so query blocks can skip later keys.
        blocks = causal_blocks(seq_len) if cache is None else 1
        impl = resolve_attention_impl(config.attention_impl, trace_platform())
        out = attend(impl, queries, keys, values, mask, segment_ids, key_segments, blocks,
                     cached=cache is not None)  # [batch, seq, heads, hd]
        out = dense(out, self.out_proj[...].astype(dtype), contract=2)
        return out, new_cache, kv


def resolve_attention_impl(impl: str, platform: str) -> str:
    """The attention implementation `impl` ("auto" or a concrete name) means on `platform`.

    "auto" picks what is fastest there: the query-blocked XLA path on CPU (tuned for XLA:CPU), cuDNN-capable
    `jax.nn.dot_product_attention` on GPU, the Pallas splash kernel on TPU. Callers that compile for another
    platform than the one they trace on (a TPU AOT compile on a CPU host) pass the target platform here.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is unknown; valid: {list(ATTENTION_IMPLS)}")
    if impl != "auto":
        return impl
    if platform in ("gpu", "cuda", "rocm"):
        return "dot_product"
    if platform == "tpu":
        return "splash"
    return "xla_blocked"


def attend(impl: str, queries: Array, keys: Array, values: Array, mask: Array, query_segments: Array,
           key_segments: Array, blocks: int, *, cached: bool) -> Array:
    """Softmax attention by the resolved implementation `impl`; out [batch, q_seq, heads, hd] like queries.

    queries [batch, q_seq, heads, hd]; keys, values [batch, k_seq, kv_heads, hd]; mask [batch, q_seq, k_seq]
    (causal in slot order AND same segment). The kernels take the segment ids instead of the dense mask where
    they can (splash). Without a cache (`cached=False`) q_seq == k_seq and slot order is the causal order.
    """
    if impl == "reference":
        return reference_attention(queries, keys, values, mask)
    if impl == "xla_blocked":
        return grouped_query_attention(queries, keys, values, mask, blocks)
    if impl == "dot_product" or (impl == "splash" and cached):
        # Splash tiles >= 128 queries against a causal mask aligned at slot 0; a decode step (1 query at an offset
        # into the cache) is not what it is for, so cached calls take the explicit-mask dot_product path.
        return dot_product_attention(queries, keys, values, mask, causal=not cached)
    if impl == "splash":
        return splash_attention(queries, keys, values, query_segments, key_segments)
    raise ValueError(f"attention impl {impl!r} is not one of {[i for i in ATTENTION_IMPLS if i != 'auto']}")


def reference_attention(queries: Array, keys: Array, values: Array, mask: Array) -> Array:
    """softmax(q·kᵀ / sqrt(hd), masked keys excluded) · v, written plainly: the formula every implementation in
    lm_core.attention_kernels computes (`attention_impl="reference"` runs it; tests/test_attention_impl.py).

    queries [batch, q_seq, heads, hd]; keys, values [batch, k_seq, kv_heads, hd]; mask [batch, q_seq, k_seq].
    With grouped-query attention each query head h reads K,V head h // (heads / kv_heads).
    """
    group = queries.shape[2] // keys.shape[2]
    keys, values = jnp.repeat(keys, group, axis=2), jnp.repeat(values, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", queries, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None], scores * queries.shape[-1] ** -0.5, MASKED)
    weights = jax.nn.softmax(scores, axis=-1)  # [batch, heads, q_seq, k_seq], float32
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(values.dtype), values)
