"""Fit a scaling law to a CSV of training runs (Huber loss, L-BFGS-B from a grid of starts).

    python -m experiments.vocab_scaling.fit --form=chinchilla --csv=runs.csv [--out=fit.json] [--json]
    python -m experiments.vocab_scaling.fit --form=isoflop --csv=vocab_scaling/data/vocab_paper_exp_data.csv --json
    python -m experiments.vocab_scaling.fit --form=vocab --csv=vocab_scaling/data/vocab_paper_exp_data.csv \\
        --min_flops=2.18e17 [--tokens=reference|exact] --json

--form=chinchilla: L = E + A/N^alpha + B/D^beta, Hoffmann et al.'s fit (log-sum-exp on log L, Huber delta 1e-3).
  CSV columns N (parameters), D (tokens), loss. --json prints {"E", "A", "B", "alpha", "beta"}.
--form=isoflop: the vocabulary paper's Approach 1. Keeps the lowest-L_u point at each FLOPs budget (running
  minimum over C) and fits N_nv = k1*C^0.5, N_v = k2*C^alpha2, H = k3*C^0.5. Virtual runs interpolated between
  the measured ones join the envelope first, as in the paper's reference code (on by default; --no_interpolate
  keeps measured points only). --isoflop_fit=huber: the converged Huber fit; =reference: the reference code's
  optimizer (scipy's unscaled Huber at L-BFGS-B's default tolerances, best of a 20x20 grid of starts by relative
  MSE), whose early-stopped end points are what the published alpha2 = 0.416 is; the converged fit of the same
  envelope gives 0.436. --json prints ln_k1, ln_k2, alpha2, k3.
--form=vocab: the paper's Approach 3, L_u = -E + A1/N_nv^alpha1 + A2/N_v^alpha2 + B/D^beta, alpha1 = beta tied,
  constants in the paper's normalised units (N in 1e6, D in 1e9 tokens), ready to replace the approach-3
  constants of a coefficients file for `experiments.vocab_scaling.predict`. --json prints E, A1, A2, B, alpha1,
  alpha2, beta. Tokens: --tokens=exact uses D = H*f(V) with the paper's f; --tokens=reference uses
  D = H*f(V/1000), f evaluated on V in thousands, which is how the reference code fitted the published
  constants (with exact tokens the best fit of the paper's data has alpha2 ~ 1.06). A fit whose best solution
  breaks the paper's constraint 0.1 < exponents < 1 is still returned and printed, with the constraint it breaks
  in "warnings" and one `warning:` line on stderr.
CSV columns for isoflop and vocab: N_nv, V, d, H (characters), loss (= L_u), optionally C (FLOPs; otherwise
  6*(N_nv + V*d)*D) and, for vocab, D (tokens, used as given unless --tokens is set). The paper's experiment
  table (vocab_scaling/data/vocab_paper_exp_data.csv: vocab_size, embed_dim, num_characters,
  Non_vocab_parameters, FLOPs, Lossu) is read as it is. --tokens defaults to `auto`: the reference's D for the
  paper's table, the D column or exact tokens for any other CSV; --isoflop_fit defaults to the converged fit.
  --min_flops drops rows with C below it first (the paper: 2.18e17 for Approach 3).
For isoflop and vocab, --json also prints "predictions": the optimal V for the paper's Table 1 models (N_nv =
  3B/7B/13B, d = 3200/4096/5120) at the compute-optimal budget C = (N_nv/k1)^2 (vocab: with the paper's k1),
  "conventions", "points" and "warnings". --out writes the same object to a file. Missing columns, non-numeric
  or non-finite values, an unknown flag value, or a fit that does not converge end with one `error:` line and
  exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from experiments.cli import run
from lm_core.errors import UserError
from vocab_scaling.approaches import (
    PAPER_COEFFICIENTS,
    Coefficients,
    fit_approach1,
    fit_approach3,
    predict,
    write_json_atomically,
)
from vocab_scaling.csv_columns import read_header, read_numeric_columns
from vocab_scaling.fitting import fit_chinchilla
from vocab_scaling.flops import tokens_from_chars
from vocab_scaling.reference import PAPER_COLUMNS, interpolate_runs, reference_tokens

FORMS = {"chinchilla": ("N", "D", "loss"), "vocab": ("N_nv", "V", "d", "H", "loss"),
         "isoflop": ("N_nv", "V", "d", "H", "loss")}
TABLE1 = ((3e9, 3200), (7e9, 4096), (13e9, 5120))  # the paper's Table 1 models: N_nv and width d

def define_flags() -> None:
    """Flags exist only when this file runs as the entrypoint: tests import its functions next to other
    entrypoints' flags (absl refuses a flag name defined twice)."""
    flags.DEFINE_enum("form", None, list(FORMS), "Which law: chinchilla, isoflop (Approach 1) or vocab "
                      "(Approach 3).", required=True)
    flags.DEFINE_string("csv", None, "CSV file of runs, one row per (run, evaluation).", required=True)
    flags.DEFINE_string("out", None, "Also write the fitted constants to this JSON file.")
    flags.DEFINE_bool("json", False, "Print one JSON object of the fitted constants instead of a table.")
    flags.DEFINE_float("min_flops", 0.0, "isoflop and vocab forms: drop rows with C below this (the paper used "
                       "2.18e17 for Approach 3).")
    flags.DEFINE_enum("tokens", "auto", ["auto", "reference", "exact"], "vocab form: D = H*f(V/1000) (reference, "
                      "how the published constants were fitted) or D = H*f(V) (exact); auto: reference for the "
                      "paper's CSV, else the D column or exact.")
    flags.DEFINE_enum("isoflop_fit", "huber", ["huber", "reference"], "isoflop form: the converged Huber fit, or "
                      "the reference code's early-stopped optimizer (what the published alpha2 is).")
    flags.DEFINE_bool("no_interpolate", False, "isoflop form: take the envelope over the measured points only "
                      "(default: with the reference's interpolated virtual runs).")


def read_runs(path: str, form: str) -> tuple[dict[str, np.ndarray], bool]:
    """The CSV's columns under this package's names, and whether it is the paper's table (its column names)."""
    header = read_header(path)
    if form != "chinchilla" and not set(FORMS[form]) <= set(header) and set(PAPER_COLUMNS) & set(header):
        data = read_numeric_columns(path, tuple(PAPER_COLUMNS))
        return {PAPER_COLUMNS[name]: values for name, values in data.items()}, True
    optional = ("C", "D") if form == "vocab" else ("C",)
    return read_numeric_columns(path, FORMS[form], optional=optional if form != "chinchilla" else ()), False


def keep_budgets(data: dict[str, np.ndarray], min_flops: float) -> dict[str, np.ndarray]:
    """The rows with C ≥ min_flops, C filled in from 6 (N_nv + V·d)·H·f(V) where the CSV has none."""
    if "C" not in data:
        tokens = data["D"] if "D" in data else tokens_from_chars(data["H"], data["V"])
        data = {**data, "C": 6.0 * (data["N_nv"] + data["V"] * data["d"]) * tokens}
    kept = data["C"] >= min_flops
    if not kept.any():
        raise UserError(f"no row has C ≥ --min_flops={min_flops:g} (largest C: {data['C'].max():.3g})")
    return {name: values[kept] for name, values in data.items()}


def predictions(coefficients: Coefficients, approach: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The optimal V of the Table 1 models by `approach` with `coefficients`, and why any could not be solved."""
    rows, problems = [], []
    for n_nv, d in TABLE1:
        try:
            result = predict(n_nv, approach=approach, coefficients=coefficients, d=d)
            vocab = result[f"approach{approach}"]["V"]
        except UserError as error:  # e.g. ∂L_u/∂V has no root for constants that break the constraint
            result, vocab = {"flops": None}, None
            problems.append(str(error))
        rows.append({"N_nv": n_nv, "d": d, "C": result["flops"], "V": vocab})
    return rows, problems


def fit_isoflop(data: dict[str, np.ndarray], interpolate: bool, method: str) -> dict[str, Any]:
    """Approach 1 on the rows (plus virtual runs when `interpolate`): constants, predictions, bookkeeping."""
    points = {name: data[name] for name in ("C", "loss", "N_nv", "H")}
    points["N_v"] = data["V"] * data["d"]
    virtual = interpolate_runs(data["N_nv"], data["V"], data["H"], data["loss"]) if interpolate else None
    if virtual is not None:
        points = {name: np.concatenate([values, virtual[name]]) for name, values in points.items()}
    fit = fit_approach1(points["C"], points["loss"], points["N_nv"], points["N_v"], points["H"], fit=method)
    coefficients = dataclasses.replace(PAPER_COEFFICIENTS, ln_k1=fit.n_nv.log_k, iso_alpha1=fit.n_nv.exponent,
                                       ln_k2=fit.n_v.log_k, iso_alpha2=fit.n_v.exponent)
    rows, problems = predictions(coefficients, "1")
    return {"ln_k1": fit.n_nv.log_k, "ln_k2": fit.n_v.log_k, "alpha2": fit.n_v.exponent, "k3": fit.chars.k,
            "predictions": rows, "conventions": {"interpolate": interpolate, "isoflop_fit": method},
            "points": {"measured": len(data["C"]), "virtual": 0 if virtual is None else len(virtual["C"]),
                       "envelope": len(fit.envelope)},
            "warnings": problems}


def fit_vocab(data: dict[str, np.ndarray], tokens: str) -> dict[str, Any]:
    """Approach 3 on the rows with D by the `tokens` convention: constants, predictions and what they break."""
    if tokens == "measured":
        d_tokens = data["D"]
    else:
        d_tokens = reference_tokens(data["H"], data["V"]) if tokens == "reference" else tokens_from_chars(
            data["H"], data["V"])
    law = fit_approach3(data["N_nv"], data["V"], data["d"], d_tokens, data["loss"], strict=False)
    broken = law.violations()
    warnings = [f"the best fit breaks the paper's constraint: {'; '.join(broken)}; its constants and predictions "
                "are printed all the same"] if broken else []
    rows, problems = predictions(dataclasses.replace(PAPER_COEFFICIENTS, **law.as_dict()), "3")
    return {**law.as_dict(), "predictions": rows, "conventions": {"tokens": tokens},
            "points": {"measured": len(data["loss"])}, "warnings": warnings + problems}


def fit(form: str, path: str, min_flops: float = 0.0, tokens: str = "auto", isoflop_fit: str = "huber",
        interpolate: bool = True) -> dict[str, Any]:
    """The object --json prints: the fitted constants of `form` on the CSV at `path` (+ predictions for the
    paper's laws). tokens="auto" follows the CSV: the reference's D for the paper's table, ours otherwise."""
    data, paper = read_runs(path, form)
    if form == "chinchilla":
        return fit_chinchilla(data["N"], data["D"], data["loss"]).as_dict()
    data = keep_budgets(data, min_flops)
    if form == "isoflop":
        return fit_isoflop(data, interpolate, isoflop_fit)
    if tokens == "auto":
        tokens = "reference" if paper else ("measured" if "D" in data else "exact")
    return fit_vocab(data, tokens)


CONSTANTS = {"chinchilla": ("E", "A", "B", "alpha", "beta"), "isoflop": ("ln_k1", "ln_k2", "alpha2", "k3"),
             "vocab": ("E", "A1", "A2", "B", "alpha1", "alpha2", "beta")}
PUBLISHED = {"isoflop": {"ln_k1": PAPER_COEFFICIENTS.ln_k1, "ln_k2": PAPER_COEFFICIENTS.ln_k2,
                         "alpha2": PAPER_COEFFICIENTS.iso_alpha2, "k3": 6.42},
             "vocab": PAPER_COEFFICIENTS.loss_law.as_dict()}


def table(form: str, path: str, result: dict[str, Any]) -> str:
    """The human-readable report: constants (next to the paper's), then the Table 1 predictions."""
    units = {"chinchilla": "raw units: N parameters, D tokens", "isoflop": "raw units: parameters, FLOPs",
             "vocab": "normalised units: N_nv, N_v in 1e6, D in 1e9 tokens"}[form]
    lines = [f"{form} fit of {Path(path).name} ({units})"]
    if "conventions" in result:
        lines.append("  conventions: " + ", ".join(f"{k}={v}" for k, v in result["conventions"].items()))
    published = PUBLISHED.get(form, {})
    for name in CONSTANTS[form]:
        paper = f"   (paper: {published[name]:.6g})" if name in published else ""
        lines.append(f"  {name:>7} = {result[name]:.6g}{paper}")
    approach = {"isoflop": "approach1", "vocab": "approach3"}.get(form)
    for row in result.get("predictions", []):
        paper = predict(row["N_nv"], d=row["d"])[approach]["V"]
        ours = "—" if row["V"] is None else f"{row['V']:,.0f}"
        lines.append(f"  N_nv={row['N_nv'] / 1e9:g}B d={row['d']}: V_opt = {ours}   (paper: {paper:,.0f})")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; all inputs are flags (see --help)")
    options = flags.FLAGS
    result = fit(options.form, options.csv, options.min_flops, options.tokens, options.isoflop_fit,
                 interpolate=not options.no_interpolate)
    if options.out:
        write_json_atomically(options.out, result)
    for warning in result.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if options.json:
        print(json.dumps(result))
        return
    print(table(options.form, options.csv, result))
    if options.out:
        print(f"wrote {options.out}")


if __name__ == "__main__":
    define_flags()
    run(main)
