"""The decoder-only transformer (Llama-style) with the seams the paper packages build on.

    tokens -> embedding -> num_layers x Block(attention, FFN) -> final RMSNorm -> output layer -> logits

Seams (see WORKSPACE.md): `ffn_factory` chooses each layer's FFN (MoE plugs in here and reports losses and
router statistics through `aux`); `return_kv` / `injected_kv` expose and replace each layer's K,V (KV prediction);
`cache` is an explicit `KVCache` pytree for prefill and decode.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
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
from lm_core.stacked import layer_view, scan_stacked, set_layer_state, stack_modules

Array = jax.Array
HIDDEN_AXES = ("batch", "act_seq", "act_embed")
# ModelConfig.remat -> what a rematerialised block keeps for the backward pass (the rest is recomputed).
# "full" keeps only the block's inputs. "ffn_only" is not a policy of the whole block: attention runs as usual
# (keeping its activations: small next to the FFN's with a flash kernel, and expensive to recompute) and only the
# FFN half of each block is rematerialised (Block).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ModelOutput(NamedTuple):
    logits: Array  # [batch, seq, vocab] in float32
    cache: KVCache | None  # the updated cache when one was passed in
    kv: tuple[LayerKV, ...] | None  # each layer's K,V before QK-norm/RoPE when return_kv=True
    aux: tuple[Aux, ...]  # each layer's FFN aux outputs (empty dicts for dense FFNs)


class HiddenStates(NamedTuple):
    """What `Transformer.hidden_states` returns: everything but the output layer."""

    hidden: Array  # [batch, seq, d_model], final-normed
    cache: KVCache | None  # the updated cache when one was passed in
    kv: tuple[LayerKV, ...]  # each layer's K,V before QK-norm/RoPE (empty when return_kv=False on a scanned model)
    aux: tuple[Aux, ...]  # each layer's FFN aux outputs (empty dicts for dense FFNs)


class LayerInputs(NamedTuple):
    """What a layer reads besides its hidden states: the tokens' context and, for cached decoding or injected K,V
    (KV prediction), the cache pieces (None when unused)."""

    context: TokenContext
    cache: LayerCache | None = None
    cache_segment_ids: Array | None = None  # [batch, cache_len] of the whole cache, when `cache` is set
    cache_index: Array | None = None  # where this call's tokens are written into the cache
    injected_kv: LayerKV | None = None  # pre-QK-norm, pre-RoPE K,V to attend with instead of the layer's own


class LayerOutput(NamedTuple):
    """What a layer returns: its hidden states, its updated cache (or None), its K,V and its FFN's aux outputs."""

    hidden: Array
    cache: LayerCache | None
    kv: LayerKV
    aux: Aux


class Block(nnx.Module):
    """One transformer layer. "pre" norm: x + f(norm(x)); "swin" norm (Chameleon): x + norm(f(x))."""

    def __init__(self, config: ModelConfig, layer_index: int, ffn_factory: FFNFactory, *, rngs: nnx.Rngs):
        self.swin_norm = config.norm_placement == "swin"
        self.attention_norm = RMSNorm(config.d_model, config, rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.ffn_norm = RMSNorm(config.d_model, config, rngs=rngs)
        self.ffn = ffn_factory(config, layer_index, rngs)
        self.remat_ffn = config.remat == "ffn_only"

    def __call__(self, x: Array, inputs: LayerInputs) -> LayerOutput:
        context = inputs.context
        attention_in = x if self.swin_norm else self.attention_norm(x)
        attended, cache, kv = self.attention(attention_in, context.positions, context.segment_ids,
                                             cache=inputs.cache, cache_segment_ids=inputs.cache_segment_ids,
                                             cache_index=inputs.cache_index, injected_kv=inputs.injected_kv)
        h = x + (self.attention_norm(attended) if self.swin_norm else attended)
        h = constrain(h, HIDDEN_AXES)
        run_ffn = nnx.remat(type(self.ffn).__call__) if self.remat_ffn else type(self.ffn).__call__
        ffn_out, aux = run_ffn(self.ffn, h if self.swin_norm else self.ffn_norm(h), context)
        out = h + (self.ffn_norm(ffn_out) if self.swin_norm else ffn_out)
        return LayerOutput(constrain(out, HIDDEN_AXES), cache, kv, aux)


BlockWrapper = Callable[[int, Block], nnx.Module]  # (layer index, its Block) -> the module run as that layer


class Transformer(nnx.Module):
    """Unrolled, the layers are `blocks` (one module each). With `config.scan_layers` they are `stacked_blocks`:
    one module per position of the structure's repeating period (1, or 2 for MoMa's MoD stack) whose parameters
    carry a leading "layers" axis (lm_core.stacked). Either way `block(i)` is layer i and `set_block_state`
    writes one; the two layouts hold the same values for the same seed, but their checkpoints differ."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, ffn_factory: FFNFactory | None = None,
                 wrap_block: BlockWrapper | None = None):
        self.config = config
        ffn_factory = ffn_factory or dense_ffn_factory
        self.embedding = Embedding(config, rngs=rngs)
        blocks = [Block(config, i, ffn_factory, rngs=rngs) for i in range(config.num_layers)]
        if wrap_block is not None:  # MoMa wraps every other block in a mixture-of-depths router
            blocks = [wrap_block(i, block) for i, block in enumerate(blocks)]
        if config.scan_layers:
            period = block_period(blocks)
            self.stacked_blocks = nnx.List([stack_modules(blocks[j::period]) for j in range(period)])
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(config.d_model, config, rngs=rngs)
        if not config.tie_embeddings:
            self.output = param(rngs, fan_in_init(0, 1), (config.d_model, config.vocab_size), ("embed", "vocab"),
                                config.weights_dtype)

    def __call__(self, tokens: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
                 cache: KVCache | None = None, injected_kv: Sequence[LayerKV] | None = None,
                 return_kv: bool = False, rng: Array | None = None, routing: Hashable | None = None) -> ModelOutput:
        states = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                                    injected_kv=injected_kv, return_kv=return_kv, rng=rng, routing=routing)
        return ModelOutput(self.logits(states.hidden), states.cache, states.kv if return_kv else None, states.aux)

    def hidden_states(self, tokens: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
                      cache: KVCache | None = None, injected_kv: Sequence[LayerKV] | None = None,
                      return_kv: bool = True, rng: Array | None = None, routing: Hashable | None = None
                      ) -> HiddenStates:
        """Final-normed hidden states [batch, seq, d_model], before the output layer.

        tokens: [batch, seq]. positions default to 0..seq-1 (offset by the cache index when decoding);
        segment_ids default to 1 everywhere (one document per row). injected_kv: one LayerKV per layer.
        return_kv=False lets a scanned model (config.scan_layers) skip collecting every layer's K,V (then the
        returned K,V tuple is empty); cached calls always run the layers unrolled. `rng` and `routing` are lent to
        the layers through their `TokenContext` (each layer gets its own fold of `rng`).
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
        context = TokenContext(tokens, positions, segment_ids, rng, routing)

        cache_segment_ids = cache_index = None
        if cache is not None:
            cache_index = cache.index
            cache_segment_ids = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, cache.index,
                                                                    axis=1)
        x = constrain(self.embedding(tokens), HIDDEN_AXES)
        if config.scan_layers and cache is None:
            x, all_kv, all_aux = self._scanned_blocks(x, context, injected_kv, return_kv)
            return HiddenStates(self.final_norm(x), None, all_kv, all_aux)
        new_layers, all_kv, all_aux = [], [], []
        for i in range(config.num_layers):
            block = self.block(i)
            layer_cache = None if cache is None else cache.layers[i]
            layer_kv = None if injected_kv is None else injected_kv[i]
            x, layer_cache, kv, aux = remat_block_call(block, config.remat)(
                block, x, LayerInputs(context.for_layer(i), layer_cache, cache_segment_ids, cache_index, layer_kv))
            new_layers.append(layer_cache)
            all_kv.append(kv)
            all_aux.append(aux)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(tuple(new_layers), cache_segment_ids, cache.index + seq)
        return HiddenStates(self.final_norm(x), new_cache, tuple(all_kv), tuple(all_aux))

    def _scanned_blocks(self, x: Array, context: TokenContext, injected_kv: Sequence[LayerKV] | None,
                        return_kv: bool) -> tuple[Array, tuple[LayerKV, ...], tuple[Aux, ...]]:
        """The stacked blocks as one `jax.lax.scan` over their layer axis (config.scan_layers): XLA compiles the
        body once, not once per layer, and the parameters are scanned as stored. With a period p > 1 (MoMa's
        MoD on every other layer) each step runs p blocks. Per-layer K,V (when `return_kv`) and aux outputs come
        back unstacked, in layer order."""
        period = len(self.stacked_blocks)
        kv_in = None if injected_kv is None else [_stack(injected_kv[j::period]) for j in range(period)]
        policy = self.config.remat

        def body(h: Array, blocks: list[nnx.Module], xs: tuple) -> tuple[Array, tuple]:
            step, kvs = xs
            outputs = []
            for j, block in enumerate(blocks):
                inputs = LayerInputs(context.for_layer(step * period + j), injected_kv=None if kvs is None else kvs[j])
                h, _, kv, aux = remat_block_call(block, policy)(block, h, inputs)
                outputs.append((kv if return_kv else None, aux))
            return h, tuple(outputs)

        steps = self.config.num_layers // period
        x, outputs = scan_stacked(body, x, self.stacked_blocks, (jnp.arange(steps), kv_in))
        layers = [jax.tree.map(lambda a, s=step: a[s], outputs[j]) for step in range(steps) for j in range(period)]
        all_kv = tuple(kv for kv, _ in layers) if return_kv else ()
        return x, all_kv, tuple(aux for _, aux in layers)

    def block(self, index: int) -> nnx.Module:
        """Layer `index`'s block. Stacked, a view of its slice: reading it is fine, changing it changes nothing
        (`set_block_state` writes)."""
        if not self.config.scan_layers:
            return self.blocks[index]
        period = len(self.stacked_blocks)
        return layer_view(self.stacked_blocks[index % period], index // period)

    def block_state(self, index: int) -> nnx.State:
        return nnx.state(self.block(index))

    def set_block_state(self, index: int, state: nnx.State) -> None:
        """Overwrite layer `index`'s variables with `state` (the state of one unstacked block)."""
        if not self.config.scan_layers:
            nnx.update(self.blocks[index], state)
            return
        period = len(self.stacked_blocks)
        set_layer_state(self.stacked_blocks[index % period], index // period, state)

    def logits(self, hidden: Array) -> Array:
        """Output layer: hidden [batch, seq, d_model] -> float32 logits [batch, seq, vocab], accumulated in float32."""
        if self.config.tie_embeddings:
            logits = self.embedding.attend(hidden)
        else:
            logits = dense(hidden, self.output[...].astype(self.config.compute_dtype),
                           preferred_element_type=jnp.float32)
        return constrain(logits.astype(jnp.float32), ("batch", "act_seq", "act_vocab"))

    def output_matrix(self) -> Array:
        """The [d_model, vocab] output-layer weights (the transposed embedding when tied)."""
        return self.embedding.table[...].T if self.config.tie_embeddings else self.output[...]

    def prefill(self, tokens: Array, positions: Array, segment_ids: Array, cache_len: int) -> tuple[Array, KVCache]:
        """(final-normed hidden states [batch, seq, d_model], a cache of `cache_len` slots holding this prompt).

        The same as `hidden_states` on an empty cache, but attention runs cache-free: a fresh prompt only attends
        to itself, so causal query blocks can skip later keys (`attention_kernels.causal_blocks`) instead of scoring
        every slot of the cache buffer. Tests: tests/test_model.py (prefill == cached forward).
        """
        states = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids)
        return states.hidden, self.cache_from_kv(states.kv, positions, segment_ids, cache_len)

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
            for block, layer in zip(map(self.block, range(self.config.num_layers)), kv, strict=True))
        segments = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, cache_len - seq)])
        return KVCache(layers, segments, jnp.asarray(seq, jnp.int32))


def remat_block_call(block: nnx.Module, policy: str) -> Callable:
    """`type(block).__call__`, rematerialised with the named policy (REMAT_POLICIES); as it is for "none" and
    "ffn_only"."""
    call = type(block).__call__
    if policy not in REMAT_POLICIES:  # "none", or "ffn_only" (which the Block applies to its FFN itself)
        return call
    return nnx.remat(call, policy=REMAT_POLICIES[policy])


def block_period(blocks: Sequence[nnx.Module]) -> int:
    """The smallest p such that block i has the structure of block i mod p and p divides the depth.

    1 for a plain model; 2 for MoMa's MoD-on-every-other-layer stack. Scanning needs identical structures (the
    graph definition and every parameter shape) at the positions a scan step shares.
    """
    signatures = [_signature(block) for block in blocks]
    for period in range(1, len(blocks) + 1):
        if len(blocks) % period == 0 and all(signatures[i] == signatures[i % period] for i in range(len(blocks))):
            return period
    return len(blocks)


def _signature(block: nnx.Module) -> tuple:
    graphdef, state = nnx.split(block)
    return graphdef, jax.tree.structure(state), tuple((leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(state))


def _stack(trees: Sequence) -> object:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
