"""Modality-aware expert-choice mixture of experts: the FFN MoMa plugs into lm_core's FFN seam.

Expert choice (not token choice): each expert scores every eligible token of its routing group with a sigmoid and
takes its top k_e = capacity_factor · n_eligible / |group| of them, so on average a token gets one expert (some get
several, some none) and no load-balancing loss is needed. A token's output is Σ_j g_j(x)·FFN_j(x) over the experts
that chose it, g_j = its sigmoid score. Dispatch (moma.dispatch) is a gather of the chosen tokens and a scatter-add
of the gated results, with an all-to-all over the mesh axis `expert` in between: no dense [tokens, experts,
capacity] one-hot tensors.

Routing groups (moma.variants.routing_groups): the paper's expert choice ranks the whole batch. At scale that
would make every device see every token, so the batch's rows are split into equal groups of consecutive rows, by
default one per batch shard, and each expert picks its top-k within each group, with capacity k = c_e · b_M,group
(b_M,group = the group's tokens of modality M). On one device there is one group: the paper's batch-level choice.
Smaller groups make the choice noisier (fewer candidates per slot), not different in kind.

Static shapes under jit: how many tokens of a modality a group holds varies, so every expert gets a slot array of
static size `expert_slots` = ceil(capacity_factor · max_fraction · T / |group|) (T = all tokens of the group,
max_fraction = the config's bound on the modality's share, 1.0 by default), and only its first
ceil(capacity_factor · n_eligible / |group|) slots, in score order, are valid. Invalid slots are computed with gate
0: the price of static shapes. With max_fraction 1.0 a 50/50 group leaves half of every modality group's slots idle
(2x the dense FFN compute over both groups); a known data mix lets `max_*_fraction` cut that (smaller routing groups
vary more around the mix: leave margin), and a group beyond the bound clips each expert's top-k to its slots
(aux `<group>_slot_overflow` > 0) instead of failing.

A group of ONE expert (MoMa 1t1i) is a modality-specific FFN that takes every token of its modality (capacity 1,
nothing to choose, no router noise, no auxiliary router) but keeps Eq. 1's sigmoid gate: its output is
sigmoid(x·W_g)·FFN(x) with a one-column router W_g. The gate is what makes upcycling function-preserving: the
m-t-n-i model's routers start as copies of W_g, so every copied expert gates a token exactly as 1t1i did
(moma.upcycle states the condition). It runs through the same slot machinery (capacity 1, replicated weights).

Routing (scores, expert choice, the auxiliary router for causal inference and the mode of each call) is
moma.routing's `Router`, which every expert group owns; the mode comes with the call (`TokenContext.routing`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.layers import Aux, FeedForward, FFNFactory, SwiGLU, TokenContext, fan_in_init, param
from lm_core.sharding import constrain, traced_batch_shards
from moma.dispatch import ExpertWeights, dispatch, per_group
from moma.routing import Router, Routing, RoutingMode, routing_aux_statistics
from moma.variants import MoMaConfig, image_token_mask, routing_groups

Array = jax.Array


def experts_per_token(routing: Routing, tokens: int) -> Array:
    """[groups, tokens] float32: how many experts chose each token of each routing group."""

    def count(index: Array, valid: Array) -> Array:
        return jnp.zeros((tokens,), jnp.float32).at[index.reshape(-1)].add(valid.reshape(-1).astype(jnp.float32))

    return per_group(count)(routing.token_index, routing.valid)


class ExpertGroup(nnx.Module):
    """|group| SwiGLU experts with stacked weights (sharded over the mesh axis `expert`) and their sigmoid router.

    One expert means an unrouted, gated modality FFN (see the module docstring): it takes every token of its
    modality, its weights are replicated.
    """

    def __init__(self, config: ModelConfig, num_experts: int, *, capacity_factor: float = 1.0,
                 max_fraction: float = 1.0, router_noise: bool = False, rngs: nnx.Rngs):
        d, ff, dtype = config.d_model, config.d_ff, config.weights_dtype
        self.compute_dtype = config.compute_dtype
        self.num_experts = num_experts
        self.routed = num_experts > 1
        self.router = Router(config, num_experts, capacity=capacity_factor if self.routed else 1.0,
                             max_fraction=max_fraction, noise=router_noise, decides=self.routed, rngs=rngs)
        expert_axis = "expert" if self.routed else None
        kernel = fan_in_init(1, 2)
        self.gate = param(rngs, kernel, (num_experts, d, ff), (expert_axis, "embed", "mlp"), dtype)
        self.up = param(rngs, kernel, (num_experts, d, ff), (expert_axis, "embed", "mlp"), dtype)
        self.down = param(rngs, kernel, (num_experts, ff, d), (expert_axis, "mlp", "embed"), dtype)

    def weights(self) -> ExpertWeights:
        dtype = self.compute_dtype
        return ExpertWeights(self.gate[...].astype(dtype), self.up[...].astype(dtype), self.down[...].astype(dtype))

    def __call__(self, x: Array, eligible: Array, mode: RoutingMode | None = None, rng: Array | None = None
                 ) -> tuple[Array, Routing]:
        """x: [groups, tokens, d]; eligible: [groups, tokens] bool. Returns the [groups, tokens, d] mixture (0 where
        no expert chose) and the routing; moma.dispatch moves the tokens (all-to-all under a mesh)."""
        routing = self.router(x, eligible, mode, rng)
        mixed = dispatch(x, routing.token_index, routing.gate, self.weights(), expert_parallel=self.routed)
        return mixed, routing


class ModalityAwareMoE(nnx.Module):
    """MoMa's FFN: a text group and an image group (or one mixed group), each routing only its own tokens.

    Routing spans each routing group (moma.variants.routing_groups: one per batch shard by default, the whole
    batch on one device, as in the paper); padding (segment id 0) is never routed.
    """

    def __init__(self, config: ModelConfig, moma: MoMaConfig, *, rngs: nnx.Rngs):
        self.image_token_range = moma.image_token_range
        self.group_names = tuple(moma.groups)
        self.routing_groups = moma.routing_groups
        self.groups = nnx.Dict({
            name: ExpertGroup(config, count, capacity_factor=moma.capacity_factor,
                              max_fraction=moma.max_fraction(name), router_noise=moma.router_noise, rngs=rngs)
            for name, count in moma.groups.items()})

    def eligible(self, context: TokenContext) -> dict[str, Array]:
        """[batch, seq] bool per group: the real (non-padding) tokens of the group's modality."""
        real = context.segment_ids != 0
        is_image = image_token_mask(context.tokens, self.image_token_range)
        return {"text": real & ~is_image, "image": real & is_image, "mixed": real}

    def __call__(self, x: Array, context: TokenContext) -> tuple[Array, Aux]:
        batch, seq, d = x.shape
        groups = routing_groups(self.routing_groups, batch, traced_batch_shards())
        grouped = constrain(x.reshape(groups, batch // groups * seq, d), ("batch", None, "act_embed"))
        modality_masks = self.eligible(context)
        out = jnp.zeros_like(grouped)
        aux: Aux = {}
        for index, name in enumerate(self.group_names):
            eligible = modality_masks[name].reshape(groups, -1)
            rng = None if context.rng is None else jax.random.fold_in(context.rng, index)  # a draw per group
            y, routing = self.groups[name](grouped, eligible, context.routing, rng)
            out = out + y
            modalities = ({part: modality_masks[part].reshape(groups, -1) for part in ("text", "image")}
                          if name == "mixed" else None)
            aux.update(routing_statistics(name, routing, eligible, modalities))
            aux.update(routing_aux_statistics(name, routing, eligible))
        return out.reshape(batch, seq, d), aux


def routing_statistics(name: str, routing: Routing, eligible: Array, modalities: dict[str, Array] | None = None
                       ) -> Aux:
    """Per-group statistics over the group's eligible tokens of every routing group (none is a loss: expert choice
    needs no balancing). eligible: [groups, tokens].

    routed_fraction: share of tokens with >= 1 expert; experts_per_token: mean experts per token (capacity_factor
    when nothing overflows); expert_load [experts]: share of the group's tokens each expert took; slot_overflow:
    share of the experts' budgets their static slots could not hold (0 unless max_*_fraction is too small).
    `modalities` (a mixed group's text and image masks, [groups, tokens]) adds `<name>_<modality>_routed_fraction`:
    whether the shared experts pick one modality's tokens over the other's.
    """
    counts = experts_per_token(routing, eligible.shape[1])
    n = jnp.maximum(jnp.sum(eligible, dtype=jnp.float32), 1.0)
    slots = routing.token_index.shape[-1]
    overflow = jnp.sum(jnp.maximum(routing.budget - slots, 0.0)) / jnp.maximum(jnp.sum(routing.budget), 1.0)
    statistics = {f"{name}_routed_fraction": jnp.sum((counts > 0) & eligible) / n,
                  f"{name}_experts_per_token": jnp.sum(counts) / n,
                  f"{name}_expert_load": jnp.sum(routing.valid, axis=(0, 2)) / n,
                  f"{name}_slot_overflow": overflow}
    for modality, mask in (modalities or {}).items():
        tokens = mask & eligible
        statistics[f"{name}_{modality}_routed_fraction"] = (
            jnp.sum((counts > 0) & tokens) / jnp.maximum(jnp.sum(tokens, dtype=jnp.float32), 1.0))
    return statistics


def moma_ffn_factory(moma: MoMaConfig) -> FFNFactory:
    """The FFN factory for `lm_core.model.Transformer`: MoMa's MoE in every layer (lm_core's SwiGLU for dense)."""

    def factory(config: ModelConfig, layer_index: int, rngs: nnx.Rngs) -> FeedForward:
        del layer_index  # MoE in every layer, as in the paper
        return SwiGLU(config, rngs=rngs) if moma.is_dense else ModalityAwareMoE(config, moma, rngs=rngs)

    return factory
