"""Auxiliary routers: causal (token-by-token) routing for a MoMa model trained with expert choice.

Why: expert choice ranks every token of the batch (MoD's top-c_d every token of the row), so whether a token gets an
expert depends on tokens after it; a model trained that way cannot be run autoregressively as is. After main
training, each routed expert group (a group of >1 expert; 1t1i's modality FFNs have nothing to decide) and each MoD
layer gets an auxiliary router sigmoid(SiLU(x·W_a1)·W_a2) (W_a1: d x d/2, W_a2: d/2 x |group|, or d/2 x 1 for MoD)
trained with binary cross-entropy to predict the expert-choice selections of the frozen model. Its input is
stop-gradient'ed, so its loss never reaches the main model.

What the routers are for is moma.routing: a model call with `routing=routing_mode("causal")` routes every token
by its aux router's decision alone (first-come static slots), "oracle" by expert choice's own selections through
the same causal path, and the default, expert choice, reports each aux router's BCE against the selections it just
made ("<group>_aux_router_loss", plus accuracy and recall) in the layer's aux dict: the training signal and the
accuracy metric.

Dense [tokens, experts] bool targets exist only at group granularity (for the BCE); dispatch stays gather/scatter.
Training touches only the aux routers' parameters (`AUX_ROUTER_PARAMS`): gradients are taken with respect to them
alone, so the main model's parameters are not merely given zero updates but never differentiated at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.layers import Aux
from lm_core.stacked import stack_depth, stack_modules
from moma.routing import CAUSAL, EXPERT_CHOICE, LOSS_SUFFIX, AuxRouter, Router, RoutingMode, routing_mode
from moma.variants import MoMaConfig

Array = jax.Array
Batch = dict[str, Array]

AUX_ROUTER = "aux_router"  # the attribute name of each Router's auxiliary router
AUX_ROUTER_PARAMS = nnx.All(nnx.Param, nnx.PathContains(AUX_ROUTER))
MODEL_INPUTS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


# ------------------------------------------------------------------------------------------------ model-level tools


def routed_modules(model: nnx.Module) -> list[Router]:
    """The routers that make a non-causal routing decision (of routed expert groups, MoD blocks), in graph order.

    They declare it with `aux_router_outputs` > 0 (|group| for an expert group, 1 for a MoD layer).
    """
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, Router) and node.aux_router_outputs > 0]


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


def causal_mode(model: nnx.Module, causal_capacity: float = 1.0) -> RoutingMode:
    """The checked causal `RoutingMode` for `model`, which needs its aux routers attached."""
    mode = routing_mode(CAUSAL, causal_capacity)
    if not has_aux_routers(model):
        raise UserError(f"{CAUSAL} routing needs auxiliary routers; attach and train them first")
    return mode


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


def routing_sums(model: nnx.Module, batch: Batch, image_token_range: tuple[int, int], mode: RoutingMode
                 ) -> dict[str, Array]:
    """Summed next-token NLL overall / on text targets / on image-code targets, and pooled aux-router counts."""
    output = model(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                   routing=mode)
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

    Losses are per target token (overall, text, image).
    """
    if not batches:
        raise UserError("no evaluation batches")
    results: dict[str, float] = {}
    graphdef, state = nnx.split(model)
    for mode, label in ((RoutingMode(), "noncausal"), (causal_mode(model, causal_capacity), "causal")):
        sums_fn = jax.jit(lambda state, batch, mode=mode: routing_sums(nnx.merge(graphdef, state), batch,
                                                                       image_token_range, mode))
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
        if mode.name == EXPERT_CHOICE:
            results.update(summarise_pooled(totals))
    return results
