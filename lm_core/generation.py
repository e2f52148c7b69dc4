"""Prefill + jit-compiled decode loop over the explicit KV cache, with greedy / temperature / top-k / top-p.

Prompts of different lengths are LEFT-padded: padding gets segment id 0 (never attended by real tokens) and each
row's positions start at 0 on its first real token, so every row decodes as if it were alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm_core.errors import UserError
from lm_core.kv_cache import KVCache

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    eos_id: int | None = None  # stop a row after it emits this id (later slots get `pad_id`)
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be positive")
        if not 0 <= self.temperature < float("inf"):  # also refuses NaN, which `temperature < 0` let through
            raise UserError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")


def sample_token(logits: Array, rng: Array, config: SamplingConfig) -> Array:
    """One token id per row from logits [batch, vocab]."""
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_k > 0:
        kth = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose probability reaches top_p (always at least the best token)
        cutoff_index = jnp.sum(cumulative < config.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, positions, segment_ids), each [batch, longest prompt], for prompts of different lengths."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.zeros_like(tokens)
    segment_ids = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        start = width - len(prompt)
        tokens[row, start:] = prompt
        positions[row, start:] = np.arange(len(prompt))
        segment_ids[row, start:] = 1
    return tokens, positions, segment_ids


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, positions: Array, segment_ids: Array,
            cache_len: int) -> tuple[Array, KVCache]:
    """Run the prompt through the model once; returns the last position's logits [batch, vocab] and the cache."""
    model = nnx.merge(graphdef, params)
    hidden, cache = model.prefill(tokens, positions, segment_ids, cache_len)
    return model.logits(hidden[:, -1:])[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def decode(graphdef: nnx.GraphDef, params: nnx.State, first_logits: Array, cache: KVCache, next_positions: Array,
           rng: Array, config: SamplingConfig) -> Array:
    """Sample `config.max_new_tokens` tokens [batch, n] one at a time inside one compiled loop."""
    model = nnx.merge(graphdef, params)
    batch = first_logits.shape[0]

    def body(carry: tuple, step_rng: Array) -> tuple[tuple, Array]:
        logits, cache, positions, finished = carry
        token = sample_token(logits, step_rng, config)
        emitted = jnp.where(finished, config.pad_id, token)
        if config.eos_id is not None:
            finished = finished | (token == config.eos_id)
        output = model(token[:, None], positions=positions[:, None], segment_ids=jnp.ones((batch, 1), jnp.int32),
                       cache=cache)
        return (output.logits[:, -1], output.cache, positions + 1, finished), emitted

    carry = (first_logits, cache, next_positions, jnp.zeros((batch,), bool))
    _, tokens = jax.lax.scan(body, carry, jax.random.split(rng, config.max_new_tokens))
    return tokens.T


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], config: SamplingConfig,
             rng: Array | None = None) -> np.ndarray:
    """New tokens [batch, max_new_tokens] for a batch of token-id prompts (lists of different lengths are fine)."""
    tokens, positions, segment_ids = left_pad(prompts, config.pad_id)
    cache_len = tokens.shape[1] + config.max_new_tokens
    if cache_len > model.config.max_seq_len:
        raise UserError(f"prompt of {tokens.shape[1]} tokens + max_new_tokens={config.max_new_tokens} exceeds "
                        f"the model's max_seq_len={model.config.max_seq_len}")
    graphdef, params = nnx.split(model)
    logits, cache = prefill(graphdef, params, tokens, positions, segment_ids, cache_len)
    rng = jax.random.key(0) if rng is None else rng
    return np.asarray(decode(graphdef, params, logits, cache, jnp.asarray(positions[:, -1] + 1), rng, config))


def generate_text(model: nnx.Module, tokenizer: Any, prompts: Sequence[str], config: SamplingConfig,
                  rng: Array | None = None) -> list[str]:
    """Continuations (text only, without the prompt) of text prompts; each prompt starts with BOS."""
    encoded = [[tokenizer.bos_id, *tokenizer.encode(prompt)] for prompt in prompts]
    new_tokens = generate(model, encoded, config, rng)
    return [tokenizer.decode([int(t) for t in row]) for row in new_tokens]
