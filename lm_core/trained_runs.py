"""Finished (or partly trained) runs, read without training: a trained model for inference, a run's state as
the runs built on it record it, and the checks that a checkpoint belongs to the setup asking for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from lm_core import sharding
from lm_core.checkpoint import CHECKPOINTS, Checkpointer, check_same_model, latest_checkpoint, latest_meta
from lm_core.errors import UserError
from lm_core.metrics import read_metrics
from lm_core.run_config import model_config_from, read_config_json
from lm_core.run_data import run_tokenizer
from lm_core.task import ModelBuilder, plain_transformer
from lm_core.train_step import abstract_with_shardings, param_shardings

# TrainTask.meta keys that checkpoints written before they existed do not have: such a checkpoint is accepted.
# "built_on": which upstream runs (and which state of them, `run_state`) a run started from: the KVP pipeline's
# base and auxiliary runs, an upcycled MoMa run's seed (also what MoMa's auxiliary routers were trained on).
RECORDED_SINCE = ("built_on",)


def run_state(directory: Path) -> str | None:
    """A run's latest checkpoint as a short string: its step and its logged loss there (two trainings that differ
    end at different losses, a rerun of the same one at the same), or its import source; None: none yet. What a
    run built on it records as "built_on", so it is refused once that run has trained on or been replaced."""
    step, meta = latest_meta(directory / CHECKPOINTS)
    if step is None:
        return None
    losses = [row["loss"] for row in read_metrics(directory / "metrics.jsonl") if row.get("step") == step]
    origin = (f"loss {losses[-1]!r}" if losses else f"imported from {meta['imported_from']}"
              if "imported_from" in meta else "no logged loss")
    return f"step {step}, {origin}"


def differing_meta(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The keys of `expected` whose saved value differs (compared as JSON), a key of RECORDED_SINCE that `saved`
    predates excepted."""
    return [key for key, value in expected.items() if _jsonable(saved.get(key)) != _jsonable(value)
            and (key in saved or key not in RECORDED_SINCE)]


def check_same_meta(saved: dict[str, Any], expected: dict[str, Any], workdir: Path) -> None:
    differing = differing_meta(saved, expected)
    if differing:
        details = ", ".join(f"{key}: checkpoint {saved.get(key)!r} vs now {expected[key]!r}" for key in differing)
        stale = (" (the run it was built on has changed since: move the stale run away to redo it)"
                 if "built_on" in differing else "")
        raise UserError(f"{workdir} holds a checkpoint of a different setup ({details}){stale}; use another "
                        "--workdir")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def load_trained_model(workdir: str | Path, create_model: ModelBuilder = plain_transformer, *,
                       mesh: Mesh | None = None) -> tuple[Any, Any, int]:
    """(model, tokenizer, step) from a workdir's config, tokenizer and latest checkpoint.

    `create_model` must build the module the run trained (its task's builder: a paper's model, or the plain
    Transformer). Only the parameters are read (not the optimizer state), each straight into its sharding on
    `mesh` (default: this process's first device, so every process of a multi-host job gets its own copy).
    """
    workdir = Path(workdir)
    config = read_config_json(workdir)
    model_config = model_config_from(config)
    step, meta = latest_checkpoint(workdir, hint="train it first")
    check_same_model(meta, model_config, workdir)
    mesh = mesh or sharding.make_mesh(sharding.MeshConfig(data=1), jax.local_devices()[:1])
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: create_model(model_config, 0)), nnx.Param)
    target = abstract_with_shardings(abstract_params, param_shardings(mesh, abstract_params))
    checkpointer = Checkpointer(workdir / CHECKPOINTS)
    params = checkpointer.restore_params(step, target)
    checkpointer.close()
    return nnx.merge(graphdef, params), run_tokenizer(config, workdir), step
