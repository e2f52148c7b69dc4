"""Registered reproduction of Horton et al. 2024: train the KVP family, evaluate it, write the Pareto report."""

from __future__ import annotations

from pathlib import Path

from experiments.registry import Section

NAME = "kv_prediction"
TITLE = "kv_prediction: KV Prediction for Improved Time to First Token (Horton et al. 2024)"


def run(scale: str, workdir: Path) -> Section:
    from experiments.configs import kvp_tiny
    from experiments.kv_prediction.pipeline import train_all
    from experiments.kv_prediction.report import evaluate_and_report

    config = kvp_tiny.get_config("demo" if scale == "demo" else "tiny")
    if scale == "small":  # a wider base for a GPU or a patient CPU
        config.model.update(dict(d_model=256, num_layers=8, num_heads=8, num_kv_heads=4, d_ff=768))
        config.steps, config.kvp.steps = 2000, 1000
        config.kvp.variants = ("lp0.75", "lp0.50", "lp0.25", "c128x4", "c64x2")
    train_all(config, workdir)
    rows, report = evaluate_and_report(config, workdir)
    return Section(TITLE, report, summary(rows) + ". Pareto plots in `kv_prediction/pareto_*.png`.")


def summary(rows: list[dict]) -> str:
    """One clause per auxiliary: KVP vs the same auxiliary alone, and what KVP saves on the first token."""
    base = rows[0]
    by_key = {(r["variant"], r["kind"]): r for r in rows}
    clauses = [f"base {100 * base['exact_match']:.0f}% retrieval exact match"]
    for (variant, kind), kvp in by_key.items():
        if kind == "KVP":
            alone = by_key[(variant, "aux only")]
            clauses.append(f"{variant}: KVP {100 * kvp['exact_match']:.0f}% vs aux alone "
                           f"{100 * alone['exact_match']:.0f}% at {kvp['flops_reduction']:.1f}x fewer TTFT FLOPs "
                           f"({kvp['measured_reduction']:.1f}x measured)")
    return "; ".join(clauses)
