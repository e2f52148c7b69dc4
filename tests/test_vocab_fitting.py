"""The robust fitter: Huber by hand, power laws, Chinchilla- and vocabulary-form recovery, and its errors."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm_core.errors import UserError
from vocab_scaling import fitting
from vocab_scaling.approaches import PAPER_COEFFICIENTS

ROOT = Path(__file__).resolve().parents[1]
CHINCHILLA_POINTS = ROOT / "vocab_scaling" / "data" / "chinchilla_svg_extracted_data.csv"
HOFFMANN = fitting.ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def chinchilla_grid() -> tuple[np.ndarray, np.ndarray]:
    """8 model sizes x 8 token counts spanning 50M-20B parameters and 1B-500B tokens."""
    n, d = np.meshgrid(np.geomspace(5e7, 2e10, 8), np.geomspace(1e9, 5e11, 8))
    return n.ravel(), d.ravel()


def test_huber_by_hand():
    loss, slope = fitting.huber(np.array([5e-4, -2e-3]), delta=1e-3)
    # inside: r²/(2δ) = 25e-8 / 2e-3 = 1.25e-4; outside: |r| - δ/2 = 2e-3 - 5e-4 = 1.5e-3 (both / δ-scaled)
    np.testing.assert_allclose(loss, [1.25e-4, 1.5e-3])
    np.testing.assert_allclose(slope, [0.5, -1.0])


def test_power_law_fit_is_robust_to_an_outlier_and_honours_fixed_parameters():
    x = np.geomspace(1e18, 1e22, 9)
    y = 0.2 * x**0.42
    y[4] *= 3.0  # one broken run
    law = fitting.fit_power_law(x, y, exponent_bounds=(0.0, 1.0))
    # Huber bounds the outlier's pull to δ per point: the fit moves by ~δ/8 = 1.25e-4 in log space, where a
    # least-squares fit would move by ln(3)/9 = 0.12.
    assert law.exponent == pytest.approx(0.42, abs=1e-4)
    assert law.k == pytest.approx(0.2, rel=1e-3)
    fixed = fitting.fit_power_law(x, 0.08 * x**0.5, exponent=0.5)
    assert fixed.exponent == 0.5 and fixed.log_k == pytest.approx(math.log(0.08), abs=1e-8)
    through_origin = fitting.fit_power_law([2.0, 4.0, 8.0], [2.0**0.8, 4.0**0.8, 8.0**0.8], log_k=0.0)
    assert through_origin.log_k == 0.0 and through_origin.exponent == pytest.approx(0.8, abs=1e-8)
    assert law.inverse(law(3e20)) == pytest.approx(3e20, rel=1e-9)


def test_chinchilla_fit_recovers_constants_from_exact_data():
    n, d = chinchilla_grid()
    fit = fitting.fit_chinchilla(n, d, HOFFMANN(n, d))
    for name, value in HOFFMANN.as_dict().items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-6), name


def test_chinchilla_fit_with_noise():
    n, d = chinchilla_grid()
    rng = np.random.default_rng(0)
    loss = HOFFMANN(n, d) * np.exp(rng.normal(0.0, 0.005, n.shape))  # 0.5% multiplicative noise
    fit = fitting.fit_chinchilla(n, d, loss).as_dict()
    assert fit["E"] == pytest.approx(1.69, rel=0.05)
    assert fit["alpha"] == pytest.approx(0.34, abs=0.02)
    assert fit["beta"] == pytest.approx(0.28, abs=0.03)
    assert fit["A"] == pytest.approx(406.4, rel=0.3)
    assert fit["B"] == pytest.approx(410.7, rel=0.6)  # B and beta trade off; the loss surface pins them less


def test_chinchilla_fit_on_the_published_points():
    with open(CHINCHILLA_POINTS, newline="") as file:
        rows = list(csv.DictReader(file))
    n = np.array([float(row["Model Size"]) for row in rows])
    c = np.array([float(row["Training FLOP"]) for row in rows])
    fit = fitting.fit_chinchilla(n, c / (6 * n), np.array([float(row["loss"]) for row in rows]))
    assert 0 < fit.alpha < 1 and 0 < fit.beta < 1
    assert 1.0 < fit.E < 3.0
    assert 100 < fit.A < 1e5


def test_vocab_loss_fit_recovers_the_paper_constants_from_exact_data():
    law = PAPER_COEFFICIENTS.loss_law
    family = [(33e6, 512), (85e6, 768), (151e6, 768), (302e6, 1024), (631e6, 1536), (1130e6, 2048)]
    rows = [(n, v, d, tokens) for n, d in family for v in (4096, 8192, 16384, 32768, 64512)
            for tokens in (2e9, 1e10, 5e10)]
    n_nv, vocab, width, tokens = map(np.array, zip(*rows, strict=True))
    fit = fitting.fit_vocab_loss(n_nv, vocab, width, tokens, law(n_nv, vocab * width, tokens))
    for name, value in law.as_dict().items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-5), name
    assert fit.beta == fit.alpha1  # tied


def test_fitter_errors_are_one_line_user_errors():
    with pytest.raises(UserError, match="finite"):
        fitting.fit_chinchilla([1e9, np.nan, 2e9, 3e9, 4e9, 5e9], [1e10] * 6, [3.0] * 6)
    with pytest.raises(UserError, match="at least 6"):
        fitting.fit_chinchilla([1e9, 2e9], [1e10, 2e10], [3.0, 2.9])
    nowhere = fitting.Parameter("x", 0.0, 1.0, (0.5,))
    with pytest.raises(UserError, match="none converged") as error:
        fitting.robust_fit(lambda theta: (np.full(3, np.nan), np.zeros((3, 1))), [nowhere], what="test fit")
    assert "\n" not in str(error.value)
    slope = fitting.Parameter("slope", -5.0, 5.0, (0.0, 1.0))
    with pytest.raises(UserError, match="2 converged but none passed slope < 0"):
        fitting.robust_fit(lambda theta: (theta[0] * np.arange(3.0) - np.arange(3.0), np.arange(3.0)[:, None]),
                           [slope], accept=lambda v: v["slope"] < 0, accept_rule="slope < 0")
    line = fitting.Parameter("slope", -5.0, 5.0, (0.0, 1.0))
    with pytest.raises(UserError, match="2 converged but none passed slope < 0"):
        fitting.robust_fit(lambda theta: (theta[0] * np.arange(3.0) - np.arange(3.0), np.arange(3.0)[:, None]),
                           [line], accept=lambda v: v["slope"] < 0, accept_rule="slope < 0")


def test_keep_rejected_returns_the_best_solution_the_check_rejected():
    slope = fitting.Parameter("slope", -5.0, 5.0, (0.0, 1.0))
    fit = fitting.robust_fit(lambda theta: (theta[0] * np.arange(3.0) - np.arange(3.0), np.arange(3.0)[:, None]),
                             [slope], accept=lambda v: v["slope"] < 0, keep_rejected=True)
    assert fit.values["slope"] == pytest.approx(1.0) and fit.accepted == 0 and fit.converged == 2
    law = fitting.VocabLossLaw(E=5.5, A1=1.8, A2=0.13, B=1.3, alpha1=0.44, alpha2=1.06, beta=0.44)
    assert law.violations() == ["alpha2=1.06 is outside 0.1 < alpha2 < 1"]
    assert PAPER_COEFFICIENTS.loss_law.violations() == []


def test_fit_cli(tmp_path):
    n, d = chinchilla_grid()
    good = tmp_path / "runs.csv"
    good.write_text("N,D,loss\n" + "".join(f"{a},{b},{c}\n" for a, b, c in zip(n, d, HOFFMANN(n, d), strict=True)))
    command = [sys.executable, "-m", "experiments.vocab_scaling.fit", "--form=chinchilla", f"--csv={good}",
               "--json", f"--out={tmp_path / 'fit.json'}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    constants = json.loads(done.stdout)
    assert set(constants) == {"E", "A", "B", "alpha", "beta"}
    assert constants["alpha"] == pytest.approx(0.34, rel=1e-5)
    assert json.loads((tmp_path / "fit.json").read_text()) == constants

    bad = tmp_path / "bad.csv"
    bad.write_text("N_nv,V,loss\n1e9,32000,3.0\n")
    done = subprocess.run([sys.executable, "-m", "experiments.vocab_scaling.fit", "--form=vocab", f"--csv={bad}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "missing column(s) d, H" in done.stderr


def test_csv_columns_name_the_bad_cell(tmp_path):
    from vocab_scaling.csv_columns import read_numeric_columns

    path = tmp_path / "runs.csv"
    path.write_text(" N , D ,loss,note\n1e9,2e10,3.1,a\n2e9,4e10,2.9,b\n")
    columns = read_numeric_columns(str(path), ("N", "D", "loss"), optional=("H",))
    assert sorted(columns) == ["D", "N", "loss"]
    np.testing.assert_allclose(columns["N"], [1e9, 2e9])
    path.write_text("N,D,loss\n1e9,2e10,3.1\n2e9,inf,2.9\n")
    with pytest.raises(UserError, match="line 3: D=inf is not finite"):
        read_numeric_columns(str(path), ("N", "D", "loss"))
    path.write_text("N,D,loss\n1e9,abc,3.1\n")
    with pytest.raises(UserError, match="line 2: D='abc' is not a number"):
        read_numeric_columns(str(path), ("N", "D", "loss"))
    with pytest.raises(UserError, match="cannot read"):
        read_numeric_columns(str(tmp_path / "absent.csv"), ("N",))
