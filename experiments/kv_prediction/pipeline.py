"""Training the KV-prediction family with lm_core's trainer: the base, then per auxiliary spec the KVP model
(auxiliary + predictor, base frozen) and the auxiliary-only baseline fine-tuned for the same steps."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from kv_prediction.auxiliary import build_layer_pruned
from kv_prediction.loss import kvp_loss
from kv_prediction.optim import make_kvp_optimizer
from kv_prediction.variants import auxiliary_config, build_kvp_model, is_layer_pruned, keep_fraction
from lm_core.config import ModelConfig
from lm_core.model import Transformer
from lm_core.train_step import TrainState
from lm_core.trainer import TrainTask, load_trained_model, model_config_from, train


def base_dir(workdir: Path) -> Path:
    return workdir / "base"


def kvp_dir(workdir: Path, spec: str) -> Path:
    return workdir / f"kvp_{spec}"


def aux_only_dir(workdir: Path, spec: str) -> Path:
    return workdir / f"aux_{spec}"


def stage_config(config: ml_collections.ConfigDict, steps: int, model: ModelConfig | None = None
                 ) -> ml_collections.ConfigDict:
    """The shared training fields of `config` for one stage (its own steps, LR schedule and model)."""
    stage = copy.deepcopy(config)
    stage.unlock()
    del stage["kvp"]
    stage.steps = steps
    stage.optimizer.total_steps = steps
    stage.optimizer.warmup_steps = max(1, steps // 10)
    stage.eval_every = steps
    stage.checkpoint_every = steps
    if model is not None:
        stage.model.update(model.to_dict())
    return stage


def copy_into(target: nnx.State, source: nnx.State) -> nnx.State:
    """`source` values placed like `target` (keeps each leaf's sharding), for loading weights into a train state."""
    return jax.tree.map(lambda t, s: jax.device_put(s, t.sharding), target, source)


def load_base(workdir: Path) -> Transformer:
    model, _, _ = load_trained_model(base_dir(workdir))
    return model


def kvp_task(config: ml_collections.ConfigDict, workdir: Path, spec: str) -> TrainTask:
    kvp = config.kvp

    def initialize(state: TrainState) -> TrainState:
        base = load_base(workdir)
        params = state.params
        params["base"] = copy_into(params["base"], nnx.state(base, nnx.Param))
        if is_layer_pruned(spec):  # KVP-LP: the auxiliary starts as the base's kept layers
            aux = build_layer_pruned(base, keep_fraction(spec), nnx.Rngs(config.seed))
            params["aux"] = copy_into(params["aux"], nnx.state(aux, nnx.Param))
        return state._replace(params=params)

    loss = functools.partial(kvp_loss, lambda_base=kvp.lambda_base, lambda_aux=kvp.lambda_aux,
                             lambda_consistency=kvp.lambda_consistency or None, z_loss_weight=config.z_loss)
    return TrainTask(loss_fn=loss, create_model=lambda model_config, seed: build_kvp_model(model_config, spec, seed),
                     initialize=initialize, make_optimizer=make_kvp_optimizer,
                     extra_meta={"kvp_variant": spec})


def aux_only_task(config: ml_collections.ConfigDict, workdir: Path, spec: str) -> TrainTask:
    def initialize(state: TrainState) -> TrainState:
        if not is_layer_pruned(spec):
            return state  # canonical: trained from its fresh initialisation, as the KVP auxiliary is
        aux = build_layer_pruned(load_base(workdir), keep_fraction(spec), nnx.Rngs(config.seed))
        return state._replace(params=copy_into(state.params, nnx.state(aux, nnx.Param)))

    return TrainTask(initialize=initialize, extra_meta={"aux_only_variant": spec})


def train_all(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """Base, then every (KVP, aux-only) pair; finished runs are skipped (each trainer resumes or returns)."""
    workdir = workdir.absolute()
    base_config = model_config_from(config)
    stages = [("base", base_dir(workdir), stage_config(config, config.steps), TrainTask())]
    for spec in config.kvp.variants:
        aux_config = auxiliary_config(base_config, spec)
        kvp_stage = stage_config(config, config.kvp.steps)
        kvp_stage.optimizer.learning_rate = config.kvp.learning_rate
        stages.append((f"KVP {spec}", kvp_dir(workdir, spec), kvp_stage, kvp_task(config, workdir, spec)))
        aux_stage = stage_config(config, config.kvp.steps, aux_config)
        aux_stage.optimizer.learning_rate = config.kvp.learning_rate
        stages.append((f"aux-only {spec}", aux_only_dir(workdir, spec), aux_stage, aux_only_task(config, workdir,
                                                                                               spec)))
    results = {}
    for index, (name, directory, stage, task) in enumerate(stages, start=1):
        print(f"== run {index} of {len(stages)}: {name}", flush=True)
        results[name] = train(stage, directory, task)
    return results
