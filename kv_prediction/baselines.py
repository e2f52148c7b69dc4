"""The base model with less of its prompt: a null-cache control and the paper's random token-pruning baseline.

- Null cache (`kv_prediction.serving.NullCachePath`): the base decodes from a cache whose prompt
  slots hold zero K,V (every key scores the same, every value is empty), then its last prompt token as usual. It
  knows only that token, so whatever it still gets right needs no prompt at all: the floor any cache must beat.
- Random token pruning (`pruned_prompts`): the base reads a random subset of each prompt's tokens (the first and
  last always kept, the order kept) as a shorter prompt. Its prefill costs about that fraction of the full one, so
  at `keep_fraction` = KVP's TTFT FLOPs / the base's it spends the same first-token budget as KVP.
- True K,V from a position on (`true_suffix_path`): a KVP model's predicted cache, except that the
  base's own K,V fill every slot from `starts[i]` on. Not a way to serve (the base reads that part of the prompt):
  a diagnostic of WHERE the predicted cache falls short, e.g. on the asked question of a closed-book prompt.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import jax.numpy as jnp
import numpy as np

from kv_prediction.model import KVPModel
from kv_prediction.serving import GivenKVPath, padded_prompts
from lm_core.attention import LayerKV
from lm_core.errors import UserError


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


def true_suffix_path(model: KVPModel, prompts: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int = 0,
                     layers: Collection[int] | None = None) -> GivenKVPath:
    """The base on KVP's predicted cache with its own K,V from prompt token starts[i] on, for these prompts (as
    `padded_prompts` lays them out; serve them with `kv_prediction.serving.generate`). `layers`: only these base
    layers get their own K,V there (None: every layer), to see which layers' K,V a prediction misses."""
    tokens, positions, segment_ids = padded_prompts(prompts, pad_id)
    read = (tokens[:, :-1], positions[:, :-1], segment_ids[:, :-1])
    predicted = model.predict_kv(read[0], positions=read[1], segment_ids=read[2])
    true = model.base(read[0], positions=read[1], segment_ids=read[2], return_kv=True).kv
    first_true = np.asarray([tokens.shape[1] - len(p) + s for p, s in zip(prompts, starts, strict=True)])  # left pad
    use_true = jnp.asarray(np.arange(read[0].shape[1])[None, :] >= first_true[:, None])[:, :, None, None]
    mixed = tuple(LayerKV(jnp.where(use_true, t.keys, p.keys), jnp.where(use_true, t.values, p.values))
                  if layers is None or i in layers else p for i, (p, t) in enumerate(zip(predicted, true, strict=True)))
    return GivenKVPath(model.base, mixed)
