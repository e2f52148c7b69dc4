"""The vocabulary sweep's machinery: tokenizers and f(V), the run plan, training each run, collecting points
(each run's config and TrainTask: experiments.vocab_scaling.task).

`run_sweep(config, workdir)` is what `python -m experiments.vocab_scaling.sweep` and the registered reproduction
call; `experiments.vocab_scaling.report` turns the collected points into fits, plots and REPORT.md.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments.vocab_scaling.task import run_config, sweep_run_task
from lm_core.atomic_files import save_npy_atomically, write_json_atomically
from lm_core.errors import UserError
from lm_core.metrics import format_seconds, read_metrics
from vocab_scaling.sweep import ModelGroup, PlannedRun, isoflop_points, plan_sweep
from vocab_scaling.tokenization_curve import PAPER_F, FCurve, fit_tokens_per_char, measure_tokens_per_char
from vocab_scaling.unigram_loss import unigram_distribution

# epochs: characters trained so far / characters of the training split (above 1, the run has repeated text)
POINT_COLUMNS = ["name", "group", "N_nv", "V", "d", "N_v", "budget", "seed", "step", "C", "H", "D", "epochs", "L_u",
                 "loss", "bpc", "final"]


def parse_groups(specs: Sequence[Mapping[str, Any] | Sequence[Any]]) -> list[ModelGroup]:
    """Groups from config entries, each a dict of ModelGroup's fields (name, d_model, num_layers, num_heads, d_ff);
    the positional 5-tuples older sweeps' config.json hold are read too."""
    fields = [field.name for field in dataclasses.fields(ModelGroup)]
    groups = []
    for spec in specs:
        if isinstance(spec, Mapping):
            values = dict(spec)
        else:  # an older sweep's positional tuple, in the fields' order
            values = dict(zip(fields, spec, strict=True)) if len(spec) == len(fields) else {}
        if sorted(values) != sorted(fields):
            raise UserError(f"sweep group {spec!r} is invalid; valid: dict(name=..., d_model=..., num_layers=..., "
                            "num_heads=..., d_ff=...)")
        groups.append(ModelGroup(str(values["name"]), *(int(values[name]) for name in fields[1:])))
    return groups


def vocabulary_tokenizers(config: ml_collections.ConfigDict, vocab_sizes: Sequence[int], train_texts: Sequence[str]
                          ) -> dict[int, Any]:
    """One cached sentencepiece tokenizer per V, trained exactly as the trainer will train it (same spec)."""
    from lm_core import tokenizer as tok
    from lm_core.run_data import tokenizer_cache_dir

    texts = [train_texts[i] for i in range(len(train_texts))]
    return {v: tok.train_tokenizer(texts, tok.TokenizerSpec(vocab_size=v, seed=config.data.tokenizer_seed),
                                   cache_dir=tokenizer_cache_dir()) for v in vocab_sizes}


def measure_f(tokenizers: dict[int, Any], texts: Sequence[str]) -> tuple[dict[int, float], FCurve]:
    """Tokens per character on held-out text for each V, and the fitted f(V) (the paper's f with < 3 sizes)."""
    held_out = [texts[i] for i in range(len(texts))]
    measured = {v: measure_tokens_per_char(t, held_out) for v, t in sorted(tokenizers.items())}
    if len(measured) < 3:
        return measured, PAPER_F
    return measured, fit_tokens_per_char(list(measured), list(measured.values()))


def log_unigram(tokenizer: Any, train_texts: Sequence[str], cache: Path) -> np.ndarray:
    """log p_unigram over the training split's targets (unseen ids count 1), cached per tokenizer.

    Targets are what the model is scored on: each document's tokens and then its EOS (lm_core.data.packing;
    BOS is only ever an input), so EOS counts once per document. Left out, it would count 1 in all and every
    document end would add log(1 / total) ≈ -15 nats to L_u."""
    if cache.exists():
        return np.load(cache)
    ids = [np.append(np.asarray(tokenizer.encode(train_texts[i]), np.int64), tokenizer.eos_id)
           for i in range(len(train_texts))]
    distribution = unigram_distribution(ids, tokenizer.vocab_size)
    values = np.log(distribution).astype(np.float32)
    save_npy_atomically(cache, values)  # every process of a multi-host sweep writes the same table
    return values


def train_run(base: ml_collections.ConfigDict, planned: PlannedRun, run_dir: Path, log_p: np.ndarray
              ) -> list[dict[str, float]]:
    """Train one run (or resume it) and return its (C, L_u, ...) points along training."""
    from lm_core.trainer import train_to_end

    result_file = run_dir / "result.json"
    if not result_file.exists():
        train_to_end(run_config(base, planned), run_dir, sweep_run_task(base, log_p))  # a signal: no result.json
        if not is_main_process():  # process 0 writes metrics.jsonl, the result and the report
            return []
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
        write_json_atomically(result_file, {"run": planned.as_row(), "eval_rows": rows}, indent=1)
    return json.loads(result_file.read_text())["eval_rows"]


def is_main_process() -> bool:
    return jax.process_index() == 0


def run_sweep(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Everything `python -m experiments.vocab_scaling.sweep` does; returns the path of REPORT.md."""
    from experiments.vocab_scaling.report import write_report
    from lm_core.data import get_text_source

    workdir = workdir.absolute()
    groups = parse_groups(config.sweep.groups)
    vocab_sizes = sorted(int(v) for v in config.sweep.vocab_sizes)
    budgets = sorted(float(c) for c in config.sweep.budgets)
    source = get_text_source(config.data.source, data_dir=config.data.data_dir or None)
    train_texts, validation_texts = source.split("train"), source.split("validation")
    train_chars = sum(len(train_texts[i]) for i in range(len(train_texts)))

    print(f"training {len(vocab_sizes)} tokenizers (cached) and measuring f(V)", flush=True)
    tokenizers = vocabulary_tokenizers(config, vocab_sizes, train_texts)
    measured, f_curve = measure_f(tokenizers, validation_texts)
    tokens_per_step = config.data.global_batch_size * config.data.seq_len
    plan = plan_sweep(groups, vocab_sizes, budgets, f_curve, tokens_per_step=tokens_per_step,
                      min_steps=config.sweep.min_steps, extra_seeds=tuple(config.sweep.get("extra_seeds", ())),
                      seeded_vocab_sizes=tuple(config.sweep.get("seeded_vocab_sizes", ())))
    workdir.mkdir(parents=True, exist_ok=True)

    points: list[dict[str, Any]] = []
    started = time.monotonic()
    for index, planned in enumerate(plan, start=1):
        done = index - 1
        eta = (time.monotonic() - started) / done * (len(plan) - done) if done else math.nan
        print(f"== run {index} of {len(plan)}: {planned.name} (N_nv={planned.n_nv:,}, V={planned.vocab_size}, "
              f"C={planned.flops_budget:.2e}, {planned.steps} steps) | sweep ETA {format_seconds(eta)}", flush=True)
        log_p = log_unigram(tokenizers[planned.vocab_size], train_texts,
                            workdir / "unigram" / f"V{planned.vocab_size}_targets.npy")
        rows = train_run(config, planned, workdir / "runs" / planned.name, log_p)
        run_points = isoflop_points(rows, planned.n_nv, planned.vocab_size, planned.group.d_model, f_curve)
        for i, point in enumerate(run_points):
            points.append({**planned.as_row(), **point, "N_v": planned.n_v, "epochs": point["H"] / train_chars,
                           "final": int(i == len(run_points) - 1)})
    if not is_main_process():
        return workdir / "REPORT.md"  # written by process 0
    write_points(workdir / "results.csv", points)
    return write_report(workdir, config, plan, points, measured, f_curve)


def write_points(path: Path, points: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=POINT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
