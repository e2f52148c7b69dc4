"""Evaluate a trained KV-prediction workdir: accuracy and perplexity vs TTFT (FLOPs and measured), Pareto table.

    python -m experiments.kv_prediction.evaluate --workdir=DIR [--json] [--config=FILE --config.kvp.x=...]

For the base, every aux-only baseline and every KVP model, each through its own serving path:
- exact match of greedy answers to held-out retrieval questions (the answer is only in the prompt);
- continuation perplexity of held-out corpus text (for KVP: the prompt through the predicted cache, the
  continuation scored by the base with its true K,V appended);
- TTFT FLOPs and measured TTFT at kvp.ttft_prompt_len.
Writes DIR/REPORT.md (Pareto table and findings), DIR/evaluation.json and the plots DIR/pareto_flops.png
(accuracy and perplexity vs TTFT FLOPs) and DIR/pareto_ttft.png (vs measured TTFT). The config is the one
train saved (DIR/kvp_config.json) unless --config is given. `--json` prints {"rows": [...]}.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from experiments.cli import flag_given, run

DEFAULT_CONFIG = str(Path(__file__).parents[1] / "configs" / "kvp_tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "KV prediction config (default: the workdir's).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.kv_prediction.train.",
                               required=True)
_JSON = flags.DEFINE_bool("json", False, "Print the table rows as one JSON object.")


def main(argv: list[str]) -> None:
    del argv
    from experiments.kv_prediction.pipeline import load_config
    from experiments.kv_prediction.report import evaluate_and_report

    workdir = Path(_WORKDIR.value)
    config = _CONFIG.value if flag_given("config") else load_config(workdir)
    rows, report = evaluate_and_report(config, workdir)
    print(json.dumps({"rows": rows}) if _JSON.value else f"wrote {report}", flush=True)


if __name__ == "__main__":
    run(main)
