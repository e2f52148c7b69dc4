"""Training the KV-prediction family with lm_core's trainer.

    DIR/base            the base LM (config.steps steps), frozen afterwards
    DIR/pre_<c...>      a canonical auxiliary pretrained as an LM on the same data (config.steps steps), when
                        kvp.pretrain_canonical; the paper's canonical auxiliaries are pretrained models too
    DIR/kvp_<name>      auxiliary + predictor trained with the 3-term loss, base frozen (kvp.steps steps)
    DIR/aux_<name>      the aux-only baseline: the same auxiliary architecture, from the same initial weights,
                        fine-tuned as a plain LM for the same kvp.steps steps
    DIR/kvp_config.json the whole config, so evaluate and ttft need only --workdir
With kvp.base=<lm_core workdir> (e.g. a model brought in by experiments.import_hf) that model is the frozen base:
DIR/base is a link to it, nothing retrains it, and its model config and tokenizer replace config.model and
config.data's tokenizer fields, so every auxiliary reads its token ids (`with_pretrained_base`).

Every run resumes; finished runs are skipped. Bad specs and mismatched checkpoints are refused before anything
is trained (one-line UserErrors).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from kv_prediction import knowledge  # noqa: F401  (registers the knowledge:<source> and retrieval:<source> sources)
from kv_prediction.auxiliary import build_layer_pruned
from kv_prediction.inference import predictor_flops_per_token
from kv_prediction.loss import kvp_loss
from kv_prediction.optim import make_kvp_optimizer
from kv_prediction.variants import AuxSpec, build_kvp_model, resolve_spec
from lm_core.atomic_files import write_json_atomically
from lm_core.checkpoint import check_same_model, latest_meta
from lm_core.config import ModelConfig
from lm_core.distributed import answer_of_process_0, place_like, wait_for_every_process
from lm_core.errors import UserError
from lm_core.flops import flops_per_token
from lm_core.model import Transformer
from lm_core.run_config import model_config_from, optimizer_config_from
from lm_core.task import ModelBuilder, StepParts, TrainTask, lm_step_parts
from lm_core.train_step import TrainState
from lm_core.trained_runs import check_same_meta, load_trained_model, run_state
from lm_core.trainer import train_to_end

CONFIG_FILE = "kvp_config.json"


def base_dir(workdir: Path) -> Path:
    return workdir / "base"


def kvp_dir(workdir: Path, aux: AuxSpec) -> Path:
    return workdir / f"kvp_{aux.name}"


def aux_only_dir(workdir: Path, aux: AuxSpec) -> Path:
    return workdir / f"aux_{aux.name}"


def pretrain_dir(workdir: Path, aux: AuxSpec) -> Path:
    return workdir / f"pre_{aux.name.split('@')[0]}"


# --- configs --------------------------------------------------------------------------------------------------


def resolve_variants(config: ml_collections.ConfigDict) -> list[AuxSpec]:
    """Every kvp.variants entry resolved against the base config (UserError on the first bad one)."""
    base = model_config_from(config)
    variants = config.kvp.variants
    if isinstance(variants, str):
        variants = (variants,)
    if not variants:
        raise UserError("kvp.variants is empty; valid: a tuple of auxiliary specs, e.g. ('lp0.50', 'c64x2')")
    resolved = [resolve_spec(base, spec) for spec in variants]
    names = [aux.name for aux in resolved]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"kvp.variants names {duplicates} more than once; valid: distinct auxiliary specs")
    return resolved


def stage_config(config: ml_collections.ConfigDict, steps: int, model: ModelConfig | None = None,
                 learning_rate: float | None = None) -> ml_collections.ConfigDict:
    """The shared training fields of `config` for one run (its own steps, LR schedule and model)."""
    stage = copy.deepcopy(config)
    stage.unlock()
    del stage["kvp"]
    stage.steps = steps
    stage.optimizer.total_steps = steps
    stage.optimizer.warmup_steps = max(1, min(stage.optimizer.warmup_steps, steps // 10))
    stage.eval_every = steps
    # the configured cadence, so a crash (kill -9, a lost host) of a long run keeps all but the last few steps; a
    # run shorter than it saves at its end (as every run does)
    stage.checkpoint_every = min(config.checkpoint_every, steps)
    if model is not None:
        stage.model.update(model.to_dict())
    if learning_rate is not None:
        stage.optimizer.learning_rate = learning_rate
    return stage


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Write the pipeline's config.json (process 0 alone: every process would write the same file)."""
    if jax.process_index() == 0:
        write_json_atomically(workdir / CONFIG_FILE, config.to_dict(), sort_keys=True)
    wait_for_every_process("kvp config saved")


def load_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{workdir} has no {CONFIG_FILE}; train first: python -m experiments.kv_prediction.train "
                        f"--config=experiments/configs/kvp_tiny.py --workdir={workdir} (or pass --config)")
    try:
        values = json.loads(path.read_text())
        values["kvp"]["variants"] = tuple(values["kvp"]["variants"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a readable KV-prediction config ({error}); valid: the {CONFIG_FILE} "
                        "experiments.kv_prediction.train writes") from None
    return ml_collections.ConfigDict(values)


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


# --- the pipeline ---------------------------------------------------------------------------------------------


def is_finished(directory: Path, stage: ml_collections.ConfigDict, task: TrainTask) -> bool:
    """True when `directory` holds the final checkpoint of this very run (same model and task metadata). Every
    process gets process 0's answer (`latest_meta`): the processes must train the same runs."""
    step, meta = latest_meta(directory / "checkpoints")
    if step is None:
        return False
    check_same_model(meta, model_config_from(stage), directory)
    check_same_meta(meta, task.meta, directory)
    return step >= stage.steps


def with_pretrained_base(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the model and tokenizer of the kvp.base workdir when one is set (else unchanged).

    A sentencepiece base's tokenizer.model is read as a pretrained tokenizer (the same ids), since a tokenizer
    trained here on config.data.source would be another one."""
    base = config.kvp.get("base", "")
    if not base:
        return config
    path = Path(base).expanduser().absolute()
    try:
        run = json.loads((path / "config.json").read_text())
        model = ModelConfig.from_dict(run["model"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"kvp.base={base!r} is not an lm_core workdir with a readable config.json ({error}); "
                        "valid: the workdir of a train_lm run or of experiments.import_hf") from None
    config = copy.deepcopy(config)
    config.unlock()
    config.kvp.base = str(path)
    config.model.update(model.to_dict())
    kind = run.get("data", {}).get("tokenizer", "sentencepiece")
    config.data.tokenizer = "byte" if kind == "byte" else "pretrained"
    config.data.tokenizer_path = str(path / ("tokenizer" if kind == "pretrained" else "tokenizer.model"))
    return config


def link_pretrained_base(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """DIR/base -> the kvp.base workdir, so every later step finds the base where it always is. Process 0 checks
    and makes it; the others take its answer (so they read the link only once it is there)."""
    link, target = base_dir(workdir), Path(config.kvp.base)
    linked = True
    if jax.process_index() == 0 and not (link.is_symlink() and link.resolve() == target.resolve()):
        linked = not (link.exists() or link.is_symlink())
        if linked:
            workdir.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target, target_is_directory=True)
    if not answer_of_process_0(linked):  # every process refuses, or every one goes on: none waits alone
        raise UserError(f"{link} exists and is not a link to kvp.base={target}; valid: a new --workdir, or the "
                        "kvp.base this workdir was made with")


def plan(config: ml_collections.ConfigDict, workdir: Path) -> list[tuple[str, Path, ml_collections.ConfigDict,
                                                                          TrainTask]]:
    """(name, directory, stage config, task) of every run, in training order (no base run when kvp.base is set:
    that model is the base)."""
    base_config = model_config_from(config)
    variants = resolve_variants(config)
    kvp = config.kvp
    runs = [] if kvp.get("base", "") else [("base", base_dir(workdir), stage_config(config, config.steps),
                                            TrainTask())]
    pretrained = set()
    for aux in variants:
        if aux.pretrained is None and not aux.layer_pruned and kvp.pretrain_canonical:
            directory = pretrain_dir(workdir, aux)
            if directory not in pretrained:
                pretrained.add(directory)
                runs.append((f"pretrain {aux.name.split('@')[0]}", directory,
                             stage_config(config, config.steps, aux.config), TrainTask()))
    for aux in variants:
        runs.append((f"KVP {aux.name}", kvp_dir(workdir, aux),
                     stage_config(config, kvp.steps, base_config, kvp.learning_rate), kvp_task(config, workdir, aux)))
        runs.append((f"aux-only {aux.name}", aux_only_dir(workdir, aux),
                     stage_config(config, kvp.steps, aux.config, kvp.learning_rate),
                     aux_only_task(config, workdir, aux)))
    return runs


def train_all(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """Base, canonical pretraining, then every (KVP, aux-only) pair; finished runs are skipped."""
    workdir = workdir.absolute()
    config = with_pretrained_base(config)
    runs = plan(config, workdir)  # validates every spec before anything is trained
    for _, directory, stage, task in runs:  # and refuses another setup's checkpoints up front
        is_finished(directory, stage, task)
    if config.kvp.get("base", ""):
        load_trained_model(config.kvp.base)  # a base that does not load is refused before anything is written
        link_pretrained_base(config, workdir)
    save_config(config, workdir)
    results = {}
    for index in range(1, len(runs) + 1):
        # Planned again before each run: a downstream run records the state its upstream runs have now.
        name, directory, stage, task = plan(config, workdir)[index - 1]
        if is_finished(directory, stage, task):
            print(f"== run {index} of {len(runs)}: {name} (finished, {directory})", flush=True)
            continue
        print(f"== run {index} of {len(runs)}: {name} -> {directory}", flush=True)
        results[name] = train_to_end(stage, directory, task)  # a signal stops the pipeline here
    return results
