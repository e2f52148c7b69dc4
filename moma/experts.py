"""Modality-aware expert-choice mixture of experts: the FFN MoMa plugs into lm_core's FFN seam.

Expert choice (not token choice): each expert scores every eligible token of the batch with a sigmoid and takes
its top k_e = capacity_factor · n_eligible / |group| of them, so on average a token gets one expert (some get
several, some none) and no load-balancing loss is needed. A token's output is Σ_j g_j(x)·FFN_j(x) over the experts
that chose it, g_j = its sigmoid score. Dispatch is a gather of the chosen tokens and a scatter-add of the gated
results: no dense [tokens, experts, capacity] one-hot tensors.

Static shapes under jit: how many tokens of a modality a batch holds varies, so every expert gets a slot array of
static size `expert_slots` = ceil(capacity_factor · max_fraction · T / |group|) (T = all tokens of the batch,
max_fraction = the config's bound on the modality's share, 1.0 by default), and only its first
ceil(capacity_factor · n_eligible / |group|) slots, in score order, are valid. Invalid slots are computed with gate
0: the price of static shapes. With max_fraction 1.0 a 50/50 batch leaves half of every modality group's slots idle
(2x the dense FFN compute over both groups); a known data mix lets `max_*_fraction` cut that, and a batch beyond the
bound clips each expert's top-k to its slots (aux `<group>_slot_overflow` > 0) instead of failing.

A group of ONE expert (MoMa 1t1i) is a modality-specific dense FFN: no router, every token of the modality, gate 1.
Expert choice with one expert and c_e = 1 would select the very same tokens and only multiply them by a sigmoid
gate, which the paper's "modality-specific FFNs" do not have; without the gate, 1t1i is exactly the dense model
with the FFN untied per modality. It runs through the same slot machinery (constant scores, capacity 1).

Causal inference: expert choice ranks the whole batch, so it is non-causal. `moma.aux_routers` attaches an auxiliary
router to each routed group after training (`aux_router`, None until then, so main-training checkpoints do not
change) and switches `routing_mode`: in "causal" mode each token's experts are those its aux router scores > 0.5,
gated by this group's router, dispatched through the same gather/scatter with first-come static slots.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.layers import Aux, FeedForward, FFNFactory, SwiGLU, TokenContext, dense, fan_in_init, param, silu
from lm_core.sharding import constrain
from lm_core.train_step import LossFn
from moma import aux_routers
from moma.variants import MoMaConfig

Array = jax.Array
NOISE_STREAM = 0x6D6F6D61  # folded into the loss rng so router noise draws differ from other uses of that rng


class Routing(NamedTuple):
    token_index: Array  # [experts, slots] int32: which token each slot holds, best score first
    gate: Array  # [experts, slots] float32: the expert's score of that token, 0 for invalid slots
    valid: Array  # [experts, slots] bool: within the expert's budget and holding an eligible token
    budget: Array  # [] float32: tokens each expert should take, ceil(capacity_factor · n_eligible / experts)
    # [tokens, experts] float32 logits of the auxiliary router, in expert-choice mode once one is attached
    aux_logits: Array | None = None


def image_token_mask(tokens: Array, image_token_range: tuple[int, int]) -> Array:
    """[batch, seq] bool: True where the id is an image code ([lo, hi)); text, BOI/EOI and padding are False."""
    low, high = image_token_range
    return (tokens >= low) & (tokens < high)


def expert_slots(tokens: int, experts: int, capacity_factor: float, max_fraction: float = 1.0) -> int:
    """Static slots per expert: the largest budget a batch of `tokens` can ask for (never more than `tokens`)."""
    return max(1, min(tokens, math.ceil(capacity_factor * max_fraction * tokens / experts)))


def expert_choice_route(scores: Array, eligible: Array, capacity_factor: float, max_fraction: float = 1.0
                        ) -> Routing:
    """Each expert (a column of `scores` [tokens, experts], values in [0, 1]) picks its top eligible tokens.

    Ineligible tokens score -1, below any sigmoid, so they are picked only into slots past the eligible tokens,
    which are invalid. Ties go to the lower token index (lax.top_k), so routing is deterministic.
    """
    tokens, experts = scores.shape
    slots = expert_slots(tokens, experts, capacity_factor, max_fraction)
    masked = jnp.where(eligible[:, None], scores, -1.0)  # [tokens, experts]
    top_scores, token_index = jax.lax.top_k(masked.T, slots)  # [experts, slots], best first
    budget = jnp.ceil(capacity_factor * jnp.sum(eligible, dtype=jnp.float32) / experts)
    valid = (jnp.arange(slots)[None, :] < budget) & (top_scores >= 0)
    return Routing(token_index.astype(jnp.int32), jnp.where(valid, top_scores, 0.0), valid, budget)


def experts_per_token(routing: Routing, tokens: int) -> Array:
    """[tokens] float32: how many experts chose each token."""
    return jnp.zeros((tokens,), jnp.float32).at[routing.token_index.reshape(-1)].add(
        routing.valid.reshape(-1).astype(jnp.float32))


class ExpertGroup(nnx.Module):
    """|group| SwiGLU experts with stacked weights (sharded over the mesh axis `expert`) and their sigmoid router.

    One expert means an unrouted modality FFN (see the module docstring): no router, weights replicated.
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
        # [d, experts]: the paper's W_g; one fan-in init like every other projection
        self.router = (param(rngs, fan_in_init(0, 1), (d, num_experts), ("embed", None), dtype) if self.routed
                       else None)
        kernel = fan_in_init(1, 2)
        self.gate = param(rngs, kernel, (num_experts, d, ff), (expert_axis, "embed", "mlp"), dtype)
        self.up = param(rngs, kernel, (num_experts, d, ff), (expert_axis, "embed", "mlp"), dtype)
        self.down = param(rngs, kernel, (num_experts, ff, d), (expert_axis, "mlp", "embed"), dtype)

    def scores(self, x: Array) -> Array:
        """[tokens, experts] float32 sigmoid affinities (float32 for a stable top-k); 1 for an unrouted group.

        With a noise key lent, Gumbel-sigmoid: sigmoid(logit + G' - G''), and G' - G'' of two standard Gumbels is
        a standard logistic draw. The noisy score both ranks the tokens and gates them.
        """
        if self.router is None:
            return jnp.ones((x.shape[0], 1), jnp.float32)
        logits = dense(x, self.router[...].astype(self.compute_dtype)).astype(jnp.float32)
        if self.router_noise and self.noise_key is not None:
            logits = logits + jax.random.logistic(self.noise_key, logits.shape, jnp.float32)
        return jax.nn.sigmoid(logits)

    def experts(self, x: Array) -> Array:
        """Every expert's SwiGLU on its own slots: x [experts, slots, d] -> [experts, slots, d]."""
        dtype = self.compute_dtype
        gate = jnp.einsum("esd,edf->esf", x, self.gate[...].astype(dtype))  # [experts, slots, d_ff]
        up = jnp.einsum("esd,edf->esf", x, self.up[...].astype(dtype))
        hidden = constrain(silu(gate) * up, ("expert", None, "act_mlp"))
        return jnp.einsum("esf,efd->esd", hidden, self.down[...].astype(dtype))

    def route(self, x: Array, eligible: Array) -> Routing:
        """Expert choice, or (moma.aux_routers) per-token decisions of the aux router gated by the main router."""
        scores = self.scores(x)
        if self.aux_router is None or self.routing_mode == aux_routers.EXPERT_CHOICE:
            routing = expert_choice_route(scores, eligible, self.capacity_factor, self.max_fraction)
            return routing if self.aux_router is None else routing._replace(aux_logits=self.aux_router(x))
        if self.routing_mode == aux_routers.ORACLE:
            routing = expert_choice_route(scores, eligible, self.capacity_factor, self.max_fraction)
            decisions = aux_routers.selection_targets(routing.token_index, routing.valid, x.shape[0])
        else:
            decisions = self.aux_router(x) > 0  # aux score > 0.5
        decisions = decisions & eligible[:, None]  # [tokens, experts]
        slots = aux_routers.causal_slots(x.shape[0], self.causal_capacity * self.max_fraction)
        token_index, valid = aux_routers.causal_expert_slots(decisions, slots)  # [experts, slots]
        gate = jnp.take_along_axis(scores.T, token_index, axis=1)
        budget = jnp.max(jnp.sum(decisions, axis=0)).astype(jnp.float32)  # the busiest expert's demand
        return Routing(token_index, jnp.where(valid, gate, 0.0), valid, budget)

    def __call__(self, x: Array, eligible: Array) -> tuple[Array, Routing]:
        """x: [tokens, d]; eligible: [tokens] bool. Returns the [tokens, d] mixture (0 where no expert chose)."""
        routing = self.route(x, eligible)
        chosen = constrain(jnp.take(x, routing.token_index, axis=0), ("expert", None, "act_embed"))  # [e, s, d]
        outputs = self.experts(chosen) * routing.gate[..., None].astype(x.dtype)  # [experts, slots, d]
        mixed = jnp.zeros_like(x).at[routing.token_index.reshape(-1)].add(outputs.reshape(-1, x.shape[-1]))
        return mixed, routing


class ModalityAwareMoE(nnx.Module):
    """MoMa's FFN: a text group and an image group (or one mixed group), each routing only its own tokens.

    Routing spans the whole batch (all rows flattened), as in the paper; padding (segment id 0) is never routed.
    """

    def __init__(self, config: ModelConfig, moma: MoMaConfig, *, rngs: nnx.Rngs):
        self.image_token_range = moma.image_token_range
        self.group_names = tuple(moma.groups)
        self.groups = nnx.Dict({
            name: ExpertGroup(config, count, capacity_factor=moma.capacity_factor,
                              max_fraction=moma.max_fraction(name), router_noise=moma.router_noise, rngs=rngs)
            for name, count in moma.groups.items()})

    def eligible(self, context: TokenContext) -> dict[str, Array]:
        """[tokens] bool per group: the real (non-padding) tokens of the group's modality, batch flattened."""
        real = context.segment_ids.reshape(-1) != 0
        is_image = image_token_mask(context.tokens.reshape(-1), self.image_token_range)
        return {"text": real & ~is_image, "image": real & is_image, "mixed": real}

    def __call__(self, x: Array, context: TokenContext) -> tuple[Array, Aux]:
        batch, seq, d = x.shape
        flat = x.reshape(batch * seq, d)  # [tokens, d]
        eligible = self.eligible(context)
        out = jnp.zeros_like(flat)
        aux: Aux = {}
        for name in self.group_names:
            y, routing = self.groups[name](flat, eligible[name])
            out = out + y
            aux.update(routing_statistics(name, routing, eligible[name]))
            if routing.aux_logits is not None:
                targets = aux_routers.selection_targets(routing.token_index, routing.valid, flat.shape[0])
                aux.update(aux_routers.aux_router_statistics(name, routing.aux_logits, targets, eligible[name]))
        return out.reshape(batch, seq, d), aux


def routing_statistics(name: str, routing: Routing, eligible: Array) -> Aux:
    """Per-group statistics over the group's eligible tokens (none is a loss: expert choice needs no balancing).

    routed_fraction: share of tokens with >= 1 expert; experts_per_token: mean experts per token (capacity_factor
    when nothing overflows); expert_load [experts]: share of the group's tokens each expert took; slot_overflow:
    share of each expert's budget its static slots could not hold (0 unless max_*_fraction is too small).
    """
    counts = experts_per_token(routing, eligible.shape[0])
    n = jnp.maximum(jnp.sum(eligible, dtype=jnp.float32), 1.0)
    slots = routing.token_index.shape[1]
    return {f"{name}_routed_fraction": jnp.sum((counts > 0) & eligible) / n,
            f"{name}_experts_per_token": jnp.sum(counts) / n,
            f"{name}_expert_load": jnp.sum(routing.valid, axis=1) / n,
            f"{name}_slot_overflow": jnp.maximum(routing.budget - slots, 0.0) / jnp.maximum(routing.budget, 1.0)}


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
