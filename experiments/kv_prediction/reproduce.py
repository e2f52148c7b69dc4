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
    kvp_rows = [r for r in rows if r["kind"] == "KVP"]
    summary = "; ".join(
        f"{r['model']}: KVP {100 * r['accuracy']:.1f}% vs aux-only "
        f"{100 * next(a for a in rows if a['model'] == r['model'] and a['kind'] == 'aux only')['accuracy']:.1f}% "
        f"top-1 at {r['flops_reduction']:.1f}x fewer TTFT FLOPs ({r['measured_reduction']:.1f}x measured)"
        for r in kvp_rows)
    return Section(TITLE, report, summary + ". Pareto plots in `kv_prediction/pareto_*.png`.")
