"""Evaluate a trained KV-prediction workdir: accuracy and perplexity vs TTFT (FLOPs and measured), Pareto table.

    python -m experiments.kv_prediction.evaluate --config=experiments/configs/kvp_tiny.py --workdir=DIR [--json]

For base-only, every aux-only baseline and every KVP model: continuation perplexity and top-1 accuracy on held-out
text (prompt-conditioned), TTFT FLOPs and measured TTFT at kvp.ttft_prompt_len. Writes DIR/REPORT.md with the
Pareto table and plots (accuracy vs TTFT FLOPs, accuracy vs measured TTFT).
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from experiments.cli import run

DEFAULT_CONFIG = str(Path(__file__).parents[1] / "configs" / "kvp_tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "KV prediction config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.kv_prediction.train.",
                               required=True)
_JSON = flags.DEFINE_bool("json", False, "Print the table rows as one JSON object.")


def main(argv: list[str]) -> None:
    del argv
    from experiments.kv_prediction.report import evaluate_and_report

    rows, report = evaluate_and_report(_CONFIG.value, Path(_WORKDIR.value))
    print(json.dumps({"rows": rows}) if _JSON.value else f"wrote {report}")


if __name__ == "__main__":
    run(main)
