"""A KV-prediction workdir's runs as lm_core's trainer sees them: where each run lives, the weights its auxiliary
starts from, and the TrainTasks of the KVP run (`kvp_task`: auxiliary + predictor with the 3-term loss, base
frozen) and of the aux-only baseline (`aux_only_task`). `kvp_builder(aux)` builds a KVP run's module, for
training and for loading (`load_trained_model(kvp_dir(workdir, aux), kvp_builder(aux))`).

    DIR/base            the base LM, frozen once trained
    DIR/pre_<c...>      a canonical auxiliary pretrained as an LM (kvp.pretrain_canonical)
    DIR/kvp_<name>      auxiliary + predictor, base frozen
    DIR/aux_<name>      the aux-only baseline, from the same initial weights as the KVP auxiliary
    DIR/kvp_config.json the whole config (experiments.kv_prediction.pipeline writes it)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from kv_prediction.auxiliary import build_layer_pruned
from kv_prediction.cost import predictor_flops_per_token
from kv_prediction.loss import kvp_loss
from kv_prediction.optim import make_kvp_optimizer
from kv_prediction.variants import AuxSpec, build_kvp_model
from lm_core.config import ModelConfig
from lm_core.distributed import place_like
from lm_core.errors import UserError
from lm_core.flops import flops_per_token
from lm_core.model import Transformer
from lm_core.run_config import model_config_from, optimizer_config_from
from lm_core.task import ModelBuilder, StepParts, TrainTask, lm_step_parts
from lm_core.train_step import TrainState
from lm_core.trained_runs import load_trained_model, run_state

CONFIG_FILE = "kvp_config.json"


def base_dir(workdir: Path) -> Path:
    return workdir / "base"


def kvp_dir(workdir: Path, aux: AuxSpec) -> Path:
    return workdir / f"kvp_{aux.name}"


def aux_only_dir(workdir: Path, aux: AuxSpec) -> Path:
    return workdir / f"aux_{aux.name}"


def pretrain_dir(workdir: Path, aux: AuxSpec) -> Path:
    return workdir / f"pre_{aux.name.split('@')[0]}"


# --- initial weights ------------------------------------------------------------------------------------------


def load_base(workdir: Path, mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """The frozen base; with `mesh`, its parameters restored straight into their shardings there."""
    model, _, _ = load_trained_model(base_dir(workdir), mesh=mesh)
    return model


def aux_init_dir(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> Path | None:
    """The lm_core run a canonical auxiliary starts from (None: layer-pruned, or canonical from random init)."""
    if aux.pretrained is not None:
        return aux.pretrained
    if not aux.layer_pruned and config.kvp.pretrain_canonical:
        return pretrain_dir(workdir, aux)
    return None


def check_same_tokenizer(base_run: Path, aux_run: Path) -> None:
    """A canonical auxiliary from another run must read the base's token ids: the same tokenizer files
    (tokenizer.model, or a pretrained tokenizer's tokenizer/ directory; none in either: both byte tokenizers)."""
    from lm_core.hf_tokenizer import workdir_tokenizer_files

    if workdir_tokenizer_files(base_run) != workdir_tokenizer_files(aux_run):
        raise UserError(f"the auxiliary run {aux_run} was trained with a different tokenizer than the base "
                        f"({base_run}); both models must read the same token ids: train the auxiliary on the same "
                        "data.source / data.tokenizer / model.vocab_size")


def initial_aux(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> Transformer:
    """The weights the KVP auxiliary and the aux-only baseline both start from."""
    if aux.layer_pruned:
        return build_layer_pruned(load_base(workdir), aux.keep_fraction, nnx.Rngs(config.seed))
    init_dir = aux_init_dir(config, workdir, aux)
    if init_dir is None:
        return Transformer(aux.config, rngs=nnx.Rngs(config.seed + 1))
    check_same_tokenizer(base_dir(workdir), init_dir)
    model, _, _ = load_trained_model(init_dir)
    if model.config != aux.config:
        raise UserError(f"the auxiliary run {init_dir} holds a {model.config.num_layers}-layer d_model="
                        f"{model.config.d_model} model, not the one its spec {aux.spec!r} describes")
    return model


# --- tasks ----------------------------------------------------------------------------------------------------


def kvp_training_flops_per_token(base: ModelConfig, aux: ModelConfig, seq_len: int) -> float:
    """≈ base forward on predicted KV + its backward to the activations (2x forward, no weight gradients) + the
    no-gradient true-KV pass + aux and predictor forward and backward (3x forward each)."""
    base_forward = flops_per_token(base, seq_len).forward
    return 3 * base_forward + flops_per_token(aux, seq_len).training + 3 * predictor_flops_per_token(base, aux)


def consistency_weight(kvp: ml_collections.ConfigDict) -> float | None:
    """kvp.lambda_consistency checked: None (the paper's 1/n_base_layers) or a finite weight >= 0."""
    weight = kvp.lambda_consistency
    if weight is not None and not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
        raise UserError(f"kvp.lambda_consistency={weight!r} is invalid; valid: a finite number >= 0 (0 turns the "
                        "consistency loss off), or None for the paper's 1/n_base_layers")
    return weight


def kvp_builder(aux: AuxSpec) -> ModelBuilder:
    """How a KVP run's module (frozen base + auxiliary + predictor) is built: what training and loading share."""
    return lambda model_config, seed: build_kvp_model(model_config, aux, seed)


def kvp_task(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> TrainTask:
    kvp = config.kvp

    def initialize(state: TrainState) -> TrainState:
        params = state.params
        mesh = jax.tree.leaves(params["base"])[0].sharding.mesh  # the training mesh: no copy through one device
        params["base"] = place_like(params["base"], nnx.state(load_base(workdir, mesh), nnx.Param))
        params["aux"] = place_like(params["aux"], nnx.state(initial_aux(config, workdir, aux), nnx.Param))
        return state._replace(params=params)

    loss = functools.partial(kvp_loss, lambda_base=kvp.lambda_base, lambda_aux=kvp.lambda_aux,
                             lambda_consistency=consistency_weight(kvp), z_loss_weight=config.z_loss,
                             chunk_tokens=config.loss_chunk_tokens)
    flops = kvp_training_flops_per_token(model_config_from(config), aux.config, config.data.seq_len)

    def step(run_config: ml_collections.ConfigDict) -> StepParts:
        """The plain step's parts with the KVP module, its 3-term loss, the base frozen in the optimizer."""
        return dataclasses.replace(lm_step_parts(run_config, kvp_builder(aux)), loss_fn=loss,
                                   optimizer=make_kvp_optimizer(optimizer_config_from(run_config)),
                                   training_flops_per_token=flops)

    return TrainTask(step=step, initialize=initialize,
                     meta={"kvp_variant": aux.name, "aux_model": aux.config.to_dict(),
                           "layer_map": list(aux.layer_map), "built_on": built_on(config, workdir, aux)})


def aux_only_task(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> TrainTask:
    def initialize(state: TrainState) -> TrainState:
        return state._replace(params=place_like(state.params, nnx.state(initial_aux(config, workdir, aux),
                                                                       nnx.Param)))

    return TrainTask(initialize=initialize, meta={"aux_only_variant": aux.name,
                                                  "built_on": built_on(config, workdir, aux)})


def built_on(config: ml_collections.ConfigDict, workdir: Path, aux: AuxSpec) -> dict[str, str | None]:
    """{upstream run: its state} for the runs a KVP / aux-only run starts from (the base, and the pretrained or
    pretraining run of a canonical auxiliary). Saved with the run's checkpoints and compared when it is resumed
    or found finished, so a run built on a base that has since trained on (or been replaced) is refused, not reused."""
    upstream = {"base": base_dir(workdir)}
    init_dir = aux_init_dir(config, workdir, aux)
    if init_dir is not None:
        upstream["aux_init"] = init_dir
    return {name: run_state(directory) for name, directory in upstream.items()}
