"""The decoder-only transformer (Llama-style) with the seams the paper packages build on.

    tokens -> embedding -> num_layers x Block(attention, FFN) -> final RMSNorm -> output layer -> logits

Seams (see WORKSPACE.md): `ffn_factory` chooses each layer's FFN (MoE plugs in here and reports losses and
router statistics through `aux`); `return_kv` / `injected_kv` expose and replace each layer's K,V (KV prediction);
`cache` is an explicit `KVCache` pytree for prefill and decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.attention import Attention, LayerCache, LayerKV
from lm_core.config import ModelConfig
from lm_core.kv_cache import KVCache
from lm_core.layers import (
    Aux,
    Embedding,
    FFNFactory,
    RMSNorm,
    TokenContext,
    dense,
    dense_ffn_factory,
    fan_in_init,
    param,
)
from lm_core.sharding import constrain

Array = jax.Array
HIDDEN_AXES = ("batch", "act_seq", "act_embed")


class ModelOutput(NamedTuple):
    logits: Array  # [batch, seq, vocab] in float32
    cache: KVCache | None  # the updated cache when one was passed in
    kv: tuple[LayerKV, ...] | None  # each layer's K,V before QK-norm/RoPE when return_kv=True
    aux: tuple[Aux, ...]  # each layer's FFN aux outputs (empty dicts for dense FFNs)


class Block(nnx.Module):
    """One transformer layer. "pre" norm: x + f(norm(x)); "swin" norm (Chameleon): x + norm(f(x))."""

    def __init__(self, config: ModelConfig, layer_index: int, ffn_factory: FFNFactory, *, rngs: nnx.Rngs):
        self.swin_norm = config.norm_placement == "swin"
        self.attention_norm = RMSNorm(config.d_model, config, rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.ffn_norm = RMSNorm(config.d_model, config, rngs=rngs)
        self.ffn = ffn_factory(config, layer_index, rngs)

    def __call__(self, x: Array, context: TokenContext, cache: LayerCache | None, cache_segment_ids: Array | None,
                 cache_index: Array | None, injected_kv: LayerKV | None
                 ) -> tuple[Array, LayerCache | None, LayerKV, Aux]:
        attention_in = x if self.swin_norm else self.attention_norm(x)
        attended, cache, kv = self.attention(attention_in, context.positions, context.segment_ids, cache=cache,
                                             cache_segment_ids=cache_segment_ids, cache_index=cache_index,
                                             injected_kv=injected_kv)
        h = x + (self.attention_norm(attended) if self.swin_norm else attended)
        h = constrain(h, HIDDEN_AXES)
        ffn_out, aux = self.ffn(h if self.swin_norm else self.ffn_norm(h), context)
        out = h + (self.ffn_norm(ffn_out) if self.swin_norm else ffn_out)
        return constrain(out, HIDDEN_AXES), cache, kv, aux


class Transformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, ffn_factory: FFNFactory | None = None):
        self.config = config
        ffn_factory = ffn_factory or dense_ffn_factory
        self.embedding = Embedding(config, rngs=rngs)
        self.blocks = nnx.List([Block(config, i, ffn_factory, rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, config, rngs=rngs)
        if not config.tie_embeddings:
            self.output = param(rngs, fan_in_init(0, 1), (config.d_model, config.vocab_size), ("embed", "vocab"),
                                config.weights_dtype)

    def __call__(self, tokens: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
                 cache: KVCache | None = None, injected_kv: Sequence[LayerKV] | None = None,
                 return_kv: bool = False) -> ModelOutput:
        hidden, cache, kv, aux = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids,
                                                    cache=cache, injected_kv=injected_kv)
        return ModelOutput(self.logits(hidden), cache, kv if return_kv else None, aux)

    def hidden_states(self, tokens: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
                      cache: KVCache | None = None, injected_kv: Sequence[LayerKV] | None = None
                      ) -> tuple[Array, KVCache | None, tuple[LayerKV, ...], tuple[Aux, ...]]:
        """Final-normed hidden states [batch, seq, d_model], before the output layer.

        tokens: [batch, seq]. positions default to 0..seq-1 (offset by the cache index when decoding);
        segment_ids default to 1 everywhere (one document per row). injected_kv: one LayerKV per layer.
        """
        config = self.config
        batch, seq = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((batch, seq), jnp.int32)
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if injected_kv is not None and len(injected_kv) != config.num_layers:
            raise ValueError(f"injected_kv has {len(injected_kv)} layers, the model has {config.num_layers}")
        context = TokenContext(tokens, positions, segment_ids)

        cache_segment_ids = cache_index = None
        if cache is not None:
            cache_index = cache.index
            cache_segment_ids = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, cache.index,
                                                                    axis=1)
        x = constrain(self.embedding(tokens), HIDDEN_AXES)
        new_layers, all_kv, all_aux = [], [], []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            layer_kv = None if injected_kv is None else injected_kv[i]
            run_block = nnx.remat(type(block).__call__) if config.remat else type(block).__call__
            x, layer_cache, kv, aux = run_block(block, x, context, layer_cache, cache_segment_ids, cache_index,
                                                layer_kv)
            new_layers.append(layer_cache)
            all_kv.append(kv)
            all_aux.append(aux)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(tuple(new_layers), cache_segment_ids, cache.index + seq)
        return self.final_norm(x), new_cache, tuple(all_kv), tuple(all_aux)

    def logits(self, hidden: Array) -> Array:
        """Output layer: hidden [batch, seq, d_model] -> float32 logits [batch, seq, vocab]."""
        if self.config.tie_embeddings:
            logits = self.embedding.attend(hidden)
        else:
            logits = dense(hidden, self.output[...].astype(self.config.compute_dtype))
        return constrain(logits.astype(jnp.float32), ("batch", "act_seq", "act_vocab"))

    def output_matrix(self) -> Array:
        """The [d_model, vocab] output-layer weights (the transposed embedding when tied)."""
        return self.embedding.table[...].T if self.config.tie_embeddings else self.output[...]

    def prefill(self, tokens: Array, positions: Array, segment_ids: Array, cache_len: int) -> tuple[Array, KVCache]:
        """(final-normed hidden states [batch, seq, d_model], a cache of `cache_len` slots holding this prompt).

        The same as `hidden_states` on an empty cache, but attention runs cache-free: a fresh prompt only attends
        to itself, so causal query blocks can skip later keys (`attention.causal_blocks`) instead of scoring
        every slot of the cache buffer. Tests: tests/test_model.py (prefill == cached forward).
        """
        hidden, _, kv, _ = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids)
        return hidden, self.cache_from_kv(kv, positions, segment_ids, cache_len)

    def cache_from_kv(self, kv: Sequence[LayerKV], positions: Array, segment_ids: Array,
                      cache_len: int) -> KVCache:
        """A cache holding the given pre-RoPE per-layer K,V in slots [0, seq), as if the model had computed them.

        This is how a predicted KV cache (kv_prediction) becomes something `__call__` can decode from.
        """
        batch, seq = segment_ids.shape
        dtype = self.config.compute_dtype
        pad = [(0, 0), (0, cache_len - seq), (0, 0), (0, 0)]
        layers = tuple(
            LayerCache(jnp.pad(block.attention.keys_for_cache(layer.keys.astype(dtype), positions), pad),
                       jnp.pad(layer.values.astype(dtype), pad))
            for block, layer in zip(self.blocks, kv, strict=True))
        segments = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, cache_len - seq)])
        return KVCache(layers, segments, jnp.asarray(seq, jnp.int32))
