"""Evaluate a trained KV-prediction workdir and write its Pareto table, plots, claims and REPORT.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from experiments.kv_prediction.claims import claim_lines
from experiments.kv_prediction.evaluation import (
    EvalData,
    evaluation_data,
    fmt_flops,
    measure_ttft,
    params_of,
    score_path,
    score_pruning,
    score_true_question,
)
from experiments.kv_prediction.models import check_base_matches, load_family
from experiments.kv_prediction.pipeline import resolve_variants
from experiments.kv_prediction.task import base_dir, kvp_config_from
from experiments.plots import plt  # headless matplotlib, configured there
from kv_prediction.cost import prefill_flops
from kv_prediction.serving import KVPPath, NullCachePath, PlainPath
from lm_core.atomic_files import write_json_atomically
from lm_core.trained_runs import load_trained_model

RESULTS_FILE = "evaluation.json"
KINDS = ("base", "aux_only", "kvp", "pruning", "null_cache", "true_question")
CONTROLS = ("null_cache", "true_question")  # diagnostics, not ways to serve a prompt: never on the Pareto front
LABELS = {"base": "base only", "aux_only": "aux only", "kvp": "KVP", "pruning": "random pruning",
          "null_cache": "null cache", "true_question": "KVP + base K,V on the question"}
STYLE = {"base": ("black", "*"), "aux_only": ("tab:orange", "s"), "kvp": ("tab:blue", "o"),
         "pruning": ("tab:green", "v"), "null_cache": ("tab:gray", "x"), "true_question": ("tab:purple", "+")}
TASK_TITLES = {"closed_book": "closed-book exact match (%)", "recall": "recall exact match (%)"}
PRETRAINED_NOTE = ", pretrained as an LM for as many steps as the base"


def _row(name: str, kind: str, config, scores: dict[str, Any], flops: float, base_flops: float,
         ttft_s: float | None, base_ttft_s: float) -> dict[str, Any]:
    """`base_ttft_s` is the base timed in the same session as this model (the ratio is what is comparable)."""
    return {"name": name, "kind": kind, "layers": config.num_layers, "d_model": config.d_model,
            "params": params_of(config), **scores, "ttft_flops": flops, "flops_reduction": base_flops / flops,
            "ttft_s": ttft_s, "measured_reduction": None if ttft_s is None else base_ttft_s / ttft_s}


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: Path) -> tuple[list[dict[str, Any]], EvalData]:
    """One row per model: the base and its null-cache control, then per auxiliary aux only, KVP and random pruning
    at KVP's TTFT FLOPs; each with its task scores, perplexity and TTFT."""
    kvp = kvp_config_from(config)
    workdir = workdir.absolute()
    check_base_matches(config, workdir)
    variants = resolve_variants(config)
    base, tokenizer, _ = load_trained_model(base_dir(workdir))
    data = evaluation_data(config, tokenizer)
    n, answer_tokens = kvp.ttft_prompt_len, kvp.answer_tokens
    rows: list[dict[str, Any]] = []
    for index, aux in enumerate(variants):
        print(f"== evaluating {index + 1} of {len(variants)}: {aux.name}", flush=True)
        family = load_family(config, workdir, aux, base)
        timing = measure_ttft(family, n, kvp.ttft_batch, kvp.ttft_repeats)
        base_flops, base_s = timing["base_flops"], timing["base_ttft_s"]
        if index == 0:
            rows.append(_row("base", "base", base.config, score_path(PlainPath(base), tokenizer, data, answer_tokens),
                             base_flops, base_flops, base_s, base_s))
            rows.append(_row("base", "null_cache", base.config,
                             score_path(NullCachePath(base), tokenizer, data, answer_tokens),
                             timing["null_cache_flops"],
                             base_flops, None, base_s))
        rows.append(_row(aux.name, "aux_only", aux.config,
                         score_path(PlainPath(family.aux_only), tokenizer, data, answer_tokens),
                         prefill_flops(aux.config, n), base_flops, timing["aux_ttft_s"], base_s))
        rows.append(_row(aux.name, "kvp", aux.config, score_path(KVPPath(family.kvp), tokenizer, data, answer_tokens),
                         timing["kvp_flops"], base_flops, timing["kvp_ttft_s"], base_s))
        pruning = score_pruning(base, tokenizer, data, answer_tokens, timing["pruning_keep_fraction"])
        rows.append({**_row(aux.name, "pruning", base.config, pruning, timing["pruning_flops"], base_flops,
                            timing["pruning_ttft_s"], base_s), "keep_fraction": timing["pruning_keep_fraction"]})
        if "closed_book" in data.tasks:
            rows.append(_row(aux.name, "true_question", aux.config,
                             score_true_question(family.kvp, tokenizer, data, answer_tokens), timing["kvp_flops"],
                             base_flops, None, base_s))
    mark_pareto(rows, next(iter(data.tasks)))
    return rows, data


def mark_pareto(rows: list[dict[str, Any]], task: str) -> None:
    """rows[i]["pareto"]: no other servable model is at least as accurate on `task` with fewer TTFT FLOPs (or more
    accurate with as few); the CONTROLS are not ways to serve."""
    served = [r for r in rows if r["kind"] not in CONTROLS]

    def beats(other: dict[str, Any], row: dict[str, Any]) -> bool:
        a, b = other["tasks"][task]["exact_match"], row["tasks"][task]["exact_match"]
        return (other["ttft_flops"] <= row["ttft_flops"] and a >= b
                and (other["ttft_flops"] < row["ttft_flops"] or a > b))

    for row in rows:
        row["pareto"] = row["kind"] not in CONTROLS and not any(beats(o, row) for o in served if o is not row)


def models_list(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (model, task): what evaluate --json and evaluation.json hold under "models"."""
    entries = []
    for row in rows:
        for task, score in row["tasks"].items():
            entries.append({"name": row["name"], "kind": row["kind"], "task": task, **score,
                            "ttft_flops": row["ttft_flops"], "ttft_s": row["ttft_s"],
                            "flops_reduction": row["flops_reduction"], "measured_reduction": row["measured_reduction"],
                            "perplexity": row["perplexity"], "params": row["params"]})
    return entries


def pareto_plot(path: Path, rows: list[dict[str, Any]], x_key: str, xlabel: str, x_scale: float = 1.0) -> Path:
    """Exact match per task and continuation perplexity against a TTFT measure; one marker per model."""
    tasks = list(rows[0]["tasks"])
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5.2 * (len(tasks) + 1), 4.2), dpi=120)
    panels = [(task, TASK_TITLES[task], 100.0) for task in tasks] + [(None, "continuation perplexity", 1.0)]
    for ax, (task, ylabel, y_scale) in zip(axes, panels, strict=True):
        for kind in KINDS:
            chosen = [r for r in rows if r["kind"] == kind and r[x_key] is not None
                      and (r["perplexity"] is not None if task is None else task in r["tasks"])]
            if not chosen:
                continue
            xs = [x_scale * r[x_key] for r in chosen]
            ys = [y_scale * (r["tasks"][task]["exact_match"] if task else r["perplexity"]) for r in chosen]
            color, marker = STYLE[kind]
            ax.scatter(xs, ys, color=color, marker=marker, s=60 if kind == "base" else 36, label=LABELS[kind],
                       zorder=3)
            for r, x, y in zip(chosen, xs, ys, strict=True):
                if kind in ("aux_only", "kvp"):
                    ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _score_cell(row: dict[str, Any], task: str) -> str:
    if task not in row["tasks"]:
        return "–"
    score = row["tasks"][task]
    low, high = score["exact_match_ci95"]
    return f"{100 * score['exact_match']:.1f}% [{100 * low:.0f}-{100 * high:.0f}]"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    tasks = list(rows[0]["tasks"])
    lines = ["| model | kind | params | " + " | ".join(f"{t} exact match [95%]" for t in tasks)
             + " | perplexity | TTFT FLOPs | FLOPs reduction | TTFT (ms) | measured reduction | Pareto |",
             "|---|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        ppl = "–" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
        ttft = "–" if r["ttft_s"] is None else f"{1e3 * r['ttft_s']:.2f}"
        measured = "–" if r["measured_reduction"] is None else f"{r['measured_reduction']:.2f}x"
        name = r["name"] + (f" (keeps {100 * r['keep_fraction']:.0f}%)" if r["kind"] == "pruning" else "")
        lines.append(f"| {name} | {LABELS[r['kind']]} | {r['params']:,} | "
                     + " | ".join(_score_cell(r, t) for t in tasks)
                     + f" | {ppl} | {fmt_flops(r['ttft_flops'])} | {r['flops_reduction']:.2f}x | {ttft} | "
                     f"{measured} | {'✓' if r['pareto'] else ''} |")
    return lines


def method_lines(config: ml_collections.ConfigDict, rows: list[dict[str, Any]], data: EvalData) -> list[str]:
    kvp, model = kvp_config_from(config), config.model
    counts = ", ".join(f"{len(q)} {task}" for task, q in data.tasks.items())
    return [
        "A small auxiliary model reads the prompt, a linear predictor maps its K,V to the frozen base model's "
        "cache, and the base generates from there: the first token costs about the auxiliary's prefill. The claim "
        "to check: at equal TTFT cost, KVP is more accurate than the auxiliary model used alone.", "",
        f"Base: {model.num_layers} layers, d_model={model.d_model}, {rows[0]['params']:,} parameters, trained "
        f"{config.steps} LM steps on `{config.data.source}`, then frozen. Each auxiliary (LP = layer-pruned copy of "
        f"the base, C = canonical smaller model{PRETRAINED_NOTE if kvp.pretrain_canonical else ''}) is trained "
        f"{kvp.steps} steps twice from the same weights on the same data: as KVP (auxiliary + predictor, "
        f"λ_B={kvp.lambda_base}, λ_A={kvp.lambda_aux}, "
        f"λ_C={'1/n_base' if kvp.lambda_consistency is None else kvp.lambda_consistency}) and alone (aux only).", "",
        f"- **Exact match** ({counts} questions, greedy answers through each model's serving path, 95% Wilson "
        "intervals): `closed_book` asks about the fact table the models saw in training, 1-shot, in a phrasing no "
        "training document uses (the answer is in the weights); `recall` asks for a fact stated only in the prompt.",
        "- **Controls**: random pruning = the base reading a random subset of each prompt at the same TTFT FLOPs as "
        "that auxiliary's KVP (the paper's simplest baseline); null cache = the base decoding from a cache of zeros "
        "(what needs no prompt); KVP + base K,V on the question = a diagnostic, not a way to serve: the KVP "
        "model's predicted cache with the base's own K,V on the asked closed-book question.",
        f"- **Perplexity**: {len(data.windows)} held-out corpus windows of {kvp.prompt_tokens} prompt + "
        f"{kvp.continuation_tokens} continuation tokens; the prompt goes through the serving path, the continuation "
        "is scored as it would be generated.",
        f"- **TTFT** at a {kvp.ttft_prompt_len}-token prompt, batch {kvp.ttft_batch}: analytic FLOPs and the median "
        f"of {kvp.ttft_repeats} timed runs of each compiled first-token function on this machine; reductions are "
        "relative to the base timed in the same session.", ""]


def write_report(workdir: Path, config: ml_collections.ConfigDict, rows: list[dict[str, Any]], data: EvalData
                 ) -> Path:
    kvp = kvp_config_from(config)
    workdir = workdir.absolute()
    claims = claim_lines(rows, data.chance, config)
    results = {"models": models_list(rows), "rows": rows, "chance": data.chance, "claims": claims}
    write_json_atomically(workdir / RESULTS_FILE, results)
    pareto_plot(workdir / "pareto_flops.png", rows, "ttft_flops", f"TTFT FLOPs ({kvp.ttft_prompt_len}-token prompt)")
    pareto_plot(workdir / "pareto_ttft.png", rows, "ttft_s",
                f"measured TTFT on this machine (ms, {kvp.ttft_prompt_len}-token prompt)", 1e3)
    lines = ["# KV prediction (Horton et al. 2024) — Pareto table", "", *method_lines(config, rows, data),
             *table_lines(rows), "",
             f"Pareto ({next(iter(data.tasks))}): no other servable model reaches at least this exact match with "
             "fewer TTFT FLOPs.", "",
             "![accuracy vs TTFT FLOPs](pareto_flops.png)", "", "![accuracy vs measured TTFT](pareto_ttft.png)", "",
             "## The paper's claims, one line each", "", *(f"- {line}" for line in claims)]
    report = workdir / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def evaluate_and_report(config: ml_collections.ConfigDict, workdir: Path) -> tuple[list[dict[str, Any]], Path]:
    rows, data = evaluate_workdir(config, workdir)
    return rows, write_report(workdir, config, rows, data)
