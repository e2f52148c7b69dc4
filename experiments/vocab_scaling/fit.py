"""Fit a scaling law to a CSV of training runs (Huber loss, L-BFGS-B from a grid of starts).

    python -m experiments.vocab_scaling.fit --form=chinchilla --csv=runs.csv [--out=fit.json] [--json]
    python -m experiments.vocab_scaling.fit --form=vocab --csv=sweep.csv --json

--form=chinchilla: L = E + A/N^alpha + B/D^beta, Hoffmann et al.'s fit (log-sum-exp on log L, Huber delta 1e-3).
  CSV columns N (parameters), D (tokens), loss.
--form=vocab: the vocabulary paper's L_u = -E + A1/N_nv^alpha1 + A2/N_v^alpha2 + B/D^beta, alpha1 = beta tied.
  CSV columns N_nv, V, d, H (characters), loss (= L_u), optionally D (tokens; otherwise D = H*f(V) with the
  paper's f). Constants come out in the paper's normalised units (N in 1e6, D in 1e9 tokens), ready to replace
  the approach-3 constants of a coefficients file for `experiments.vocab_scaling.predict`.
Example: `... --form=chinchilla --csv=runs.csv --json` (runs.csv: `N,D,loss` rows) prints one JSON object
{"E": ..., "A": ..., "B": ..., "alpha": ..., "beta": ...}. --out writes that object to a file. Missing columns,
non-numeric or non-finite values, or a fit that does not converge end with one `error:` line and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from experiments.cli import run
from lm_core.errors import UserError
from vocab_scaling.approaches import fit_approach3, write_json_atomically
from vocab_scaling.csv_columns import read_numeric_columns
from vocab_scaling.fitting import fit_chinchilla
from vocab_scaling.flops import tokens_from_chars

FORMS = {"chinchilla": ("N", "D", "loss"), "vocab": ("N_nv", "V", "d", "H", "loss")}

_FORM = flags.DEFINE_enum("form", None, list(FORMS), "Which law: chinchilla or vocab.", required=True)
_CSV = flags.DEFINE_string("csv", None, "CSV file of runs, one row per (run, evaluation).", required=True)
_OUT = flags.DEFINE_string("out", None, "Also write the fitted constants to this JSON file.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object of the fitted constants instead of a table.")
_MIN_FLOPS = flags.DEFINE_float("min_flops", 0.0, "vocab form: drop rows with 6(N_nv+V*d)*D below this "
                                "(the paper used 2.18e17).")


def fit(form: str, path: str, min_flops: float = 0.0) -> dict[str, float]:
    """The fitted constants of `form` on the CSV at `path`, as the flat dict --json prints."""
    if form == "chinchilla":
        data = read_numeric_columns(path, FORMS["chinchilla"])
        return fit_chinchilla(data["N"], data["D"], data["loss"]).as_dict()
    data = read_numeric_columns(path, FORMS["vocab"], optional=("D",))
    tokens = data["D"] if "D" in data else tokens_from_chars(data["H"], data["V"])
    law = fit_approach3(data["N_nv"], data["V"], data["d"], tokens, data["loss"], min_flops=min_flops)
    return law.as_dict()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; all inputs are flags (see --help)")
    constants = fit(_FORM.value, _CSV.value, _MIN_FLOPS.value)
    if _OUT.value:
        write_json_atomically(_OUT.value, constants)
    if _JSON.value:
        print(json.dumps(constants))
        return
    units = "raw units: N parameters, D tokens" if _FORM.value == "chinchilla" else (
        "normalised units: N_nv, N_v in 1e6, D in 1e9 tokens")
    print(f"{_FORM.value} fit of {Path(_CSV.value).name} ({units})")
    for name, value in constants.items():
        print(f"  {name:>7} = {value:.6g}")
    if _OUT.value:
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    run(main)
