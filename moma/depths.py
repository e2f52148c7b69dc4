"""Staged mixture-of-depths (MoD): on alternating layers only the top c_d of each row's tokens are processed.

A sigmoid router scores every token; each row (sequence) picks its own top ceil(c_d · n_real) real tokens
(segment id != 0), and the layer (attention AND FFN, i.e. a whole lm_core `Block`) runs on those only, gathered
into a [batch, slots, d] sub-batch (slots = ceil(c_d · seq)) that keeps each row's chosen tokens in their original
order, with their positions and segment ids (documents stay apart, attention stays causal in the original order);
the others skip the layer on the residual path, bit for bit unchanged. The chosen tokens' residual update is scaled
by their router score, which is how the router gets a gradient. The top-k spans the row, so it is non-causal
within the row; causal inference uses auxiliary routers (`moma.aux_routers`: in causal mode a token goes through
the layer iff its aux score > 0.5, first come within its row, still weighted by this router's score).

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
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.layers import Aux, FeedForward, TokenContext, dense, fan_in_init, param
from lm_core.model import HIDDEN_AXES, Block, LayerInputs, LayerOutput, Transformer
from lm_core.sharding import constrain
from moma import aux_routers
from moma.experts import moma_ffn_factory
from moma.variants import MoMaConfig, check_fits_model

Array = jax.Array


class Selection(NamedTuple):
    index: Array  # [batch, slots] int32 token index within the row, ascending (original order)
    weight: Array  # [batch, slots] float32 router score, 0 for invalid slots
    valid: Array  # [batch, slots] bool: within the row's budget ceil(c_d · n_real_in_row) and a real token


def mod_layers(num_layers: int) -> tuple[int, ...]:
    """The MoD layers of a staged model: every other layer, starting at layer 0."""
    return tuple(range(0, num_layers, 2))


def select_row_tokens(scores: Array, real: Array, capacity: float) -> Selection:
    """One row ([seq] in): its top ceil(capacity · n_real) real tokens by score, sorted back into token order.

    ceil(capacity · seq) slots; the ones past the row's budget (or on padding) are invalid, with weight 0.
    """
    slots = max(1, math.ceil(capacity * scores.shape[0]))
    top, index = jax.lax.top_k(jnp.where(real, scores, -1.0), slots)  # sigmoid scores >= 0 beat padding's -1
    budget = jnp.ceil(capacity * jnp.sum(real, dtype=jnp.float32))
    valid = (jnp.arange(slots) < budget) & (top >= 0)
    order = jnp.argsort(index)  # causal attention needs the original order
    return Selection(index[order].astype(jnp.int32), jnp.where(valid, top, 0.0)[order], valid[order])


def select_tokens(scores: Array, real: Array, capacity: float) -> Selection:
    """`select_row_tokens` for every row: scores, real [batch, seq] -> a [batch, slots] Selection."""
    return jax.vmap(select_row_tokens, in_axes=(0, 0, None))(scores, real, capacity)


def gather_rows(x: Array, index: Array) -> Array:
    """x [batch, seq, ...] at index [batch, slots] -> [batch, slots, ...] (row b takes x[b, index[b]])."""
    return jax.vmap(lambda row, idx: jnp.take(row, idx, axis=0))(x, index)


def scatter_add_rows(x: Array, index: Array, update: Array) -> Array:
    """x [batch, seq, d] with update [batch, slots, d] added at index [batch, slots], row by row."""
    return jax.vmap(lambda row, idx, upd: row.at[idx].add(upd))(x, index, update)


def selected_context(context: TokenContext, selection: Selection) -> TokenContext:
    """[batch, slots] context of each row's selected tokens: their ids, positions and segment ids.

    Invalid slots get segment 0 (padding), so they neither attend to nor are seen by real tokens, and MoE layers
    inside the block do not route them.
    """
    segments = jnp.where(selection.valid, gather_rows(context.segment_ids, selection.index), 0)
    return TokenContext(gather_rows(context.tokens, selection.index),
                        gather_rows(context.positions, selection.index), segments.astype(jnp.int32))


class MoDBlock(nnx.Module):
    """An lm_core `Block` that only the router's top c_d of each row's tokens go through."""

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
        """x [batch, seq, d] -> [batch, seq] float32 sigmoid(x·w)."""
        return jax.nn.sigmoid(dense(x, self.router[...].astype(self.compute_dtype))[..., 0].astype(jnp.float32))

    def select(self, x: Array, real: Array) -> tuple[Selection, Aux]:
        """Each row's top c_d (expert choice), or its tokens whose aux score > 0.5 (causal; see moma.aux_routers).

        x [batch, seq, d], real [batch, seq]. Causal mode has ceil(causal_capacity · seq) slots per row, filled
        first come in the row's token order (all seq by default, so nothing is dropped).
        """
        batch, seq, d = x.shape
        scores = self.scores(x)  # [batch, seq]
        chosen = select_tokens(scores, real, self.capacity)
        if self.aux_router is None:
            return chosen, {}
        targets = aux_routers.row_selection_targets(chosen.index, chosen.valid, seq)  # [batch, seq]
        if self.routing_mode == aux_routers.EXPERT_CHOICE:
            logits = self.aux_router(x.reshape(batch * seq, d))
            return chosen, aux_routers.aux_router_statistics("mod", logits, targets.reshape(-1, 1), real.reshape(-1))
        if self.routing_mode == aux_routers.ORACLE:
            decisions = targets
        else:
            decisions = self.aux_router(x.reshape(batch * seq, d))[:, 0].reshape(batch, seq) > 0
        decisions = decisions & real
        index, valid = aux_routers.first_come_row_slots(decisions, aux_routers.causal_slots(seq,
                                                                                             self.causal_capacity))
        demand = jnp.sum(decisions, dtype=jnp.float32)
        overflow = (demand - jnp.sum(valid)) / jnp.maximum(demand, 1.0)
        weight = jnp.where(valid, jnp.take_along_axis(scores, index, axis=1), 0.0)
        return Selection(index, weight, valid), {"mod_causal_overflow": overflow}

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
        selection, routing_aux = self.select(x, real)
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
