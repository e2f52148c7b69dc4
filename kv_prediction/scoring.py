"""Exact-match answers and perplexity through a serving path (kv_prediction.serving).

Exact match (`greedy_answers`, `exact_match_rate`): greedy generation through the path, answers cut at the first
newline / period / comma. Continuation perplexity: `kv_prediction.serving.continuation_nll` per token, `perplexity`
of those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from kv_prediction.synthetic import Example, exact_match
from lm_core.generation import SamplingConfig


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
