"""The sweep planner's arithmetic and one end-to-end micro sweep (real tokenizers, real training, fits, report)."""

import math
import pydoc_data.topics

import ml_collections
import pytest

from lm_core.errors import UserError
from vocab_scaling.sweep import ModelGroup, chars_for_budget, isoflop_points, plan_sweep
from vocab_scaling.tokenization_curve import FCurve

FLAT_F = FCurve(0.0, 0.0, 0.25)  # 0.25 tokens per character at every V: easy hand arithmetic


def test_chars_for_budget_hand_value():
    # C = 6 (N_nv + V d) H f  ->  H = 6e9 / (6 * (1000 + 100 * 10) * 0.25) = 2e6
    assert chars_for_budget(6e9, 1000, 100, 10, FLAT_F) == pytest.approx(2e6)


def test_plan_sweep_isoflop_design():
    group = ModelGroup("g", d_model=32, num_layers=1, num_heads=2, d_ff=64)
    n_nv = group.non_vocab_params()
    # one layer: attention 4*32*32 + FFN 3*32*64 + two norms 2*32, plus the final norm 32
    assert n_nv == 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32 + 32
    runs = plan_sweep([group], [256, 512], [1e9, 1e8], FLAT_F, tokens_per_step=100, min_steps=1)
    assert [(r.vocab_size, r.flops_budget) for r in runs] == [(256, 1e8), (256, 1e9), (512, 1e8), (512, 1e9)]
    for run in runs:
        assert 6 * (n_nv + run.vocab_size * 32) * run.chars * 0.25 == pytest.approx(run.flops_budget)
        assert run.tokens == pytest.approx(run.chars * 0.25)
        assert run.steps == round(run.tokens / 100)
    # a larger vocabulary buys fewer tokens at the same budget
    assert runs[0].tokens > runs[2].tokens
    with pytest.raises(UserError, match="reaches 10000 steps"):
        plan_sweep([group], [256], [1e6], FLAT_F, tokens_per_step=100, min_steps=10000)


def test_isoflop_points_convert_characters_to_flops():
    rows = [{"step": 10, "chars": 400.0, "tokens": 100, "eval_loss": 3.0, "eval_unigram_nll": -0.5, "eval_bpc": 2.0},
            {"step": 20, "chars": 800.0, "tokens": 200, "eval_loss": 2.5, "eval_unigram_nll": math.nan}]
    points = isoflop_points(rows, n_nv=1000, vocab_size=100, d=10, f=FLAT_F)
    assert len(points) == 1  # the non-finite evaluation is dropped
    assert points[0]["C"] == pytest.approx(6 * 2000 * 400 * 0.25)
    assert points[0]["L_u"] == -0.5


@pytest.mark.slow
def test_micro_sweep_end_to_end(tmp_path, monkeypatch):
    from experiments.vocab_scaling.runner import run_sweep
    from lm_core.trainer import default_config

    monkeypatch.setenv("LM_CORE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in sorted(pydoc_data.topics.topics.items())[:40]:
        (corpus / f"{name}.txt").write_text(text)
    config = default_config()
    config.data.source = f"files:{corpus}/*.txt"
    config.data.seq_len = 32
    config.data.global_batch_size = 8
    config.log_every = 5
    config.eval_batches = 2
    config.sweep = ml_collections.ConfigDict(dict(
        groups=(("a", 32, 1, 2, 64), ("b", 48, 2, 2, 96)), vocab_sizes=(384, 448, 512), budgets=(3e9,),
        min_steps=5, warmup_fraction=0.1, evals_per_run=2))
    report = run_sweep(config, tmp_path / "sweep")
    text = report.read_text()
    assert "## Fitted constants" in text and "| 512 |" in text
    assert (tmp_path / "sweep" / "isoflop.png").stat().st_size > 0
    rows = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("name,group,N_nv,V") and len(rows) > 6
    # rerunning skips the finished runs and gives the same report
    assert run_sweep(config, tmp_path / "sweep").read_text() == text
