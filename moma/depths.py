"""Staged mixture-of-depths (MoD): on alternating layers only the top c_d of the batch's tokens are processed.

A sigmoid router scores every token; the layer (attention AND FFN, i.e. a whole lm_core `Block`) runs on the
chosen tokens only, gathered into one short sequence that keeps their order, positions and documents (each row's
documents become distinct segments, so no token sees another row or document and attention stays causal in the
original order); the others skip the layer on the residual path, bit for bit unchanged. The chosen tokens' residual
update is scaled by their router score, which is how the router gets a gradient. Like expert choice, the top-k spans
the whole batch, so it is non-causal; causal inference uses auxiliary routers (`moma.aux_routers`: in causal mode a
token goes through the layer iff its aux score > 0.5, still weighted by this router's score).

The FFN seam cannot express "skip attention too", so MoD wraps whole blocks: `build_moma_model` builds an lm_core
`Transformer` and replaces blocks 0, 2, 4, ... by `MoDBlock`s around them (the wrapped block's parameters move
under `blocks/<i>/block/...`). Static shapes: the sub-sequence has ceil(c_d · T) slots (T = batch · seq); with
padding only ceil(c_d · n_real) of them are valid, the rest run with segment id 0 and an update weight of 0.
Cost and sharding note: the sub-sequence is ONE row of c_d · T tokens, so its attention is O((c_d · T)^2) and it
is not split over the batch mesh axes; fine at research scale, a per-row variant would be needed beyond that.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.attention import LayerCache, LayerKV
from lm_core.config import ModelConfig
from lm_core.layers import Aux, FeedForward, TokenContext, dense, fan_in_init, param
from lm_core.model import Block, Transformer
from moma import aux_routers
from moma.experts import moma_ffn_factory
from moma.variants import MoMaConfig, check_fits_model

Array = jax.Array


class Selection(NamedTuple):
    index: Array  # [slots] int32 flat token index, ascending (original order)
    weight: Array  # [slots] float32 router score, 0 for invalid slots
    valid: Array  # [slots] bool: within the budget ceil(c_d · n_real) and a real token


def mod_layers(num_layers: int) -> tuple[int, ...]:
    """The MoD layers of a staged model: every other layer, starting at layer 0."""
    return tuple(range(0, num_layers, 2))


def select_tokens(scores: Array, real: Array, capacity: float) -> Selection:
    """The top ceil(capacity · n_real) real tokens by score ([tokens] in), sorted back into token order."""
    slots = max(1, math.ceil(capacity * scores.shape[0]))
    top, index = jax.lax.top_k(jnp.where(real, scores, -1.0), slots)  # sigmoid scores >= 0 beat padding's -1
    budget = jnp.ceil(capacity * jnp.sum(real, dtype=jnp.float32))
    valid = (jnp.arange(slots) < budget) & (top >= 0)
    order = jnp.argsort(index)  # causal attention needs the original order
    return Selection(index[order].astype(jnp.int32), jnp.where(valid, top, 0.0)[order], valid[order])


def selected_context(context: TokenContext, selection: Selection) -> TokenContext:
    """[1, slots] context of the selected tokens: their ids and positions, one segment per (row, document).

    Invalid slots get segment 0 (padding), so they neither attend to nor are seen by real tokens, and MoE layers
    inside the block do not route them.
    """
    seq = context.tokens.shape[1]
    row = selection.index // seq
    segments = context.segment_ids.reshape(-1)[selection.index]
    documents_per_row = jnp.max(context.segment_ids) + 1
    sub_segments = jnp.where(selection.valid, row * documents_per_row + segments, 0)
    return TokenContext(context.tokens.reshape(-1)[selection.index][None],
                        context.positions.reshape(-1)[selection.index][None], sub_segments[None].astype(jnp.int32))


class MoDBlock(nnx.Module):
    """An lm_core `Block` that only the router's top c_d of the batch's tokens go through."""

    def __init__(self, block: Block, config: ModelConfig, capacity: float, *, rngs: nnx.Rngs):
        self.block = block
        self.capacity = capacity
        self.compute_dtype = config.compute_dtype
        self.router = param(rngs, fan_in_init(0, 1), (config.d_model, 1), ("embed", None), config.weights_dtype)
        # causal routing (moma.aux_routers): attached after main training; no parameters until then
        self.aux_router_outputs = 1
        self.aux_router = nnx.data(None)
        self.routing_mode = aux_routers.EXPERT_CHOICE
        self.causal_capacity = 1.0

    def scores(self, x: Array) -> Array:
        """x [tokens, d] -> [tokens] float32 sigmoid(x·w)."""
        return jax.nn.sigmoid(dense(x, self.router[...].astype(self.compute_dtype))[:, 0].astype(jnp.float32))

    def select(self, flat: Array, real: Array) -> tuple[Selection, Aux]:
        """The batch's top c_d (expert choice), or the tokens whose aux score > 0.5 (causal; see moma.aux_routers).

        Causal mode has ceil(causal_capacity · T) slots filled first come in token order (all T by default, so
        nothing is dropped and the sub-sequence is the whole batch's real tokens that chose the layer).
        """
        scores = self.scores(flat)  # [tokens]
        chosen = select_tokens(scores, real, self.capacity)
        if self.aux_router is None:
            return chosen, {}
        targets = aux_routers.selection_targets(chosen.index[None], chosen.valid[None], flat.shape[0])  # [T, 1]
        if self.routing_mode == aux_routers.EXPERT_CHOICE:
            return chosen, aux_routers.aux_router_statistics("mod", self.aux_router(flat), targets, real)
        decisions = targets[:, 0] if self.routing_mode == aux_routers.ORACLE else self.aux_router(flat)[:, 0] > 0
        decisions = decisions & real
        index, valid = aux_routers.first_come_slots(decisions, aux_routers.causal_slots(flat.shape[0],
                                                                                         self.causal_capacity))
        demand = jnp.sum(decisions, dtype=jnp.float32)
        overflow = (demand - jnp.sum(valid)) / jnp.maximum(demand, 1.0)
        return Selection(index, jnp.where(valid, scores[index], 0.0), valid), {"mod_causal_overflow": overflow}

    def __call__(self, x: Array, context: TokenContext, cache: LayerCache | None, cache_segment_ids: Array | None,
                 cache_index: Array | None, injected_kv: LayerKV | None
                 ) -> tuple[Array, LayerCache | None, LayerKV, Aux]:
        """Same contract as `Block.__call__`, without cache or injected K,V; the returned K,V are the selected
        tokens' ([1, slots, kv_heads, head_dim])."""
        if cache is not None or injected_kv is not None:
            raise NotImplementedError("mixture-of-depths layers route over the whole batch; cached decoding and "
                                      "injected K,V need causal auxiliary routers")
        batch, seq, d = x.shape
        flat = x.reshape(batch * seq, d)  # [tokens, d]
        real = context.segment_ids.reshape(-1) != 0
        selection, routing_aux = self.select(flat, real)
        selected = jnp.take(flat, selection.index, axis=0)[None]  # [1, slots, d]
        processed, _, kv, aux = self.block(selected, selected_context(context, selection), None, None, None, None)
        update = (processed[0] - selected[0]) * selection.weight[:, None].astype(x.dtype)  # [slots, d]
        out = flat.at[selection.index].add(update).reshape(batch, seq, d)
        selected_fraction = jnp.sum(selection.valid) / jnp.maximum(jnp.sum(real), 1)
        return out, None, kv, dict(aux, mod_selected_fraction=selected_fraction, **routing_aux)


def build_moma_model(model_config: ModelConfig, moma: MoMaConfig, *, rngs: nnx.Rngs) -> Transformer:
    """An lm_core Transformer with MoMa's FFN in every layer, and MoD on layers 0, 2, 4, ... when `moma.mod`."""
    check_fits_model(moma, model_config)
    routed_layers = mod_layers(model_config.num_layers) if moma.mod else ()
    bounded = moma_ffn_factory(moma)
    # A MoD layer's FFN sees only the tokens its router picked, in any modality mix, so the max_*_fraction bounds
    # (set from the data's mix) do not hold there: its expert slots stay sized for all of its tokens.
    unbounded = moma_ffn_factory(dataclasses.replace(moma, max_text_fraction=1.0, max_image_fraction=1.0))

    def ffn_factory(config: ModelConfig, layer_index: int, layer_rngs: nnx.Rngs) -> FeedForward:
        return (unbounded if layer_index in routed_layers else bounded)(config, layer_index, layer_rngs)

    model = Transformer(model_config, rngs=rngs, ffn_factory=ffn_factory)
    for index in routed_layers:
        model.blocks[index] = MoDBlock(model.blocks[index], model_config, moma.mod_capacity, rngs=rngs)
    return model
