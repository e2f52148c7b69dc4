"""What a run trains on: its tokenizer (trained, reused from the workdir, or pretrained) and its data (`TrainData`);
the default is a text source packed into rows (`text_train_data`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from lm_core.config import ModelConfig
from lm_core.errors import UserError

HostBatch = dict[str, np.ndarray]


@dataclasses.dataclass
class TrainData:
    """What the loop reads: a run's tokenizer, its training stream and its evaluation batches.

    The default (`text_train_data`) packs a text source; a paper with other data (MoMa's image-caption documents)
    returns its own through `TrainTask.make_data`. Batches are host rows with the keys the loss reads plus a
    per-row "chars" count, which the loop pops (bits per character) before the batch reaches the model.
    """

    # .vocab_size; saved as workdir/tokenizer.model (a pretrained one as workdir/tokenizer/) when it has .save and
    # none is there yet
    tokenizer: Any
    loader: Any  # .next() -> HostBatch, .state() -> JSON-able dict, .restore(state): the exact-resume contract
    eval_batches: list[HostBatch]


def train_or_reuse_tokenizer(config: ml_collections.ConfigDict, workdir: Path, train_texts: Any,
                             model_config: ModelConfig) -> Any:
    """The run's tokenizer: the copy in the workdir if there is one (resume), else trained (or taken from the cache).

    The caller saves a newly trained one into the workdir once the run's inputs have all been validated."""
    from lm_core import tokenizer as tok

    if config.data.tokenizer != "sentencepiece" or (workdir / tok.MODEL_FILENAME).exists():
        tokenizer = run_tokenizer(config, workdir)
    else:
        spec = tok.TokenizerSpec(vocab_size=model_config.vocab_size, seed=config.data.tokenizer_seed)
        tokenizer = tok.train_tokenizer(_iterate(train_texts), spec, cache_dir=tokenizer_cache_dir())
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's vocabulary "
                        f"({tokenizer.vocab_size}); use model.vocab_size >= {tokenizer.vocab_size}")
    return tokenizer


def _pretrained_tokenizer(config: ml_collections.ConfigDict, workdir: Path) -> Any:
    """The workdir's copy (resume: the files the run started with), else data.tokenizer_path."""
    from lm_core.hf_tokenizer import PRETRAINED_DIRNAME, PretrainedTokenizer

    saved, path = workdir / PRETRAINED_DIRNAME, config.data.get("tokenizer_path", "")
    if not saved.is_dir() and not path:
        raise UserError(f"{workdir} has no {PRETRAINED_DIRNAME}/ and data.tokenizer_path is empty; valid: the workdir "
                        "of a data.tokenizer=pretrained run, or a config naming data.tokenizer_path")
    return PretrainedTokenizer.load(saved if saved.is_dir() else path)


def run_tokenizer(config: ml_collections.ConfigDict, workdir: Path) -> Any:
    """The tokenizer a trained run in `workdir` used, for any data.tokenizer (what load_trained_model returns)."""
    from lm_core import tokenizer as tok

    kind = config.data.get("tokenizer", "sentencepiece")
    if kind == "byte":
        # the saved copy carries the run's reserved ids (MoMa's image codes sit there); a new run has none yet
        saved = workdir / tok.MODEL_FILENAME
        return tok.ByteTokenizer.load(saved) if saved.exists() else tok.ByteTokenizer()
    if kind == "pretrained":
        return _pretrained_tokenizer(config, workdir)
    return tok.Tokenizer.load(workdir / tok.MODEL_FILENAME)


def tokenizer_cache_dir() -> Path:
    """Trained tokenizers are cached here (LM_CORE_CACHE overrides), so a sweep trains each one once."""
    return Path(os.environ.get("LM_CORE_CACHE", Path.home() / ".cache" / "lm_core")) / "tokenizers"


def text_train_data(config: ml_collections.ConfigDict, workdir: Path, model_config: ModelConfig) -> TrainData:
    """The default data: a text source (config.data.source) packed into rows by LMDataLoader."""
    from lm_core.data import LMDataLoader, get_text_source, iter_eval_batches

    source = get_text_source(config.data.source, data_dir=config.data.data_dir or None)
    train_texts = source.split("train")
    tokenizer = train_or_reuse_tokenizer(config, workdir, train_texts, model_config)
    loader = LMDataLoader(train_texts, tokenizer, seq_len=config.data.seq_len,
                          global_batch_size=config.data.global_batch_size, seed=config.seed,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          whole_documents=config.data.get("whole_documents", False))
    eval_batches = list(iter_eval_batches(source.split("validation"), tokenizer, config.data.seq_len,
                                          config.data.global_batch_size, config.eval_batches))
    return TrainData(tokenizer, loader, eval_batches)


def _iterate(texts: Any) -> Iterator[str]:
    for i in range(len(texts)):
        yield texts[i]
