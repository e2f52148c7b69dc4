"""A run's config: the fields every training entrypoint understands, their checks, and the typed configs read
from it (the model's `ModelConfig`, the optimizer's `OptimizerConfig`), plus a finished run's saved config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar

import ml_collections

from lm_core.config import ModelConfig, check_finite_numbers
from lm_core.errors import UserError
from lm_core.optim import OptimizerConfig
from lm_core.profiling import parse_profile_steps
from lm_core.wandb_writer import check_log_config

SectionT = TypeVar("SectionT")  # a config dataclass


def default_config() -> ml_collections.ConfigDict:
    """Every field a training entrypoint understands; config files start from this and override."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.steps = 200
    config.grad_accum_steps = 1
    config.z_loss = 1e-4
    config.loss_chunk_tokens = 0  # > 0: output layer + loss in chunks of this many tokens per device (saves memory)
    # Derived fields stay 0 ("from the other fields") so a config that changes d_model or num_heads gets a
    # matching head_dim, d_ff and num_kv_heads instead of the defaults' resolved values.
    config.model = ml_collections.ConfigDict(dict(ModelConfig(vocab_size=1024).to_dict(), head_dim=0, d_ff=0,
                                                  num_kv_heads=0))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    config.data = ml_collections.ConfigDict(dict(
        source="builtin",  # builtin | files:<glob> | tfds:<name>[/<config>]
        data_dir="",  # where TFDS datasets are prepared/read ("" = ~/.cache/lm_core/tfds)
        # sentencepiece (BPE trained at model.vocab_size) | byte | pretrained (tokenizer_path, its own special ids;
        # copied to workdir/tokenizer/, see lm_core.hf_tokenizer.PretrainedTokenizer)
        tokenizer="sentencepiece",
        tokenizer_path="",  # pretrained only: a directory with tokenizer.json and/or tokenizer.model, or one file
        tokenizer_seed=0,
        seq_len=128,
        global_batch_size=16,
        whole_documents=False,  # True: a document that fits in one row is never split over two (costs padding)
        # How a tokens:DIR dataset is read (text sources always tokenize in the training process): grain, where
        # each host builds only its own rows ahead of the step (lm_core.data.grain_pipeline), or stream, where
        # every host packs the whole global batch when it is needed (needed for whole_documents).
        loader="grain",
        loader_workers=0,  # grain: worker processes that build the batches (0: threads of the training process)
        # grain: prefetch threads building the batches ahead (-1: none on a CPU backend, where the train step keeps
        # every core busy and a thread only adds GIL handoffs (benchmarks/data.py: 2x slower on 2 cores); 2 else)
        loader_threads=-1,
    ))
    optimizer = OptimizerConfig()
    config.optimizer = ml_collections.ConfigDict(dataclasses.asdict(optimizer))
    config.optimizer.total_steps = 0  # 0 = the run's `steps`
    config.log_every = 10
    config.eval_every = 100
    config.eval_batches = 4
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    # Weights & Biases next to metrics.jsonl and TensorBoard (lm_core.wandb_writer; needs `pip install wandb`).
    # With wandb=True process 0 logs every metrics.jsonl row, at its step, into one W&B run (files in workdir/wandb/)
    # whose id is kept in workdir/wandb_run_id, so a resumed run continues the same W&B run.
    config.log = ml_collections.ConfigDict(dict(
        wandb=False,
        wandb_project="lm_core",
        # offline: no network, no login (upload later with `wandb sync DIR/wandb/offline-run-*`); online: needs
        # `wandb login` or WANDB_API_KEY; disabled: W&B's no-op run. This field decides, not WANDB_MODE.
        wandb_mode="offline",
        wandb_run_name="",  # "" = the workdir's name
    ))
    # A jax.profiler trace of steps FIRST to LAST, both inclusive, into workdir/profile/ (lm_core.profiling), e.g.
    # "100:103"; "" = off. A string rather than two ints: one flag (--config.profile_steps=100:103) that reads as
    # the window, with "" for off instead of a sentinel number. A window ending after `steps` is refused (not
    # clipped), a run resumed past the window traces nothing, and only process 0 traces.
    config.profile_steps = ""
    return config


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def optimizer_config_from(config: ml_collections.ConfigDict) -> OptimizerConfig:
    values = config.optimizer.to_dict()
    values["total_steps"] = values.get("total_steps") or config.steps
    try:
        return OptimizerConfig(**values)
    except TypeError as error:
        raise UserError(f"bad optimizer config: {error}") from error


def validate_run_config(config: ml_collections.ConfigDict) -> None:
    check_finite_numbers(config.to_dict())
    for name in ("steps", "log_every", "eval_batches", "keep_checkpoints", "grad_accum_steps"):
        value = config[name]
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{name}={value!r} must be a positive integer")
    for name in ("eval_every", "checkpoint_every"):
        if not isinstance(config[name], int) or config[name] < 0:
            raise UserError(f"{name}={config[name]!r} must be an integer >= 0 (0 = never)")
    for name in ("seq_len", "global_batch_size"):
        if not isinstance(config.data[name], int) or config.data[name] <= 0:
            raise UserError(f"data.{name}={config.data[name]!r} must be a positive integer")
    # numpy's generators (the data order) take no negative seed: refused here, not at the first batch
    if not isinstance(config.seed, int) or config.seed < 0:
        raise UserError(f"seed={config.seed!r} must be an integer >= 0")
    if config.data.tokenizer not in ("sentencepiece", "byte", "pretrained"):
        raise UserError(f"data.tokenizer={config.data.tokenizer!r} is unknown; valid: sentencepiece, byte, pretrained")
    if config.data.tokenizer == "pretrained" and not config.data.get("tokenizer_path"):
        raise UserError("data.tokenizer=pretrained needs data.tokenizer_path; valid: a directory holding "
                        "tokenizer.json and/or tokenizer.model (plus optional tokenizer_config.json), or one such file")
    if not config.z_loss >= 0:
        raise UserError(f"z_loss={config.z_loss} must be >= 0")
    check_log_config(config)
    parse_profile_steps(config.get("profile_steps", ""), config.steps)


def from_section(cls: type[SectionT], section: ml_collections.ConfigDict, name: str, *,
                 other_keys: tuple[str, ...] = ()) -> SectionT:
    """The config dataclass `cls` from the run config's section `name` (e.g. "moma.image_tokenizer"): every field
    the section sets, `cls`'s defaults for the rest. A key that is neither a field nor one of `other_keys` (what
    the section holds for someone else) is refused in one line naming it, so a typo never goes unnoticed."""
    fields = {field.name for field in dataclasses.fields(cls)}
    values = section.to_dict()
    unknown = sorted(set(values) - fields - set(other_keys))
    if unknown:
        raise UserError(f"{name} has unknown field(s) {unknown}; valid: {sorted(fields | set(other_keys))}")
    return cls(**{key: value for key, value in values.items() if key in fields})


def read_config_json(workdir: str | Path, *, trained_by: str = "experiments.train_lm") -> ml_collections.ConfigDict:
    """The config.json a training run wrote into `workdir`; missing or unreadable (not JSON, not an object) is a
    UserError saying which entrypoint (`trained_by`) writes it."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} has no config.json; train first with python -m {trained_by}")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as error:  # TypeError: JSON that is not an object
        raise UserError(f"{path} is not readable JSON ({error}); valid: the config.json python -m {trained_by} "
                        "writes (restore it, or retrain into a new --workdir)") from None
