"""Scoring a model through the path it serves prompts with: continuation perplexity and exact-match answers.

Continuation perplexity: a window of P prompt tokens and C continuation tokens. The prompt is read the way the
model reads prompts, the continuation is scored the way it would be generated:
- base-only / aux-only (`continuation_nll`): the model reads the whole window with its own K,V;
- KVP (`continuation_nll_kvp`): the prompt through the TTFT path (aux on prompt[:-1] -> predicted base cache ->
  base on the last prompt token, whose logits score continuation token 1), then the base scores the rest of the
  continuation with its own true K,V appended to that cache, exactly as it decodes;
- `continuation_nll_on_kv`: the same with GIVEN K,V for prompt[:-1]; with the base's own K,V it is the plain
  base forward pass (the perfect-predictor reference point, and the test of this scoring).

Exact match (`exact_match_rate`): greedy generation through `lm_core.generation.generate` (base, aux) or
`kv_prediction.inference.generate_kvp` (KVP), answers cut at the first newline / period / comma.

Windows are unpadded [n, P + C] int32 arrays starting with BOS: one document per row, positions 0..P+C-1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kv_prediction.inference import first_logits_on_kv
from kv_prediction.model import KVPModel
from kv_prediction.synthetic import Example, exact_match
from lm_core.attention import LayerKV
from lm_core.generation import SamplingConfig
from lm_core.model import Transformer

Array = jax.Array


def token_nll(logits: Array, targets: Array) -> Array:
    """-log p(target) per token: logits [n, c, vocab], targets [n, c] -> [n, c] float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _layout(windows: Array) -> tuple[Array, Array]:
    """(positions, segment_ids) [n, width] of unpadded one-document rows."""
    n, width = windows.shape
    return jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (n, width)), jnp.ones((n, width), jnp.int32)


def _score_after_prompt(base: Transformer, first_logits: Array, cache, windows: Array, prompt_len: int) -> Array:
    """NLL [n, C] of windows[:, P:] given the logits of the last prompt token and a cache holding the prompt."""
    positions, segments = _layout(windows)
    logits = first_logits[:, None]  # [n, 1, vocab] scores continuation token 1
    if windows.shape[1] - prompt_len > 1:  # tokens P .. width-2 are read with the base's own K,V appended
        rest = slice(prompt_len, windows.shape[1] - 1)
        later = base(windows[:, rest], positions=positions[:, rest], segment_ids=segments[:, rest], cache=cache)
        logits = jnp.concatenate([logits, later.logits], axis=1)
    return token_nll(logits, windows[:, prompt_len:])


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len"))
def _plain_nll(graphdef: nnx.GraphDef, params: nnx.State, windows: Array, prompt_len: int) -> Array:
    model = nnx.merge(graphdef, params)
    logits = model(windows[:, :-1]).logits[:, prompt_len - 1:]  # [n, C, vocab]
    return token_nll(logits, windows[:, prompt_len:])


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len"))
def _kvp_nll(graphdef: nnx.GraphDef, params: nnx.State, windows: Array, prompt_len: int) -> Array:
    model = nnx.merge(graphdef, params)
    positions, segments = _layout(windows)
    prompt = slice(0, prompt_len)
    read = slice(0, prompt_len - 1)
    predicted = model.predict_kv(windows[:, read], positions=positions[:, read], segment_ids=segments[:, read])
    first_logits, cache = first_logits_on_kv(model.base, predicted, windows[:, prompt], positions[:, prompt],
                                             segments[:, prompt], windows.shape[1])
    return _score_after_prompt(model.base, first_logits, cache, windows, prompt_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len"))
def _on_kv_nll(graphdef: nnx.GraphDef, params: nnx.State, prompt_kv: tuple[LayerKV, ...], windows: Array,
               prompt_len: int) -> Array:
    base = nnx.merge(graphdef, params)
    positions, segments = _layout(windows)
    prompt = slice(0, prompt_len)
    first_logits, cache = first_logits_on_kv(base, prompt_kv, windows[:, prompt], positions[:, prompt],
                                             segments[:, prompt], windows.shape[1])
    return _score_after_prompt(base, first_logits, cache, windows, prompt_len)


def _check(windows: np.ndarray, prompt_len: int) -> jax.Array:
    if windows.ndim != 2 or not 2 <= prompt_len < windows.shape[1]:
        raise ValueError(f"windows {windows.shape} need 2 <= prompt_len={prompt_len} < width")
    return jnp.asarray(windows, jnp.int32)


def continuation_nll(model: Transformer, windows: np.ndarray, prompt_len: int) -> np.ndarray:
    """[n, C] per-token NLL of windows[:, P:] for a model reading the whole window (base-only, aux-only)."""
    return np.asarray(_plain_nll(*nnx.split(model), _check(windows, prompt_len), prompt_len))


def continuation_nll_kvp(model: KVPModel, windows: np.ndarray, prompt_len: int) -> np.ndarray:
    """[n, C] per-token NLL of windows[:, P:] with the prompt read through the KVP TTFT path."""
    return np.asarray(_kvp_nll(*nnx.split(model), _check(windows, prompt_len), prompt_len))


def continuation_nll_on_kv(base: Transformer, windows: np.ndarray, prompt_len: int,
                           prompt_kv: Sequence[LayerKV]) -> np.ndarray:
    """[n, C] per-token NLL of windows[:, P:] for the base given pre-RoPE K,V of windows[:, :P-1]."""
    return np.asarray(_on_kv_nll(*nnx.split(base), tuple(prompt_kv), _check(windows, prompt_len), prompt_len))


def perplexity(nll: np.ndarray) -> float:
    return float(math.exp(float(np.mean(nll))))


# --- exact match ------------------------------------------------------------------------------------------------

# (token-id prompts, sampling config) -> new tokens [batch, max_new_tokens]
GenerateFn = Callable[[Sequence[Sequence[int]], SamplingConfig], np.ndarray]


def greedy_answers(generate_fn: GenerateFn, tokenizer, examples: Sequence[Example], *,
                   max_new_tokens: int = 8, batch_size: int = 64) -> list[str]:
    """Each example's greedy continuation as text (prompts start with BOS, batched with left padding)."""
    config = SamplingConfig(max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id)
    prompts = [[tokenizer.bos_id, *tokenizer.encode(example.prompt)] for example in examples]
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        new_tokens = generate_fn(prompts[start:start + batch_size], config)
        texts += [tokenizer.decode([int(t) for t in row]) for row in new_tokens]
    return texts


def exact_match_rate(generated: Sequence[str], examples: Sequence[Example]) -> float:
    hits = [exact_match(text, example.answer) for text, example in zip(generated, examples, strict=True)]
    return sum(hits) / max(len(hits), 1)
