"""Evaluating the KV-prediction family the way each model serves a prompt, and timing its TTFT.

Models (`kind`): the base alone (`base`), every auxiliary alone (`aux_only`) and with its predictor (`kvp`), and
controls built from the base (`kv_prediction.baselines`): random token pruning at each KVP's TTFT FLOPs
(`pruning`), a cache of zeros (`null_cache`) and, on the closed-book task, each KVP model with the base's own K,V
on the asked question (`true_question`, a diagnostic of where the predicted cache falls short).
Tasks, each scored by exact match of greedy answers with a 95% interval, plus continuation perplexity:
- `closed_book` (`kv_prediction.knowledge`): questions about the fact table the models saw in training, asked in
  new words; the answer is in the weights, reached through the prompt;
- `recall` (`kv_prediction.retrieval`): held-out documents whose answer is only in the prompt;
- perplexity: P prompt tokens through the serving path, C continuation tokens scored as they would be generated.
Every model is scored through its serving path (`kv_prediction.serving`: the same generation and continuation
scoring for all). TTFT: FLOPs from `kv_prediction.cost.ttft_flops` / `prefill_flops`, and wall time of the compiled
first-token function (`kv_prediction.serving.first_token`) on this machine (host prompt ids -> first token on
the host, warmed up, median of repeats, the models timed in turn so background load hits them alike).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from experiments.kv_prediction.models import Family
from experiments.kv_prediction.task import kvp_config_from
from kv_prediction import baselines, knowledge, retrieval
from kv_prediction.cost import prefill_flops, ttft_flops
from kv_prediction.model import KVPModel
from kv_prediction.scoring import GenerateFn, greedy_answers, perplexity
from kv_prediction.serving import (
    KVPPath,
    NullCachePath,
    PlainPath,
    ServingPath,
    continuation_nll,
    first_token,
    generate,
)
from kv_prediction.synthetic import Example, exact_match
from lm_core.errors import UserError
from lm_core.flops import param_counts
from lm_core.generation import SamplingConfig
from lm_core.model import Transformer

TTFT_NEW_TOKENS = 32  # cache room for decoding after the first token, as a server would allocate
TASKS = ("closed_book", "recall")
Z_95 = 1.959963984540054


@dataclasses.dataclass
class EvalData:
    tasks: dict[str, list[Example]]  # task -> its questions (only the tasks the training data holds)
    chance: dict[str, float]  # task -> exact match of a uniform guess among the plausible answers
    windows: np.ndarray  # [n, prompt_tokens + continuation_tokens] held-out corpus text, BOS first
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class TaskSources:
    knowledge: knowledge.KnowledgeOptions | None
    retrieval: retrieval.RetrievalOptions | None
    corpus: str  # the text source inside the task wrappers


def task_sources(source: str) -> TaskSources:
    """The task wrappers around a data source, e.g. knowledge:...:retrieval:...:builtin (in either order)."""
    found: dict[str, Any] = {}
    while (prefix := source.partition(":")[0]) in (knowledge.PREFIX, retrieval.PREFIX) and prefix not in found:
        module = knowledge if prefix == knowledge.PREFIX else retrieval
        found[prefix], source = module.parse_spec(source.partition(":")[2])
    return TaskSources(found.get(knowledge.PREFIX), found.get(retrieval.PREFIX), source)


def wilson_interval(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, where the normal one is not)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + Z_95**2 / (2 * n)) / (1 + Z_95**2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + Z_95**2 / (4 * n * n)) / (1 + Z_95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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


def task_questions(config: ml_collections.ConfigDict, sources: TaskSources, corpus: Sequence[str]
                   ) -> tuple[dict[str, list[Example]], dict[str, float]]:
    """({task: questions}, {task: chance}) for the tasks config.data.source trains on; `corpus` is the validation
    split of the text source inside the task wrappers."""
    questions = kvp_config_from(config).eval_questions  # 0: the whole fact table, and 512 recall documents
    tasks, chance = {}, {}
    if sources.knowledge is not None:
        tasks["closed_book"] = knowledge.knowledge_examples(sources.knowledge, questions or None)
        chance["closed_book"] = 1 / sources.knowledge.values
    if sources.retrieval is not None:
        tasks["recall"] = retrieval.retrieval_examples(sources.retrieval, corpus, questions or 512)
        chance["recall"] = 1 / sources.retrieval.facts
    if not tasks:
        raise UserError(f"data.source={config.data.source!r} holds no evaluation task; valid: a source wrapped in "
                        "knowledge:[<options>:] and/or retrieval:[<options>:], e.g. knowledge:retrieval:builtin")
    return tasks, chance


def evaluation_data(config: ml_collections.ConfigDict, tokenizer: Any) -> EvalData:
    from lm_core.data import get_text_source

    kvp = kvp_config_from(config)
    sources = task_sources(config.data.source)
    corpus = get_text_source(sources.corpus, data_dir=config.data.data_dir or None).split("validation")
    tasks, chance = task_questions(config, sources, corpus)
    longest = max(len(tokenizer.encode(e.prompt)) + 1 for questions in tasks.values() for e in questions)
    if longest + kvp.answer_tokens > config.model.max_seq_len:
        raise UserError(f"evaluation prompts of up to {longest + kvp.answer_tokens} tokens (with the answer) exceed "
                        f"model.max_seq_len={config.model.max_seq_len}; lower the task's facts/filler_chars or "
                        "raise max_seq_len")
    windows = evaluation_windows(corpus, tokenizer, kvp.eval_documents, kvp.prompt_tokens, kvp.continuation_tokens)
    return EvalData(tasks, chance, windows, kvp.prompt_tokens)


def exact_match_score(texts: Sequence[str], questions: Sequence[Example]) -> dict[str, Any]:
    """{exact_match, exact_match_ci95, questions} of generated texts against their questions' answers."""
    hits = sum(exact_match(text, example.answer) for text, example in zip(texts, questions, strict=True))
    return {"exact_match": hits / len(questions), "exact_match_ci95": wilson_interval(hits, len(questions)),
            "questions": len(questions)}


def task_scores(generate_fn: GenerateFn, tokenizer: Any, data: EvalData, answer_tokens: int
                ) -> dict[str, dict[str, Any]]:
    """{task: {exact_match, exact_match_ci95, questions}} of one way to generate."""
    return {task: exact_match_score(greedy_answers(generate_fn, tokenizer, questions, max_new_tokens=answer_tokens),
                                    questions) for task, questions in data.tasks.items()}


def score_path(path: ServingPath, tokenizer: Any, data: EvalData, answer_tokens: int) -> dict[str, Any]:
    """Exact match on every task and continuation perplexity, both through `path`."""
    return {"tasks": task_scores(functools.partial(generate, path), tokenizer, data, answer_tokens),
            "perplexity": perplexity(continuation_nll(path, data.windows, data.prompt_tokens))}


def score_true_question(model: KVPModel, tokenizer: Any, data: EvalData, answer_tokens: int) -> dict[str, Any]:
    """Closed book only: KVP with the base's own K,V on the asked question (from its last "Question:" on)."""
    examples = data.tasks["closed_book"]
    prompts = [[tokenizer.bos_id, *tokenizer.encode(e.prompt)] for e in examples]
    starts = [1 + len(tokenizer.encode(e.prompt[:e.prompt.rindex("Question:")])) for e in examples]
    sampling = SamplingConfig(max_new_tokens=answer_tokens, pad_id=tokenizer.pad_id)
    texts = []
    for i in range(0, len(prompts), 64):
        batch = prompts[i:i + 64]
        new = generate(baselines.true_suffix_path(model, batch, starts[i:i + 64], tokenizer.pad_id), batch, sampling)
        texts += [tokenizer.decode([int(t) for t in row]) for row in new]
    return {"tasks": {"closed_book": exact_match_score(texts, examples)}, "perplexity": None}


def score_pruning(base: Transformer, tokenizer: Any, data: EvalData, answer_tokens: int, keep_fraction: float
                  ) -> dict[str, Any]:
    """The base reading a random `keep_fraction` of each prompt (no perplexity: the windows are not pruned)."""
    def generate_pruned(prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> np.ndarray:
        return generate(PlainPath(base), baselines.pruned_prompts(prompts, keep_fraction), sampling)

    return {"tasks": task_scores(generate_pruned, tokenizer, data, answer_tokens), "perplexity": None}


# --- time to first token ----------------------------------------------------------------------------------------


def _first_token_timer(path: ServingPath, prompt: np.ndarray) -> Callable[[], float]:
    graphdef, state = nnx.split(path)
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


def measure_ttft(family: Family, prompt_len: int, batch: int, repeats: int, seed: int = 0, *,
                 time_null_cache: bool = False) -> dict[str, Any]:
    """Measured TTFT of base-only, aux-only, KVP and random pruning at KVP's FLOPs for one auxiliary, next to their
    TTFT FLOPs; with `time_null_cache` also the null cache's (`null_cache_ttft_s`: KVP's base part alone, a cache of
    N-1 slots built and the base on the last token; benchmarks.ttft's bound)."""
    base, aux = family.base.config, family.aux_only.config
    prompt = np.random.default_rng(seed).integers(4, base.vocab_size, (batch, prompt_len)).astype(np.int32)
    flops = ttft_flops(base, aux, prompt_len)
    keep_fraction = min(1.0, flops.kvp / flops.base_only)
    pruned = prompt[:, :baselines.kept_tokens(prompt_len, keep_fraction)]  # timing depends on the length only
    timers = {"base": _first_token_timer(PlainPath(family.base), prompt),
              "aux": _first_token_timer(PlainPath(family.aux_only), prompt),
              "kvp": _first_token_timer(KVPPath(family.kvp), prompt),
              "pruning": _first_token_timer(PlainPath(family.base), pruned)}
    if time_null_cache:
        timers["null_cache"] = _first_token_timer(NullCachePath(family.base), prompt)
    seconds = median_times(timers, repeats)
    measured = seconds["base"] / seconds["kvp"]
    return {"variant": family.aux.spec, "prompt_len": prompt_len, "batch": batch, "repeats": repeats,
            "base_ttft_s": seconds["base"], "aux_ttft_s": seconds["aux"], "kvp_ttft_s": seconds["kvp"],
            "pruning_ttft_s": seconds["pruning"], "pruning_keep_fraction": keep_fraction,
            "base_flops": flops.base_only, "aux_flops": prefill_flops(aux, prompt_len), "kvp_flops": flops.kvp,
            "pruning_flops": prefill_flops(base, pruned.shape[1]), "null_cache_flops": flops.base_last_token,
            "flops_reduction": flops.reduction, "measured_reduction": measured,
            "aux_flops_reduction": flops.base_only / prefill_flops(aux, prompt_len),
            "aux_measured_reduction": seconds["base"] / seconds["aux"],
            "measured_over_flops": measured / flops.reduction,
            **({"null_cache_ttft_s": seconds["null_cache"]} if time_null_cache else {})}


def params_of(config) -> int:
    return param_counts(config).total


def fmt_flops(value: float) -> str:
    exponent = int(math.floor(math.log10(value))) if value > 0 else 0
    return f"{value / 10**exponent:.2f}e{exponent}"
