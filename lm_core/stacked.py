"""Stacked layers: modules of one structure held as one module whose every parameter has a leading layer axis.

A scanned model (ModelConfig.scan_layers) keeps its blocks this way, so `jax.lax.scan` runs over the parameters as
they are stored: no per-layer copy each step, one optimizer update per parameter kind rather than per layer, and a
compile time that hardly grows with depth. The leading axis is the logical axis "layers" (never sharded), so
`lm_core.sharding` places the rest of each parameter as before. Every submodule of a stacked module records the
depth in `STACK_DEPTH`, so code that adds parameters later (MoMa's aux routers) can add them stacked too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_AXIS = "layers"
STACKED_BLOCKS = "stacked_blocks"  # the Transformer attribute holding them (lm_core.model)
UNROLLED_BLOCKS = "blocks"  # the attribute of an unrolled Transformer's blocks
STACK_DEPTH = "stack_depth"  # attribute of every module inside a stacked module: how many layers it holds


def _is_variable(x: object) -> bool:
    return isinstance(x, nnx.Variable)


def _axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    return tuple(getattr(variable, "logical_axes", None) or (None,) * variable.get_value().ndim)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of the modules' (identical) structure whose variables are theirs stacked along a new axis 0."""
    graphdef, *_ = nnx.split(modules[0])
    states = [nnx.split(module)[1] for module in modules]
    stacked = jax.tree.map(
        lambda *variables: variables[0].replace(jnp.stack([v.get_value() for v in variables]),
                                                logical_axes=(LAYER_AXIS, *_axes(variables[0]))),
        *states, is_leaf=_is_variable)
    module = nnx.merge(graphdef, stacked)
    mark_stacked(module, len(modules))
    return module


def mark_stacked(module: nnx.Module, depth: int) -> None:
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module):
            setattr(node, STACK_DEPTH, depth)


def stack_depth(module: nnx.Module) -> int:
    """How many layers a module inside a stacked module holds; 0 for an ordinary module."""
    return getattr(module, STACK_DEPTH, 0)


def unstacked_state(state: nnx.State) -> nnx.State:
    """One layer's slice of a stacked state (as a scan body receives it), with the layer axis dropped from each
    variable's logical axes too."""
    return jax.tree.map(lambda v: v.replace(v.get_value(), logical_axes=_axes(v)[1:]), state, is_leaf=_is_variable)


def _layer_module(graphdef: nnx.GraphDef, layer_state: nnx.State) -> nnx.Module:
    """An ordinary module of a stacked module's structure holding one layer's slice of its state."""
    module = nnx.merge(graphdef, unstacked_state(layer_state))
    mark_stacked(module, 0)
    return module


def layer_view(stacked: nnx.Module, index: int) -> nnx.Module:
    """Layer `index` of a stacked module as an ordinary module (a read-only view: changing it leaves the stack
    as it was; `set_layer_state` writes)."""
    graphdef, state = nnx.split(stacked)
    return _layer_module(graphdef, jax.tree.map(lambda a: a[index], state))


def set_layer_state(stacked: nnx.Module, index: int, layer: nnx.State) -> None:
    """Write one layer's parameters (a state of the unstacked structure) into slot `index` of the stack."""
    new_values = {path: variable.get_value() for path, variable in nnx.to_flat_state(layer)}
    updated = [(path, variable.replace(variable.get_value().at[index].set(new_values[path])))
               for path, variable in nnx.to_flat_state(nnx.state(stacked))]
    nnx.update(stacked, nnx.from_flat_state(updated))


def scan_stacked(body: Callable, carry: object, stacked: Sequence[nnx.Module], xs: object = None
                 ) -> tuple[object, object]:
    """`jax.lax.scan` over the layers of `stacked` modules (one per position of a repeating period):
    `body(carry, modules, x) -> (carry, y)` gets each position's layer as an ordinary module."""
    graphdefs, states = zip(*(nnx.split(module) for module in stacked), strict=True)

    def step(h: object, inputs: tuple) -> tuple[object, object]:
        layer_states, x = inputs
        return body(h, [_layer_module(g, s) for g, s in zip(graphdefs, layer_states, strict=True)], x)

    return jax.lax.scan(step, carry, (list(states), xs))


# ------------------------------------------------------------------------------ converting a model's state layout

def _with_value(leaf: object, value: jax.Array, axes: tuple[str | None, ...]) -> object:
    return leaf.replace(value, logical_axes=axes) if _is_variable(leaf) else value


def _value(leaf: object) -> jax.Array:
    return leaf.get_value() if _is_variable(leaf) else leaf


def unrolled_layout(state: nnx.State) -> nnx.State:
    """A Transformer state (parameters, gradients) with `stacked_blocks/<j>/...` [steps, ...] entries split into
    the unrolled model's `blocks/<j + period·s>/...` ones; anything else is kept as it is."""
    flat = nnx.to_flat_state(state)
    period = 1 + max((p[1] for p, _ in flat if p[0] == STACKED_BLOCKS), default=-1)
    converted = []
    for path, leaf in flat:
        if path[0] != STACKED_BLOCKS:
            converted.append((path, leaf))
            continue
        value = _value(leaf)
        axes = _axes(leaf)[1:] if _is_variable(leaf) else ()
        converted += [((UNROLLED_BLOCKS, path[1] + period * step, *path[2:]), _with_value(leaf, value[step], axes))
                      for step in range(value.shape[0])]
    return nnx.from_flat_state(sorted(converted, key=lambda item: _sort_key(item[0])))


def stacked_layout(state: nnx.State, period: int) -> nnx.State:
    """The inverse of `unrolled_layout`: `blocks/<i>/...` entries stacked into `stacked_blocks/<i % period>/...`."""
    stacks: dict[tuple, list[tuple[int, object]]] = {}
    converted = []
    for path, leaf in nnx.to_flat_state(state):
        if path[0] != UNROLLED_BLOCKS:
            converted.append((path, leaf))
        else:
            stacks.setdefault((STACKED_BLOCKS, path[1] % period, *path[2:]), []).append((path[1], leaf))
    for path, layers in stacks.items():
        leaves = [leaf for _, leaf in sorted(layers, key=lambda item: item[0])]
        axes = (LAYER_AXIS, *_axes(leaves[0])) if _is_variable(leaves[0]) else ()
        converted.append((path, _with_value(leaves[0], jnp.stack([_value(x) for x in leaves]), axes)))
    return nnx.from_flat_state(sorted(converted, key=lambda item: _sort_key(item[0])))


def _sort_key(path: tuple) -> tuple:
    return tuple((0, k, "") if isinstance(k, int) else (1, 0, str(k)) for k in path)
