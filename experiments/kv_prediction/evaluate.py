"""Evaluate a trained KV-prediction workdir: accuracy and perplexity vs TTFT (FLOPs and measured), Pareto table.

    python -m experiments.kv_prediction.evaluate --workdir=DIR [--json] [--config=FILE --config.kvp.x=...]

For the base, every aux-only baseline and every KVP model, each through its own serving path, and two controls
built from the base (random token pruning at each KVP's TTFT FLOPs, and a cache of zeros):
- exact match of greedy answers, with a 95% interval, on each task the training data holds: `closed_book` (the
  fact table of a knowledge: source, asked in a wording training never used; the answer is in the weights) and
  `recall` (held-out retrieval: documents; the answer is only in the prompt);
- continuation perplexity of held-out corpus text (for KVP: the prompt through the predicted cache, the
  continuation scored by the base with its true K,V appended);
- TTFT FLOPs and measured TTFT at kvp.ttft_prompt_len.
Writes DIR/REPORT.md (Pareto table and one line per paper claim), DIR/evaluation.json and the plots
DIR/pareto_flops.png (accuracy and perplexity vs TTFT FLOPs) and DIR/pareto_ttft.png (vs measured TTFT). The config
is the one train saved (DIR/kvp_config.json) unless --config is given. `--json` prints evaluation.json: "models"
(one entry per model and task: name, kind = base / aux_only / kvp / pruning / null_cache, task, exact_match,
exact_match_ci95, questions, ttft_flops, ttft_s, ...), "rows" (one per model), "chance" and "claims".
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from experiments.cli import define_config_file, flag_given, run

DEFAULT_CONFIG = str(Path(__file__).parents[1] / "configs" / "kvp_tiny.py")
_CONFIG = define_config_file("config", DEFAULT_CONFIG, "KV prediction config (default: the workdir's).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.kv_prediction.train.",
                               required=True)
_JSON = flags.DEFINE_bool("json", False, "Print the table rows as one JSON object.")


def main(argv: list[str]) -> None:
    del argv
    from experiments.kv_prediction.pipeline import load_config
    from experiments.kv_prediction.report import RESULTS_FILE, evaluate_and_report

    workdir = Path(_WORKDIR.value)
    config = _CONFIG.value if flag_given("config") else load_config(workdir)
    _, report = evaluate_and_report(config, workdir)
    print((workdir / RESULTS_FILE).read_text().replace("\n", " ") if _JSON.value else f"wrote {report}", flush=True)


if __name__ == "__main__":
    run(main)
