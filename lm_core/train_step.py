"""Train state, sharded initialisation and the jit-compiled train step built from a user-supplied loss.

The model lives as (graphdef, params): `nnx.split` separates the static structure from the parameter pytree, so
the step is a pure function of arrays that `jax.jit` compiles with explicit in/out shardings and donation.
A loss function has the signature `loss_fn(model, batch, rng) -> (loss, metrics)`; paper packages bring their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lm_core.errors import UserError
from lm_core.sharding import batch_sharding, batch_shards, named_sharding, replicated

Array = jax.Array
Batch = dict[str, Array]
LossFn = Callable[[nnx.Module, Batch, Array], tuple[Array, dict[str, Array]]]


class TrainState(NamedTuple):
    step: Array  # int32 scalar: optimizer steps taken
    params: nnx.State
    opt_state: optax.OptState
    rng: Array  # uint32[2] raw PRNG key; each step folds in its step number


def param_shardings(mesh: Mesh, params: nnx.State) -> nnx.State:
    """NamedSharding per parameter from its `logical_axes` metadata (parameters without it are replicated)."""

    def to_sharding(path: tuple, variable: nnx.Variable) -> nnx.Variable:
        shape = variable.get_value().shape
        logical = getattr(variable, "logical_axes", None) or (None,) * len(shape)
        name = "parameter " + "/".join(str(p) for p in path)
        return variable.replace(named_sharding(mesh, logical, shape, name=name))

    return nnx.map_state(to_sharding, params)


def train_state_layout(create_model: Callable[[], nnx.Module], optimizer: optax.GradientTransformation, mesh: Mesh
                       ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, abstract state, state shardings) without creating a parameter: shapes, dtypes and placements.

    The abstract state's leaves are `jax.ShapeDtypeStruct`s carrying their shardings, so `step.lower(state, batch)`
    compiles the real train step for a mesh whose devices this process does not have (lm_core.aot).
    """
    graphdef, abstract_params = nnx.split(nnx.eval_shape(create_model), nnx.Param)
    shardings = param_shardings(mesh, abstract_params)
    abstract_opt, opt_shardings = optimizer_state_layout(optimizer, abstract_params, shardings, mesh)
    state_shardings = TrainState(replicated(mesh), shardings, opt_shardings, replicated(mesh))
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt,
                        jax.ShapeDtypeStruct((2,), jnp.uint32))
    return graphdef, abstract_with_shardings(shapes, state_shardings), state_shardings


def optimizer_state_layout(optimizer: optax.GradientTransformation, abstract_params: Any, shardings: Any,
                           mesh: Mesh) -> tuple[Any, Any]:
    """(abstract optimizer state, its shardings) for parameters of these shapes and shardings."""
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    # Optimizer moments are sharded like their parameters; scalars (step counts) are replicated.
    # Parameters an optimizer leaves alone (optax.multi_transform / masked) appear as empty MaskedNodes.
    opt_shardings = optax.tree_map_params(
        optimizer, lambda leaf, sharding: leaf if isinstance(leaf, optax.MaskedNode) else sharding,
        abstract_opt, shardings,
        transform_non_params=lambda x: x if isinstance(x, optax.MaskedNode) else replicated(mesh),
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return abstract_opt, opt_shardings


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `shapes` carrying `shardings` (matching trees): what `.lower` compiles for."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        shapes, shardings)


def init_train_state(create_model: Callable[[], nnx.Module], optimizer: optax.GradientTransformation, mesh: Mesh,
                     seed: int) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Build parameters directly in their shards (never whole on one device) and the optimizer state.

    Returns (graphdef, state, state_shardings); `create_model` is a zero-argument constructor, e.g.
    `lambda: Transformer(config, rngs=nnx.Rngs(seed))`.
    """
    graphdef, _, state_shardings = train_state_layout(create_model, optimizer, mesh)

    def create_params() -> nnx.State:
        return nnx.split(create_model(), nnx.Param)[1]

    with jax.set_mesh(mesh):
        params = jax.jit(create_params, out_shardings=state_shardings.params)()
        opt_state = jax.jit(optimizer.init, out_shardings=state_shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated(mesh))
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh)), params, opt_state, rng)
    return graphdef, state, state_shardings


def loss_and_grads(graphdef: nnx.GraphDef, loss_fn: LossFn, params: nnx.State, batch: Batch, rng: Array,
                   grad_accum_steps: int = 1) -> tuple[Array, dict[str, Array], nnx.State]:
    """Loss, metrics and gradients of the whole batch, optionally in `grad_accum_steps` sequential micro-batches.

    Micro-batch results are weighted by their counted tokens (metrics["tokens"], when the loss reports it), so
    accumulation gives the same token-mean loss and gradients as one big batch.
    """

    def one_batch(micro: Batch, key: Array) -> tuple[Array, dict[str, Array], nnx.State]:
        def objective(p: nnx.State) -> tuple[Array, dict[str, Array]]:
            return loss_fn(nnx.merge(graphdef, p), micro, key)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return loss, metrics, grads

    key = jax.random.wrap_key_data(rng)
    if grad_accum_steps == 1:
        return one_batch(batch, key)

    micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

    def weight_of(metrics: dict[str, Array]) -> Array:
        return metrics.get("tokens", jnp.ones((), jnp.float32)).astype(jnp.float32)

    def accumulate(carry: tuple, inputs: tuple) -> tuple[tuple, None]:
        total_weight, weighted_loss, weighted_metrics, weighted_grads = carry
        micro, index = inputs
        loss, metrics, grads = one_batch(micro, jax.random.fold_in(key, index))
        w = weight_of(metrics)
        return (total_weight + w, weighted_loss + w * loss,
                jax.tree.map(lambda a, m: a + w * m, weighted_metrics, metrics),
                jax.tree.map(lambda a, g: a + w * g, weighted_grads, grads)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    metric_shapes = jax.eval_shape(lambda: one_batch(first, key)[1])
    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes),
             jax.tree.map(jnp.zeros_like, params))
    (weight, loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros,
                                                     (micro_batches, jnp.arange(grad_accum_steps)))
    weight = jnp.maximum(weight, 1e-9)
    metrics = {name: value / weight for name, value in metrics.items()}
    for summed in ("tokens", "nll"):  # these are totals, not means: undo the weighting
        if summed in metrics:
            metrics[summed] = metrics[summed] * weight / grad_accum_steps
    if "tokens" in metric_shapes:
        metrics["tokens"] = weight
    return loss / weight, metrics, jax.tree.map(lambda g: g / weight, grads)


def all_finite(*trees: Any) -> Array:
    """One bool: every element of every array in `trees` is finite (an all-reduce over sharded leaves)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(trees)]))


def batch_shardings(mesh: Mesh, batch: Batch) -> dict[str, NamedSharding]:
    return {name: batch_sharding(mesh, value.ndim) for name, value in batch.items()}


def check_batch_fits(mesh: Mesh, global_batch_size: int, grad_accum_steps: int = 1) -> None:
    shards = batch_shards(mesh)
    if global_batch_size % (shards * grad_accum_steps):
        raise UserError(f"global batch size {global_batch_size} must be divisible by the batch mesh axes "
                        f"(data*fsdp*expert = {shards}) times grad_accum_steps={grad_accum_steps}")


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    mesh: Mesh, state_shardings: TrainState, *, grad_accum_steps: int = 1
                    ) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """A compiled `step(state, batch, proceed=True) -> (new_state, metrics)`; `state` is donated (updated in place).

    metrics["finite"] (bool) is False when the objective, the gradient norm or an updated parameter is not finite,
    or when `proceed` is False; `new_state` is then `state` unchanged (step count included). `proceed` is the
    previous step's metrics["finite"], still on the device: a caller that reads each step's flag back only after
    dispatching the next step (so the host never waits for the device) passes it, and a step that follows a
    non-finite one is not applied either, so the state the caller finally sees is still the last finite one.

    `step.lower(state, batch)` gives the same jit's `jax.stages.Lowered`, for looking at what runs: its HLO,
    `.compile().cost_analysis()`, or the op names of a profile (benchmarks/op_profile.py).
    """

    def step(state: TrainState, batch: Batch, proceed: Array) -> tuple[TrainState, dict[str, Array]]:
        step_rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))
        loss, metrics, grads = loss_and_grads(graphdef, loss_fn, state.params, batch, step_rng, grad_accum_steps)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = all_finite(loss, grad_norm, params) & proceed
        # A step that is not finite is not applied, decided here on device, so the state the caller holds is the
        # last finite one, to save instead of a NaN one. Costs a reduction over the parameters and keeping the old
        # ones until it is done (~0.8x their size).
        updated = TrainState(state.step + 1, params, opt_state, state.rng)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        return new_state, dict(metrics, objective=loss, grad_norm=grad_norm, finite=finite)

    compiled: dict[str, Any] = {}

    def jitted(batch: Batch) -> Any:
        if "step" not in compiled:  # shardings of the batch are known only once we see its keys and ranks
            compiled["step"] = jax.jit(step, in_shardings=(state_shardings, batch_shardings(mesh, batch),
                                                           replicated(mesh)),
                                       out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
        return compiled["step"]

    def run(state: TrainState, batch: Batch, proceed: Array | None = None) -> tuple[TrainState, dict[str, Array]]:
        if proceed is None:  # made on first use: an ahead-of-time mesh of abstract TPU devices holds no arrays
            if "always" not in compiled:
                compiled["always"] = jax.device_put(jnp.asarray(True), replicated(mesh))
            proceed = compiled["always"]
        with jax.set_mesh(mesh):
            return jitted(batch)(state, batch, proceed)

    def lower(state: TrainState, batch: Batch) -> jax.stages.Lowered:
        with jax.set_mesh(mesh):
            return jitted(batch).lower(state, batch, jax.ShapeDtypeStruct((), jnp.bool_, sharding=replicated(mesh)))

    run.lower = lower  # type: ignore[attr-defined]
    return run
