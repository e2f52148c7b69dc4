"""Serving paths: how a prompt is read before the base model writes the answer, and what every path shares.

A serving path reads a prompt into (the logits of its last token, the decoder's cache holding the whole prompt);
after that every path is the same: its decoder generates, appending its own true K,V (lm_core.generation.decode),
or scores a continuation the way it would generate it. Three kinds of path, one protocol (`ServingPath`):
- `PlainPath(model)`: the model alone (base-only, aux-only, random pruning on shorter prompts) prefills the prompt;
- `KVPPath(kvp_model)`, the paper's TTFT path:

      prompt[:-1] -> A (K,V of every aux layer) -> P -> predicted base cache   (cheap: A's cost per token)
      prompt[-1]  -> B on that cache -> first token from B's logits            (one base token step)
      then B alone decodes; A and P are never used again.

- `GivenKVPath(base, prompt_kv)` / `NullCachePath(base)`: the base on GIVEN pre-RoPE K,V for prompt[:-1] (an
  oracle's, a mix of predicted and true, or zeros: kv_prediction.baselines), then on the last prompt token.

Generic on any path: `generate` (greedy or sampled new tokens), `continuation_nll` (per-token NLL of a window's
continuation after its prompt was read by the path) and `first_token` (the compiled first-token function TTFT is
measured on). Prompts of different lengths are LEFT-padded as in `lm_core.generation` (padding has segment id 0
and is never attended; positions start at 0 on each row's first real token), so the last column is every row's
last prompt token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kv_prediction.model import KVPModel
from lm_core.attention import LayerKV
from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.generation import SamplingConfig, decode, left_pad
from lm_core.kv_cache import KVCache
from lm_core.model import Transformer

Array = jax.Array


class ServingPath(Protocol):
    """What a serving path is: an nnx module (so it splits and compiles) with these members."""

    @property
    def decoder(self) -> Transformer:
        """The model that writes the answer from the cache `read_prompt` returns."""

    @property
    def reader_config(self) -> ModelConfig | None:
        """The model reading prompt[:-1] when it is not the decoder (KVP's auxiliary), else None."""

    def read_prompt(self, tokens: Array, positions: Array, segment_ids: Array, cache_len: int
                    ) -> tuple[Array, KVCache]:
        """[batch, width] prompt -> (logits [batch, vocab] of its last token, a `cache_len` decoder cache)."""


def first_logits_on_kv(base: Transformer, prompt_kv: Sequence[LayerKV], tokens: Array, positions: Array,
                       segment_ids: Array, cache_len: int) -> tuple[Array, KVCache]:
    """Base cache from the K,V of tokens[:, :-1], then B runs the last prompt token on it.

    Returns (logits [batch, vocab] of the last prompt token, the cache with every prompt slot filled).
    """
    cache = base.cache_from_kv(prompt_kv, positions[:, :-1], segment_ids[:, :-1], cache_len)
    out = base(tokens[:, -1:], positions=positions[:, -1:], segment_ids=segment_ids[:, -1:], cache=cache)
    return out.logits[:, -1], out.cache


class PlainPath(nnx.Module):
    """A model on its own reads the whole prompt (logits for its last token only)."""

    def __init__(self, model: Transformer):
        self.model = model
        self.reader_config = None

    @property
    def decoder(self) -> Transformer:
        return self.model

    def read_prompt(self, tokens: Array, positions: Array, segment_ids: Array, cache_len: int
                    ) -> tuple[Array, KVCache]:
        hidden, cache = self.model.prefill(tokens, positions, segment_ids, cache_len)
        return self.model.logits(hidden[:, -1:])[:, 0], cache


class KVPPath(nnx.Module):
    """The paper's TTFT path: auxiliary + predictor read prompt[:-1], the base reads the last token and answers."""

    def __init__(self, model: KVPModel):
        self.model = model
        self.reader_config = model.aux.config

    @property
    def decoder(self) -> Transformer:
        return self.model.base

    def read_prompt(self, tokens: Array, positions: Array, segment_ids: Array, cache_len: int
                    ) -> tuple[Array, KVCache]:
        read = (tokens[:, :-1], positions[:, :-1], segment_ids[:, :-1])
        predicted = self.model.predict_kv(read[0], positions=read[1], segment_ids=read[2])
        return first_logits_on_kv(self.model.base, predicted, tokens, positions, segment_ids, cache_len)


class GivenKVPath(nnx.Module):
    """The base on given pre-RoPE K,V [batch, width - 1] for prompt[:-1] (laid out as `padded_prompts` pads)."""

    def __init__(self, base: Transformer, prompt_kv: Sequence[LayerKV]):
        self.base = base
        self.prompt_kv = nnx.data(tuple(prompt_kv))
        self.reader_config = None

    @property
    def decoder(self) -> Transformer:
        return self.base

    def read_prompt(self, tokens: Array, positions: Array, segment_ids: Array, cache_len: int
                    ) -> tuple[Array, KVCache]:
        return first_logits_on_kv(self.base, self.prompt_kv, tokens, positions, segment_ids, cache_len)


def zero_kv(config: ModelConfig, batch: int, length: int) -> tuple[LayerKV, ...]:
    """Pre-RoPE K,V of zeros for `length` prompt slots in every layer."""
    zeros = jnp.zeros((batch, length, config.num_kv_heads, config.head_dim), config.compute_dtype)
    return tuple(LayerKV(zeros, zeros) for _ in range(config.num_layers))


class NullCachePath(GivenKVPath):
    """The base on zero K,V for prompt[:-1] (of whatever shape the prompt has), then its last token."""

    def __init__(self, base: Transformer):
        super().__init__(base, ())

    def read_prompt(self, tokens: Array, positions: Array, segment_ids: Array, cache_len: int
                    ) -> tuple[Array, KVCache]:
        kv = zero_kv(self.base.config, tokens.shape[0], tokens.shape[1] - 1)
        return first_logits_on_kv(self.base, kv, tokens, positions, segment_ids, cache_len)


# --- what every path shares -------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def read_prompt(graphdef: nnx.GraphDef, state: nnx.State, tokens: Array, positions: Array, segment_ids: Array,
                cache_len: int) -> tuple[Array, KVCache]:
    """`path.read_prompt`, compiled, for a path split into (graphdef, state)."""
    return nnx.merge(graphdef, state).read_prompt(tokens, positions, segment_ids, cache_len)


def unpadded_layout(tokens: Array) -> tuple[Array, Array]:
    """(positions 0..N-1, segment ids all 1), each [batch, N], for prompts that fill their rows exactly."""
    batch, width = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    return positions, jnp.ones((batch, width), jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def first_token(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, cache_len: int) -> tuple[Array, KVCache]:
    """A path's whole first-token computation in one compiled function for unpadded prompts [batch, N]:
    (greedy first token [batch], the decoder's cache). What TTFT is measured on."""
    logits, cache = nnx.merge(graphdef, params).read_prompt(tokens, *unpadded_layout(tokens), cache_len)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def padded_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, positions, segment_ids) [batch, width >= 2], left-padded.

    At least two columns so that "every prompt token but the last" is never an empty array (one-token prompts
    then give the reader only padding, which nothing attends to).
    """
    tokens, positions, segment_ids = left_pad(prompts, pad_id)
    if tokens.shape[1] == 1:
        tokens, positions, segment_ids = (np.pad(a, [(0, 0), (1, 0)], constant_values=v)
                                          for a, v in ((tokens, pad_id), (positions, 0), (segment_ids, 0)))
    return tokens, positions, segment_ids


def check_lengths(path: ServingPath, prompt_width: int, max_new_tokens: int) -> int:
    """The cache length prompt + new tokens, or a UserError when a model of the path cannot hold that many."""
    cache_len = prompt_width + max_new_tokens
    if cache_len > path.decoder.config.max_seq_len:
        raise UserError(f"prompt of {prompt_width} tokens + max_new_tokens={max_new_tokens} exceeds the base "
                        f"model's max_seq_len={path.decoder.config.max_seq_len}")
    reader = path.reader_config
    if reader is not None and prompt_width - 1 > reader.max_seq_len:
        raise UserError(f"prompt of {prompt_width} tokens has the auxiliary model read {prompt_width - 1}, more "
                        f"than its max_seq_len={reader.max_seq_len}")
    return cache_len


def generate(path: ServingPath, prompts: Sequence[Sequence[int]], config: SamplingConfig,
             rng: Array | None = None) -> np.ndarray:
    """New tokens [batch, max_new_tokens]: the path reads the prompts, its decoder generates."""
    tokens, positions, segment_ids = padded_prompts(prompts, config.pad_id)
    cache_len = check_lengths(path, tokens.shape[1], config.max_new_tokens)
    first_logits, cache = read_prompt(*nnx.split(path), tokens, positions, segment_ids, cache_len)
    graphdef, params = nnx.split(path.decoder)
    rng = jax.random.key(0) if rng is None else rng
    next_positions = jnp.asarray(positions[:, -1] + 1)
    return np.asarray(decode(graphdef, params, first_logits, cache, next_positions, rng, config))


def token_nll(logits: Array, targets: Array) -> Array:
    """-log p(target) per token: logits [n, c, vocab], targets [n, c] -> [n, c] float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len"))
def _continuation_nll(graphdef: nnx.GraphDef, state: nnx.State, windows: Array, prompt_len: int) -> Array:
    """NLL [n, C] of windows[:, P:]: the path reads windows[:, :P]; the last prompt token's logits score
    continuation token 1, then the decoder reads tokens P .. width-2 with its own K,V appended, as it decodes."""
    path = nnx.merge(graphdef, state)
    positions, segments = unpadded_layout(windows)
    prompt = slice(0, prompt_len)
    first_logits, cache = path.read_prompt(windows[:, prompt], positions[:, prompt], segments[:, prompt],
                                           windows.shape[1])
    logits = first_logits[:, None]  # [n, 1, vocab]
    if windows.shape[1] - prompt_len > 1:
        rest = slice(prompt_len, windows.shape[1] - 1)
        later = path.decoder(windows[:, rest], positions=positions[:, rest], segment_ids=segments[:, rest],
                             cache=cache)
        logits = jnp.concatenate([logits, later.logits], axis=1)
    return token_nll(logits, windows[:, prompt_len:])


def continuation_nll(path: ServingPath, windows: np.ndarray, prompt_len: int) -> np.ndarray:
    """[n, C] per-token NLL of windows[:, P:] (unpadded [n, P + C] rows, one document each) through `path`."""
    if windows.ndim != 2 or not 2 <= prompt_len < windows.shape[1]:
        raise ValueError(f"windows {windows.shape} need 2 <= prompt_len={prompt_len} < width")
    return np.asarray(_continuation_nll(*nnx.split(path), jnp.asarray(windows, jnp.int32), prompt_len))
