"""Modality-aware expert-choice mixture of experts: the FFN MoMa plugs into lm_core's FFN seam.

Expert choice (not token choice): each expert scores every eligible token of the batch with a sigmoid and takes
its top k_e = capacity_factor · n_eligible / |group| of them, so on average a token gets one expert (some get
several, some none) and no load-balancing loss is needed. A token's output is Σ_j g_j(x)·FFN_j(x) over the experts
that chose it. Dispatch is a gather of the chosen tokens and a scatter-add of the weighted results: no dense
[tokens, experts, capacity] one-hot tensors.

Static shapes under jit: the number of tokens of a modality varies from batch to batch, so each expert's slot
array has the static size k_max = ceil(capacity_factor · T / |group|) (T = all tokens of the batch) and only the
first ceil(capacity_factor · n_eligible / |group|) slots, in score order, are used. With half the tokens of each
modality half the slots are idle; their compute is the price of static shapes (the gates zero them).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.layers import Aux, FFNFactory, SwiGLU, TokenContext, dense, fan_in_init, param, silu
from lm_core.sharding import constrain
from moma.variants import MoMaConfig

Array = jax.Array


class Routing(NamedTuple):
    token_index: Array  # [experts, k_max] int32: which token each slot holds
    gate: Array  # [experts, k_max] float32: sigmoid score, 0 for unused slots
    used: Array  # [experts, k_max] bool


def expert_choice(scores: Array, eligible: Array, capacity_factor: float) -> Routing:
    """Each expert (column of `scores` [tokens, experts], sigmoid values) picks its top eligible tokens."""
    tokens, experts = scores.shape
    k_max = min(tokens, math.ceil(capacity_factor * tokens / experts))
    masked = jnp.where(eligible[:, None], scores, -1.0)  # sigmoid scores are > 0, so -1 ranks last
    top_scores, token_index = jax.lax.top_k(masked.T, k_max)  # [experts, k_max], best first
    budget = jnp.ceil(capacity_factor * jnp.sum(eligible) / experts)
    used = (jnp.arange(k_max)[None, :] < budget) & (top_scores >= 0)
    return Routing(token_index.astype(jnp.int32), jnp.where(used, top_scores, 0.0), used)


def tokens_per_expert_count(routing: Routing, tokens: int) -> Array:
    """[tokens] how many experts chose each token."""
    return jnp.zeros((tokens,), jnp.float32).at[routing.token_index.reshape(-1)].add(
        routing.used.reshape(-1).astype(jnp.float32))


class ExpertGroup(nnx.Module):
    """|group| SwiGLU experts (stacked weights, sharded over the mesh axis `expert`) and their sigmoid router."""

    def __init__(self, config: ModelConfig, num_experts: int, *, rngs: nnx.Rngs):
        d, ff, dtype = config.d_model, config.d_ff, config.weights_dtype
        self.compute_dtype = config.compute_dtype
        self.num_experts = num_experts
        self.router = param(rngs, fan_in_init(0, 1), (d, num_experts), ("embed", None), dtype)
        kernel = fan_in_init(1, 2)
        self.gate = param(rngs, kernel, (num_experts, d, ff), ("expert", "embed", "mlp"), dtype)
        self.up = param(rngs, kernel, (num_experts, d, ff), ("expert", "embed", "mlp"), dtype)
        self.down = param(rngs, kernel, (num_experts, ff, d), ("expert", "mlp", "embed"), dtype)

    def scores(self, x: Array) -> Array:
        """[tokens, experts] sigmoid affinities, in float32 for a stable top-k."""
        return jax.nn.sigmoid(dense(x, self.router[...].astype(self.compute_dtype)).astype(jnp.float32))

    def experts(self, x: Array) -> Array:
        """Every expert's FFN on its own tokens: x [experts, slots, d] -> [experts, slots, d]."""
        dtype = self.compute_dtype
        gate = jnp.einsum("esd,edf->esf", x, self.gate[...].astype(dtype))
        up = jnp.einsum("esd,edf->esf", x, self.up[...].astype(dtype))
        hidden = constrain(silu(gate) * up, ("expert", None, "act_mlp"))
        return jnp.einsum("esf,efd->esd", hidden, self.down[...].astype(dtype))

    def __call__(self, x: Array, eligible: Array, capacity_factor: float) -> tuple[Array, Routing]:
        """x: [tokens, d]; eligible: [tokens] bool. Returns the [tokens, d] mixture (0 for unchosen tokens)."""
        routing = expert_choice(self.scores(x), eligible, capacity_factor)
        chosen = constrain(jnp.take(x, routing.token_index, axis=0), ("expert", None, "act_embed"))
        outputs = self.experts(chosen) * routing.gate[..., None].astype(x.dtype)  # [experts, k_max, d]
        mixed = jnp.zeros_like(x).at[routing.token_index.reshape(-1)].add(outputs.reshape(-1, x.shape[-1]))
        return mixed, routing


def image_token_mask(tokens: Array, image_token_range: tuple[int, int]) -> Array:
    """True where a token id is an image code (BOI/EOI and all text ids are outside the range)."""
    low, high = image_token_range
    return (tokens >= low) & (tokens < high)


class ModalityAwareMoE(nnx.Module):
    """MoMa's FFN: a text group and an image group (or one mixed group), each routing only its own tokens.

    A group of ONE expert is a modality-specific dense FFN (MoMa 1t1i): every token of the modality goes through
    it with weight 1; expert choice with a single expert and c_e = 1 would pick the same tokens, only gated.
    """

    def __init__(self, config: ModelConfig, moma: MoMaConfig, *, rngs: nnx.Rngs):
        self.capacity_factor = moma.capacity_factor
        self.image_token_range = moma.image_token_range
        self.group_names = tuple(moma.groups)
        self.groups = nnx.Dict({name: SwiGLU(config, rngs=rngs) if count == 1 else ExpertGroup(config, count,
                                                                                             rngs=rngs)
                                for name, count in moma.groups.items()})

    def __call__(self, x: Array, context: TokenContext) -> tuple[Array, Aux]:
        batch, seq, d = x.shape
        flat = x.reshape(batch * seq, d)
        real = context.segment_ids.reshape(-1) != 0  # padding is never routed
        is_image = image_token_mask(context.tokens.reshape(-1), self.image_token_range)
        eligible_by_group = {"text": real & ~is_image, "image": real & is_image, "mixed": real}
        out = jnp.zeros_like(flat)
        aux: Aux = {}
        for name in self.group_names:
            group, eligible = self.groups[name], eligible_by_group[name]
            if isinstance(group, SwiGLU):
                y, _ = group(flat[None], context)
                out = out + y[0] * eligible[:, None].astype(flat.dtype)
                continue
            y, routing = group(flat, eligible, self.capacity_factor)
            out = out + y
            aux.update(routing_statistics(name, routing, eligible))
        return out.reshape(batch, seq, d), aux


def routing_statistics(name: str, routing: Routing, eligible: Array) -> Aux:
    """Per-group routing statistics (means over the group's eligible tokens)."""
    counts = tokens_per_expert_count(routing, eligible.shape[0])
    n = jnp.maximum(jnp.sum(eligible), 1)
    return {f"{name}_routed_fraction": jnp.sum((counts > 0) & eligible) / n,
            f"{name}_experts_per_token": jnp.sum(counts * eligible) / n,
            f"{name}_expert_load": jnp.sum(routing.used, axis=1) / n}


def moma_ffn_factory(moma: MoMaConfig) -> FFNFactory:
    """The FFN factory for `lm_core.model.Transformer`: MoMa's MoE in every layer (dense SwiGLU for "dense")."""

    def factory(config: ModelConfig, layer_index: int, rngs: nnx.Rngs):
        del layer_index  # MoE in every layer, as in the paper
        return SwiGLU(config, rngs=rngs) if moma.is_dense else ModalityAwareMoE(config, moma, rngs=rngs)

    return factory
