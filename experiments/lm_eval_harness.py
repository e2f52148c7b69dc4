"""Evaluate a trained workdir with EleutherAI's lm-evaluation-harness, on tasks whose data ships with the project.

    python -m experiments.lm_eval_harness --workdir=DIR [--kvp=SPEC]
        [--tasks=lm_core_tiny_mc,lm_core_tiny_ppl,lm_core_tiny_gen] [--batch_size=16] [--limit=N]
        [--max_length=N] [--seed=0] [--output=FILE]
Tasks (experiments/eval_tasks, read offline): lm_core_tiny_mc (60 four-way questions: acc, acc_norm),
lm_core_tiny_ppl (whole-document perplexity of six paragraphs: word_perplexity, byte_perplexity, bits_per_byte),
lm_core_tiny_gen (24 two-shot patterns answered greedily: exact_match). --workdir is an lm_core workdir
(experiments.train_lm). For a KV-prediction workdir (experiments.kv_prediction.train), --kvp=SPEC (e.g. lp0.50)
scores through the paper's serving path: the auxiliary and its predictor read the context, the base scores and
writes the continuation on the predicted cache; --workdir=DIR/base is the base alone. --max_length lowers the
context (default: the model's max_seq_len). Prints a table and writes FILE (default:
DIR/lm_eval_results[_kvp_<name>].json): workdir, kvp, checkpoint_step, results (lm_eval's per-task metrics),
n_samples. From Python, `LMCoreLM(workdir=DIR, kvp=SPEC)` is an `lm_eval.api.model.LM`:
`lm_eval.simple_evaluate(model=LMCoreLM(...), tasks=[...], task_manager=local_task_manager())`, or
model="lm_core", model_args="workdir=DIR,kvp=lp0.50" once this module is imported.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from experiments.cli import run
from kv_prediction.serving import KVPPath, padded_prompts, read_prompt
from lm_core.atomic_files import write_json_atomically
from lm_core.checkpoint import has_checkpoints
from lm_core.errors import UserError
from lm_core.generation import SamplingConfig, decode, left_pad, prefill

# The bundled tasks read local files and nothing may reach the Hugging Face hub. `datasets` reads these when it is
# first imported: none of the imports above imports it (lm_eval's task and evaluator modules do, later).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

Array = jax.Array
TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
DEFAULT_TASKS = ("lm_core_tiny_mc", "lm_core_tiny_ppl", "lm_core_tiny_gen")
DEFAULT_MAX_GEN_TOKS = 256
RESULTS_FILE = "lm_eval_results"
log = logging.getLogger(__name__)

# At most this many positions' logits [positions, vocab] exist at once (a 128K vocabulary: 2 GiB in float32);
# the tiny models here always fit in one chunk.
LOGIT_CHUNK_TOKENS = 4096

# (prompt tokens, continuation tokens): the prompt ends where the scored continuation starts; prompt non-empty.
Row = tuple[list[int], list[int]]


def bucket_length(n: int, cap: int) -> int:
    """The padded width for n tokens: the next power of two up to 32, then the next multiple of 32 (never more
    than cap, never less than n). Few distinct widths = few jit compilations; padding wastes < 32 tokens."""
    width = 1 << max(n - 1, 0).bit_length() if n <= 32 else -(-n // 32) * 32
    return max(n, min(width, cap))


def fit_request(context: Sequence[int], continuation: Sequence[int], max_length: int) -> Row:
    """(prompt, continuation) whose model input (prompt + continuation[:-1]) fits max_length tokens: the context
    loses its start, as lm_eval's HF model truncates ((context + continuation)[-(max_length + 1):])."""
    if len(continuation) > max_length:
        raise UserError(f"a continuation of {len(continuation)} tokens is longer than max_length={max_length}; "
                        "it cannot be scored in one window")
    window = (list(context) + list(continuation))[-(max_length + 1):]
    return window[:len(window) - len(continuation)], list(continuation)


def target_scores(logits: Array, targets: Array) -> tuple[Array, Array]:
    """(log p(target), target == argmax) per position: logits [b, w, vocab], targets [b, w]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def chunked_target_scores(model: nnx.Module, hidden: Array, targets: Array) -> tuple[Array, Array]:
    """`target_scores` of model.logits(hidden) [b, w, d] -> [b, w], the output layer run over chunks of positions
    (LOGIT_CHUNK_TOKENS per chunk, all rows) so the whole [b, w, vocab] logits never exist."""
    batch, width, d = hidden.shape
    chunk = max(1, min(width, LOGIT_CHUNK_TOKENS // batch))
    padding = -width % chunk
    steps = (width + padding) // chunk
    hidden = jnp.pad(hidden, [(0, 0), (0, padding), (0, 0)]).reshape(batch, steps, chunk, d).swapaxes(0, 1)
    targets = jnp.pad(targets, [(0, 0), (0, padding)]).reshape(batch, steps, chunk).swapaxes(0, 1)
    picked, greedy = jax.lax.map(lambda chunk_args: target_scores(model.logits(chunk_args[0]), chunk_args[1]),
                                 (hidden, targets))
    return tuple(a.swapaxes(0, 1).reshape(batch, steps * chunk)[:, :width] for a in (picked, greedy))


def reduce_rows(picked: np.ndarray, greedy: np.ndarray, mask: np.ndarray, count: int) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probs in float64, every continuation token greedy) for the first count rows."""
    return [(float(np.sum(picked[i][mask[i]], dtype=np.float64)), bool(np.all(greedy[i][mask[i]])))
            for i in range(count)]


# --- a plain lm_core model: one full forward per batch ---------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward_scores(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, positions: Array,
                         segment_ids: Array, targets: Array) -> tuple[Array, Array]:
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(tokens, positions=positions, segment_ids=segment_ids, return_kv=False).hidden
    return chunked_target_scores(model, hidden, targets)


def full_layout(rows: Sequence[Row], batch_size: int, cap: int) -> dict[str, np.ndarray]:
    """Right-padded [batch_size, width] inputs (prompt + continuation[:-1]), targets (the next tokens) and the mask
    of the continuation's targets. Padding has segment id 0; rows past len(rows) are all padding."""
    width = bucket_length(max(len(p) + len(c) - 1 for p, c in rows), cap)
    arrays = {name: np.zeros((batch_size, width), np.int32) for name in ("tokens", "positions", "segment_ids",
                                                                         "targets")}
    mask = np.zeros((batch_size, width), bool)
    for row, (prompt, continuation) in enumerate(rows):
        sequence = prompt + continuation
        n = len(sequence) - 1
        arrays["tokens"][row, :n] = sequence[:-1]
        arrays["targets"][row, :n] = sequence[1:]
        arrays["positions"][row, :n] = np.arange(n)
        arrays["segment_ids"][row, :n] = 1
        mask[row, n - len(continuation):n] = True
    return {**arrays, "mask": mask}


# --- a KV-prediction model: the context through aux + predictor, the continuation by the base ------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _kvp_scores(graphdef: nnx.GraphDef, params: nnx.State, prompt: tuple[Array, Array, Array],
                continuation: tuple[Array, Array, Array], targets: Array, cache_len: int) -> tuple[Array, Array]:
    """The TTFT path of a split `KVPPath` (aux on prompt[:-1] -> predicted base cache -> base on the last prompt
    token, whose logits score continuation token 1), then the base reads continuation[:-1] on that cache with its
    own K,V appended, exactly as it would decode (kv_prediction.serving.continuation_nll does the same for
    unpadded windows)."""
    path = nnx.merge(graphdef, params)
    first_logits, cache = path.read_prompt(*prompt, cache_len)
    tokens, positions, segment_ids = continuation
    base = path.decoder
    later = base.hidden_states(tokens, positions=positions, segment_ids=segment_ids, cache=cache).hidden
    first = target_scores(first_logits[:, None], targets[:, :1])
    rest = chunked_target_scores(base, later, targets[:, 1:])
    return tuple(jnp.concatenate([a, b], axis=1) for a, b in zip(first, rest, strict=True))


def widen_left(tokens: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray, width: int, pad_id: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded prompt arrays grown to `width` columns of more padding (segment id 0, never attended)."""
    extra = [(0, 0), (width - tokens.shape[1], 0)]
    return (np.pad(tokens, extra, constant_values=pad_id), np.pad(positions, extra),
            np.pad(segment_ids, extra))


def kvp_layout(rows: Sequence[Row], batch_size: int, cap: int, pad_id: int, filler: int) -> dict[str, Any]:
    """Prompts left-padded (kv_prediction.serving.padded_prompts) to a bucket width; continuation inputs
    (continuation[:-1]) right-padded after them with positions that go on from each row's prompt; targets
    [batch, 1 + width] = the continuation, the first scored by the last prompt token's logits. Rows past
    len(rows) read one `filler` token (the batch keeps its size) and are discarded."""
    rows = list(rows) + [([filler], [filler])] * (batch_size - len(rows))
    prompt = padded_prompts([p for p, _ in rows], pad_id)
    prompt = widen_left(*prompt, max(2, bucket_length(prompt[0].shape[1], cap)), pad_id)
    width = bucket_length(max(max(len(c) - 1 for _, c in rows), 1), cap)
    tokens, positions, segment_ids = (np.zeros((batch_size, width), np.int32) for _ in range(3))
    targets = np.zeros((batch_size, 1 + width), np.int32)
    mask = np.zeros((batch_size, 1 + width), bool)
    for row, (_, continuation) in enumerate(rows):
        n = len(continuation) - 1
        tokens[row, :n] = continuation[:-1]
        positions[row, :] = prompt[1][row, -1] + 1 + np.arange(width)
        segment_ids[row, :n] = 1
        targets[row, :n + 1] = continuation
        mask[row, :n + 1] = True
    return {"prompt": prompt, "continuation": (tokens, positions, segment_ids), "targets": targets, "mask": mask}


# --- scorers: what differs between a plain model and a KVP model ---------------------------------------------


class PlainScorer:
    """An lm_core `Transformer`: scoring is one full forward; generation is lm_core.generation's prefill + decode."""

    def __init__(self, model: nnx.Module, tokenizer: Any):
        self.model = model
        self.pad_id, self.bos_id = tokenizer.pad_id, tokenizer.bos_id
        self.graphdef, self.params = nnx.split(model)
        self.max_seq_len = self.context_limit(model)

    @staticmethod
    def context_limit(model: nnx.Module) -> int:
        return model.config.max_seq_len

    def score(self, rows: Sequence[Row], batch_size: int, cap: int) -> list[tuple[float, bool]]:
        layout = full_layout(rows, batch_size, cap)
        picked, greedy = _full_forward_scores(self.graphdef, self.params, layout["tokens"], layout["positions"],
                                              layout["segment_ids"], layout["targets"])
        return reduce_rows(np.asarray(picked), np.asarray(greedy), layout["mask"], len(rows))

    def first_step(self, prompts: Sequence[Sequence[int]], width: int, new_tokens: int
                   ) -> tuple[Array, Any, np.ndarray]:
        """(logits of each prompt's last token, a cache with room for new_tokens, positions [batch, width]) as
        lm_core.generation.generate prefills them, with prompts left-padded to `width`."""
        tokens, positions, segment_ids = widen_left(*left_pad(prompts, self.pad_id), width, self.pad_id)
        logits, cache = prefill(self.graphdef, self.params, tokens, positions, segment_ids, width + new_tokens)
        return logits, cache, positions

    def decoder(self) -> tuple[nnx.GraphDef, nnx.State]:
        return self.graphdef, self.params


class KVPScorer(PlainScorer):
    """A `KVPModel`: the aux + predictor read each prompt, the base scores and decodes on the predicted cache."""

    def __init__(self, model: nnx.Module, tokenizer: Any):
        super().__init__(model, tokenizer)
        self.graphdef, self.params = nnx.split(KVPPath(model))  # its serving path (kv_prediction.serving)
        self.base_graphdef, self.base_params = nnx.split(model.base)

    @staticmethod
    def context_limit(model: nnx.Module) -> int:
        return min(model.base.config.max_seq_len, model.aux.config.max_seq_len)

    def score(self, rows: Sequence[Row], batch_size: int, cap: int) -> list[tuple[float, bool]]:
        layout = kvp_layout(rows, batch_size, cap, self.pad_id, self.bos_id)
        cache_len = layout["prompt"][0].shape[1] + layout["continuation"][0].shape[1]
        picked, greedy = _kvp_scores(self.graphdef, self.params, layout["prompt"], layout["continuation"],
                                     layout["targets"], cache_len)
        return reduce_rows(np.asarray(picked), np.asarray(greedy), layout["mask"], len(rows))

    def first_step(self, prompts: Sequence[Sequence[int]], width: int, new_tokens: int
                   ) -> tuple[Array, Any, np.ndarray]:
        """The KVP path's prompt reading (kv_prediction.serving), prompts left-padded to `width`."""
        width = max(width, 2)  # the aux reads every column but the last (padded_prompts' minimum)
        tokens, positions, segment_ids = widen_left(*padded_prompts(prompts, self.pad_id), width, self.pad_id)
        logits, cache = read_prompt(self.graphdef, self.params, tokens, positions, segment_ids, width + new_tokens)
        return logits, cache, positions

    def decoder(self) -> tuple[nnx.GraphDef, nnx.State]:
        return self.base_graphdef, self.base_params


def generate_tokens(scorer: PlainScorer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                    rng: Array, cap: int) -> np.ndarray:
    """New tokens [len(prompts), sampling.max_new_tokens]: the scorer's prefill at a bucketed width, then
    lm_core.generation.decode (the base's, for KVP). Each row's positions start at 0 on its first real token,
    so the extra left padding changes nothing but the compiled shape."""
    width = bucket_length(max(len(p) for p in prompts), cap)
    logits, cache, positions = scorer.first_step(prompts, width, sampling.max_new_tokens)
    graphdef, params = scorer.decoder()
    return np.asarray(decode(graphdef, params, logits, cache, jnp.asarray(positions[:, -1] + 1), rng, sampling))


# --- loading a workdir -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    scorer: PlainScorer
    tokenizer: Any
    step: int
    description: str


def check_plain_workdir(workdir: Path) -> None:
    """Refuse, before anything is read or created, what load_trained_model cannot load."""
    from experiments.kv_prediction.task import CONFIG_FILE

    if not (workdir / "config.json").is_file():
        if (workdir / CONFIG_FILE).is_file():
            trained = ", ".join(trained_kvp_specs(workdir)) or "none trained yet"
            raise UserError(f"{workdir} is a KV-prediction workdir; pass kvp=<spec> (trained: {trained}) for a KVP "
                            f"model or workdir={workdir / 'base'} for its base alone")
        raise UserError(f"{workdir} has no config.json; valid: a workdir written by python -m experiments.train_lm "
                        "(or a KV-prediction workdir with kvp=<spec>)")
    if not has_checkpoints(workdir):
        raise UserError(f"{workdir} has no checkpoints/; train it first (python -m experiments.train_lm)")
    if workdir.name.startswith("kvp_") and (workdir.parent / CONFIG_FILE).is_file():  # holds a KVPModel
        raise UserError(f"{workdir} is a KVP run; evaluate it as workdir={workdir.parent} with kvp={workdir.name[4:]}")


def trained_kvp_specs(workdir: Path) -> list[str]:
    """Names of the workdir's configured auxiliaries whose KVP run has checkpoints."""
    from experiments.kv_prediction.pipeline import load_config, resolve_variants
    from experiments.kv_prediction.task import kvp_dir

    return [aux.name for aux in resolve_variants(load_config(workdir))
            if has_checkpoints(kvp_dir(workdir, aux))]


def load_kvp(workdir: Path, spec: str) -> tuple[nnx.Module, Any, int, str]:
    """The trained KVP model of one auxiliary, loaded as experiments.kv_prediction.models.load_family does."""
    from experiments.kv_prediction.pipeline import load_config, resolve_variants
    from experiments.kv_prediction.task import CONFIG_FILE, kvp_builder, kvp_dir
    from lm_core.trained_runs import load_trained_model

    if not (workdir / CONFIG_FILE).is_file():
        raise UserError(f"{workdir} has no {CONFIG_FILE}: kvp={spec} needs a workdir written by python -m "
                        "experiments.kv_prediction.train")
    config = load_config(workdir)
    trained = [aux for aux in resolve_variants(config) if has_checkpoints(kvp_dir(workdir, aux))]
    matches = [aux for aux in trained if spec in (aux.spec, aux.name)]
    if not matches:
        valid = ", ".join(aux.name for aux in trained) or "none trained yet"
        raise UserError(f"kvp={spec!r} is not a trained KVP model of {workdir}; valid: {valid}")
    aux = matches[0]
    model, tokenizer, step = load_trained_model(kvp_dir(workdir, aux), kvp_builder(aux))
    return model, tokenizer, step, f"KVP {aux.name} of {workdir}"


def load_workdir(workdir: str | Path, kvp: str | None = None) -> Loaded:
    from lm_core.trained_runs import load_trained_model

    workdir = Path(workdir)
    if kvp:
        model, tokenizer, step, description = load_kvp(workdir, kvp)
        return Loaded(KVPScorer(model, tokenizer), tokenizer, step, description)
    check_plain_workdir(workdir)
    model, tokenizer, step = load_trained_model(workdir)
    return Loaded(PlainScorer(model, tokenizer), tokenizer, step, f"lm_core model of {workdir}")


# --- generation requests -------------------------------------------------------------------------------------


_WARNED_GEN_KWARGS: set[str] = set()


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    until: tuple[str, ...]
    max_gen_toks: int
    temperature: float
    top_k: int
    top_p: float


def parse_gen_kwargs(gen_kwargs: dict[str, Any]) -> GenerationRequest:
    """lm_eval's generation kwargs as HF's model reads them: greedy unless do_sample (then temperature 1 unless
    given); `until` a string or list; keys this model has no use for are named in one warning."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    until = (until,) if isinstance(until, str) else tuple(until)
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = kwargs.pop("temperature", None)
    temperature = (1.0 if temperature is None else float(temperature)) if do_sample else 0.0
    request = GenerationRequest(until=tuple(stop for stop in until if stop),
                                max_gen_toks=int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
                                temperature=temperature, top_k=int(kwargs.pop("top_k", None) or 0),
                                top_p=float(kwargs.pop("top_p", None) or 1.0))
    if request.max_gen_toks <= 0:
        raise UserError(f"max_gen_toks={request.max_gen_toks} must be positive")
    unused = sorted(set(kwargs) - _WARNED_GEN_KWARGS)
    if unused:
        log.warning("lm_core generation ignores gen_kwargs %s", unused)
        _WARNED_GEN_KWARGS.update(unused)  # said once per process, not once per request
    return request


def generation_budget(prompt_len: int, max_gen_toks: int, max_length: int) -> int:
    """New tokens for a prompt: max_gen_toks, cut so that prompt + new tokens fit max_length while the prompt
    keeps min(its length, half of max_length) (HF keeps max_length - max_gen_toks, which can leave a small model
    no context at all)."""
    return max(1, min(max_gen_toks, max_length - min(prompt_len, max_length // 2)))


def cut_text(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any `until` string."""
    ends = [index for index in (text.find(stop) for stop in until) if index >= 0]
    return text[:min(ends)] if ends else text


def first_eos_cut(row: np.ndarray, eos_id: int) -> list[int]:
    """The ids before the first EOS (decode pads a finished row; pad ids decode to nothing, but be explicit)."""
    ids = [int(t) for t in row]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


# --- the lm_eval model -------------------------------------------------------------------------------------


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(order[start:start + batch_size]) for start in range(0, len(order), batch_size)]


def positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0 or (isinstance(value, float) and value != number):
        raise UserError(f"{name}={value!r} is invalid; valid: a positive integer")
    return number


def context_length(requested: int | str | None, limit: int) -> int:
    """The context the adapter uses: `limit` (the model's max_seq_len) unless a shorter one is asked for."""
    if requested in (None, ""):
        return limit
    length = positive_int("max_length", requested)
    if not 2 <= length <= limit:
        raise UserError(f"max_length={length} is invalid; valid: 2..{limit} (the model's max_seq_len)")
    return length


@register_model("lm_core")
class LMCoreLM(TemplateLM):
    """An lm_core workdir (or, with `kvp`, a KV-prediction workdir's KVP model) as an lm_eval model.

    Tokenisation follows lm_eval's HF model with a BOS token: `tok_encode` adds BOS, `_encode_pair` (TemplateLM)
    encodes context + continuation whole and splits where the context ends, moving the context's trailing spaces
    to the continuation; an empty context is BOS alone. Requests are sorted by length and padded to fixed bucket
    shapes (`bucket_length`, batch rows to `batch_size`), one jitted forward per batch.
    """

    def __init__(self, workdir: str, kvp: str | None = None, batch_size: int | str = 16,
                 max_length: int | str | None = None, seed: int | str = 0, **unused: Any):
        super().__init__()
        del unused  # lm_eval passes device / max_batch_size, which a JAX model on its default device ignores
        self.batch_size = positive_int("batch_size", batch_size)
        self.loaded = load_workdir(workdir, kvp or None)
        self._tokenizer = self.loaded.tokenizer
        self._max_length = context_length(max_length, self.loaded.scorer.max_seq_len)
        self.seed = int(seed)
        self.workdir, self.kvp = str(workdir), kvp or None

    # token ids ------------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"lm_core:{Path(self.workdir).resolve()}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """BOS + the text's ids, as lm_core trained on (documents start with BOS); without BOS when asked."""
        ids = self._tokenizer.encode(string)
        return ids if add_special_tokens is False else [self._tokenizer.bos_id, *ids]

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids)

    def get_model_info(self) -> dict[str, Any]:
        return {"lm_core_workdir": self.workdir, "lm_core_kvp": self.kvp, "lm_core_step": self.loaded.step}

    # scoring --------------------------------------------------------------------------------------------------

    def score_rows(self, rows: Sequence[Row]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) per row, batched longest first (so a batch's rows have similar widths)."""
        # an empty continuation has log-likelihood 0 and is trivially greedy: nothing to run
        scored = [i for i in range(len(rows)) if rows[i][1]]
        order = sorted(scored, key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        for batch in _batches(order, self.batch_size):
            for index, result in zip(batch, self.loaded.scorer.score([rows[i] for i in batch], self.batch_size,
                                                                       self.max_length), strict=True):
                results[index] = result
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        rows = [fit_request(context, continuation, self.max_length) for _, context, continuation in requests]
        results = self.score_rows(rows)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over windows of max_length (lm_eval.utils.get_rolling_token_windows with
        BOS as the prefix, made disjoint as the HF model does): every token predicted once, the first from BOS.
        Through KVP, a window's context goes through the aux + predictor; the first window's context is BOS alone,
        so a document that fits one window scores as the base alone (--max_length shorter than it tells them apart)."""
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for pair in lm_eval_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(lm_eval_utils.make_disjoint_window(pair))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score_rows(windows), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # generation -----------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled continuations (lm_core.generation, batched and left-padded), cut at EOS and at the
        first `until` string; requests with the same generation settings are batched together, longest first."""
        parsed = [(self.tok_encode(context), parse_gen_kwargs(gen_kwargs))
                  for context, gen_kwargs in (request.args for request in requests)]
        groups: dict[GenerationRequest, list[int]] = {}
        for index, (_, request) in enumerate(parsed):
            groups.setdefault(request, []).append(index)
        outputs = [""] * len(requests)
        batch_number = 0
        for request, indices in groups.items():
            indices.sort(key=lambda i: -len(parsed[i][0]))
            for batch in _batches(indices, self.batch_size):
                texts = self.generate_batch([parsed[i][0] for i in batch], request, batch_number)
                batch_number += 1
                for index, text in zip(batch, texts, strict=True):
                    outputs[index] = text
        for request, text in zip(requests, outputs, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return outputs

    def generate_batch(self, prompts: Sequence[list[int]], request: GenerationRequest, batch_number: int
                       ) -> list[str]:
        budgets = [generation_budget(len(p), request.max_gen_toks, self.max_length) for p in prompts]
        prompts = [p[-(self.max_length - budget):] for p, budget in zip(prompts, budgets, strict=True)]
        sampling = SamplingConfig(max_new_tokens=max(budgets), temperature=request.temperature, top_k=request.top_k,
                                  top_p=request.top_p, eos_id=self._tokenizer.eos_id, pad_id=self._tokenizer.pad_id)
        padded = list(prompts) + [[self._tokenizer.bos_id]] * (self.batch_size - len(prompts))  # fixed batch size
        rng = jax.random.fold_in(jax.random.key(self.seed), batch_number)
        new_tokens = generate_tokens(self.loaded.scorer, padded, sampling, rng, self.max_length)
        return [cut_text(self.tok_decode(first_eos_cut(row[:budget], self._tokenizer.eos_id)), request.until)
                for row, budget in zip(new_tokens, budgets, strict=False)]


# --- the entrypoint ------------------------------------------------------------------------------------------


def local_task_manager() -> Any:
    """lm_eval's TaskManager over the bundled tasks only (lm_eval's own hub tasks would need the network)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def parse_tasks(names: Sequence[str], task_manager: Any) -> list[str]:
    valid = sorted(task_manager.all_tasks)
    tasks = [name.strip() for name in names if name.strip()]
    unknown = [name for name in tasks if name not in valid]
    if unknown or not tasks:
        raise UserError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown) or '(none given)'}; "
                        f"valid: {', '.join(valid)}")
    return tasks


def evaluate(lm: LMCoreLM, tasks: Sequence[str], limit: int | None, task_manager: Any) -> dict[str, Any]:
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
                                   log_samples=False, torch_random_seed=None, random_seed=lm.seed,
                                   numpy_random_seed=lm.seed, fewshot_random_seed=lm.seed)


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str, float, Any, int]]:
    """(task, metric[,filter], value, stderr, documents) for every metric of lm_eval's results."""
    rows = []
    for task, metrics in results["results"].items():
        documents = results.get("n-samples", {}).get(task, {}).get("effective", 0)
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:  # name, alias, sample_len; stderrs go with their metric
                continue
            metric, _, filter_name = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name in ("none", "") else f"{metric} ({filter_name})"
            rows.append((task, name, value, stderr, documents))
    return rows


def table_lines(rows: Sequence[tuple[str, str, float, Any, int]]) -> list[str]:
    lines = [f"{'task':<20} {'metric':<24} {'value':>12} {'stderr':>8} {'docs':>5}"]
    for task, metric, value, stderr, documents in rows:
        error = f"{stderr:.4f}" if isinstance(stderr, int | float) else "-"
        lines.append(f"{task:<20} {metric:<24} {value:>12.6g} {error:>8} {documents:>5}")
    return lines


def default_output(workdir: Path, kvp: str | None) -> Path:
    return workdir / (f"{RESULTS_FILE}_kvp_{kvp}.json" if kvp else f"{RESULTS_FILE}.json")


def define_flags() -> None:
    """Flags exist only when this file runs as the entrypoint: it is also imported as a library (LMCoreLM), next
    to other entrypoints' flags (absl refuses a flag name defined twice)."""
    flags.DEFINE_string("workdir", None, "An lm_core workdir, or a KV-prediction workdir with --kvp.", required=True)
    flags.DEFINE_string("kvp", None, "Auxiliary spec of a KVP model of the workdir (e.g. lp0.50).")
    flags.DEFINE_list("tasks", list(DEFAULT_TASKS), "Comma-separated task names (experiments/eval_tasks).")
    flags.DEFINE_integer("batch_size", 16, "Requests per compiled forward.")
    flags.DEFINE_integer("limit", None, "Evaluate only the first N documents of each task.")
    flags.DEFINE_integer("max_length", None, "Context length (default: the model's max_seq_len).")
    flags.DEFINE_integer("seed", 0, "Seed of sampled generation and of lm_eval's few-shot sampling.")
    flags.DEFINE_string("output", None, "Results JSON (default: DIR/lm_eval_results[_kvp_<name>].json).")


def main(argv: list[str]) -> None:
    del argv
    args = flags.FLAGS
    # lm_eval logs a warning per task about --metadata for custom datasets, which says nothing about these tasks
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    task_manager = local_task_manager()
    tasks = parse_tasks(args.tasks, task_manager)
    if args.limit is not None:
        positive_int("limit", args.limit)
    workdir = Path(args.workdir)
    lm = LMCoreLM(workdir=str(workdir), kvp=args.kvp, batch_size=args.batch_size, max_length=args.max_length,
                  seed=args.seed)
    results = evaluate(lm, tasks, args.limit, task_manager)
    print(f"# {lm.loaded.description}, checkpoint step {lm.loaded.step}")
    print("\n".join(table_lines(metric_rows(results))))
    output = Path(args.output) if args.output else default_output(workdir, args.kvp)
    write_json_atomically(output, {"workdir": str(workdir), "kvp": args.kvp, "checkpoint_step": lm.loaded.step,
                               "model": lm.loaded.description, "limit": args.limit, "max_length": lm.max_length,
                               "results": results["results"], "n_samples": results.get("n-samples", {}),
                               "versions": results.get("versions", {})})
    print(f"wrote {output}", flush=True)


if __name__ == "__main__":
    define_flags()
    run(main)
