"""Registered reproduction of Horton et al. 2024: train the KVP family, evaluate it, write the Pareto report."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.registry import Section

NAME = "kv_prediction"
TITLE = "kv_prediction: KV Prediction for Improved Time to First Token (Horton et al. 2024)"


def run(scale: str, workdir: Path) -> Section:
    from experiments.configs import kvp_tiny
    from experiments.kv_prediction.pipeline import train_all
    from experiments.kv_prediction.report import RESULTS_FILE, evaluate_and_report

    config = kvp_tiny.get_config("demo" if scale == "demo" else "tiny")
    if scale == "small":  # a wider base for a GPU or a patient CPU
        config.model.update(dict(d_model=256, num_layers=8, num_heads=8, num_kv_heads=4, d_ff=768))
        config.steps, config.kvp.steps = 2000, 1000
        config.kvp.variants = ("lp0.75", "lp0.50", "lp0.25", "c128x4", "c64x2")
    train_all(config, workdir)
    rows, report = evaluate_and_report(config, workdir)
    claims = json.loads((workdir / RESULTS_FILE).read_text())["claims"]
    return Section(TITLE, report, summary(rows, claims) + " Pareto plots in `kv_prediction/pareto_*.png`.")


def summary(rows: list[dict], claims: list[str]) -> str:
    """The headline claim's line (KVP vs its auxiliary alone) and the base's score; at the demo scale, the line
    saying it shows nothing."""
    if claims[0].startswith("This is the demo scale"):
        return claims[0]
    base = next(r for r in rows if r["kind"] == "base")
    task = next(iter(base["tasks"]))
    return f"base {100 * base['tasks'][task]['exact_match']:.0f}% {task} exact match; {claims[0]}"
