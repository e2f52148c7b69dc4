"""The KV-prediction family of a workdir: trained models, or random weights of the configured sizes for timing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from experiments.kv_prediction.task import aux_only_dir, base_dir, kvp_builder, kvp_dir
from kv_prediction.model import KVPModel
from kv_prediction.variants import AuxSpec, build_kvp_model
from lm_core.checkpoint import check_same_model, has_checkpoints, latest_checkpoint
from lm_core.errors import UserError
from lm_core.model import Transformer
from lm_core.run_config import model_config_from
from lm_core.trained_runs import load_trained_model


@dataclasses.dataclass
class Family:
    aux: AuxSpec
    base: Transformer
    aux_only: Transformer  # the aux-only baseline (trained) or the KVP auxiliary (random weights)
    kvp: KVPModel


def check_base_matches(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """The base run in `workdir` must be the model `config` describes."""
    _, meta = latest_checkpoint(base_dir(workdir), hint="run python -m experiments.kv_prediction.train first")
    check_same_model(meta, model_config_from(config), base_dir(workdir))


def load_family(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec, base: Transformer | None = None
                ) -> Family:
    """(base, aux-only baseline, KVP model) of one auxiliary, all trained."""
    for directory in (kvp_dir(workdir, aux), aux_only_dir(workdir, aux)):
        if not has_checkpoints(directory):  # only probed: load_trained_model reads the checkpoint once, below
            raise UserError(f"{directory} is not trained yet; rerun python -m experiments.kv_prediction.train "
                            f"--workdir={workdir}")
    if base is None:
        base, _, _ = load_trained_model(base_dir(workdir))
    aux_only, _, _ = load_trained_model(aux_only_dir(workdir, aux))
    kvp, _, _ = load_trained_model(kvp_dir(workdir, aux), kvp_builder(aux))
    return Family(aux, base, aux_only, kvp)


def random_family(config: ml_collections.ConfigDict, aux: AuxSpec) -> Family:
    """Random weights of the configured sizes (timing does not depend on weights)."""
    kvp = build_kvp_model(model_config_from(config), aux, config.seed)
    return Family(aux, kvp.base, kvp.aux, kvp)


def trained_family(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> Family | None:
    """The trained family of `aux` when `workdir` has all three runs, else None."""
    directories = (base_dir(workdir), kvp_dir(workdir, aux), aux_only_dir(workdir, aux))
    if not all(has_checkpoints(directory) for directory in directories):
        return None
    check_base_matches(config, workdir)
    return load_family(config, workdir, aux)
