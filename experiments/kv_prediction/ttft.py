"""Time to first token of base-only, aux-only and KVP models on this machine, next to the FLOPs estimate.

    python -m experiments.kv_prediction.ttft [--workdir=DIR] [--config=experiments/configs/kvp_tiny.py]
        [--variant=lp0.50] [--batch=1] [--prompt_len=256] [--repeats=20] [--json] [--flops_only]

TTFT = host prompt ids -> first token on the host, through each model's compiled prefill (base-only, aux-only:
the model reads the prompt and fills its cache; KVP: the aux reads prompt[:-1], the predictor writes the base's
cache, the base runs the last token, all in one compiled function), warmed up, the median of --repeats runs, the
three models timed in turn. With a trained --workdir its models and config are used; without one, random weights
of the configured sizes (timing does not depend on weights; --config.model.max_seq_len=2048 allows long prompts).
`--json` prints one object: base_ttft_s, aux_ttft_s, kvp_ttft_s, flops_reduction (base / KVP TTFT FLOPs),
measured_reduction (base TTFT / KVP TTFT), measured_over_flops, ... of the first variant, and "variants" with
every variant's. This project's target (benchmarks.ttft.TARGET) is measured_over_flops >= 0.9 at prompts of 256+
tokens; the paper measured 0.65-0.75 on an Apple M2 CPU. On a busy machine, use more --repeats.

`--flops_only` times nothing (no weights are built, so paper sizes take a second) and prints per variant:
flops_reduction (this config's TTFT path at --prompt_len), per_token_reduction (the paper's convention,
t_B(1) / t_A(1) at 2 FLOPs per weight including the output layer) and, for the paper's five auxiliaries of the
1.1B base, openelm_reduction (that convention on OpenELM's real layer-wise-scaled shapes, `kv_prediction.openelm`)
next to paper_reduction (the paper's number), e.g.
    python -m experiments.kv_prediction.ttft --config=experiments/configs/kvp_paper.py --prompt_len=1024 \
        --flops_only
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from experiments.cli import define_config_file, flag_given, run

DEFAULT_CONFIG = str(Path(__file__).parents[1] / "configs" / "kvp_tiny.py")
_CONFIG = define_config_file("config", DEFAULT_CONFIG, "KV prediction config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A kv_prediction workdir (optional: trained models and config).")
_VARIANT = flags.DEFINE_string("variant", None, "Auxiliary spec (default: every kvp.variants entry).")
_BATCH = flags.DEFINE_integer("batch", 1, "Prompts per batch.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 256, "Prompt length in tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repeats per model (the median is reported).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
_FLOPS_ONLY = flags.DEFINE_bool("flops_only", False, "Print FLOPs reductions only (ours, the paper's convention, "
                                "OpenELM's shapes and the paper's numbers); time nothing.")


def flops_rows(base, variants, prompt_len: int) -> dict[str, dict]:
    """Per variant: our TTFT-path FLOPs reduction, the paper's per-token convention, and OpenELM's / the paper's
    numbers where the variant is one of the paper's."""
    from kv_prediction import openelm
    from kv_prediction.cost import ttft_flops
    from lm_core.flops import flops_per_token

    rows = {}
    for aux in variants:
        per_token = flops_per_token(base, 1).forward / flops_per_token(aux.config, 1).forward
        row = {"variant": aux.spec, "prompt_len": prompt_len,
               "flops_reduction": ttft_flops(base, aux.config, prompt_len).reduction,
               "per_token_reduction": per_token}
        if aux.spec in openelm.PAPER_REDUCTIONS and (base.num_layers, base.d_model) == openelm.SIZES["1.1B"]:
            row["openelm_reduction"] = openelm.paper_flops_reduction(aux.spec)
            row["paper_reduction"] = openelm.PAPER_REDUCTIONS[aux.spec]
        rows[aux.spec] = row
    return rows


def print_flops(rows: dict[str, dict]) -> None:
    for spec, row in rows.items():
        paper = (f" | OpenELM shapes {row['openelm_reduction']:.2f}x, paper {row['paper_reduction']:.2f}x"
                 if "paper_reduction" in row else "")
        print(f"{spec}: TTFT FLOPs reduction {row['flops_reduction']:.2f}x at {row['prompt_len']} tokens, per-token "
              f"{row['per_token_reduction']:.2f}x{paper}", flush=True)


def main(argv: list[str]) -> None:
    del argv
    from experiments.kv_prediction.evaluation import measure_ttft
    from experiments.kv_prediction.models import random_family, trained_family
    from experiments.kv_prediction.pipeline import load_config, resolve_variants
    from experiments.kv_prediction.task import CONFIG_FILE
    from kv_prediction.variants import resolve_spec
    from lm_core.errors import UserError
    from lm_core.run_config import model_config_from

    workdir = Path(_WORKDIR.value) if _WORKDIR.value else None
    if workdir is not None and not workdir.is_dir():  # a typo must not fall back to timing random weights
        raise UserError(f"--workdir={workdir} does not exist; valid: a workdir of experiments.kv_prediction.train, "
                        "or no --workdir to time random weights of the configured sizes")
    use_saved = workdir is not None and (workdir / CONFIG_FILE).is_file() and not flag_given("config")
    config = load_config(workdir) if use_saved else _CONFIG.value
    base = model_config_from(config)
    if _PROMPT_LEN.value < 2 or _BATCH.value < 1 or _REPEATS.value < 1:
        raise UserError(f"--prompt_len={_PROMPT_LEN.value} must be >= 2, --batch={_BATCH.value} >= 1 and "
                        f"--repeats={_REPEATS.value} >= 1")
    if _PROMPT_LEN.value > base.max_seq_len:
        raise UserError(f"--prompt_len={_PROMPT_LEN.value} exceeds the base model's max_seq_len={base.max_seq_len}; "
                        "valid: a shorter prompt, or (without a trained workdir) --config.model.max_seq_len=N")
    variants = [resolve_spec(base, _VARIANT.value)] if _VARIANT.value else resolve_variants(config)
    if _FLOPS_ONLY.value:
        rows = flops_rows(base, variants, _PROMPT_LEN.value)
        if _JSON.value:
            print(json.dumps({"variants": rows}), flush=True)
        else:
            print_flops(rows)
        return
    results = {}
    for aux in variants:
        family = (trained_family(config, workdir, aux) if workdir is not None else None) or random_family(config, aux)
        results[aux.spec] = measure_ttft(family, _PROMPT_LEN.value, _BATCH.value, _REPEATS.value)
    first = results[variants[0].spec]
    if _JSON.value:
        print(json.dumps({**first, "variants": results}), flush=True)
        return
    for spec, r in results.items():
        print(f"{spec}: base {r['base_ttft_s'] * 1e3:.2f} ms, aux-only {r['aux_ttft_s'] * 1e3:.2f} ms, KVP "
              f"{r['kvp_ttft_s'] * 1e3:.2f} ms | KVP reduction: measured {r['measured_reduction']:.2f}x, FLOPs "
              f"{r['flops_reduction']:.2f}x (measured/FLOPs {r['measured_over_flops']:.2f}; target >= 0.9) | "
              f"aux-only: measured {r['aux_measured_reduction']:.2f}x, FLOPs {r['aux_flops_reduction']:.2f}x",
              flush=True)


if __name__ == "__main__":
    run(main)
