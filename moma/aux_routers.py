"""Auxiliary routers: causal (token-by-token) routing for a MoMa model trained with expert choice.

Why: expert choice ranks every token of the batch (MoD's top-c_d every token of the row), so whether a token gets an
expert depends on tokens after it; a model trained that way cannot be run autoregressively as is. After main
training, each routed expert group (a group of >1 expert; 1t1i's modality FFNs have nothing to decide) and each MoD
layer gets an auxiliary router sigmoid(SiLU(x·W_a1)·W_a2) (W_a1: d x d/2, W_a2: d/2 x |group|, or d/2 x 1 for MoD)
trained with binary cross-entropy to predict the expert-choice selections of the frozen model. Its input is
stop-gradient'ed, so its loss never reaches the main model.

Routing modes (a static attribute of each routed module, set with `set_routing_mode`; a new mode is a new graphdef,
so each compiles once under jit):
- "expert_choice": the trained, non-causal routing. With aux routers attached, each module also reports its aux
  router's BCE against the selections it just made ("<group>_aux_router_loss", plus accuracy and recall) in the
  layer's aux dict; that is the training signal and the accuracy metric.
- "causal": a token goes to expert j (through a MoD layer) iff its aux score > 0.5, i.e. aux logit > 0; the main
  router's sigmoid still gates. Every decision is a function of the token's own hidden state only.
- "oracle": the causal dispatch path driven by the expert-choice selections instead of the aux routers (the aux
  routers "forced to the truth"): a test hook showing the causal path reproduces expert choice, and an upper bound.

Static shapes in causal mode: an expert may now receive any number of tokens. Each expert gets `ceil(causal_capacity
· max_fraction · T)` slots per routing group (T = tokens of the group, moma.experts) filled FIRST COME in the
group's flattened token order (its first row's tokens in order, then the next row's, ...); each MoD layer, which
routes per row (`moma.depths`), gets `ceil(causal_capacity · seq)` slots in every row, filled first come in that
row's token order. With the default causal_capacity = 1.0 (and a modality bound that holds) every eligible token
fits, nothing is ever dropped and routing is exactly per token: the price is |group| times the expert compute of
expert choice (every expert holds slots for all its modality's tokens), fine at research scale (a causal MoD layer's
sub-batch likewise has seq slots per row, i.e. the layer's full attention cost). causal_capacity < 1 bounds that
compute; tokens past an expert's (a MoD row's) slots are dropped (expert output 0; a MoD layer skipped) and reported
as `<group>_slot_overflow` (MoD: `mod_causal_overflow`). Even then first-come filling means a token's routing never
depends on any token after it in flattened order, so never on its own row's future (a later token can only lose a
slot, never take one from an earlier token); for experts earlier ROWS of the routing group can use up slots, though,
so only capacity 1.0 makes rows independent there (MoD rows are always independent). At decode time (one token per
row) the question does not arise.

Dense [tokens, experts] bool targets exist only at group granularity (for the BCE); dispatch stays gather/scatter.
Training touches only the aux routers' parameters (`AUX_ROUTER_PARAMS`): gradients are taken with respect to them
alone, so the main model's parameters are not merely given zero updates but never differentiated at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.layers import Aux, dense, fan_in_init, param, silu
from lm_core.stacked import stack_depth, stack_modules
from moma.dispatch import per_group
from moma.variants import MoMaConfig

Array = jax.Array
Batch = dict[str, Array]

EXPERT_CHOICE, CAUSAL, ORACLE = "expert_choice", "causal", "oracle"
ROUTING_MODES = (EXPERT_CHOICE, CAUSAL, ORACLE)
AUX_ROUTER = "aux_router"  # the attribute name of each module's auxiliary router
AUX_ROUTER_PARAMS = nnx.All(nnx.Param, nnx.PathContains(AUX_ROUTER))
LOSS_SUFFIX = "_aux_router_loss"
MODEL_INPUTS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class AuxRouter(nnx.Module):
    """sigmoid(SiLU(x·W_a1)·W_a2) as logits: x [tokens, d] -> [tokens, outputs] float32 (score = sigmoid(logit))."""

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


# ----------------------------------------------------------------------------------------------- routing primitives


def causal_slots(tokens: int, capacity: float) -> int:
    """Static slots per expert in causal mode: `capacity` of the `tokens` that may be eligible (at least 1)."""
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
    """`first_come_slots` per expert column: [tokens, experts] -> ([experts, slots] index, [experts, slots] valid)."""
    return jax.vmap(first_come_slots, in_axes=(1, None))(decisions, slots)


def first_come_row_slots(decisions: Array, slots: int) -> tuple[Array, Array]:
    """`first_come_slots` per row (MoD): [batch, seq] -> ([batch, slots] index within the row, [batch, slots] valid).

    Rows never compete for slots, so a token's slot depends only on the earlier tokens of its own row.
    """
    return jax.vmap(first_come_slots, in_axes=(0, None))(decisions, slots)


def row_selection_targets(token_index: Array, valid: Array, seq: int) -> Array:
    """[batch, seq] bool: which tokens of each row a per-row [batch, slots] selection chose (valid slots only)."""
    return jax.vmap(lambda index, ok: selection_targets(index[None], ok[None], seq)[:, 0])(token_index, valid)


def selection_targets(token_index: Array, valid: Array, tokens: int) -> Array:
    """[tokens, experts] bool: which (token, expert) pairs an [experts, slots] routing selected (valid slots only)."""
    experts = token_index.shape[0]
    expert_of_slot = jnp.broadcast_to(jnp.arange(experts)[:, None], token_index.shape)
    hits = jnp.zeros((tokens, experts), jnp.int32).at[token_index, expert_of_slot].add(valid.astype(jnp.int32))
    return hits > 0


def group_selection_targets(token_index: Array, valid: Array, tokens: int) -> Array:
    """`selection_targets` in every routing group: [groups, experts, slots] -> [groups, tokens, experts] bool."""
    return per_group(lambda index, ok: selection_targets(index, ok, tokens))(token_index, valid)


def aux_router_statistics(name: str, logits: Array, targets: Array, eligible: Array) -> Aux:
    """BCE of the aux router against the selections, and its accuracy/recall, over the eligible (token, output) pairs.

    logits, targets: [tokens, outputs]; eligible: [tokens]. Accuracy: share of decisions (logit > 0) that match;
    recall: share of selected pairs the aux router also selects. `pairs`/`selected` let callers pool batches and
    layers exactly. The "_loss" entry is what `aux_router_objective` (and lm_core's next_token_loss) minimises.
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


# ------------------------------------------------------------------------------------------------ model-level tools


def routed_modules(model: nnx.Module) -> list[nnx.Module]:
    """Modules that make a non-causal routing decision (routed expert groups, MoD blocks), in graph order.

    They declare it with `aux_router_outputs` > 0 (|group| for an expert group, 1 for a MoD layer).
    """
    return [node for _, node in nnx.iter_graph(model) if getattr(node, "aux_router_outputs", 0) > 0]


NOTHING_TO_ROUTE = ("makes no routing decision (dense or 1t1i without MoD): it is already causal and has nothing "
                    "for auxiliary routers to learn; use a moe_<m>t<n>i (m or n > 1), moe_<n>x or mod_ variant")


def check_routable(model: nnx.Module, variant: str = "") -> None:
    """A model without routed modules is refused: there is nothing to train."""
    if not routed_modules(model):
        raise UserError(f"variant {variant or '?'!r} {NOTHING_TO_ROUTE}")


def variant_routes(moma: MoMaConfig) -> bool:
    """Whether a variant makes a non-causal routing decision (MoD, or an expert group of several experts)."""
    return moma.mod or any(count > 1 for count in moma.groups.values())


def check_variant_routable(moma: MoMaConfig) -> None:
    """The same check from the config alone (before any checkpoint is loaded)."""
    if not variant_routes(moma):
        raise UserError(f"variant {moma.variant!r} {NOTHING_TO_ROUTE}")


def attach_aux_routers(model: nnx.Module, config: ModelConfig, *, rngs: nnx.Rngs) -> int:
    """Give every routed module a fresh `AuxRouter` (replacing any it had); returns how many were attached."""
    modules = routed_modules(model)
    for module in modules:
        depth = stack_depth(module)  # a module of stacked layers gets one router per layer, stacked as well
        routers = [AuxRouter(config, module.aux_router_outputs, rngs=rngs) for _ in range(max(depth, 1))]
        setattr(module, AUX_ROUTER, stack_modules(routers) if depth else routers[0])
    return len(modules)


def has_aux_routers(model: nnx.Module) -> bool:
    modules = routed_modules(model)
    return bool(modules) and all(getattr(m, AUX_ROUTER) is not None for m in modules)


def set_routing_mode(model: nnx.Module, mode: str, *, causal_capacity: float = 1.0) -> None:
    """Switch every routed module to `mode` (see the module docstring); causal modes need aux routers attached."""
    if mode not in ROUTING_MODES:
        raise UserError(f"routing mode {mode!r} is unknown; valid: {', '.join(ROUTING_MODES)}")
    if not 0 < causal_capacity <= 1:
        raise UserError(f"causal_capacity={causal_capacity} must be in (0, 1] (1 = every token fits)")
    if mode != EXPERT_CHOICE and not has_aux_routers(model):
        raise UserError(f"{mode} routing needs auxiliary routers; attach and train them first")
    for module in routed_modules(model):
        module.routing_mode = mode
        module.causal_capacity = causal_capacity


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys a forward pass needs (data loaders add counts and characters the model must not see)."""
    return {name: batch[name] for name in MODEL_INPUTS if name in batch}


def aux_router_objective(model: nnx.Module, batch: Batch) -> tuple[Array, dict[str, Array]]:
    """Sum over layers and groups of the aux routers' mean BCE (expert-choice mode); metrics pooled over layers."""
    aux = model.hidden_states(batch["inputs"], positions=batch.get("positions"),
                              segment_ids=batch.get("segment_ids"), return_kv=False).aux
    losses = [value for layer in aux for name, value in layer.items() if name.endswith(LOSS_SUFFIX)]
    if not losses:
        raise UserError("the model reports no auxiliary-router loss; attach aux routers and use expert_choice mode")
    return sum(losses), pooled_statistics(aux)


def pooled_statistics(aux: tuple[Aux, ...]) -> dict[str, Array]:
    """Accuracy and recall per group name (text, image, mixed, mod) and overall, pooled over layers by pair counts.

    Also returns the pooled pair/selected counts (`*_pairs`, `*_selected`) so batches can be pooled the same way.
    """
    sums: dict[str, Array] = {}
    for layer in aux:
        for key, pairs in layer.items():
            if not key.endswith("_aux_router_pairs"):
                continue
            group = key[: -len("_aux_router_pairs")]
            selected = layer[f"{group}_aux_router_selected"]
            for prefix in (group, "all"):
                add = {"pairs": pairs, "selected": selected,
                       "correct": layer[f"{group}_aux_router_accuracy"] * pairs,
                       "hits": layer[f"{group}_aux_router_recall"] * selected,
                       "bce": layer[f"{group}{LOSS_SUFFIX}"] * pairs}
                for name, value in add.items():
                    sums[f"{prefix}_{name}"] = sums.get(f"{prefix}_{name}", 0.0) + value
    return sums


def summarise_pooled(sums: dict[str, float]) -> dict[str, float]:
    """Pooled sums -> {group}_aux_router_accuracy / _recall / _bce / _selected_share ("all": no group prefix)."""
    out = {}
    for key in sums:
        if not key.endswith("_pairs"):
            continue
        group = key[: -len("_pairs")]
        label = "aux_router" if group == "all" else f"{group}_aux_router"
        pairs, selected = max(sums[key], 1.0), max(sums[f"{group}_selected"], 1.0)
        out[f"{label}_accuracy"] = sums[f"{group}_correct"] / pairs
        out[f"{label}_recall"] = sums[f"{group}_hits"] / selected
        out[f"{label}_bce"] = sums[f"{group}_bce"] / pairs
        out[f"{label}_selected_share"] = sums[f"{group}_selected"] / pairs  # chance = max(share, 1 - share)
    return out


def aux_router_optimizer(learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """Adam with clipping; no weight decay (few small matrices, a short run)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate, b1=0.9, b2=0.95))


def aux_router_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation) -> Callable:
    """`step(aux_params, opt_state, frozen, batch) -> (aux_params, opt_state, metrics)`, not yet jitted: one
    optimizer step of the aux routers (the model split as `nnx.split(model, AUX_ROUTER_PARAMS, ...)`; gradients
    only w.r.t. the aux routers). experiments.compile_check compiles the same function for a mesh."""

    def step(aux_params: nnx.State, opt_state: optax.OptState, frozen: nnx.State, batch: Batch
             ) -> tuple[nnx.State, optax.OptState, dict[str, Array]]:
        def objective(params: nnx.State) -> tuple[Array, dict[str, Array]]:
            return aux_router_objective(nnx.merge(graphdef, params, frozen), batch)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(aux_params)
        updates, opt_state = optimizer.update(grads, opt_state, aux_params)
        return optax.apply_updates(aux_params, updates), opt_state, dict(metrics, objective=loss)

    return step


def train_aux_routers(model: nnx.Module, batches: Iterable[dict[str, Any]], steps: int, *,
                      learning_rate: float = 1e-3) -> Iterator[dict[str, float]]:
    """Train the attached aux routers in place for `steps` batches (main model frozen); yields each step's metrics.

    The model is split into (aux-router params, everything else); gradients are taken w.r.t. the former only.
    """
    check_routable(model)
    if not has_aux_routers(model):
        raise UserError("no auxiliary routers attached; call attach_aux_routers first")
    set_routing_mode(model, EXPERT_CHOICE)
    graphdef, aux_params, frozen = nnx.split(model, AUX_ROUTER_PARAMS, ...)
    optimizer = aux_router_optimizer(learning_rate)
    opt_state = optimizer.init(aux_params)
    step = jax.jit(aux_router_step(graphdef, optimizer))
    iterator = iter(batches)
    for _ in range(steps):
        aux_params, opt_state, metrics = step(aux_params, opt_state, frozen, model_inputs(next(iterator)))
        nnx.update(model, aux_params)
        host = {key: float(value) for key, value in metrics.items()}
        yield dict(summarise_pooled(host), objective=host["objective"])


def routing_sums(model: nnx.Module, batch: Batch, image_token_range: tuple[int, int]) -> dict[str, Array]:
    """Summed next-token NLL overall / on text targets / on image-code targets, and pooled aux-router counts."""
    output = model(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    logits = output.logits
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    low, high = image_token_range
    image = ((batch["targets"] >= low) & (batch["targets"] < high)).astype(jnp.float32) * mask
    text = mask - image
    sums = {"nll": jnp.sum(nll * mask), "tokens": jnp.sum(mask), "text_nll": jnp.sum(nll * text),
            "text_tokens": jnp.sum(text), "image_nll": jnp.sum(nll * image), "image_tokens": jnp.sum(image)}
    sums.update(pooled_statistics(output.aux))
    for key in ("mod_selected_fraction", "mod_causal_overflow"):
        values = [layer[key] for layer in output.aux if key in layer]
        if values:
            sums[key] = sum(values) / len(values)
    return sums


def evaluate_routing(model: nnx.Module, batches: list[dict[str, Any]], image_token_range: tuple[int, int], *,
                     causal_capacity: float = 1.0) -> dict[str, float]:
    """Eval loss with expert-choice routing (noncausal_*) and with aux routing (causal_*), plus aux accuracy.

    Losses are per target token (overall, text, image). Leaves the model in expert-choice mode.
    """
    if not batches:
        raise UserError("no evaluation batches")
    results: dict[str, float] = {}
    for mode, label in ((EXPERT_CHOICE, "noncausal"), (CAUSAL, "causal")):
        set_routing_mode(model, mode, causal_capacity=causal_capacity)
        graphdef, state = nnx.split(model)
        sums_fn = jax.jit(lambda state, batch, graphdef=graphdef: routing_sums(nnx.merge(graphdef, state), batch,
                                                                             image_token_range))
        totals: dict[str, float] = {}
        for batch in batches:
            for key, value in sums_fn(state, model_inputs(batch)).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        results[f"{label}_loss"] = totals["nll"] / max(totals["tokens"], 1.0)
        for modality in ("text", "image"):
            if totals[f"{modality}_tokens"] > 0:
                results[f"{label}_{modality}_loss"] = totals[f"{modality}_nll"] / totals[f"{modality}_tokens"]
        for key in ("mod_selected_fraction", "mod_causal_overflow"):
            if key in totals:
                results[f"{label}_{key}"] = totals[key] / len(batches)
        if mode == EXPERT_CHOICE:
            results.update(summarise_pooled(totals))
    set_routing_mode(model, EXPERT_CHOICE)
    return results
