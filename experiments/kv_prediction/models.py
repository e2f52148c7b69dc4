"""Loading the trained KV-prediction family from a workdir, or building it with random weights for timing."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from experiments.kv_prediction.pipeline import aux_only_dir, aux_only_task, base_dir, kvp_dir, kvp_task
from kv_prediction.model import KVPModel
from kv_prediction.variants import build_kvp_model
from lm_core.model import Transformer
from lm_core.trainer import load_trained_model, model_config_from


def load_or_build(config: ml_collections.ConfigDict, workdir: Path | None, spec: str) -> KVPModel:
    """The trained KVP model of `spec` when `workdir` has it, else random weights of the configured sizes."""
    if workdir is not None and (kvp_dir(workdir, spec) / "checkpoints").is_dir():
        model, _, _ = load_trained_model(kvp_dir(workdir, spec), kvp_task(config, workdir, spec))
        return model
    return build_kvp_model(model_config_from(config), spec, config.seed)


def load_family(config: ml_collections.ConfigDict, workdir: Path, spec: str
                ) -> tuple[Transformer, Transformer, KVPModel]:
    """(base, aux-only baseline, KVP model) for one auxiliary spec, all trained."""
    base, _, _ = load_trained_model(base_dir(workdir))
    aux_only, _, _ = load_trained_model(aux_only_dir(workdir, spec), aux_only_task(config, workdir, spec))
    kvp, _, _ = load_trained_model(kvp_dir(workdir, spec), kvp_task(config, workdir, spec))
    return base, aux_only, kvp
