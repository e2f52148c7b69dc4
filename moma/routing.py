"""One `Router` for every routing decision in MoMa: sigmoid scores, expert choice, and the causal modes.

Two modules route: an expert group (moma.experts: its |group| experts each pick tokens of their modality in every
routing group of the batch) and a mixture-of-depths layer (moma.depths: one "chooser" picks tokens of each row, so
its routing groups are the rows). Both are the same computation on [groups, tokens, d] inputs with `choosers`
columns, so both own a `Router`:
- scoring: s = sigmoid(x·W), W [d, choosers] the paper's W_g; with `noise` on and an rng lent (training after
  upcycling), Gumbel-sigmoid sigmoid(x·W + G' - G''), and G' - G'' of two standard Gumbels is a standard logistic
  draw. The (noisy) score both ranks the tokens and gates them.
- expert choice (training): each chooser takes its top k = ceil(capacity · n_eligible / choosers) eligible tokens
  of each routing group, best first; ties go to the lower token index (lax.top_k), so routing is deterministic.
- the auxiliary router (`aux_router`, attached after main training by moma.aux_routers, None until then):
  sigmoid(SiLU(x·W_a1)·W_a2), trained to predict the expert-choice selections from the token alone.
- the mode, chosen per model call (`model(..., routing=RoutingMode(...))`, lent to the layers through lm_core's
  `TokenContext.routing`; a static value, so each mode compiles once), never by changing the modules:
  "expert_choice" (the default; with an aux router attached it also returns the aux logits, to score or train it),
  "causal" (a token goes to chooser j iff its aux logit > 0, i.e. aux score > 0.5) and "oracle" (the causal
  dispatch path driven by expert choice's own selections: a test hook showing the causal path reproduces expert
  choice, and an upper bound).

Static shapes: under expert choice each chooser has `expert_slots` slots of which the first k, in score order, are
valid. In the causal modes a chooser may receive any number of tokens, so it gets ceil(causal_capacity ·
max_fraction · T) slots per routing group (T = tokens of the group) filled FIRST COME in the group's flattened
token order (its first row's tokens in order, then the next row's, ...). With the default causal_capacity 1.0 (and
a modality bound that holds) every eligible token fits and routing is exactly per token: the price is |group| times
the expert compute of expert choice (every expert holds slots for all its modality's tokens; a causal MoD layer's
sub-batch has seq slots per row, the layer's full attention cost), fine at research scale. Below 1, tokens past a
chooser's slots are dropped (expert output 0, a MoD layer skipped) and reported as `<group>_slot_overflow` (MoD:
`mod_causal_overflow`); first-come filling still means a token's routing never depends on any token after it (a
later token can only lose a slot, never take one). Earlier ROWS of an expert's routing group can use up its slots,
though, so only capacity 1.0 makes rows independent there; MoD's rows are its routing groups, always independent.
At decode time (one token per row) the question does not arise.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.layers import Aux, dense, fan_in_init, param, silu
from moma.dispatch import per_group

Array = jax.Array

EXPERT_CHOICE, CAUSAL, ORACLE = "expert_choice", "causal", "oracle"
ROUTING_MODES = (EXPERT_CHOICE, CAUSAL, ORACLE)
LOSS_SUFFIX = "_aux_router_loss"


class RoutingMode(NamedTuple):
    """How routed modules pick tokens in one model call (the module docstring); hashable, so jit treats it as static."""

    name: str = EXPERT_CHOICE
    causal_capacity: float = 1.0  # causal slots per chooser as a share of the routing group's tokens


def routing_mode(name: str, causal_capacity: float = 1.0) -> RoutingMode:
    """A checked `RoutingMode`: a known mode and 0 < causal_capacity <= 1."""
    if name not in ROUTING_MODES:
        raise UserError(f"routing mode {name!r} is unknown; valid: {', '.join(ROUTING_MODES)}")
    if not 0 < causal_capacity <= 1:
        raise UserError(f"causal_capacity={causal_capacity} must be in (0, 1] (1 = every token fits)")
    return RoutingMode(name, float(causal_capacity))


class Routing(NamedTuple):
    """One router's choice in every routing group."""

    token_index: Array  # [groups, choosers, slots] int32: which token of its group each slot holds
    gate: Array  # [groups, choosers, slots] float32: the router's score of that token, 0 for invalid slots
    valid: Array  # [groups, choosers, slots] bool: within the chooser's budget and holding an eligible token
    # [groups] float32: tokens each chooser should take, ceil(capacity · n_eligible / choosers) under expert
    # choice; in the causal modes the busiest chooser's demand
    budget: Array
    aux_logits: Array | None = None  # [groups, tokens, choosers]: the aux router's, under expert choice once attached


def expert_slots(tokens: int, experts: int, capacity_factor: float, max_fraction: float = 1.0) -> int:
    """Static slots per chooser: the largest budget a group of `tokens` can ask for (never more than `tokens`)."""
    return max(1, min(tokens, math.ceil(capacity_factor * max_fraction * tokens / experts)))


def expert_choice_route(scores: Array, eligible: Array, capacity_factor: float, max_fraction: float = 1.0
                        ) -> Routing:
    """Each chooser (a column of `scores` [tokens, choosers], values in [0, 1]) picks its top eligible tokens.

    One routing group, without the leading groups axis (`group_route` maps it over groups). Ineligible tokens
    score -1, below any sigmoid, so they are picked only into slots past the eligible tokens, which are invalid.
    """
    tokens, experts = scores.shape
    slots = expert_slots(tokens, experts, capacity_factor, max_fraction)
    masked = jnp.where(eligible[:, None], scores, -1.0)  # [tokens, choosers]
    top_scores, token_index = jax.lax.top_k(masked.T, slots)  # [choosers, slots], best first
    budget = jnp.ceil(capacity_factor * jnp.sum(eligible, dtype=jnp.float32) / experts)
    valid = (jnp.arange(slots)[None, :] < budget) & (top_scores >= 0)
    return Routing(token_index.astype(jnp.int32), jnp.where(valid, top_scores, 0.0), valid, budget)


def group_route(scores: Array, eligible: Array, capacity_factor: float, max_fraction: float = 1.0) -> Routing:
    """`expert_choice_route` in every routing group: scores [groups, tokens, choosers], eligible [groups, tokens]."""
    return per_group(functools.partial(expert_choice_route, capacity_factor=capacity_factor,
                                       max_fraction=max_fraction))(scores, eligible)


def causal_slots(tokens: int, capacity: float) -> int:
    """Static slots per chooser in causal mode: `capacity` of the `tokens` that may be eligible (at least 1)."""
    return max(1, min(tokens, math.ceil(capacity * tokens)))


def first_come_slots(decisions: Array, slots: int) -> tuple[Array, Array]:
    """The first `slots` tokens (flattened order) with a True decision: ([slots] int32 index ascending, [slots] valid).

    Earliest-first, so a token's slot never depends on a later token. Unfilled slots point at undecided tokens and
    are invalid.
    """
    tokens = decisions.shape[0]
    key = jnp.where(decisions, -jnp.arange(tokens, dtype=jnp.int32), -tokens)  # earlier decided tokens rank higher
    top, index = jax.lax.top_k(key, slots)
    return index.astype(jnp.int32), top > -tokens


def causal_expert_slots(decisions: Array, slots: int) -> tuple[Array, Array]:
    """`first_come_slots` per chooser: [tokens, choosers] -> ([choosers, slots] index, [choosers, slots] valid)."""
    return jax.vmap(first_come_slots, in_axes=(1, None))(decisions, slots)


def causal_route(scores: Array, decisions: Array, slots: int) -> Routing:
    """Per-token decisions [groups, tokens, choosers] -> first-come slots in every group, gated by `scores`."""
    token_index, valid = per_group(lambda group: causal_expert_slots(group, slots))(decisions)
    gate = jnp.take_along_axis(jnp.swapaxes(scores, 1, 2), token_index, axis=2)  # [groups, choosers, slots]
    budget = jnp.max(jnp.sum(decisions, axis=1), axis=-1).astype(jnp.float32)  # the busiest chooser's demand
    return Routing(token_index, jnp.where(valid, gate, 0.0), valid, budget)


def selection_targets(token_index: Array, valid: Array, tokens: int) -> Array:
    """[tokens, choosers] bool: which (token, chooser) pairs a [choosers, slots] routing selected (valid slots)."""
    experts = token_index.shape[0]
    expert_of_slot = jnp.broadcast_to(jnp.arange(experts)[:, None], token_index.shape)
    hits = jnp.zeros((tokens, experts), jnp.int32).at[token_index, expert_of_slot].add(valid.astype(jnp.int32))
    return hits > 0


def group_selection_targets(token_index: Array, valid: Array, tokens: int) -> Array:
    """`selection_targets` in every routing group: [groups, choosers, slots] -> [groups, tokens, choosers] bool."""
    return per_group(lambda index, ok: selection_targets(index, ok, tokens))(token_index, valid)


class AuxRouter(nnx.Module):
    """sigmoid(SiLU(x·W_a1)·W_a2) as logits: x [..., d] -> [..., outputs] float32 (score = sigmoid(logit))."""

    def __init__(self, config: ModelConfig, outputs: int, *, rngs: nnx.Rngs):
        hidden = max(1, config.d_model // 2)
        self.compute_dtype = config.compute_dtype
        # small matrices, replicated: they cost d²/2 + d/2·|E| flops per token, next to the experts' 3·d·d_ff
        self.w1 = param(rngs, fan_in_init(0, 1), (config.d_model, hidden), ("embed", None), config.weights_dtype)
        self.w2 = param(rngs, fan_in_init(0, 1), (hidden, outputs), (None, None), config.weights_dtype)

    def __call__(self, x: Array) -> Array:
        x = jax.lax.stop_gradient(x)  # the main model is frozen: its hidden states are only the router's input
        hidden = silu(dense(x, self.w1[...].astype(self.compute_dtype)))
        return dense(hidden, self.w2[...].astype(self.compute_dtype)).astype(jnp.float32)


class Router(nnx.Module):
    """Scores, expert choice, the aux router and the routing modes of one routed module (the module docstring).

    `decides=False` (1t1i's one-expert groups: every token of the modality, nothing to choose) routes by expert
    choice in every mode and never gets an aux router; `aux_router_outputs` says how many decisions an aux router
    of this module makes (moma.aux_routers attaches them).
    """

    def __init__(self, config: ModelConfig, choosers: int, *, capacity: float, max_fraction: float = 1.0,
                 noise: bool = False, decides: bool = True, rngs: nnx.Rngs):
        self.compute_dtype = config.compute_dtype
        self.capacity = capacity
        self.max_fraction = max_fraction
        self.noise = noise and decides
        self.aux_router_outputs = choosers if decides else 0
        # [d, choosers]: W_g (one column for 1t1i: its gate); one fan-in init like every other projection
        self.weight = param(rngs, fan_in_init(0, 1), (config.d_model, choosers), ("embed", None),
                            config.weights_dtype)
        self.aux_router = nnx.data(None)

    def scores(self, x: Array, rng: Array | None = None) -> Array:
        """x [..., d] -> [..., choosers] float32 sigmoid affinities (float32 for a stable top-k), also the gates."""
        logits = dense(x, self.weight[...].astype(self.compute_dtype)).astype(jnp.float32)
        if self.noise and rng is not None:
            logits = logits + jax.random.logistic(rng, logits.shape, jnp.float32)
        return jax.nn.sigmoid(logits)

    def __call__(self, x: Array, eligible: Array, mode: RoutingMode | None = None, rng: Array | None = None
                 ) -> Routing:
        """x [groups, tokens, d], eligible [groups, tokens] -> this mode's `Routing`."""
        mode = mode or RoutingMode()
        scores = self.scores(x, rng)  # [groups, tokens, choosers]
        if not self.aux_router_outputs or mode.name == EXPERT_CHOICE:
            routing = group_route(scores, eligible, self.capacity, self.max_fraction)
            return routing if self.aux_router is None else routing._replace(aux_logits=self.aux_router(x))
        if self.aux_router is None:
            raise UserError(f"{mode.name} routing needs auxiliary routers; attach and train them first")
        if mode.name == ORACLE:
            chosen = group_route(scores, eligible, self.capacity, self.max_fraction)
            decisions = group_selection_targets(chosen.token_index, chosen.valid, x.shape[1])
        else:
            decisions = self.aux_router(x) > 0  # aux score > 0.5
        slots = causal_slots(x.shape[1], mode.causal_capacity * self.max_fraction)
        return causal_route(scores, decisions & eligible[..., None], slots)


def aux_router_statistics(name: str, logits: Array, targets: Array, eligible: Array) -> Aux:
    """BCE of the aux router against the selections, and its accuracy/recall, over the eligible (token, output) pairs.

    logits, targets: [tokens, outputs]; eligible: [tokens]. Accuracy: share of decisions (logit > 0) that match;
    recall: share of selected pairs the aux router also selects. `pairs`/`selected` let callers pool batches and
    layers exactly. The "_loss" entry is what `moma.aux_routers.aux_router_objective` minimises.
    """
    mask = jnp.broadcast_to(eligible[:, None], logits.shape)
    bce = optax.sigmoid_binary_cross_entropy(logits, targets.astype(jnp.float32))
    pairs = jnp.sum(mask, dtype=jnp.float32)
    selected = jnp.sum(targets & mask, dtype=jnp.float32)
    predicted = logits > 0
    return {f"{name}{LOSS_SUFFIX}": jnp.sum(jnp.where(mask, bce, 0.0)) / jnp.maximum(pairs, 1.0),
            f"{name}_aux_router_accuracy": jnp.sum((predicted == targets) & mask) / jnp.maximum(pairs, 1.0),
            f"{name}_aux_router_recall": jnp.sum(predicted & targets & mask) / jnp.maximum(selected, 1.0),
            f"{name}_aux_router_pairs": pairs, f"{name}_aux_router_selected": selected}


def routing_aux_statistics(name: str, routing: Routing, eligible: Array) -> Aux:
    """`aux_router_statistics` of an expert-choice `Routing` that carries aux logits ({} otherwise), against its
    own selections. eligible: [groups, tokens]."""
    if routing.aux_logits is None:
        return {}
    targets = group_selection_targets(routing.token_index, routing.valid, eligible.shape[1])
    outputs = targets.shape[-1]
    return aux_router_statistics(name, routing.aux_logits.reshape(-1, outputs), targets.reshape(-1, outputs),
                                 eligible.reshape(-1))
