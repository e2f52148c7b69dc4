"""Expert dispatch: each routing group's chosen tokens to their experts and the gated outputs back.

Routing (moma.experts) gives every expert of a group a fixed number of slots per routing group: token_index
[groups, experts, slots] (which token of the group each slot holds) and gate [groups, experts, slots] (0 for an
invalid slot). Dispatch gathers those tokens, runs every expert's SwiGLU on its slots as one batched matmul, scales
by the gate and scatter-adds the results back into the group's tokens. Static shapes throughout.

Under a mesh whose batch shards each hold whole routing groups, this runs inside `jax.shard_map`: each device
gathers its own groups' slots, `jax.lax.all_to_all` over the mesh axis `expert` sends expert j's slots to the
device holding expert j (weights [experts, d, d_ff] are split over `expert`), that device runs its local experts
on the slots of every group it received, and the inverse all-to-all brings the outputs home, where the gate and the
scatter-add are local. Per device and layer that moves the device's own slots twice (there and back) in each
direction of the pass, never the global batch. The FFN width is split over `tensor` (the down projection's
partial sums are psum'd there) and expert weights are gathered over `fsdp` at the shard_map boundary, as FSDP
does for every other weight. Without a mesh, or when routing groups span devices (e.g. moma.routing_groups=1 on a
data-parallel mesh: the paper's whole-batch choice), the same local computation runs as plain jit code and GSPMD
moves what it must.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lm_core.layers import silu
from lm_core.sharding import batch_shards, logical_to_spec

Array = jax.Array


class ExpertWeights(NamedTuple):
    """Stacked SwiGLU weights of one expert group, in the compute dtype."""

    gate: Array  # [experts, d, d_ff]
    up: Array  # [experts, d, d_ff]
    down: Array  # [experts, d_ff, d]


def per_group(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` of one routing group mapped over the leading groups axis of every argument.

    One group (a single device) calls `fn` directly, so a single-device program is the one it was before routing
    groups existed, without size-1 batch dimensions in its gathers, scatters and top-k."""

    def mapped(*args: Any) -> Any:
        if jax.tree.leaves(args)[0].shape[0] == 1:
            return jax.tree.map(lambda a: a[None], fn(*jax.tree.map(lambda a: a[0], args)))
        return jax.vmap(fn)(*args)

    return mapped


def gather_slots(x: Array, token_index: Array) -> Array:
    """x [groups, tokens, d], token_index [groups, experts, slots] -> the slots' inputs [groups, experts, slots, d]."""
    return per_group(lambda tokens, index: jnp.take(tokens, index, axis=0))(x, token_index)


def combine_slots(x: Array, token_index: Array, outputs: Array) -> Array:
    """Scatter-add outputs [groups, experts, slots, d] into zeros like x [groups, tokens, d] at token_index."""
    d = x.shape[-1]

    def combine(tokens: Array, index: Array, out: Array) -> Array:
        return jnp.zeros_like(tokens).at[index.reshape(-1)].add(out.reshape(-1, d))

    return per_group(combine)(x, token_index, outputs)


def swiglu_experts(x: Array, weights: ExpertWeights) -> Array:
    """Every expert's SwiGLU on its slots: x [groups, experts, slots, d] -> [groups, experts, slots, d].

    Each expert's slots of all groups form one [groups x slots, d] matrix, so each projection is one matmul
    batched over experts only: with a groups batch axis as well, XLA:CPU ran moma_tiny's train step ~15% slower."""
    groups, experts, slots, d = x.shape
    rows = jnp.swapaxes(x, 0, 1).reshape(experts, groups * slots, d)
    gate = jnp.einsum("esd,edf->esf", rows, weights.gate)
    up = jnp.einsum("esd,edf->esf", rows, weights.up)
    out = jnp.einsum("esf,efd->esd", silu(gate) * up, weights.down)
    return jnp.swapaxes(out.reshape(experts, groups, slots, d), 0, 1)


def dispatch_local(x: Array, token_index: Array, gate: Array, weights: ExpertWeights) -> Array:
    """Gather, experts, gate, scatter-add on one device (or as GSPMD makes of it): [groups, tokens, d]."""
    outputs = swiglu_experts(gather_slots(x, token_index), weights)
    return combine_slots(x, token_index, outputs * gate[..., None].astype(x.dtype))


def dispatch(x: Array, token_index: Array, gate: Array, weights: ExpertWeights, *, expert_parallel: bool) -> Array:
    """The mixture [groups, tokens, d] of a group's experts; `expert_parallel`: its weights are split over `expert`.

    Runs as `expert_parallel_dispatch` when a mesh of several devices is set and its batch shards hold whole
    routing groups.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or x.shape[0] % batch_shards(mesh):
        return dispatch_local(x, token_index, gate, weights)
    return expert_parallel_dispatch(x, token_index, gate, weights, mesh, expert_parallel=expert_parallel)


def expert_parallel_dispatch(x: Array, token_index: Array, gate: Array, weights: ExpertWeights,
                             mesh: jax.sharding.AbstractMesh, *, expert_parallel: bool) -> Array:
    """`dispatch_local`'s result with every device working on its own routing groups (module docstring)."""
    names = mesh.axis_names
    grouped = PartitionSpec(logical_to_spec(("batch",), names)[0])  # [groups, ...]: groups over the batch axes
    expert = "expert" if expert_parallel else None
    in_out = logical_to_spec((expert, None, "mlp"), names)
    out_in = logical_to_spec((expert, "mlp", None), names)
    exchange = expert_parallel and "expert" in names and mesh.shape["expert"] > 1

    def local(x: Array, token_index: Array, gate: Array, weights: ExpertWeights) -> Array:
        slots = gather_slots(x, token_index)  # [local groups, experts, slots, d]
        if exchange:  # -> [local groups x |expert|, local experts, slots, d]: every group's slots of my experts
            slots = jax.lax.all_to_all(slots, "expert", split_axis=1, concat_axis=0, tiled=True)
        outputs = swiglu_experts(slots, weights)
        if "tensor" in names:  # each tensor shard holds part of d_ff: sum the down projection's parts
            outputs = jax.lax.psum(outputs, "tensor")
        if exchange:  # inverse: back to [local groups, experts, slots, d]
            outputs = jax.lax.all_to_all(outputs, "expert", split_axis=0, concat_axis=1, tiled=True)
        return combine_slots(x, token_index, outputs * gate[..., None].astype(x.dtype))

    weight_specs = ExpertWeights(in_out, in_out, out_in)
    return jax.shard_map(local, mesh=mesh, in_specs=(grouped, grouped, grouped, weight_specs),
                         out_specs=grouped)(x, token_index, gate, weights)
