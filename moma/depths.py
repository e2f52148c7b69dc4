"""Staged mixture-of-depths (MoD): on alternating layers only the top c_d of each row's tokens are processed.

A sigmoid router scores every token; each row (sequence) picks its own top ceil(c_d · n_real) real tokens
(segment id != 0), and the layer (attention AND FFN, i.e. a whole lm_core `Block`) runs on those only, gathered
into a [batch, slots, d] sub-batch (slots = ceil(c_d · seq)) that keeps each row's chosen tokens in their original
order, with their positions and segment ids (documents stay apart, attention stays causal in the original order);
the others skip the layer on the residual path, bit for bit unchanged. The chosen tokens' residual update is scaled
by their router score, which is how the router gets a gradient. The choice is moma.routing's `Router` with one
chooser and the rows as its routing groups: the top-k spans the row, so it is non-causal within the row; causal
inference uses auxiliary routers (`routing=RoutingMode("causal")`: a token goes through the layer iff its aux score
> 0.5, first come within its row, still weighted by this router's score; rows never compete for slots).

Why per row: batch stays the leading axis of the sub-batch, so it shards over the batch mesh axes like every other
activation, and no attention row holds more than seq tokens (a top-k over the flattened batch would give one row
of c_d · batch · seq tokens, O((c_d · T)^2) attention on one device). It is also what the original MoD paper does
(Raposo et al. 2024, per-sequence top-k). MoMa (Lin et al. 2024) describes its MoD router as picking the top
c_d = 25% of the tokens of the batch, batch-level like its experts (each expert picks the top-k tokens of its
modality in the batch); per-row MoD deviates from that: the same share c_d, but tokens compete only within their
own row. The experts keep batch-level expert choice (`moma.experts`, unchanged: inside a MoD layer
they route over the whole [batch, slots] sub-batch).

The FFN seam cannot express "skip attention too", so MoD wraps whole blocks: `build_moma_model` builds an lm_core
`Transformer` whose blocks 0, 2, 4, ... are `MoDBlock`s around them (`wrap_block`; the wrapped block's parameters
sit under `blocks/<i>/block/...`, or stacked with a scanned model: `stacked_blocks/0/block/...`).
Static shapes: every row has ceil(c_d · seq) slots; with padding only ceil(c_d · n_real_in_row) of them are
valid, the rest run with segment id 0 and an update weight of 0.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.layers import Aux, FeedForward, TokenContext
from lm_core.model import HIDDEN_AXES, Block, LayerInputs, LayerOutput, Transformer
from lm_core.sharding import constrain
from moma.experts import moma_ffn_factory
from moma.routing import EXPERT_CHOICE, Router, Routing, RoutingMode, routing_aux_statistics
from moma.variants import MoMaConfig, check_fits_model

Array = jax.Array


class Selection(NamedTuple):
    index: Array  # [batch, slots] int32 token index within the row, ascending (original order)
    weight: Array  # [batch, slots] float32 router score, 0 for invalid slots
    valid: Array  # [batch, slots] bool: within the row's budget ceil(c_d · n_real_in_row) and a real token


def mod_layers(num_layers: int) -> tuple[int, ...]:
    """The MoD layers of a staged model: every other layer, starting at layer 0."""
    return tuple(range(0, num_layers, 2))


def row_selection(routing: Routing, in_token_order: bool) -> Selection:
    """A one-chooser `Routing` over rows ([batch, 1, slots]) as each row's `Selection`; expert choice's picks
    (best first) sorted back into token order, which causal attention inside the layer needs (first-come causal
    slots already are)."""
    index, weight, valid = routing.token_index[:, 0], routing.gate[:, 0], routing.valid[:, 0]
    if not in_token_order:
        return Selection(index, weight, valid)
    order = jnp.argsort(index, axis=-1)
    return Selection(*(jnp.take_along_axis(a, order, axis=-1) for a in (index, weight, valid)))


def gather_rows(x: Array, index: Array) -> Array:
    """x [batch, seq, ...] at index [batch, slots] -> [batch, slots, ...] (row b takes x[b, index[b]])."""
    return jax.vmap(lambda row, idx: jnp.take(row, idx, axis=0))(x, index)


def scatter_add_rows(x: Array, index: Array, update: Array) -> Array:
    """x [batch, seq, d] with update [batch, slots, d] added at index [batch, slots], row by row."""
    return jax.vmap(lambda row, idx, upd: row.at[idx].add(upd))(x, index, update)


def selected_context(context: TokenContext, selection: Selection) -> TokenContext:
    """[batch, slots] context of each row's selected tokens: their ids, positions and segment ids.

    Invalid slots get segment 0 (padding), so they neither attend to nor are seen by real tokens, and MoE layers
    inside the block do not route them. The rng and routing mode pass through to the block's FFN.
    """
    segments = jnp.where(selection.valid, gather_rows(context.segment_ids, selection.index), 0)
    return context.replace(tokens=gather_rows(context.tokens, selection.index),
                           positions=gather_rows(context.positions, selection.index),
                           segment_ids=segments.astype(jnp.int32))


class MoDBlock(nnx.Module):
    """An lm_core `Block` that only the router's top c_d of each row's tokens go through."""

    def __init__(self, block: Block, config: ModelConfig, capacity: float, *, rngs: nnx.Rngs):
        self.block = block
        self.router = Router(config, 1, capacity=capacity, rngs=rngs)

    def select(self, x: Array, real: Array, mode: RoutingMode | None = None) -> tuple[Selection, Aux]:
        """Each row's top c_d (expert choice), or its tokens whose aux score > 0.5 (causal; see moma.routing).

        x [batch, seq, d], real [batch, seq]. Causal mode has ceil(causal_capacity · seq) slots per row, filled
        first come in the row's token order (all seq by default, so nothing is dropped).
        """
        mode = mode or RoutingMode()
        routing = self.router(x, real, mode)  # the rows are the routing groups
        if mode.name == EXPERT_CHOICE:
            return row_selection(routing, in_token_order=True), routing_aux_statistics("mod", routing, real)
        demand = jnp.sum(routing.budget)  # one chooser: each row's budget is its demand
        overflow = (demand - jnp.sum(routing.valid)) / jnp.maximum(demand, 1.0)
        return row_selection(routing, in_token_order=False), {"mod_causal_overflow": overflow}

    def __call__(self, x: Array, inputs: LayerInputs) -> LayerOutput:
        """Same contract as `Block.__call__`, without cache or injected K,V; the returned K,V are the selected
        tokens' ([batch, slots, kv_heads, head_dim]).

        aux["mod_selected_fraction"]: valid slots over real tokens, pooled over the batch (total / total).
        """
        context = inputs.context
        if inputs.cache is not None or inputs.injected_kv is not None:
            raise NotImplementedError("mixture-of-depths layers route over the whole sequence; cached decoding "
                                      "and injected K,V need causal auxiliary routers")
        real = context.segment_ids != 0  # [batch, seq]
        selection, routing_aux = self.select(x, real, context.routing)
        selected = constrain(gather_rows(x, selection.index), HIDDEN_AXES)  # [batch, slots, d]: batch-sharded
        processed, _, kv, aux = self.block(selected, LayerInputs(selected_context(context, selection)))
        update = (processed - selected) * selection.weight[..., None].astype(x.dtype)  # [batch, slots, d]
        out = constrain(scatter_add_rows(x, selection.index, update), HIDDEN_AXES)
        selected_fraction = jnp.sum(selection.valid) / jnp.maximum(jnp.sum(real), 1)
        return LayerOutput(out, None, kv, dict(aux, mod_selected_fraction=selected_fraction, **routing_aux))


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

    def wrap_block(index: int, block: Block) -> nnx.Module:
        return MoDBlock(block, model_config, moma.mod_capacity, rngs=rngs) if index in routed_layers else block

    return Transformer(model_config, rngs=rngs, ffn_factory=ffn_factory, wrap_block=wrap_block)
