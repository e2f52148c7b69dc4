"""A module's variables as one .npz file ("/"-joined paths of `nnx.state` -> arrays) and back, checked against
the module the file is loaded into: for small models saved outside a training run's Orbax checkpoints (MoMa's VQ
image tokenizer, moma.vq.storage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm_core.errors import UserError


def save_state_npz(module: nnx.Module, path: Path) -> None:
    """Every variable of `module`, host copies, into `path` (write it inside a staged directory: not atomic)."""
    flat = _flatten(nnx.to_pure_dict(nnx.state(module)))
    with open(path, "wb") as f:
        np.savez(f, **{name: np.asarray(value) for name, value in flat.items()})


def load_state_npz(path: Path, abstract: nnx.Module, *, label: str, written_by: str) -> nnx.Module:
    """`abstract` (e.g. from `nnx.eval_shape`) with the variables `save_state_npz` wrote to `path`. A missing or
    corrupt file, or one whose arrays are not exactly the module's, is one UserError: "<label> '<path>' ...;
    valid: ... <written_by>"."""
    graphdef, state = nnx.split(abstract)
    expected = {name: value.shape for name, value in _flatten(nnx.to_pure_dict(state)).items()}
    try:
        with np.load(path) as data:
            saved = {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise UserError(f"{label} '{path}' is missing or corrupt ({' '.join(str(e).split())[:160]}); valid: a "
                        f"directory written by {written_by}") from e
    mismatched = sorted(set(expected) ^ set(saved)) + sorted(
        name for name in set(expected) & set(saved) if saved[name].shape != tuple(expected[name]))
    if mismatched:
        raise UserError(f"{label} '{path}' does not match its config ({len(mismatched)} arrays differ, e.g. "
                        f"{mismatched[:3]}); valid: the config and state written together by {written_by}")
    nnx.replace_by_pure_dict(state, _unflatten({name: jnp.asarray(value) for name, value in saved.items()}))
    return nnx.merge(graphdef, state)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of _flatten; purely numeric keys become ints again (nnx.List indices)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = (int(p) if p.isdigit() else p for p in name.split("/"))
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
