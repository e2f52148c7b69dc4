"""Time to first token of base-only, auxiliary-only and KVP models on this machine, next to the FLOPs estimate.

    python -m experiments.kv_prediction.ttft [--workdir=DIR] [--config=experiments/configs/kvp_tiny.py]
        [--variant=lp0.25] [--batch=1] [--prompt_len=256] [--repeats=20] [--json]

With a trained --workdir the models are loaded from it; without one they get random weights of the configured
sizes (timing does not depend on weights). TTFT = host prompt ids -> first token on the host, compiled and warmed
up, median of repeats. `--json` prints one object with base_ttft_s, aux_ttft_s, kvp_ttft_s, flops_reduction and
measured_reduction (base TTFT / KVP TTFT). The paper's CPU measurements reached 0.65-0.75 of the FLOPs reduction.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from experiments.cli import run

DEFAULT_CONFIG = str(Path(__file__).parents[1] / "configs" / "kvp_tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "KV prediction config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained kv_prediction workdir (optional).")
_VARIANT = flags.DEFINE_string("variant", None, "Auxiliary spec (default: every variant of the config).")
_BATCH = flags.DEFINE_integer("batch", 1, "Prompts per batch.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 256, "Prompt length in tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repeats (median reported).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def main(argv: list[str]) -> None:
    del argv
    from experiments.kv_prediction.evaluation import measure_ttft
    from experiments.kv_prediction.models import load_or_build
    from lm_core.errors import UserError

    config = _CONFIG.value
    if _PROMPT_LEN.value < 2 or _BATCH.value < 1:
        raise UserError(f"--prompt_len={_PROMPT_LEN.value} must be >= 2 and --batch={_BATCH.value} >= 1")
    if _PROMPT_LEN.value > config.model.max_seq_len:
        raise UserError(f"--prompt_len={_PROMPT_LEN.value} exceeds the base model's max_seq_len="
                        f"{config.model.max_seq_len}")
    variants = [_VARIANT.value] if _VARIANT.value else list(config.kvp.variants)
    results = {}
    for spec in variants:
        model = load_or_build(config, Path(_WORKDIR.value) if _WORKDIR.value else None, spec)
        results[spec] = measure_ttft(model, _PROMPT_LEN.value, _BATCH.value, _REPEATS.value)
    if _JSON.value:
        print(json.dumps(results[variants[0]] if len(variants) == 1 else {**results[variants[0]], "variants": results}))
        return
    for spec, r in results.items():
        print(f"{spec}: base {r['base_ttft_s'] * 1e3:.1f} ms, aux-only {r['aux_ttft_s'] * 1e3:.1f} ms, "
              f"KVP {r['kvp_ttft_s'] * 1e3:.1f} ms | reduction measured {r['measured_reduction']:.2f}x vs FLOPs "
              f"{r['flops_reduction']:.2f}x ({r['measured_over_flops']:.2f} of it; target >= 0.9)")


if __name__ == "__main__":
    run(main)
