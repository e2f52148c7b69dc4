"""The three approaches and the predictor against the paper's published numbers; coefficient files; the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm_core.errors import UserError
from vocab_scaling import approaches
from vocab_scaling.approaches import PAPER_COEFFICIENTS, Coefficients, predict
from vocab_scaling.flops import paper_flops
from vocab_scaling.tokenization_curve import PAPER_F

ROOT = Path(__file__).resolve().parents[1]

# The paper's Table 1: N_nv, d, V_opt in thousands by approaches 1 / 2 / 3, compute-optimal C.
PUBLISHED = [(3e9, 3200, (39, 43, 37), 1.3e21), (7e9, 4096, (62, 67, 60), 7.1e21),
             (13e9, 5120, (83, 91, 81), 2.4e22)]
# The model family of the paper's sweeps (33M to 2.87B non-vocabulary parameters): N_nv and d.
FAMILY = [(33e6, 512), (85e6, 768), (151e6, 768), (302e6, 1024), (631e6, 1536), (1130e6, 2048), (2870e6, 3200)]


@pytest.mark.parametrize(("n_nv", "d", "vocab_k", "flops"), PUBLISHED)
def test_predictor_reproduces_the_published_table(n_nv, d, vocab_k, flops):
    result = predict(n_nv, d=d)
    assert result["d"] == d
    assert float(f"{result['optimal_flops']:.1e}") == flops
    got = tuple(round(result[f"approach{i}"]["V"] / 1000) for i in (1, 2, 3))
    assert got == vocab_k
    for i in (1, 2, 3):
        assert result[f"approach{i}"]["N_v"] == pytest.approx(result[f"approach{i}"]["V"] * d)


def test_width_defaults_to_the_paper_table_and_llama2_70b_deserves_over_200k():
    result = predict(70e9)
    assert result["d"] == 8192
    assert result["approach3"]["V"] > 216_000  # the abstract: "at least 216K" for Llama2-70B (32K in reality)
    assert min(result[f"approach{i}"]["V"] for i in (1, 2, 3)) > 200_000


def test_approach3_moves_the_optimum_with_the_budget():
    # The paper's validation experiments: the 2.87B model (d=3200) at 2.8e20 / 1.2e21 / 2.3e21 FLOPs -> 24K / 35K / 43K.
    # The formula gives 23.9K / 35.4K / 42.2K; 43K would need C ~ 2.45e21 (see the package report).
    under, optimal, over = (predict(2.87e9, flops=c, approach=3, d=3200)["approach3"]["V"]
                            for c in (2.8e20, 1.2e21, 2.3e21))
    assert under < optimal < over
    assert under == pytest.approx(24_000, abs=500)
    assert optimal == pytest.approx(35_000, abs=500)
    assert over == pytest.approx(43_000, abs=1_000)


def test_approach3_derivative_matches_a_finite_difference():
    law, n_nv, d, c = PAPER_COEFFICIENTS.loss_law, 3e9, 3200.0, 1.3e21

    def loss(vocab: float) -> float:
        return law(n_nv, vocab * d, c / (6 * (n_nv + vocab * d)))

    vocab, step = 20_000.0, 1.0
    numeric = (loss(vocab + step) - loss(vocab - step)) / (2 * step)  # per token of V
    analytic = approaches.loss_vocab_derivative(vocab / 1000, n_nv, d, c, law) * (d / 1000) / 1000
    assert analytic == pytest.approx(numeric, rel=1e-5)
    root = approaches.approach3_vocab(n_nv, d, c, law)
    assert loss(root) < min(loss(root * 0.9), loss(root * 1.1))  # a minimum, not a maximum


def test_approach2_derivative_and_gamma():
    n_nv, d, chars, vocab = 1e9, 2048, 1e11, 30_000.0
    numeric = (paper_flops(n_nv, vocab + 1, d, chars) - paper_flops(n_nv, vocab - 1, d, chars)) / 2
    assert approaches.flops_vocab_derivative(vocab, n_nv, d, chars) == pytest.approx(numeric, rel=1e-6)
    best = approaches.flops_optimal_vocab(n_nv, d)
    assert approaches.flops_vocab_derivative(best, n_nv, d) == pytest.approx(0.0, abs=1e-9)
    # The paper's γ comes out of the derivative over its model family to 6 digits.
    gamma = approaches.fit_gamma([n for n, _ in FAMILY], [d for _, d in FAMILY], PAPER_F)
    assert gamma == pytest.approx(PAPER_COEFFICIENTS.gamma, abs=1e-5)


def test_approach1_envelope_and_fit_recover_synthetic_laws():
    # Envelope points lie on N_nv = 0.08 C^0.5, N_v = 0.2 C^0.42, H = 6.42 C^0.5 with falling loss; each has a
    # dominated twin (same budget or more, higher loss) that must be dropped.
    c = np.geomspace(1e17, 1e21, 6)
    best_loss = 4.0 - 0.1 * np.arange(6)
    flops = np.concatenate([c, c * 1.05])
    loss = np.concatenate([best_loss, best_loss + 0.5])
    n_nv = np.concatenate([0.08 * c**0.5, 0.03 * c**0.5])
    n_v = np.concatenate([0.2 * c**0.42, 0.5 * c**0.42])
    chars = np.concatenate([6.42 * c**0.5, 9.0 * c**0.5])
    np.testing.assert_array_equal(approaches.isoflop_envelope(flops, loss), np.arange(6))
    fit = approaches.fit_approach1(flops, loss, n_nv, n_v, chars)
    assert fit.n_nv.k == pytest.approx(0.08, rel=1e-6) and fit.n_nv.exponent == 0.5
    assert fit.n_v.k == pytest.approx(0.2, rel=1e-5) and fit.n_v.exponent == pytest.approx(0.42, abs=1e-6)
    assert fit.chars.k == pytest.approx(6.42, rel=1e-6)
    assert approaches.empirical_anchor([33e6, 33e6, 85e6], [2e6, 3e6, 9e6], [4.1, 4.0, 3.5]) == (33e6, 3e6)


def test_coefficients_json_round_trip_and_errors(tmp_path):
    path = PAPER_COEFFICIENTS.save_json(tmp_path / "c.json")
    assert Coefficients.from_json(path) == PAPER_COEFFICIENTS
    partial = {k: v for k, v in PAPER_COEFFICIENTS.to_dict().items() if k not in ("gamma", "A2")}
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(UserError, match="lacks constant\\(s\\) gamma, A2"):
        Coefficients.from_json(tmp_path / "partial.json")
    (tmp_path / "text.json").write_text(json.dumps({**PAPER_COEFFICIENTS.to_dict(), "gamma": "high"}))
    with pytest.raises(UserError, match="gamma='high'"):
        Coefficients.from_json(tmp_path / "text.json")
    with pytest.raises(UserError, match="cannot read"):
        Coefficients.from_json(tmp_path / "absent.json")
    # A fitted loss law swaps in by field name.
    refit = dataclasses.replace(PAPER_COEFFICIENTS, **dataclasses.replace(PAPER_COEFFICIENTS.loss_law, E=6.0).as_dict())
    assert refit.E == 6.0 and refit.gamma == PAPER_COEFFICIENTS.gamma


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(n_nv=0), "n_nv=0"), (dict(n_nv=float("nan")), "n_nv=nan"), (dict(n_nv=1e9, flops=-1.0), "flops=-1.0"),
    (dict(n_nv=1e9, approach=4), "approach=4"), (dict(n_nv=1e9, d=0), "d=0"),
])
def test_predict_rejects_bad_values(kwargs, message):
    with pytest.raises(UserError, match=message):
        predict(**kwargs)


def test_predict_single_approach_and_min_flops_filter():
    assert set(predict(1e9, approach="2")) == {"nnv", "d", "flops", "optimal_flops", "approach2"}
    with pytest.raises(UserError, match="min_flops"):
        approaches.fit_approach3([33e6], [4096], [512], [1e9], [-3.0], min_flops=approaches.PAPER_MIN_FLOPS)


def run_predict(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.vocab_scaling.predict", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_predict_cli_json_and_model_config():
    done = run_predict("--nnv=7e9", "--d=4096", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"nnv", "d", "flops", "approach1", "approach2", "approach3"} <= set(result)
    assert [round(result[f"approach{i}"]["V"] / 1000) for i in (1, 2, 3)] == [62, 67, 60]
    assert result["flops"] == pytest.approx(7.05e21, rel=1e-3)

    from experiments.configs.lm_tiny import get_config
    from lm_core.config import ModelConfig
    from lm_core.flops import param_counts

    model = ModelConfig.from_dict(dict(get_config().model.to_dict()))
    done = run_predict("--model_config=experiments/configs/lm_tiny.py", "--flops=1e15", "--approach=3", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["nnv"] == param_counts(model).non_vocab and result["d"] == model.d_model
    assert result["flops"] == 1e15 and math.isfinite(result["approach3"]["V"])


@pytest.mark.parametrize("flags", [("--nnv=abc",), ("--nnv=-3e9",)])
def test_predict_cli_bad_input_is_one_line_and_exit_2(flags):
    done = run_predict(*flags)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "nnv" in done.stderr
