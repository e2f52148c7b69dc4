"""The lm_core reproduction: train the tiny LM on the built-in corpus, plot its loss curves, sample from it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from experiments.plots import line_plot
from experiments.registry import Section
from lm_core.metrics import read_metrics

NAME = "lm"
TITLE = "lm_core: a Llama-style LM on the built-in corpus"
CONFIG_FILE = Path(__file__).parent / "configs" / "lm_tiny.py"
PROMPTS = ["The dictionary", "Return a new", "This module provides"]


def load_config(scale: str):
    spec = importlib.util.spec_from_file_location("lm_tiny_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config({"demo": "demo", "tiny": "tiny", "small": "small"}[scale])


def run(scale: str, workdir: Path) -> Section:
    from lm_core.generation import SamplingConfig, generate_text
    from lm_core.trained_runs import load_trained_model
    from lm_core.trainer import train

    config = load_config(scale)
    result = train(config, workdir / "run")
    rows = read_metrics(workdir / "run" / "metrics.jsonl")
    train_curve = ([r["step"] for r in rows], [r["loss"] for r in rows])
    eval_rows = [r for r in rows if "eval_loss" in r]
    eval_curve = ([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows])
    plot = line_plot(workdir / "loss_curve.png", {"train": train_curve, "validation": eval_curve},
                     title="Tiny LM on the built-in corpus", xlabel="step", ylabel="loss (nats/token)")
    model, tokenizer, _ = load_trained_model(workdir / "run")
    greedy = SamplingConfig(max_new_tokens=40, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    samples = [p + c for p, c in zip(PROMPTS, generate_text(model, tokenizer, PROMPTS, greedy), strict=True)]
    last = eval_rows[-1] if eval_rows else rows[-1]
    model = result.model_config
    lines = [
        f"# {TITLE}", "",
        f"Model: {model.num_layers} layers, d_model={model.d_model}, {model.num_heads} heads "
        f"({model.num_kv_heads} KV heads), vocabulary {model.vocab_size} (sentencepiece BPE trained on the corpus), "
        f"sequence length {config.data.seq_len}, batch {config.data.global_batch_size}, {config.steps} steps.", "",
        "| step | train loss | validation loss | validation bits/char | tokens/s | MFU |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in eval_rows:
        lines.append(f"| {r['step']} | {r['loss']:.3f} | {r['eval_loss']:.3f} | {r.get('eval_bpc', math.nan):.3f} "
                     f"| {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |")
    lines += ["", f"A uniform guess scores ln({model.vocab_size}) = {math.log(model.vocab_size):.2f} nats/token.", "",
              "![loss curve](loss_curve.png)", "", "## Greedy samples", ""]
    lines += [f"- `{text!r}`" for text in samples]
    report = workdir / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    summary = (f"Final validation loss {last.get('eval_loss', last['loss']):.3f} nats/token "
               f"({last.get('eval_bpc', math.nan):.3f} bits/char) after {result.step} steps; "
               f"loss curve in `{plot.relative_to(workdir.parent)}`.")
    return Section(TITLE, report, summary)
