"""Scoring base-only, auxiliary-only and KVP models the way each would serve a prompt, and timing their TTFT.

Continuation scoring: held-out windows of prompt + continuation tokens. Base-only and aux-only models read the
whole window; a KVP model reads the prompt through its TTFT path (aux on prompt[:-1] -> predicted base cache ->
base on the last prompt token) and the base then scores the continuation with its own true K,V appended, exactly
as it would generate it. Reported: continuation perplexity and top-1 accuracy (greedy next-token exact match),
both conditioned on the prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kv_prediction.inference import kvp_prefill, prefill_flops, ttft_flops
from kv_prediction.model import KVPModel
from lm_core.model import Transformer


@dataclasses.dataclass
class Scores:
    perplexity: float
    accuracy: float
    tokens: int


def evaluation_windows(texts, tokenizer, count: int, prompt_tokens: int, continuation_tokens: int) -> np.ndarray:
    """[n, prompt + continuation] token windows: the start of each long-enough held-out document, BOS first."""
    width = prompt_tokens + continuation_tokens
    windows = []
    for i in range(len(texts)):
        ids = [tokenizer.bos_id, *tokenizer.encode(texts[i])]
        if len(ids) >= width:
            windows.append(ids[:width])
        if len(windows) == count:
            break
    if not windows:
        raise ValueError(f"no validation document has {width} tokens; lower kvp.prompt_tokens")
    return np.asarray(windows, np.int32)


def _scores(logits: jax.Array, targets: np.ndarray) -> Scores:
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logits, axis=-1) == targets
    return Scores(float(jnp.exp(jnp.mean(nll))), float(jnp.mean(correct)), int(targets.size))


def score_plain(model: Transformer, windows: np.ndarray, prompt_tokens: int) -> Scores:
    """A model reading the whole window with its own K,V (base-only or aux-only)."""
    logits = jax.jit(lambda m, t: m(t).logits)(model, jnp.asarray(windows[:, :-1]))
    return _scores(logits[:, prompt_tokens - 1:], windows[:, prompt_tokens:])


def score_kvp(model: KVPModel, windows: np.ndarray, prompt_tokens: int) -> Scores:
    """The prompt through the TTFT path, then the base on the continuation with its true K,V appended."""
    batch, width = windows.shape
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width))
    segments = np.ones((batch, width), np.int32)
    graphdef, params = nnx.split(model)
    prompt = slice(0, prompt_tokens)
    first_logits, cache = kvp_prefill(graphdef, params, windows[:, prompt], positions[:, prompt], segments[:, prompt],
                                      width)
    rest = slice(prompt_tokens, width - 1)

    @jax.jit
    def continue_base(base, tokens, positions, segments, cache):
        return base(tokens, positions=positions, segment_ids=segments, cache=cache).logits

    later = continue_base(model.base, windows[:, rest], positions[:, rest], segments[:, rest], cache)
    logits = jnp.concatenate([first_logits[:, None], later], axis=1)
    return _scores(logits, windows[:, prompt_tokens:])


# --- time to first token ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="graphdef")
def _plain_first_token(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, params)
    hidden, _, _, _ = model.hidden_states(tokens)
    return jnp.argmax(model.logits(hidden[:, -1:])[:, 0], axis=-1)  # logits of the last position only


@functools.partial(jax.jit, static_argnames="graphdef")
def _kvp_first_token(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, params)
    batch, width = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    segments = jnp.ones((batch, width), jnp.int32)
    predicted = model.predict_kv(tokens[:, :-1], positions=positions[:, :-1], segment_ids=segments[:, :-1])
    cache = model.base.cache_from_kv(predicted, positions[:, :-1], segments[:, :-1], width)
    out = model.base(tokens[:, -1:], positions=positions[:, -1:], segment_ids=segments[:, -1:], cache=cache)
    return jnp.argmax(out.logits[:, -1], axis=-1)


def median_ttft(first_token: Callable, graphdef: nnx.GraphDef, params: nnx.State, prompt: np.ndarray,
                repeats: int) -> float:
    """Seconds from host prompt ids to the first token back on the host (compiled and warmed up first)."""
    np.asarray(first_token(graphdef, params, prompt))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(first_token(graphdef, params, prompt))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_ttft(model: KVPModel, prompt_len: int, batch: int, repeats: int) -> dict[str, float]:
    prompt = np.random.default_rng(0).integers(4, model.base.config.vocab_size, (batch, prompt_len)).astype(np.int32)
    base_s = median_ttft(_plain_first_token, *nnx.split(model.base), prompt, repeats)
    aux_s = median_ttft(_plain_first_token, *nnx.split(model.aux), prompt, repeats)
    kvp_s = median_ttft(_kvp_first_token, *nnx.split(model), prompt, repeats)
    flops = ttft_flops(model.base.config, model.aux.config, prompt_len)
    aux_flops = prefill_flops(model.aux.config, prompt_len)
    return {"prompt_len": prompt_len, "batch": batch, "base_ttft_s": base_s, "aux_ttft_s": aux_s, "kvp_ttft_s": kvp_s,
            "base_flops": flops.base_only, "aux_flops": aux_flops, "kvp_flops": flops.kvp,
            "flops_reduction": flops.reduction, "measured_reduction": base_s / kvp_s,
            "measured_over_flops": (base_s / kvp_s) / flops.reduction}


def fmt_flops(value: float) -> str:
    exponent = int(math.floor(math.log10(value))) if value > 0 else 0
    return f"{value / 10**exponent:.2f}e{exponent}"
