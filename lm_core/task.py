"""What a paper changes about training: a `TrainTask` of five members, each defaulting to a plain language model.

    TrainTask(step=...,        # the train step's parts for a run config: model, loss, optimizer, FLOPs (StepParts)
              evaluation=...,  # extra evaluation statistics beside the loss (Evaluation)
              make_data=...,   # the run's tokenizer, training stream and evaluation batches (TrainData)
              initialize=...,  # applied to a fresh state, e.g. pretrained weights for part of the model
              meta=...)        # saved with every checkpoint, compared on resume

A paper's `step` usually starts from `lm_step_parts(config)` and replaces what it changes, e.g.
`dataclasses.replace(lm_step_parts(config), loss_fn=my_loss)`. Loading a trained model needs only the model
builder (`lm_core.trained_runs.load_trained_model(workdir, create_model)`), never the training task.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from lm_core import flops
from lm_core.config import ModelConfig
from lm_core.loss import next_token_loss
from lm_core.model import Transformer
from lm_core.optim import make_optimizer
from lm_core.run_config import model_config_from, optimizer_config_from
from lm_core.run_data import TrainData, text_train_data
from lm_core.train_step import LossFn, TrainState

Array = jax.Array
Batch = dict[str, Array]
# (model config, seed) -> the module a run trains; it creates its nnx.Rngs inside (it runs under jit, so the
# parameters are born sharded).
ModelBuilder = Callable[[ModelConfig, int], nnx.Module]
# (logits [batch, seq, vocab], batch) -> {name: summed statistic}; the trainer divides each sum by the token count.
EvalSumsFn = Callable[[Array, Batch], dict[str, Array]]
# (run config, workdir, model config) -> TrainData. It runs before anything is written, so it may raise UserError
# for bad data; the loop restores the loader on resume, so a fresh position set here (e.g. an upcycled run
# continuing its source's stream) only counts once.
DataBuilder = Callable[[ml_collections.ConfigDict, Path, ModelConfig], TrainData]


def plain_transformer(model_config: ModelConfig, seed: int) -> nnx.Module:
    """The default model: lm_core's decoder-only Transformer."""
    return Transformer(model_config, rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What the train step is made of, for a run config: `train` runs it, experiments.compile_check compiles it
    ahead of time for a mesh, from the same construction (`TrainTask.step`)."""

    model_config: ModelConfig
    optimizer: optax.GradientTransformation
    create_model: Callable[[], nnx.Module]  # zero-argument; makes its own Rngs so init can run under jit
    loss_fn: LossFn
    training_flops_per_token: float  # the analytic count MFU is measured against


def lm_step_parts(config: ml_collections.ConfigDict, create_model: ModelBuilder = plain_transformer) -> StepParts:
    """A plain language model's train step: next-token cross-entropy + z-loss, the configured AdamW, the
    Transformer's analytic FLOPs (`create_model` may swap in another module of the same cost)."""
    model_config = model_config_from(config)
    loss_fn = functools.partial(next_token_loss, z_loss_weight=config.z_loss, chunk_tokens=config.loss_chunk_tokens)
    return StepParts(model_config, make_optimizer(optimizer_config_from(config)),
                     functools.partial(create_model, model_config, config.seed), loss_fn,
                     flops.flops_per_token(model_config, config.data.seq_len).training)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Evaluation statistics beside the loss: `sums` adds summed statistics (reported per token as eval_<name>);
    `row`, when set, turns the summary ({"eval_loss", "eval_<name>", ...}) into the entries to log instead, for
    statistics whose denominator is not the token count (e.g. per-modality losses over that modality's tokens)."""

    sums: EvalSumsFn
    row: Callable[[dict[str, float]], dict[str, float]] | None = None


@dataclasses.dataclass(frozen=True)
class TrainTask:
    """What a paper package changes about training; the defaults train a plain language model."""

    step: Callable[[ml_collections.ConfigDict], StepParts] = lm_step_parts
    evaluation: Evaluation | None = None
    make_data: DataBuilder = text_train_data
    initialize: Callable[[TrainState], TrainState] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
