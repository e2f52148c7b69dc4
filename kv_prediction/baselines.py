"""The base model with less of its prompt: a null-cache control and the paper's random token-pruning baseline.

- Null cache (`generate_null_cache`, `continuation_nll_null_cache`): the base decodes from a cache whose prompt
  slots hold zero K,V (every key scores the same, every value is empty), then its last prompt token as usual. It
  knows only that token, so whatever it still gets right needs no prompt at all: the floor any cache must beat.
- Random token pruning (`pruned_prompts`): the base reads a random subset of each prompt's tokens (the first and
  last always kept, the order kept) as a shorter prompt. Its prefill costs about that fraction of the full one, so
  at `keep_fraction` = KVP's TTFT FLOPs / the base's it spends the same first-token budget as KVP.
- True K,V from a position on (`generate_with_true_suffix`): a KVP model's predicted cache, except that the
  base's own K,V fill every slot from `starts[i]` on. Not a way to serve (the base reads that part of the prompt):
  a diagnostic of WHERE the predicted cache falls short, e.g. on the asked question of a closed-book prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from kv_prediction.inference import generate_on_kv, padded_prompts
from kv_prediction.model import KVPModel
from kv_prediction.scoring import continuation_nll_on_kv
from lm_core.attention import LayerKV
from lm_core.errors import UserError
from lm_core.generation import SamplingConfig
from lm_core.model import Transformer


def zero_kv(config, batch: int, length: int) -> tuple[LayerKV, ...]:
    """Pre-RoPE K,V of zeros for `length` prompt slots in every layer."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, config.compute_dtype)
    return tuple(LayerKV(zeros, zeros) for _ in range(config.num_layers))


def generate_null_cache(base: Transformer, prompts: Sequence[Sequence[int]], config: SamplingConfig) -> np.ndarray:
    """New tokens [batch, max_new_tokens]: the base on zero K,V for every prompt token but the last."""
    tokens, positions, segment_ids = padded_prompts(prompts, config.pad_id)
    kv = zero_kv(base.config, tokens.shape[0], tokens.shape[1] - 1)
    return generate_on_kv(base, tokens, positions, segment_ids, kv, config)


def continuation_nll_null_cache(base: Transformer, windows: np.ndarray, prompt_len: int) -> np.ndarray:
    """[n, C] NLL of windows[:, P:] when the base's cache holds zeros for windows[:, :P-1]."""
    return continuation_nll_on_kv(base, windows, prompt_len, zero_kv(base.config, windows.shape[0], prompt_len - 1))


def kept_tokens(length: int, keep_fraction: float) -> int:
    """How many of a `length`-token prompt random pruning keeps (the first and last always among them)."""
    return min(length, max(2, round(keep_fraction * length)))


def pruned_prompts(prompts: Sequence[Sequence[int]], keep_fraction: float, seed: int = 0) -> list[list[int]]:
    """Each prompt with a random `keep_fraction` of its tokens, in order; the first (BOS) and last always kept."""
    if not 0 < keep_fraction <= 1:
        raise UserError(f"keep_fraction={keep_fraction} is invalid; valid: a fraction in (0, 1]")
    rng = np.random.default_rng(seed)
    pruned = []
    for prompt in prompts:
        prompt = list(prompt)
        keep = kept_tokens(len(prompt), keep_fraction)
        middle = sorted(rng.choice(np.arange(1, len(prompt) - 1), keep - 2, replace=False)) if keep > 2 else []
        pruned.append([prompt[0], *(prompt[int(i)] for i in middle), prompt[-1]] if len(prompt) > 1 else prompt)
    return pruned


def generate_with_true_suffix(model: KVPModel, prompts: Sequence[Sequence[int]], starts: Sequence[int],
                              config: SamplingConfig) -> np.ndarray:
    """New tokens: the base generating from KVP's predicted cache with its own K,V from prompt token starts[i] on."""
    tokens, positions, segment_ids = padded_prompts(prompts, config.pad_id)
    read = (tokens[:, :-1], positions[:, :-1], segment_ids[:, :-1])
    predicted = model.predict_kv(read[0], positions=read[1], segment_ids=read[2])
    true = model.base(read[0], positions=read[1], segment_ids=read[2], return_kv=True).kv
    first_true = np.asarray([tokens.shape[1] - len(p) + s for p, s in zip(prompts, starts, strict=True)])  # left pad
    use_true = jnp.asarray(np.arange(read[0].shape[1])[None, :] >= first_true[:, None])[:, :, None, None]
    mixed = tuple(LayerKV(jnp.where(use_true, t.keys, p.keys), jnp.where(use_true, t.values, p.values))
                  for p, t in zip(predicted, true, strict=True))
    return generate_on_kv(model.base, tokens, positions, segment_ids, mixed, config)
