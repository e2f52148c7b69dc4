"""Evaluating base-only, aux-only and KVP models the way each serves a prompt, and timing their TTFT.

Two accuracy measures, both conditioned on a prompt only the model's serving path reads:
- exact match on held-out retrieval questions (`kv_prediction.retrieval`): greedy answers through
  lm_core.generation (base, aux) or generate_kvp (KVP: the aux and predictor read the prompt, the base answers);
- continuation perplexity on held-out corpus text: P prompt tokens through the serving path, C continuation tokens
  scored as they would be generated (`kv_prediction.scoring`).
TTFT: FLOPs from `kv_prediction.inference.ttft_flops` / `prefill_flops`, and wall time of the compiled
first-token functions on this machine (host prompt ids -> first token on the host, warmed up, median of repeats,
the models timed in turn so background load hits them alike).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from experiments.kv_prediction.models import Family
from kv_prediction import retrieval
from kv_prediction.inference import generate_kvp, kvp_first_token, plain_first_token, prefill_flops, ttft_flops
from kv_prediction.model import KVPModel
from kv_prediction.scoring import continuation_nll, continuation_nll_kvp, exact_match_rate, greedy_answers, perplexity
from lm_core.errors import UserError
from lm_core.flops import param_counts
from lm_core.generation import generate
from lm_core.model import Transformer

TTFT_NEW_TOKENS = 32  # cache room for decoding after the first token, as a server would allocate


@dataclasses.dataclass
class EvalData:
    examples: list[retrieval.RetrievalExample]  # held-out retrieval questions
    windows: np.ndarray  # [n, prompt_tokens + continuation_tokens] held-out corpus text, BOS first
    prompt_tokens: int


def retrieval_setup(config: ml_collections.ConfigDict) -> tuple[retrieval.RetrievalOptions, str]:
    """(retrieval options, corpus spec): those of a retrieval:... data source, else defaults over the source."""
    source = config.data.source
    if source.startswith(f"{retrieval.PREFIX}:"):
        return retrieval.parse_spec(source.partition(":")[2])
    return retrieval.RetrievalOptions(), source


def evaluation_windows(texts: Sequence[str], tokenizer: Any, count: int, prompt_tokens: int,
                       continuation_tokens: int) -> np.ndarray:
    """[n, prompt + continuation] windows: the start of each long-enough held-out document, BOS first."""
    width = prompt_tokens + continuation_tokens
    windows = []
    for i in range(len(texts)):
        ids = [tokenizer.bos_id, *tokenizer.encode(texts[i])]
        if len(ids) >= width:
            windows.append(ids[:width])
        if len(windows) == count:
            break
    if not windows:
        raise UserError(f"no validation document has {width} tokens; lower kvp.prompt_tokens or "
                        "kvp.continuation_tokens")
    return np.asarray(windows, np.int32)


def evaluation_data(config: ml_collections.ConfigDict, tokenizer: Any) -> EvalData:
    from lm_core.data import get_text_source

    kvp = config.kvp
    options, corpus_spec = retrieval_setup(config)
    corpus = get_text_source(corpus_spec, data_dir=config.data.data_dir or None).split("validation")
    examples = retrieval.retrieval_examples(options, corpus, kvp.eval_questions)
    longest = max(len(tokenizer.encode(e.prompt)) + 1 for e in examples) + kvp.answer_tokens
    if longest > config.model.max_seq_len:
        raise UserError(f"retrieval prompts of up to {longest} tokens (with the answer) exceed model.max_seq_len="
                        f"{config.model.max_seq_len}; lower the retrieval facts/filler_chars or raise max_seq_len")
    windows = evaluation_windows(corpus, tokenizer, kvp.eval_documents, kvp.prompt_tokens, kvp.continuation_tokens)
    return EvalData(examples, windows, kvp.prompt_tokens)


def _scores(exact: float, nll: np.ndarray) -> dict[str, float]:
    return {"exact_match": exact, "perplexity": perplexity(nll)}


def score_plain(model: Transformer, tokenizer: Any, data: EvalData, answer_tokens: int) -> dict[str, float]:
    """A model on its own (base-only or aux-only)."""
    answers = greedy_answers(lambda prompts, sampling: generate(model, prompts, sampling), tokenizer, data.examples,
                             max_new_tokens=answer_tokens)
    return _scores(exact_match_rate(answers, data.examples), continuation_nll(model, data.windows, data.prompt_tokens))


def score_kvp(model: KVPModel, tokenizer: Any, data: EvalData, answer_tokens: int) -> dict[str, float]:
    """A KVP model through its TTFT path (aux + predictor read the prompt, the base answers)."""
    answers = greedy_answers(lambda prompts, sampling: generate_kvp(model, prompts, sampling), tokenizer,
                             data.examples, max_new_tokens=answer_tokens)
    return _scores(exact_match_rate(answers, data.examples),
                   continuation_nll_kvp(model, data.windows, data.prompt_tokens))


# --- time to first token ----------------------------------------------------------------------------------------


def _first_token_timer(first_token: Callable, module: nnx.Module, prompt: np.ndarray) -> Callable[[], float]:
    graphdef, state = nnx.split(module)
    # A plain dict of arrays: jit flattens it in C++, ~0.13 ms less dispatch per call than an nnx.State here, which
    # is a visible share of a small auxiliary's few-millisecond first token (a server would hold it this way too).
    params = state.to_pure_dict()
    cache_len = prompt.shape[1] + TTFT_NEW_TOKENS

    def timed() -> float:
        start = time.perf_counter()
        token, _ = first_token(graphdef, params, prompt, cache_len)
        np.asarray(token)  # the first token is on the host
        return time.perf_counter() - start

    return timed


def median_times(timers: dict[str, Callable[[], float]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per timer; each round runs every timer once, so load changes hit all of them alike."""
    for timer in timers.values():
        for _ in range(warmup):  # the first call compiles
            timer()
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: float(np.median(values)) for name, values in times.items()}


def measure_ttft(family: Family, prompt_len: int, batch: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Measured TTFT of base-only, aux-only and KVP for one auxiliary, next to their TTFT FLOPs."""
    base, aux = family.base.config, family.aux_only.config
    prompt = np.random.default_rng(seed).integers(4, base.vocab_size, (batch, prompt_len)).astype(np.int32)
    seconds = median_times({"base": _first_token_timer(plain_first_token, family.base, prompt),
                            "aux": _first_token_timer(plain_first_token, family.aux_only, prompt),
                            "kvp": _first_token_timer(kvp_first_token, family.kvp, prompt)}, repeats)
    flops = ttft_flops(base, aux, prompt_len)
    measured = seconds["base"] / seconds["kvp"]
    return {"variant": family.aux.spec, "prompt_len": prompt_len, "batch": batch, "repeats": repeats,
            "base_ttft_s": seconds["base"], "aux_ttft_s": seconds["aux"], "kvp_ttft_s": seconds["kvp"],
            "base_flops": flops.base_only, "aux_flops": prefill_flops(aux, prompt_len), "kvp_flops": flops.kvp,
            "flops_reduction": flops.reduction, "measured_reduction": measured,
            "aux_flops_reduction": flops.base_only / prefill_flops(aux, prompt_len),
            "aux_measured_reduction": seconds["base"] / seconds["aux"],
            "measured_over_flops": measured / flops.reduction}


def params_of(config) -> int:
    return param_counts(config).total


def fmt_flops(value: float) -> str:
    exponent = int(math.floor(math.log10(value))) if value > 0 else 0
    return f"{value / 10**exponent:.2f}e{exponent}"
