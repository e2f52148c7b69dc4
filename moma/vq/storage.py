"""Save / load of a VQ tokenizer: a directory of config.json + state.npz ("/"-joined paths of nnx.state -> arrays).

`save_vq` replaces the directory atomically; `load_vq` rebuilds the model from its config and refuses (UserError
naming the file) a missing, corrupt or mismatched state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm_core.errors import UserError
from moma.vq.model import VQConfig, VQTokenizer

CONFIG_FILE = "config.json"
STATE_FILE = "state.npz"


def save_vq(model: VQTokenizer, directory: str | os.PathLike) -> Path:
    """Write the tokenizer to `directory` atomically: a complete new directory replaces any old one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    flat = _flatten(nnx.to_pure_dict(nnx.state(model)))
    staging = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed save by a process with our pid
    staging.mkdir()
    try:
        with open(staging / STATE_FILE, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
        (staging / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.config), indent=2) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            staging.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_config(directory: str | os.PathLike) -> VQConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        return VQConfig(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"VQ tokenizer config '{path}' is missing or corrupt ({' '.join(str(e).split())[:160]}); "
                        "valid: a directory written by moma.vq.save_vq") from e


def load_vq(directory: str | os.PathLike) -> VQTokenizer:
    """The tokenizer `save_vq` wrote; a missing, corrupt or mismatched state is a UserError naming the file."""
    config = load_config(directory)
    path = Path(directory) / STATE_FILE
    abstract = nnx.eval_shape(lambda: VQTokenizer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = {k: v.shape for k, v in _flatten(nnx.to_pure_dict(state)).items()}
    try:
        with np.load(path) as data:
            saved = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise UserError(f"VQ tokenizer state '{path}' is missing or corrupt ({' '.join(str(e).split())[:160]}); "
                        "valid: a directory written by moma.vq.save_vq") from e
    mismatched = sorted(set(expected) ^ set(saved)) + sorted(
        k for k in set(expected) & set(saved) if saved[k].shape != tuple(expected[k]))
    if mismatched:
        raise UserError(f"VQ tokenizer state '{path}' does not match its config ({len(mismatched)} arrays differ, "
                        f"e.g. {mismatched[:3]}); valid: config.json and state.npz written together by save_vq")
    nnx.replace_by_pure_dict(state, _unflatten({k: jnp.asarray(v) for k, v in saved.items()}))
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
