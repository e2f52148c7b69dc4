"""Staged mixture-of-depths (MoD): on alternating layers only the top c_d of the batch's tokens are processed.

A sigmoid router scores every token; the layer (attention AND FFN) runs on the chosen tokens only, as one short
sequence that keeps their positions and documents (rows and packed documents become distinct segments, so no
token sees another row or document); the others skip the layer on the residual path. The chosen tokens' residual
update is scaled by their router score so the router learns which tokens deserve the layer. Like expert choice,
the top-k looks at the whole batch, so it is non-causal; causal inference needs auxiliary routers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.attention import LayerCache, LayerKV
from lm_core.config import ModelConfig
from lm_core.layers import Aux, TokenContext, dense, param
from lm_core.model import Block, Transformer
from moma.experts import moma_ffn_factory
from moma.variants import MoMaConfig

Array = jax.Array


class MoDBlock(nnx.Module):
    def __init__(self, block: Block, config: ModelConfig, capacity: float, *, rngs: nnx.Rngs):
        self.block = block
        self.capacity = capacity
        self.router = param(rngs, nnx.initializers.normal(config.d_model**-0.5), (config.d_model, 1),
                            ("embed", None), config.weights_dtype)

    def __call__(self, x: Array, context: TokenContext, cache: LayerCache | None, cache_segment_ids: Array | None,
                 cache_index: Array | None, injected_kv: LayerKV | None
                 ) -> tuple[Array, LayerCache | None, LayerKV, Aux]:
        if cache is not None or injected_kv is not None:
            raise NotImplementedError("mixture-of-depths layers route over the whole batch; cached decoding and "
                                      "injected K,V need causal auxiliary routers")
        batch, seq, d = x.shape
        flat = x.reshape(batch * seq, d)
        real = context.segment_ids.reshape(-1) != 0
        scores = jax.nn.sigmoid(dense(flat, self.router[...].astype(x.dtype))[:, 0].astype(jnp.float32))
        k = max(1, math.ceil(self.capacity * batch * seq))
        _, chosen = jax.lax.top_k(jnp.where(real, scores, -1.0), k)
        chosen = jnp.sort(chosen)  # keep the original order so causal attention stays causal
        row = chosen // seq
        max_segments = jnp.max(context.segment_ids) + 1
        segments = context.segment_ids.reshape(-1)[chosen]
        sub_context = TokenContext(context.tokens.reshape(-1)[chosen][None],
                                   context.positions.reshape(-1)[chosen][None],
                                   jnp.where(segments > 0, row * max_segments + segments, 0)[None])
        selected = flat[chosen][None]  # [1, k, d]
        processed, _, kv, aux = self.block(selected, sub_context, None, None, None, None)
        update = (processed[0] - selected[0]) * scores[chosen][:, None].astype(x.dtype)
        out = flat.at[chosen].add(update).reshape(batch, seq, d)
        aux = dict(aux, mod_selected_fraction=jnp.sum(real[chosen]) / jnp.maximum(jnp.sum(real), 1))
        return out, None, kv, aux


def build_moma_model(model_config: ModelConfig, moma: MoMaConfig, *, rngs: nnx.Rngs) -> Transformer:
    """An lm_core Transformer with MoMa's FFNs, and MoD on layers 0, 2, 4, ... when the variant asks for it."""
    model = Transformer(model_config, rngs=rngs, ffn_factory=moma_ffn_factory(moma))
    if moma.mod:
        for index in range(0, model_config.num_layers, 2):
            model.blocks[index] = MoDBlock(model.blocks[index], model_config, moma.mod_capacity, rngs=rngs)
    return model
