"""Approaches 1 and 3 fitted on the paper's own experiment table reproduce its published constants and Table 1.

The table is vocab_scaling/data/vocab_paper_exp_data.csv (the reference repository's exp_data.csv, 1,200 rows).
The two Approach-3 fits take ~15 s each on a busy 2-core machine; everything else takes seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.vocab_scaling import fit as fit_cli
from vocab_scaling.approaches import PAPER_COEFFICIENTS, PAPER_MIN_FLOPS, predict
from vocab_scaling.flops import paper_flops
from vocab_scaling.reference import PAPER_COLUMNS, interpolate_runs

ROOT = Path(__file__).resolve().parents[1]
PAPER_CSV = ROOT / "vocab_scaling" / "data" / "vocab_paper_exp_data.csv"
TABLE1 = fit_cli.TABLE1


def published_vocab(approach: str) -> list[float]:
    """Table 1's V (unrounded) for the 3B/7B/13B models from the published constants."""
    return [predict(n_nv, d=d)[f"approach{approach}"]["V"] for n_nv, d in TABLE1]


def run_fit(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.vocab_scaling.fit", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def paper_rows() -> dict[str, np.ndarray]:
    data, is_paper = fit_cli.read_runs(str(PAPER_CSV), "isoflop")
    assert is_paper and len(data["loss"]) == 1200
    return fit_cli.keep_budgets(data, 0.0)


def test_paper_table_is_what_the_code_assumes(paper_rows):
    # C in the table is the paper's 6 (N_nv + V·d)·H·f(V), so virtual runs' FLOPs are comparable with it.
    np.testing.assert_allclose(paper_flops(paper_rows["N_nv"], paper_rows["V"], paper_rows["d"], paper_rows["H"]),
                               paper_rows["C"], rtol=1e-12)
    virtual = interpolate_runs(paper_rows["N_nv"], paper_rows["V"], paper_rows["H"], paper_rows["loss"])
    # 10 V x up to 50 diagonal models inside each V's convex hull, plus 6 models x 20 vocabularies.
    assert len(virtual["C"]) == 562
    assert set(virtual) == {"C", "loss", "N_nv", "V", "d", "N_v", "H"}
    assert np.all(np.isfinite(virtual["loss"]))
    assert virtual["V"].min() >= 4096 and virtual["V"].max() <= 96256 * (1 + 1e-12)


def test_approach1_reproduces_the_published_fit_and_table1(paper_rows):
    result = fit_cli.fit_isoflop(paper_rows, interpolate=True, method="reference")
    assert result["alpha2"] == pytest.approx(PAPER_COEFFICIENTS.iso_alpha2, abs=0.01)  # measured 0.4165
    assert result["ln_k1"] == pytest.approx(PAPER_COEFFICIENTS.ln_k1, abs=0.01)
    assert result["ln_k2"] == pytest.approx(PAPER_COEFFICIENTS.ln_k2, abs=0.05)
    assert result["k3"] == pytest.approx(6.42, rel=0.01)  # the paper prints H = 6.42·C^0.50
    ours = [row["V"] for row in result["predictions"]]
    np.testing.assert_allclose(ours, published_vocab("1"), rtol=0.03)  # measured within 0.2%


def test_interpolation_and_the_reference_optimizer_are_both_needed(paper_rows):
    """Why the switches exist: without the virtual runs the envelope's α2 is 0.449 whatever the optimizer (the
    envelope jumps between 6 x 10 configurations); with them, the converged Huber fit gives 0.436 and only the
    reference's early-stopped, MSE-picked fit gives the published 0.416."""
    measured_only = fit_cli.fit_isoflop(paper_rows, interpolate=False, method="reference")
    converged = fit_cli.fit_isoflop(paper_rows, interpolate=True, method="huber")
    assert measured_only["alpha2"] == pytest.approx(0.4486, abs=1e-3)
    assert converged["alpha2"] == pytest.approx(0.4356, abs=1e-3)
    for other in (measured_only, converged):
        assert other["alpha2"] - PAPER_COEFFICIENTS.iso_alpha2 > 0.015
        assert other["predictions"][1]["V"] > 1.1 * published_vocab("1")[1]  # 7B: 77K and 72K instead of 62K


def test_cli_isoflop_on_the_paper_csv():
    done = run_fit("--form=isoflop", f"--csv={PAPER_CSV}", "--json", "--isoflop_fit=reference")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"ln_k1", "ln_k2", "alpha2", "k3", "predictions"} <= set(result)
    assert result["conventions"] == {"interpolate": True, "isoflop_fit": "reference"}
    assert result["alpha2"] == pytest.approx(PAPER_COEFFICIENTS.iso_alpha2, abs=0.01)
    assert [row["N_nv"] for row in result["predictions"]] == [n for n, _ in TABLE1]
    np.testing.assert_allclose([row["V"] for row in result["predictions"]], published_vocab("1"), rtol=0.03)
    assert result["warnings"] == [] and done.stderr == ""

    done = run_fit("--form=isoflop", f"--csv={PAPER_CSV}", "--json", "--no_interpolate")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["points"]["virtual"] == 0


def test_cli_approach3_reference_tokens_reproduce_the_published_constants(tmp_path):
    done = run_fit("--form=vocab", f"--csv={PAPER_CSV}", f"--min_flops={PAPER_MIN_FLOPS}", "--json",
                   f"--out={tmp_path / 'fit.json'}")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["conventions"] == {"tokens": "reference"} and result["points"]["measured"] == 1054
    published = PAPER_COEFFICIENTS.loss_law.as_dict()
    for name, value in published.items():
        # A2 is the one constant outside 2% (measured 0.1907 vs 0.1958, -2.6%): A2 and α2 trade off along a
        # valley where the Huber objective at the published constants is only 6e-6 (relative) above ours, and
        # the reference script itself, rerun on this table with today's scipy, ends at A2 = 0.1919 (-2.0%).
        assert result[name] == pytest.approx(value, rel=0.03 if name == "A2" else 0.02), name
    np.testing.assert_allclose([row["V"] for row in result["predictions"]], published_vocab("3"), rtol=0.01)
    assert result["warnings"] == []
    assert json.loads((tmp_path / "fit.json").read_text()) == result


def test_cli_approach3_exact_tokens_returns_its_best_fit_and_names_the_broken_constraint():
    done = run_fit("--form=vocab", f"--csv={PAPER_CSV}", f"--min_flops={PAPER_MIN_FLOPS}", "--tokens=exact",
                   "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["conventions"] == {"tokens": "exact"}
    assert result["alpha2"] == pytest.approx(1.06, abs=0.01)  # D = H·f(V): the best fit breaks α2 < 1
    assert len(result["warnings"]) == 1 and "alpha2=1.059 is outside 0.1 < alpha2 < 1" in result["warnings"][0]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("warning: ")
    assert all(row["V"] is not None and row["V"] > 0 for row in result["predictions"])


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    done = run_fit("--form=vocab", f"--csv={PAPER_CSV}", "--tokens=thousands")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "tokens" in done.stderr

    lines = PAPER_CSV.read_text().splitlines()
    names = lines[0].split(",")
    keep = [i for i, name in enumerate(names) if name != "Lossu"]
    no_loss = tmp_path / "no_loss.csv"
    no_loss.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in lines[:5]) + "\n")
    done = run_fit("--form=isoflop", f"--csv={no_loss}")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "missing column(s) Lossu" in done.stderr

    text = tmp_path / "text.csv"
    text.write_text("\n".join([lines[0], lines[1], lines[2].replace(lines[2].split(",")[0], "big", 1)]) + "\n")
    done = run_fit("--form=vocab", f"--csv={text}")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "line 3: vocab_size='big'" in done.stderr
    assert set(PAPER_COLUMNS) == set(names)
