"""Meshes and the logical-axis-rules table.

Modules name the axes of their parameters and activations logically ("batch", "embed", "mlp", "vocab", ...).
`LOGICAL_AXIS_RULES` maps each name to mesh axes; changing parallelism means changing mesh sizes, never code.

- `data`:   pure data parallelism (parameters replicated).
- `fsdp`:   data parallelism whose parameters (and optimizer state) are sharded along their "embed" dimension.
- `tensor`: Megatron-style model parallelism over heads, the FFN hidden width and the vocabulary.
- `expert`: mixture-of-experts parallelism; dense parts of the model use it as another data axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lm_core.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# logical name -> mesh axes (None = replicated). Parameters and activations use distinct names where they must
# shard differently, e.g. the parameter "embed" dimension is FSDP-sharded while activations keep it whole.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "expert": "expert",
    "head_dim": None,
    "norm": None,
    "layers": None,
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_seq": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the four mesh axes; one of them may be -1 to take all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def batch_shards(self, num_devices: int) -> int:
        """How many shards the batch splits into on `num_devices` (the product of the BATCH_AXES sizes)."""
        sizes = dict(zip(MESH_AXES, self.resolved_shape(num_devices), strict=True))
        return math.prod(sizes[axis] for axis in BATCH_AXES)

    def resolved_shape(self, num_devices: int) -> tuple[int, int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor, self.expert]
        bad = [f"{name}={size}" for name, size in zip(MESH_AXES, sizes, strict=True) if size == 0 or size < -1]
        if bad:
            raise UserError(f"invalid mesh size(s) {', '.join(bad)}: each must be a positive integer or -1")
        if sizes.count(-1) > 1:
            raise UserError(f"mesh {self._describe(sizes)}: at most one axis may be -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise UserError(f"mesh {self._describe(sizes)} does not fit {num_devices} devices: "
                                f"{num_devices} is not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise UserError(f"mesh {self._describe(sizes)} needs {math.prod(sizes)} devices but "
                            f"{num_devices} are available; make data*fsdp*tensor*expert = {num_devices} "
                            "or set one axis to -1")
        return tuple(sizes)  # type: ignore[return-value]

    @staticmethod
    def _describe(sizes: Sequence[int]) -> str:
        return "(" + ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes, strict=True)) + ")"


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert) over `devices` (default: all devices of all hosts)."""
    config = config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    shape = config.resolved_shape(len(devices))
    try:
        # make_mesh orders devices so that the inner axes (tensor, expert) stay within fast interconnect.
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)
    except (ValueError, NotImplementedError):
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def logical_to_spec(logical_axes: Sequence[str | None], mesh_axis_names: Sequence[str] = MESH_AXES,
                    rules: dict[str, Any] | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry these logical names.

    A mesh axis is used at most once per array (the first dimension that asks for it wins), and axes the mesh
    does not have are dropped, so the same model code runs on any subset of the four axes.
    """
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    used: set[str] = set()
    spec: list[Any] = []
    for name in logical_axes:
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules")
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh_axis_names and a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def mesh_axes_size(mesh: Mesh | jax.sharding.AbstractMesh, entry: Any) -> int:
    """How many shards one PartitionSpec entry splits a dimension into."""
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape), strict=False)):
        shards = mesh_axes_size(mesh, entry)
        if size % shards:
            raise UserError(f"{name} dimension {dim} of size {size} cannot be split over mesh axes {entry} "
                            f"({shards} shards); choose sizes divisible by {shards} or a different mesh")


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   name: str = "array") -> NamedSharding:
    spec = logical_to_spec(logical_axes, mesh.axis_names)
    if shape is not None:
        check_divisible(name, shape, spec, mesh)
    return NamedSharding(mesh, spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Annotate an activation's sharding when running under a mesh (`jax.set_mesh`); a no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, mesh.axis_names)
    for size, entry in zip(x.shape, spec, strict=False):
        if size % mesh_axes_size(mesh, entry):
            return x  # e.g. a batch of 1 while decoding on a data-parallel mesh: let XLA decide
    return jax.lax.with_sharding_constraint(x, spec)


def tree_shardings(mesh: Mesh, logical_tree: Any, shapes: Any) -> Any:
    """NamedShardings for a pytree of arrays, given a matching pytree of logical-axes tuples.

    `logical_tree` leaves are tuples of names (or None for replicated); `shapes` has arrays or ShapeDtypeStructs.
    """
    paths_and_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    logical_leaves = jax.tree.leaves(logical_tree, is_leaf=lambda x: x is None or isinstance(x, tuple))
    if len(logical_leaves) != len(paths_and_shapes):
        raise ValueError("logical axes tree does not match the array tree")
    shardings = []
    for (path, leaf), logical in zip(paths_and_shapes, logical_leaves, strict=True):
        logical = logical if logical is not None else (None,) * len(leaf.shape)
        shardings.append(named_sharding(mesh, logical, leaf.shape, name=jax.tree_util.keystr(path)))
    return jax.tree.unflatten(jax.tree.structure(shapes), shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input: the batch over the data-like axes, the rest whole."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh.axis_names))


def batch_shards(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def traced_batch_shards() -> int:
    """`batch_shards` of the mesh being traced for (`jax.set_mesh`); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else batch_shards(mesh)
