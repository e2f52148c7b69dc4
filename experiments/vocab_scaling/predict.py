"""Predict the compute-optimal vocabulary size (Tao et al. 2024, approaches 1-3).

    python -m experiments.vocab_scaling.predict --nnv=7e9 [--flops=2.3e21] [--approach=1|2|3|all]
        [--coefficients=paper|FILE.json] [--d=4096] [--json]
    python -m experiments.vocab_scaling.predict --model_config=experiments/configs/lm_tiny.py [--flops=1e18]

--nnv is the non-vocabulary parameter count (embeddings and output layer excluded); --d the width (default: the
paper's width table for that N_nv). Approaches 1 and 2 answer for the compute-optimal budget C = (N_nv/k1)^2;
Approach 3 answers for --flops (default: that same budget), so it also covers under- and over-training.
--model_config reads N_nv and d from an lm_core config file (its `model` fields) instead of --nnv/--d: "which
vocabulary for my model and budget?". Note the paper's constants were fitted on 33M-3B models.
Example: `--nnv=7e9 --d=4096` prints V ~ 62K / 67K / 60K (the paper's table); `--nnv=2.87e9 --d=3200
--flops=2.3e21 --approach=3` gives ~42K. --json prints one object {"nnv", "d", "flops", "optimal_flops",
"approach1": {"V", "N_v"}, ...} with V unrounded, in tokens. Bad values end with one `error:` line, exit code 2.
"""

from __future__ import annotations

import json
import math
from typing import Any

from absl import flags

from experiments.cli import define_config_file, run
from lm_core.errors import UserError
from vocab_scaling.approaches import PAPER_COEFFICIENTS, Coefficients, predict

_NNV = flags.DEFINE_float("nnv", None, "Non-vocabulary parameters N_nv, e.g. 7e9.")
_FLOPS = flags.DEFINE_float("flops", None, "Training budget C in FLOPs for Approach 3 (default: compute-optimal).")
_APPROACH = flags.DEFINE_enum("approach", "all", ["1", "2", "3", "all"], "Which approach(es) to report.")
_COEFFICIENTS = flags.DEFINE_string("coefficients", "paper", "'paper' or a JSON file of constants "
                                    "(keys: the fields of vocab_scaling.approaches.Coefficients).")
_D = flags.DEFINE_integer("d", None, "Model width d (default: the paper's table d(N_nv), or the config's d_model).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_MODEL_CONFIG = define_config_file(
    "model_config", None, "An lm_core config file (ml_collections get_config()); N_nv and d come from its model.")

NAMES = {"approach1": "1 IsoFLOPs envelope", "approach2": "2 dC/dV = 0 (gamma)", "approach3": "3 parametric L_u fit"}


def load_coefficients(spec: str) -> Coefficients:
    return PAPER_COEFFICIENTS if spec == "paper" else Coefficients.from_json(spec)


def model_from_config(config: Any) -> tuple[float, int, int]:
    """(N_nv, d, the config's own vocab_size) of an lm_core config (a trainer config's `model`, or a model one)."""
    from lm_core.config import ModelConfig
    from lm_core.flops import param_counts

    try:
        fields = config.model if "model" in config else config
    except OSError as error:  # config_flags defers a failed load to the first access; keep its last, telling line
        reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
        raise UserError(f"--model_config={flags.FLAGS['model_config'].config_filename}: cannot load it "
                        f"({reason})") from None
    model = ModelConfig.from_dict(dict(fields.to_dict() if hasattr(fields, "to_dict") else fields))
    return float(param_counts(model).non_vocab), model.d_model, model.vocab_size


def table(result: dict[str, Any], current_vocab: int | None) -> str:
    lines = [f"N_nv = {result['nnv']:.4g} non-vocabulary parameters, d = {result['d']:g}",
             f"compute-optimal budget (Approach 1): C = {result['optimal_flops']:.3g} FLOPs"]
    if result["flops"] != result["optimal_flops"]:
        lines.append(f"Approach 3 budget: C = {result['flops']:.3g} FLOPs "
                     f"({result['flops'] / result['optimal_flops']:.2g} x compute-optimal)")
    lines.append(f"{'approach':<24} {'V_opt':>12} {'N_v = V*d':>12}")
    for key, name in NAMES.items():
        if key in result:
            lines.append(f"{name:<24} {result[key]['V']:>12,.0f} {result[key]['N_v']:>12.4g}")
    if current_vocab is not None:
        lines.append(f"(the config uses V = {current_vocab:,})")
    return "\n".join(lines)


def check_positive(flag: str, value: float | None, meaning: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UserError(f"--{flag}={value:g} must be a finite number > 0 ({meaning})")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; all inputs are flags (see --help)")
    check_positive("nnv", _NNV.value, "non-vocabulary parameters, e.g. 7e9")
    check_positive("flops", _FLOPS.value, "a training budget in FLOPs, e.g. 2.3e21")
    check_positive("d", _D.value, "the model width, e.g. 4096")
    nnv, d, current_vocab = _NNV.value, _D.value, None
    if _MODEL_CONFIG.value is not None:
        if nnv is not None:
            raise UserError("give --nnv or --model_config, not both (the config determines N_nv)")
        nnv, config_d, current_vocab = model_from_config(_MODEL_CONFIG.value)
        d = d if d is not None else config_d
    elif nnv is None:
        raise UserError("--nnv (non-vocabulary parameters, e.g. 7e9) or --model_config=FILE.py is required")
    result = predict(nnv, flops=_FLOPS.value, approach=_APPROACH.value,
                     coefficients=load_coefficients(_COEFFICIENTS.value), d=d)
    refuse_past_the_cap(result)
    if current_vocab is not None:
        result["config_vocab_size"] = current_vocab
    print(json.dumps(result) if _JSON.value else table(result, current_vocab))


def refuse_past_the_cap(result: dict) -> None:
    """A predicted V past VOCAB_CAP rests on f(V) where it is capped (vocab_scaling.tokenization_curve): refused,
    not printed as an answer."""
    from vocab_scaling.tokenization_curve import VOCAB_CAP

    past = {name: entry["V"] for name, entry in result.items() if name.startswith("approach") and
            entry["V"] > VOCAB_CAP}
    if past:
        values = ", ".join(f"{name} V={v:.3g}" for name, v in past.items())
        raise UserError(f"--nnv={result['nnv']:g}: the predicted vocabulary ({values}) is past {VOCAB_CAP:,}, "
                        "where the tokenization curve f(V) every approach rests on is capped; valid: a smaller "
                        f"--nnv (the predictions hold while V <= {VOCAB_CAP:,})")


if __name__ == "__main__":
    run(main)
