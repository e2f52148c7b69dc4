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
is trained (one-line UserErrors). Each run's TrainTask, initial weights and directory: experiments.kv_prediction.task;
this module decides which runs there are, in which order, and trains them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections

from experiments.kv_prediction.task import (
    CONFIG_FILE,
    aux_only_dir,
    aux_only_task,
    base_dir,
    kvp_config_from,
    kvp_dir,
    kvp_task,
    pretrain_dir,
)
from kv_prediction import knowledge  # noqa: F401  (registers the knowledge:<source> and retrieval:<source> sources)
from kv_prediction.variants import AuxSpec, resolve_spec
from lm_core.atomic_files import write_json_atomically
from lm_core.checkpoint import check_same_model, latest_meta
from lm_core.config import ModelConfig
from lm_core.distributed import answer_of_process_0, wait_for_every_process
from lm_core.errors import UserError
from lm_core.run_config import model_config_from
from lm_core.task import TrainTask
from lm_core.trained_runs import check_same_meta, load_trained_model
from lm_core.trainer import train_to_end

# --- configs --------------------------------------------------------------------------------------------------


def resolve_variants(config: ml_collections.ConfigDict) -> list[AuxSpec]:
    """Every kvp.variants entry resolved against the base config (UserError on the first bad one; an empty or
    non-string kvp.variants is KVPConfig's to refuse)."""
    variants = kvp_config_from(config).variants
    base = model_config_from(config)
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
        kvp = values["kvp"]
        if not isinstance(kvp, dict):
            raise TypeError("its kvp section is not an object")
        if "variants" in kvp:  # JSON has lists; a config.json of an earlier version may lack any field
            kvp["variants"] = tuple(kvp["variants"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a readable KV-prediction config ({error}); valid: the {CONFIG_FILE} "
                        "experiments.kv_prediction.train writes") from None
    return ml_collections.ConfigDict(values)


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
    base = kvp_config_from(config).base
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
    link, target = base_dir(workdir), Path(kvp_config_from(config).base)
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
    kvp = kvp_config_from(config)
    base_config = model_config_from(config)
    variants = resolve_variants(config)
    runs = [] if kvp.base else [("base", base_dir(workdir), stage_config(config, config.steps), TrainTask())]
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
    kvp_config_from(config)  # a bad kvp.* field is refused first, before anything is read or written
    config = with_pretrained_base(config)
    runs = plan(config, workdir)  # validates every spec before anything is trained
    for _, directory, stage, task in runs:  # and refuses another setup's checkpoints up front
        is_finished(directory, stage, task)
    base = kvp_config_from(config).base  # made absolute by with_pretrained_base
    if base:
        load_trained_model(base)  # a base that does not load is refused before anything is written
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
