"""One run of a vocabulary sweep as lm_core's trainer sees it: its run config (a model group at one vocabulary
size, the planned steps) and its TrainTask (`sweep_run_task`): the unigram-normalised loss as an evaluation
statistic, scored on the same validation characters at every V."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm_core.data import get_text_source, iter_eval_batches
from lm_core.run_data import text_train_data
from lm_core.task import Evaluation, TrainTask
from vocab_scaling.sweep import ModelGroup, PlannedRun
from vocab_scaling.unigram_loss import unigram_sums


def sweep_run_task(base: ml_collections.ConfigDict, log_p: np.ndarray) -> TrainTask:
    """A sweep run's task: the plain LM step, L_u's sums in every evaluation, the same validation text at every V
    (`sweep.eval_chars` characters of it; 0: the whole split)."""
    eval_chars = int(base.sweep.get("eval_chars", 0))
    return TrainTask(evaluation=Evaluation(unigram_eval_fn(log_p)), make_data=same_text_data(eval_chars))


def unigram_eval_fn(log_p: np.ndarray):
    """The trainer's extra evaluation statistic: Σ (nll + log p_unigram(target)), i.e. L_u once divided by tokens."""
    table = jnp.asarray(log_p)

    def sums(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        log_z = jax.nn.logsumexp(logits, axis=-1)
        nll = log_z - jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        return unigram_sums(nll, batch["targets"], batch["loss_mask"], table)

    return sums


# What a sweep's model group decides about the model; every other model field (dtype, remat, attention_impl,
# scan_layers, ...) is the sweep config's own.
GROUP_MODEL_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                      "max_seq_len", "tie_embeddings")


def group_run_config(base: ml_collections.ConfigDict, group: ModelGroup, vocab_size: int
                     ) -> ml_collections.ConfigDict:
    """The sweep config with one group's model at one vocabulary size (the `sweep` section removed)."""
    config = copy.deepcopy(base)
    config.unlock()
    model = group.model_config(vocab_size, base.data.seq_len).to_dict()
    config.model.update({name: model[name] for name in GROUP_MODEL_FIELDS})
    del config["sweep"]
    return config


def run_config(base: ml_collections.ConfigDict, planned: PlannedRun) -> ml_collections.ConfigDict:
    """The lm_core training config of one planned run."""
    config = group_run_config(base, planned.group, planned.vocab_size)
    config.steps = planned.steps
    config.seed = base.seed + planned.seed
    config.optimizer.total_steps = planned.steps
    config.optimizer.warmup_steps = max(1, int(base.sweep.warmup_fraction * planned.steps))
    evals = max(1, int(base.sweep.evals_per_run))
    config.eval_every = max(1, planned.steps // evals)
    config.checkpoint_every = config.eval_every
    config.log_every = max(1, min(config.log_every, config.eval_every))
    return config


def leading_documents(texts: Sequence[str], max_chars: int) -> list[str]:
    """Whole documents from the start of `texts`, in order, until they hold `max_chars` characters (at least one
    document; all of them for max_chars=0)."""
    documents, total = [], 0
    for i in range(len(texts)):
        if max_chars and documents and total >= max_chars:
            break
        documents.append(texts[i])
        total += len(texts[i])
    return documents


def same_text_data(eval_chars: int) -> Callable[..., Any]:
    """`TrainTask.make_data` of a sweep run: the trainer's text data, scored on the same characters at every V,
    namely every token of `leading_documents(validation split, eval_chars)`. The trainer's own `eval_batches`
    batches of tokens would cover fewer characters, from a different slice of text, at a small V than at a large
    one: noise as large as the L_u differences that locate the optimum."""

    def make_data(config: ml_collections.ConfigDict, workdir: Path, model_config: Any) -> Any:
        data = text_train_data(config, workdir, model_config)
        source = get_text_source(config.data.source, data_dir=config.data.data_dir or None)
        documents = leading_documents(source.split("validation"), eval_chars)
        batches = iter_eval_batches(documents, data.tokenizer, config.data.seq_len, config.data.global_batch_size)
        return dataclasses.replace(data, eval_batches=list(batches))

    return make_data
