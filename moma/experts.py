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

Causal inference: expert choice ranks the whole routing group, so it is non-causal. `moma.aux_routers` attaches an
auxiliary router to each routed group after training (`aux_router`, None until then, so main-training checkpoints
do not change) and switches `routing_mode`: in "causal" mode each token's experts are those its aux router scores > 0.5,
gated by this group's router, dispatched through the same gather/scatter with first-come static slots.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.layers import Aux, FeedForward, FFNFactory, SwiGLU, TokenContext, dense, fan_in_init, param
from lm_core.sharding import constrain, traced_batch_shards
from lm_core.train_step import LossFn
from moma import aux_routers
from moma.dispatch import ExpertWeights, dispatch, per_group
from moma.variants import MoMaConfig, image_token_mask, routing_groups

Array = jax.Array
NOISE_STREAM = 0x6D6F6D61  # folded into the loss rng so router noise draws differ from other uses of that rng


class Routing(NamedTuple):
    """One expert group's choice in every routing group (moma.variants.routing_groups)."""

    token_index: Array  # [groups, experts, slots] int32: which token of its group each slot holds, best first
    gate: Array  # [groups, experts, slots] float32: the expert's score of that token, 0 for invalid slots
    valid: Array  # [groups, experts, slots] bool: within the expert's budget and holding an eligible token
    budget: Array  # [groups] float32: tokens each expert should take, ceil(capacity_factor · n_eligible / experts)
    # [groups, tokens, experts] float32 logits of the auxiliary router, in expert-choice mode once one is attached
    aux_logits: Array | None = None


def expert_slots(tokens: int, experts: int, capacity_factor: float, max_fraction: float = 1.0) -> int:
    """Static slots per expert: the largest budget a group of `tokens` can ask for (never more than `tokens`)."""
    return max(1, min(tokens, math.ceil(capacity_factor * max_fraction * tokens / experts)))


def expert_choice_route(scores: Array, eligible: Array, capacity_factor: float, max_fraction: float = 1.0
                        ) -> Routing:
    """Each expert (a column of `scores` [tokens, experts], values in [0, 1]) picks its top eligible tokens.

    One routing group, without the leading groups axis (`group_route` maps it over groups). Ineligible tokens
    score -1, below any sigmoid, so they are picked only into slots past the eligible tokens, which are invalid.
    Ties go to the lower token index (lax.top_k), so routing is deterministic.
    """
    tokens, experts = scores.shape
    slots = expert_slots(tokens, experts, capacity_factor, max_fraction)
    masked = jnp.where(eligible[:, None], scores, -1.0)  # [tokens, experts]
    top_scores, token_index = jax.lax.top_k(masked.T, slots)  # [experts, slots], best first
    budget = jnp.ceil(capacity_factor * jnp.sum(eligible, dtype=jnp.float32) / experts)
    valid = (jnp.arange(slots)[None, :] < budget) & (top_scores >= 0)
    return Routing(token_index.astype(jnp.int32), jnp.where(valid, top_scores, 0.0), valid, budget)


def group_route(scores: Array, eligible: Array, capacity_factor: float, max_fraction: float = 1.0) -> Routing:
    """`expert_choice_route` in every routing group: scores [groups, tokens, experts], eligible [groups, tokens]."""
    return per_group(functools.partial(expert_choice_route, capacity_factor=capacity_factor,
                                       max_fraction=max_fraction))(scores, eligible)


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
        self.capacity_factor = capacity_factor if self.routed else 1.0
        self.max_fraction = max_fraction
        self.router_noise = router_noise and self.routed
        self.noise_key = nnx.data(None)  # lent by `noisy_routing(...)` while training, None otherwise
        # causal routing (moma.aux_routers): attached after main training; no parameters until then
        self.aux_router_outputs = num_experts if self.routed else 0
        self.aux_router = nnx.data(None)
        self.routing_mode = aux_routers.EXPERT_CHOICE
        self.causal_capacity = 1.0
        expert_axis = "expert" if self.routed else None
        # [d, experts]: the paper's W_g (one column for 1t1i: its gate); one fan-in init like every other projection
        self.router = param(rngs, fan_in_init(0, 1), (d, num_experts), ("embed", None), dtype)
        kernel = fan_in_init(1, 2)
        self.gate = param(rngs, kernel, (num_experts, d, ff), (expert_axis, "embed", "mlp"), dtype)
        self.up = param(rngs, kernel, (num_experts, d, ff), (expert_axis, "embed", "mlp"), dtype)
        self.down = param(rngs, kernel, (num_experts, ff, d), (expert_axis, "mlp", "embed"), dtype)

    def scores(self, x: Array) -> Array:
        """x [..., d] -> [..., experts] float32 sigmoid affinities (float32 for a stable top-k), also the gates.

        With a noise key lent, Gumbel-sigmoid: sigmoid(logit + G' - G''), and G' - G'' of two standard Gumbels is
        a standard logistic draw. The noisy score both ranks the tokens and gates them.
        """
        logits = dense(x, self.router[...].astype(self.compute_dtype)).astype(jnp.float32)
        if self.router_noise and self.noise_key is not None:
            logits = logits + jax.random.logistic(self.noise_key, logits.shape, jnp.float32)
        return jax.nn.sigmoid(logits)

    def weights(self) -> ExpertWeights:
        dtype = self.compute_dtype
        return ExpertWeights(self.gate[...].astype(dtype), self.up[...].astype(dtype), self.down[...].astype(dtype))

    def route(self, x: Array, eligible: Array) -> Routing:
        """Expert choice in each routing group, or (moma.aux_routers) per-token decisions of the aux router gated
        by the main router. x [groups, tokens, d], eligible [groups, tokens]."""
        scores = self.scores(x)  # [groups, tokens, experts]
        if self.aux_router is None or self.routing_mode == aux_routers.EXPERT_CHOICE:
            routing = group_route(scores, eligible, self.capacity_factor, self.max_fraction)
            return routing if self.aux_router is None else routing._replace(aux_logits=self.aux_router(x))
        tokens = x.shape[1]
        if self.routing_mode == aux_routers.ORACLE:
            routing = group_route(scores, eligible, self.capacity_factor, self.max_fraction)
            decisions = aux_routers.group_selection_targets(routing.token_index, routing.valid, tokens)
        else:
            decisions = self.aux_router(x) > 0  # aux score > 0.5
        decisions = decisions & eligible[..., None]  # [groups, tokens, experts]
        slots = aux_routers.causal_slots(tokens, self.causal_capacity * self.max_fraction)
        token_index, valid = per_group(lambda group: aux_routers.causal_expert_slots(group, slots))(decisions)
        gate = jnp.take_along_axis(jnp.swapaxes(scores, 1, 2), token_index, axis=2)  # [groups, experts, slots]
        budget = jnp.max(jnp.sum(decisions, axis=1), axis=-1).astype(jnp.float32)  # the busiest expert's demand
        return Routing(token_index, jnp.where(valid, gate, 0.0), valid, budget)

    def __call__(self, x: Array, eligible: Array) -> tuple[Array, Routing]:
        """x: [groups, tokens, d]; eligible: [groups, tokens] bool. Returns the [groups, tokens, d] mixture (0 where
        no expert chose) and the routing; moma.dispatch moves the tokens (all-to-all under a mesh)."""
        routing = self.route(x, eligible)
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
        for name in self.group_names:
            eligible = modality_masks[name].reshape(groups, -1)
            y, routing = self.groups[name](grouped, eligible)
            out = out + y
            modalities = ({part: modality_masks[part].reshape(groups, -1) for part in ("text", "image")}
                          if name == "mixed" else None)
            aux.update(routing_statistics(name, routing, eligible, modalities))
            if routing.aux_logits is not None:
                targets = aux_routers.group_selection_targets(routing.token_index, routing.valid, eligible.shape[1])
                experts = targets.shape[-1]
                aux.update(aux_routers.aux_router_statistics(name, routing.aux_logits.reshape(-1, experts),
                                                             targets.reshape(-1, experts), eligible.reshape(-1)))
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


@contextlib.contextmanager
def noisy_routing(model: nnx.Module, key: Array) -> Iterator[None]:
    """Gumbel-sigmoid router noise for the model calls inside the `with` (groups built with router_noise=True).

    lm_core's FFN seam passes no randomness, so the key is lent to each group (its own fold) for the duration and
    taken back afterwards; outside the `with` (evaluation, inference) routing is noise-free.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    groups = [node for _, node in nnx.iter_graph(model) if isinstance(node, ExpertGroup) and node.router_noise]
    for index, group in enumerate(groups):
        group.noise_key = jax.random.fold_in(key, index)
    try:
        yield
    finally:
        for group in groups:
            group.noise_key = None


def with_router_noise(loss_fn: LossFn) -> LossFn:
    """A loss function that runs `loss_fn` with router noise drawn from the train step's rng."""

    def noisy_loss(model: nnx.Module, batch: dict[str, Array], rng: Array) -> tuple[Array, dict[str, Array]]:
        if rng is None:
            return loss_fn(model, batch, rng)
        with noisy_routing(model, jax.random.fold_in(rng, NOISE_STREAM)):
            return loss_fn(model, batch, rng)

    return noisy_loss
